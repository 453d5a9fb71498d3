"""Stopping a run cleanly on SIGINT (Ctrl-C) or SIGTERM (schedulers, ``torchrun`` shutting down).

The handler only records the request; the loop finishes the optimizer step it is in, agrees with
the other ranks that a stop was requested (any rank's request stops all of them at the same step),
writes a checkpoint and raises :class:`Interrupted`, which the CLI turns into one line and the
conventional exit code (130 for SIGINT, 143 for SIGTERM). A second signal while the checkpoint is
being written falls through to the default behaviour (the process dies; the previous checkpoint
stays complete: checkpoints are renamed into place only when whole).
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager


class Interrupted(Exception):
    """The run stopped at ``step`` because of ``signum``; a checkpoint of that step was written."""

    def __init__(self, step: int, signum: int, checkpoint: str):
        self.step, self.signum, self.checkpoint = step, signum, checkpoint
        name = signal.Signals(signum).name
        super().__init__(f"interrupted by {name} at step {step}; checkpoint {checkpoint} written; "
                         f"re-run the same command with --resume to continue")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopRequests:
    """Context manager: while active, SIGINT/SIGTERM set :attr:`signum` instead of killing the
    process (only in the main thread; elsewhere it does nothing)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # a second signal: give up on the clean stop
            signal.signal(signum, self._previous.get(signum) or signal.SIG_DFL)
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()


def ignore_in_worker(_worker_id: int, parent: int | None = None) -> None:
    """``DataLoader(worker_init_fn=...)``: stop requests are the main process's to handle (it stops
    at a step boundary and shuts the workers down itself), so a worker leaves its rank's process
    group and ignores SIGINT and SIGTERM. Otherwise ``torchrun``'s shutdown (``killpg(SIGTERM)`` of
    each rank's group), SLURM's ``scancel`` (every process of the step) or Ctrl-C would kill the
    workers first, and the main process would die on "DataLoader worker ... killed by signal"
    before it could write its checkpoint. Workers still exit when the main process does: it shuts
    them down (:mod:`trainer.loader`); if it dies first (SIGKILL, the OOM killer), Linux kills them
    (``PR_SET_PDEATHSIG``), even one blocked where torch's watchdog cannot see the parent gone.
    ``parent``: the main process's pid, taken before the fork (``functools.partial``), so that a
    parent that died before this runs is noticed."""
    import os

    try:
        os.setpgid(0, 0)
    except OSError:  # not permitted (e.g. already a group leader): the ignored signals still hold
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, StopRequests.SIGNALS)  # blocked by the parent across the fork
    _die_with_parent(parent)


@contextmanager
def block_stop_signals():
    """SIGINT and SIGTERM held back (not lost: delivered when the block ends) in this thread while
    it starts worker processes, which inherit the mask until they ignore the signals."""
    signal.pthread_sigmask(signal.SIG_BLOCK, StopRequests.SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, StopRequests.SIGNALS)


def _die_with_parent(parent: int | None = None) -> None:
    """Ask Linux to SIGKILL this process when its parent dies; elsewhere nothing (the watchdog of
    torch's worker loop remains). If the parent (``parent``, or else the current parent) is
    already gone once the request is in place, exit at once."""
    import ctypes
    import ctypes.util
    import os
    import sys

    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    PR_SET_PDEATHSIG = 1
    parent = os.getppid() if parent is None else parent
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)
