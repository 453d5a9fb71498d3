"""Fetching a part's files: each read as a regular file of exactly the size the manifest records,
and checked against its sha256 before any parser sees it; through the local read-through cache
(:mod:`~logitstore.storage.cache`) and the prefetcher (:mod:`~logitstore.storage.prefetch`)."""

from __future__ import annotations

import hashlib
from typing import Callable

from logitstore.errors import FormatError
from logitstore.storage.cache import FileCache
from logitstore.storage.fsio import StoreFS
from logitstore.storage.prefetch import Prefetcher

#: ``(shard, part) -> (path of the part inside the store, {relative path: {"bytes", "sha256"}})``
FileList = Callable[[tuple[int, str]], tuple[str, dict[str, dict]]]


class PartFetcher:
    """``fetch((shard, part))`` returns ``{relative path: bytes}``, checked; ``prefetch(keys)``
    fetches ahead on threads. With a cache, checksums are always checked (the cache is keyed by
    them); without, ``verify_checksums=False`` skips the check (sizes are still enforced)."""

    def __init__(self, fs: StoreFS, files_of: FileList, *, verify_checksums: bool = True, cache_dir: str | None = None):
        self.fs = fs
        self.files_of = files_of
        self.verify_checksums = verify_checksums
        self.file_cache = FileCache(cache_dir) if cache_dir else None
        self._prefetcher: Prefetcher | None = None

    def get(self, key: tuple[int, str]) -> dict[str, bytes]:
        """The files of part ``key``, from the prefetcher if it holds them."""
        if self._prefetcher is not None:
            got = self._prefetcher.take(key)
            if got is not None:
                return got
        return self.fetch(key)

    def fetch(self, key: tuple[int, str]) -> dict[str, bytes]:
        base, files = self.files_of(key)
        out = {}
        for rel, meta in files.items():
            out[rel] = self.read_file(f"{base}/{rel}", meta)
        return out

    def read_file(self, where: str, meta: dict) -> bytes:
        """The file at ``where`` (inside the store), exactly ``meta["bytes"]`` long and, where
        checksums are checked, matching ``meta["sha256"]``; through the local cache if there is one."""
        cache = self.file_cache
        if cache is not None:
            data = cache.get(meta["sha256"], meta["bytes"], verify=self.verify_checksums)
            if data is not None:
                return data
        data = self.fs.read(where, size=meta["bytes"])  # a regular file of exactly that size, or refused
        if (self.verify_checksums or cache is not None) and hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise FormatError(f"{where}: sha256 mismatch (file is corrupt)")
        if cache is not None:
            cache.put(meta["sha256"], data)
        return data

    def prefetch(self, keys: list[tuple[int, str]], depth: int) -> None:
        """Fetch ``keys`` in that order ahead of :meth:`get`, ``depth`` in flight; replaces any
        earlier plan; ``depth <= 0`` stops prefetching."""
        self.close()
        if depth > 0:
            self._prefetcher = Prefetcher(self.fetch, keys, depth)

    def close(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None
