"""logitstore: run teachers once, store their sparse distributions, distil from the cache.

    import logitstore
    store = logitstore.open("cache/")           # local path or fsspec URL
    seq = store[0]                              # {"input_ids": [n], "teachers": {name: {...}}}
    for batch in store.iter_batches(8): ...
"""

from logitstore.version import __version__  # noqa: E402
from logitstore.errors import ConfigError, FormatError, LogitStoreError  # noqa: E402
from logitstore.format.reader import Store  # noqa: E402
from logitstore.moved import install as _install_moved  # noqa: E402

_install_moved()  # logitstore.dump and the flat module names of earlier versions (logitstore/moved.py)


def open(url: str, **kwargs) -> Store:  # noqa: A001 - mirrors zarr.open / fsspec.open
    """Open a store for reading. ``verify_checksums=False`` skips sha256 checks; ``follow=True`` also
    opens a store still being written, as the shards committed so far (``Store.refresh``)."""
    return Store(str(url), **kwargs)


__all__ = ["open", "Store", "LogitStoreError", "FormatError", "ConfigError", "__version__"]
