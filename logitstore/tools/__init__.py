"""The store tools: what can be done with stores once written, each an importable function behind
a ``logitstore`` subcommand.

``merge`` (concatenate stores), ``fuse`` (several teachers into one), ``convert`` (another backend
or encoding), ``export`` (Parquet for other trainers), ``verify``, ``info`` / ``ls`` and ``stats``;
:mod:`~logitstore.tools.derive` holds what the store-making tools share (jobs per shard, the
commit protocol applied to derived stores).
"""
