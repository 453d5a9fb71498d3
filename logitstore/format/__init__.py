"""The on-disk format: the public contract specified in ``FORMAT.md`` (in this folder, shipped with
the package) and everything that reads or writes it.

- :mod:`~logitstore.format.manifest`: the manifest schema, its version and validators;
- :mod:`~logitstore.format.layout`: names of shards, parts and commit records;
- :mod:`~logitstore.format.codec`: value encodings (``lossless``, ``compact``) and their bounds;
- :mod:`~logitstore.format.hashing`: content hashes and fingerprints recorded in a store;
- :mod:`~logitstore.format.backends`: the zarr v3 and Arrow/Parquet containers of a part;
- reading: :mod:`~logitstore.format.opening` (manifest), :mod:`~logitstore.format.index` (shard
  index and array specs), :mod:`~logitstore.format.decode` (parts to arrays),
  :mod:`~logitstore.format.reader` (``Store``);
- writing: :mod:`~logitstore.format.writer` (parts), :mod:`~logitstore.format.commit` (plan first,
  manifest last).

The reading side never imports the writing side. Bytes move through :mod:`logitstore.storage`.
"""
