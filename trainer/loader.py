"""The training loader: a ``DataLoader`` over a :class:`~trainer.data.DistillDataset` whose
workers survive the signals that stop a run, and whose iterators are always shut down.

Workers ignore SIGINT/SIGTERM (:func:`~trainer.interrupt.ignore_in_worker`) so that the main
process can write its checkpoint before they go. The price: ``multiprocessing``'s exit hook, and
torch's own fallback in ``_shutdown_workers``, stop workers with SIGTERM and then wait for them, so
a worker left running (its iterator kept alive by a stored exception, a traceback, a global; or
still busy when it was told to stop) would make the process hang at exit. Hence:

- every iterator made by :func:`make_loader`'s loaders is registered, and :func:`shutdown` sends
  its workers their end-of-work marker, joins them and then SIGKILLs any still alive;
- :func:`epoch_batches` shuts its iterator down when the epoch ends or the loop leaves;
- an exit hook, run before ``multiprocessing``'s, shuts down every registered iterator left.
"""

from __future__ import annotations

import atexit
import functools
import os
import sys
import weakref
from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch
from torch.utils.data import DataLoader

from .interrupt import block_stop_signals, ignore_in_worker

_LIVE: "weakref.WeakSet" = weakref.WeakSet()  # iterators whose worker processes may still run


class _TrackedLoader(DataLoader):
    """A ``DataLoader`` whose multi-process iterators are registered for :func:`shutdown`."""

    def _get_iterator(self):
        # the workers fork while this runs: with SIGINT/SIGTERM blocked, a stop request sent to the
        # process group then (an epoch boundary) waits in the parent instead of killing a worker that
        # has not yet reached ignore_in_worker; the workers unblock them once they ignore them
        with block_stop_signals() if self.num_workers else nullcontext():
            it = super()._get_iterator()
        if hasattr(it, "_workers"):
            _LIVE.add(it)
        return it


def make_loader(ds, workers: int, pin: bool, seed: int = 0) -> DataLoader:
    """A loader with its own generator: by default ``iter(DataLoader)`` draws the workers' base seed
    from the global torch RNG, which would shift dropout masks after a resume (the checkpoint
    restores the RNG at a step, not at the start of the epoch's iterator)."""
    return _TrackedLoader(ds, batch_size=None, num_workers=workers, pin_memory=pin, prefetch_factor=4 if workers else None,
                          generator=torch.Generator().manual_seed(seed),
                          worker_init_fn=functools.partial(ignore_in_worker, parent=os.getpid()) if workers else None)


@contextmanager
def epoch_batches(loader: DataLoader) -> Iterator[Iterator]:
    """``with epoch_batches(loader) as it:`` an iterator over one epoch, whose workers are shut
    down when the block ends, normally or by an exception."""
    stop = shutdown  # bound now: at interpreter teardown the module's globals may already be gone
    it = iter(loader)
    try:
        yield it
    finally:
        stop(it)


def shutdown(it) -> None:
    """Stop the worker processes of a loader iterator (a no-op for single-process iterators).
    ``_shutdown_workers`` (what the iterator's own ``__del__`` calls) sends each worker its
    end-of-work marker and joins it for a few seconds; a worker still alive after that (busy, stuck
    in I/O, or the shutdown interrupted by a second signal) is killed, since it ignores SIGTERM."""
    try:
        stop = getattr(it, "_shutdown_workers", None)
        if stop is not None:
            stop()
    finally:
        for w in getattr(it, "_workers", None) or []:
            if w.is_alive():
                w.kill()
                w.join(5)
        _LIVE.discard(it)


@atexit.register  # registered after multiprocessing's (imported above, with torch): runs before it
def _shutdown_live() -> None:
    for it in list(_LIVE):
        try:
            shutdown(it)
        except Exception as e:  # keep stopping the others; say what went wrong
            print(f"trainer: could not stop data loader workers at exit: {e}", file=sys.stderr)


def worker_message(e: Exception) -> str:
    """The original message of an error re-raised by a DataLoader worker (the last traceback line)."""
    text = str(e)
    if "Original Traceback" not in text:
        return text
    last = [ln for ln in text.strip().splitlines() if ln.strip()][-1]
    return last.split(": ", 1)[1] if ": " in last and last.split(": ", 1)[0].endswith("Error") else last
