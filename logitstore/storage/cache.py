"""A local read-through cache of a remote store's files, addressed by their sha256.

``Store(url, cache_dir=DIR)`` keeps every file it fetches under ``DIR/sha256/ab/abcdef...`` (named
by the checksum the manifest gives for it). A later read, in this run or another, takes the file
from there after checking its size and (with checksums on) its sha256 against the manifest; a file
that fails is fetched again and replaced. Files are written under a temporary name and renamed, so
concurrent readers (ranks, workers) never see a half-written one. Stores that share files (a merged
store and its inputs) share cache entries. Nothing is ever evicted: delete the directory to free it.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

from logitstore.errors import FormatError, StorageError
from logitstore.storage.fsio import read_regular_file


class FileCache:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser()
        self.hits = 0
        self.misses = 0

    def _path(self, sha256: str) -> Path:
        return self.root / "sha256" / sha256[:2] / sha256

    def get(self, sha256: str, size: int, verify: bool = True) -> bytes | None:
        """The cached bytes of a file with this checksum and size, or None (absent or damaged)."""
        p = self._path(sha256)
        try:  # a regular file of exactly ``size`` bytes, read boundedly (never a FIFO or a device)
            data = read_regular_file(p, size, size)
        except (OSError, FormatError):
            return None
        if verify and hashlib.sha256(data).hexdigest() != sha256:
            return None
        self.hits += 1
        return data

    def put(self, sha256: str, data: bytes) -> None:
        self.misses += 1
        p = self._path(sha256)
        tmp = p.with_name(f".tmp-{p.name}-{uuid.uuid4().hex[:8]}")
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            os.replace(tmp, p)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise StorageError(f"--cache-dir {self.root}: write failed ({e.strerror or e})") from e
