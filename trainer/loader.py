"""The training loader: a ``DataLoader`` over a :class:`~trainer.data.DistillDataset` whose
workers survive the signals that stop a run, and whose iterators are always shut down.

Workers ignore SIGINT/SIGTERM (:func:`~trainer.interrupt.ignore_in_worker`) so that the main
process can write its checkpoint before they go. The price: ``multiprocessing``'s exit hook stops
daemonic children with SIGTERM and then waits for them, so a worker whose iterator was never shut
down (the iterator kept alive by a stored exception, a traceback, a global) would make the process
hang at exit. Hence every iterator made here is shut down when its epoch ends or the loop leaves
(:func:`epoch_batches`), and an exit hook, run before ``multiprocessing``'s, shuts down any that
are still alive.
"""

from __future__ import annotations

import atexit
import weakref
from contextlib import contextmanager
from typing import Iterator

import torch
from torch.utils.data import DataLoader

from .interrupt import ignore_in_worker

_LIVE: "weakref.WeakSet" = weakref.WeakSet()  # iterators with worker processes not yet shut down


def make_loader(ds, workers: int, pin: bool, seed: int = 0) -> DataLoader:
    """A loader with its own generator: by default ``iter(DataLoader)`` draws the workers' base seed
    from the global torch RNG, which would shift dropout masks after a resume (the checkpoint
    restores the RNG at a step, not at the start of the epoch's iterator)."""
    return DataLoader(ds, batch_size=None, num_workers=workers, pin_memory=pin, prefetch_factor=4 if workers else None,
                      generator=torch.Generator().manual_seed(seed), worker_init_fn=ignore_in_worker if workers else None)


@contextmanager
def epoch_batches(loader: DataLoader) -> Iterator[Iterator]:
    """``with epoch_batches(loader) as it:`` an iterator over one epoch, whose workers are shut
    down when the block ends, normally or by an exception."""
    it = iter(loader)
    if hasattr(it, "_shutdown_workers"):
        _LIVE.add(it)
    try:
        yield it
    finally:
        shutdown(it)


def shutdown(it) -> None:
    """Stop the worker processes of a loader iterator (a no-op for single-process iterators).
    ``_shutdown_workers`` is what the iterator's own ``__del__`` calls: it sends each worker its
    end-of-work marker and joins it, which works although workers ignore SIGTERM."""
    _LIVE.discard(it)
    stop = getattr(it, "_shutdown_workers", None)
    if stop is not None:
        stop()


@atexit.register  # registered after multiprocessing's (imported above, with torch): runs before it
def _shutdown_live() -> None:
    for it in list(_LIVE):
        shutdown(it)
