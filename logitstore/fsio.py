"""File access for a store root given as a local path or an fsspec URL."""

from __future__ import annotations

import os
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .errors import FormatError, StorageError


class StoreFS:
    """Paths relative to a store root, on any fsspec filesystem."""

    def __init__(self, url: str):
        self.url = str(url)
        self._fs, self.root = fsspec.core.url_to_fs(self.url)
        self._pid = os.getpid()
        #: a local filesystem renames atomically; an object store has no rename, but each object
        #: PUT is atomic (all or nothing), so there files are written in place
        self.renames = isinstance(self.fs, LocalFileSystem)

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        """The filesystem, made afresh in a forked child (data-loader workers): async filesystems
        such as s3fs hold an event loop that does not survive a fork."""
        if self._pid != os.getpid():
            self._fs, _ = fsspec.core.url_to_fs(self.url)
            self._pid = os.getpid()
        return self._fs

    def path(self, rel: str) -> str:
        return f"{self.root.rstrip('/')}/{rel}" if rel else self.root

    def exists(self, rel: str = "") -> bool:
        return self.fs.exists(self.path(rel))

    def read(self, rel: str, max_bytes: int | None = None) -> bytes:
        p = self.path(rel)
        try:
            if max_bytes is not None and self.fs.size(p) > max_bytes:
                raise FormatError(f"{rel}: larger than the {max_bytes} bytes allowed")
            return self.fs.cat_file(p)
        except FileNotFoundError:
            raise FormatError(f"{rel}: missing") from None

    def _failed(self, what: str, rel: str, e: OSError) -> StorageError:
        reason = e.strerror or str(e) or type(e).__name__
        return StorageError(f"{self.path(rel)}: {what} failed ({reason})")

    def write(self, rel: str, data: bytes) -> None:
        p = self.path(rel)
        try:
            self.fs.makedirs(p.rsplit("/", 1)[0], exist_ok=True)
            self.fs.pipe_file(p, data)
        except OSError as e:  # disk full, permission denied, a remote store's error...
            raise self._failed("write", rel, e) from e

    def write_atomic(self, rel: str, data: bytes) -> None:
        """Readers see all of ``rel`` or nothing: written under a temporary name beside it and renamed
        on a local filesystem; a single PUT on an object store."""
        if not self.renames:
            self.write(rel, data)
            return
        head, _, name = rel.rpartition("/")
        tmp = f"{head}/.tmp-{name}-{uuid.uuid4().hex[:8]}" if head else f".tmp-{name}-{uuid.uuid4().hex[:8]}"
        self.write(tmp, data)
        self.mv(tmp, rel)

    def rm(self, rel: str) -> None:
        try:
            if self.exists(rel):
                self.fs.rm(self.path(rel), recursive=True)
        except OSError as e:
            raise self._failed("remove", rel, e) from e

    def mv(self, src: str, dst: str) -> None:
        """Rename a file or directory (on an object store: copy each object, then delete the source)."""
        try:
            if self.renames:
                self.fs.mv(self.path(src), self.path(dst), recursive=True)
                return
            base = self.path(src).rstrip("/")
            files = self.fs.find(base) if self.fs.isdir(base) else [base]
            for f in files:
                self.fs.copy(f, self.path(dst).rstrip("/") + f[len(base):])
            self.fs.rm(base, recursive=True)
        except OSError as e:
            raise self._failed(f"rename to {dst}", src, e) from e

    def ls(self, rel: str) -> list[str]:
        """Names directly under ``rel`` (empty if it does not exist)."""
        if not self.exists(rel):
            return []
        base = self.path(rel).rstrip("/")
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(base, detail=False) if p.rstrip("/") != base)
