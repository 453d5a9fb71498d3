"""File access for a store root given as a local path or an fsspec URL."""

from __future__ import annotations

import uuid

import fsspec

from .errors import FormatError, StorageError


class StoreFS:
    """Paths relative to a store root, on any fsspec filesystem."""

    def __init__(self, url: str):
        self.url = str(url)
        self.fs, self.root = fsspec.core.url_to_fs(self.url)

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
        """Write to a temporary name beside ``rel``, then rename: readers see all of it or nothing."""
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
        try:
            self.fs.mv(self.path(src), self.path(dst), recursive=True)
        except OSError as e:
            raise self._failed(f"rename to {dst}", src, e) from e

    def ls(self, rel: str) -> list[str]:
        """Names directly under ``rel`` (empty if it does not exist)."""
        if not self.exists(rel):
            return []
        base = self.path(rel).rstrip("/")
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(base, detail=False) if p.rstrip("/") != base)
