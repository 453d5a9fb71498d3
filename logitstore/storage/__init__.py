"""Transport: where a store's bytes live and how they move, independent of what they mean.

- :mod:`~logitstore.storage.fsio`: every path and fsspec URL (local, ``s3://``, ``memory://``), atomic
  writes, bounded reads of regular files only;
- :mod:`~logitstore.storage.fetch`: a part's files fetched, size- and sha256-checked against the
  manifest, through the read-through cache and the prefetcher;
- :mod:`~logitstore.storage.cache`: the local read-through cache keyed by sha256;
- :mod:`~logitstore.storage.prefetch`: fetching ahead on threads;
- :mod:`~logitstore.storage.lock`: the writer's lock file.
"""
