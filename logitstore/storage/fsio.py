"""File access for a store root given as a local path or an fsspec URL."""

from __future__ import annotations

import os
import stat
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem

from logitstore.errors import FormatError, StorageError


#: the most :meth:`StoreFS.read` returns when the caller gives no bound (JSON records, the manifest)
MAX_READ_BYTES = 256 << 20


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def read_regular_file(path: str | os.PathLike, limit: int, size: int | None = None, name: str | None = None) -> bytes:
    """The bytes of the local regular file ``path`` (``name`` in messages): refused without reading
    if it is not a regular file (a FIFO, a device, a socket; symlinks are followed), if it is larger
    than ``limit`` or, given ``size``, of another size; at most ``stat`` size + 1 bytes are read."""
    name = str(path) if name is None else name
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise FormatError(f"{name}: {_kind(st.st_mode)}, expected a regular file; refused")
    # O_NONBLOCK: should the path be swapped for a FIFO after the check, open() does not block;
    # the fstat below then refuses what was actually opened
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    with open(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FormatError(f"{name}: {_kind(st.st_mode)}, expected a regular file; refused")
        if size is not None and st.st_size != size:
            raise FormatError(f"{name}: {st.st_size} bytes, manifest says {size}")
        if st.st_size > limit:
            raise FormatError(f"{name}: larger than the {limit} bytes allowed")
        return f.read(st.st_size + 1)  # one byte more than stat said: a file that grew is refused


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

    def read(self, rel: str, max_bytes: int | None = None, *, size: int | None = None) -> bytes:
        """The bytes of the regular file ``rel``, read boundedly: at most ``size + 1`` bytes when the
        manifest declares its ``size`` (refused unless exactly ``size`` came back), else at most
        ``max_bytes + 1`` (default :data:`MAX_READ_BYTES`; refused if more came back).

        On a local filesystem only a regular file whose real path (symlinks resolved) lies inside the
        real store root is read: a symlink to a regular file inside the store is followed, a
        symlink that leads outside it, a FIFO, a device or a socket is refused without being read
        (a FIFO is never opened for blocking). Elsewhere (fsspec) the object must be a ``file`` of
        the right size, and the read is a range request of ``limit + 1`` bytes."""
        limit = size if size is not None else (MAX_READ_BYTES if max_bytes is None else max_bytes)
        try:
            data = self._read_local(rel, limit, size) if self.renames else self._read_remote(rel, limit, size)
        except FileNotFoundError:
            raise FormatError(f"{rel}: missing") from None
        except IsADirectoryError:
            raise FormatError(f"{rel}: a directory, expected a regular file; refused") from None
        except OSError as e:  # permission denied, a path through a file, a remote error...
            raise FormatError(f"{rel}: cannot be read ({e.strerror or str(e) or type(e).__name__})") from None
        if size is not None and len(data) != size:
            raise FormatError(f"{rel}: {len(data)} bytes, manifest says {size}")
        if len(data) > limit:
            raise FormatError(f"{rel}: larger than the {limit} bytes allowed")
        return data

    def _read_local(self, rel: str, limit: int, size: int | None) -> bytes:
        root = os.path.realpath(self.root)
        real = os.path.realpath(self.path(rel))
        mode = os.stat(real).st_mode  # only stat: nothing outside the root is opened
        if not stat.S_ISREG(mode):
            link = f" (a link to {real})" if os.path.islink(self.path(rel)) else ""
            raise FormatError(f"{rel}: {_kind(mode)}{link}, expected a regular file; refused")
        if os.path.commonpath([root, real]) != root:
            raise FormatError(f"{rel}: resolves to {real}, outside the store root {root}; refused")
        return read_regular_file(real, limit, size, rel)

    def _read_remote(self, rel: str, limit: int, size: int | None) -> bytes:
        p = self.path(rel)
        info = self.fs.info(p)
        if info.get("type", "file") != "file":
            raise FormatError(f"{rel}: a {info.get('type')}, expected a file; refused")
        have = info.get("size")
        if have is not None:
            if size is not None and have != size:
                raise FormatError(f"{rel}: {have} bytes, manifest says {size}")
            if have > limit:
                raise FormatError(f"{rel}: larger than the {limit} bytes allowed")
            if have == 0:
                return b""  # nothing to read (and a range request on an empty object is an error)
        return self.fs.cat_file(p, start=0, end=limit + 1)

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
