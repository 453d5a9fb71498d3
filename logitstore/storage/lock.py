"""A lock file in a store being written, so that two writers never work on one ``--out`` at once.

``STORE/lock.json`` holds ``{"op", "host", "pid", "token", "started", "refreshed"}`` (times in
seconds since the epoch). The writer (``dump``'s rank 0, ``merge``, ``fuse``, ``convert``) creates
it before it writes the plan, rewrites ``refreshed`` every :data:`REFRESH_SECONDS` while it runs
and removes it when it is done, fails or is interrupted. Another writer refuses the store while
the lock is live. A lock is stale, and is taken over, when

- it was written on this host by a process that no longer exists (a crash or ``kill -9``), or
- it has not been refreshed for :data:`STALE_SECONDS` (a writer on another host that died).

On a local filesystem the lock is created atomically (``O_CREAT | O_EXCL``). Object stores have no
create-if-absent, so there it is best effort: the lock is written, read back, and the writer
refuses if it finds another's token; two writers starting within the same second can both win.
Readers ignore the file (it is not in the manifest); ``ls`` shows a locked unfinished store as
"in progress".
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager

from logitstore.errors import ConfigError, LogitStoreError
from logitstore.storage.fsio import StoreFS

LOCK = "lock.json"
#: tokens of the locks this process holds now
_HELD: set[str] = set()
REFRESH_SECONDS = 30.0
STALE_SECONDS = 600.0


def read_lock(fs: StoreFS) -> dict | None:
    """The lock record in ``fs``'s store, or None (absent or unreadable)."""
    try:
        if not fs.exists(LOCK):
            return None
        rec = json.loads(fs.read(LOCK, 1 << 16))
    except Exception:  # a half-written or damaged lock is no lock
        return None
    return rec if isinstance(rec, dict) else None


def lock_is_live(rec: dict, now: float | None = None) -> bool:
    """Whether the writer that holds ``rec`` may still be running (see the module docstring)."""
    now = time.time() if now is None else now
    pid = rec.get("pid")
    if rec.get("host") == socket.gethostname() and isinstance(pid, int) and pid > 0:
        # on this host the process table is the answer, whatever the clock says: a writer
        # suspended for longer than STALE_SECONDS (Ctrl-Z) still holds the store, and a lock
        # naming this very process but none of its tokens is left over from a container that
        # restarted with our pid
        if pid == os.getpid():
            return rec.get("token") in _HELD
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except OSError:  # exists, owned by someone else
            return True
        return True
    refreshed = rec.get("refreshed")
    return isinstance(refreshed, (int, float)) and now - refreshed <= STALE_SECONDS


def describe(rec: dict, now: float | None = None) -> str:
    now = time.time() if now is None else now
    started = rec.get("started")
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    age = now - rec["refreshed"] if isinstance(rec.get("refreshed"), (int, float)) else float("nan")
    return f"{rec.get('op', 'a writer')} on host {rec.get('host')}, pid {rec.get('pid')}, since {since}, lock refreshed {age:.0f}s ago"


class StoreLock:
    def __init__(self, fs: StoreFS, out: str, op: str):
        self.fs, self.out, self.op = fs, out, op
        self.token = uuid.uuid4().hex
        self.started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        return json.dumps({"op": self.op, "host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                           "started": self.started, "refreshed": time.time()}).encode()

    def _refuse(self, rec: dict) -> ConfigError:
        return ConfigError(f"--out {self.out}: another {describe(rec)} is writing this store; wait for it to finish "
                           f"(if it is dead, remove {self.out}/{LOCK})")

    def acquire(self) -> "StoreLock":
        rec = read_lock(self.fs)
        if rec is not None:
            if lock_is_live(rec):
                raise self._refuse(rec)
            again = read_lock(self.fs)  # stale: its writer is gone; take it over, unless another writer just did
            if again is not None and again.get("token") != rec.get("token"):
                raise self._refuse(again)
            self.fs.rm(LOCK)
        if self.fs.renames:  # a local filesystem
            path = self.fs.path(LOCK)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:  # another writer won the race since we looked
                raise self._refuse(read_lock(self.fs) or {}) from None
            with os.fdopen(fd, "wb") as f:
                f.write(self._record())
        else:  # object store: no create-if-absent; write and read back (best effort)
            self.fs.write(LOCK, self._record())
            back = read_lock(self.fs)
            if back is not None and back.get("token") != self.token:
                raise self._refuse(back)
        _HELD.add(self.token)
        self._thread = threading.Thread(target=self._refresh, name="logitstore-lock", daemon=True)
        self._thread.start()
        return self

    def _refresh(self) -> None:
        while not self._stop.wait(REFRESH_SECONDS):
            try:
                rec = read_lock(self.fs)
                if rec is not None and rec.get("token") != self.token:
                    return  # taken over (we were thought dead): leave it to the new owner
                self.fs.write_atomic(LOCK, self._record())
            except (OSError, LogitStoreError):  # retried at the next refresh; the writer reports its own storage errors
                continue

    def release(self) -> None:
        self._stop.set()
        _HELD.discard(self.token)
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            rec = read_lock(self.fs)
            if rec is not None and rec.get("token") == self.token:
                self.fs.rm(LOCK)
        except (OSError, LogitStoreError):  # a lock left behind is stale once this process has exited
            return


@contextmanager
def store_lock(fs: StoreFS, out: str, op: str, enabled: bool = True):
    """Hold the lock of the store at ``fs`` for the body (nothing if not ``enabled``)."""
    if not enabled:
        yield None
        return
    lock = StoreLock(fs, out, op).acquire()
    try:
        yield lock
    finally:
        lock.release()
