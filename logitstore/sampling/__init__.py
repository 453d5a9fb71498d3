"""Epoch plans for rank-local reading: which (rank, worker) reads which sequences, in which order.

Pure numpy, no I/O. :class:`EpochPlan` is a deterministic function of ``(seed, epoch, n_streams)``
and the store's shard sizes; a :class:`Layout` (ranks, loader workers, batch size) only decides who
reads what, so a run can resume exactly on another layout from the position vector that
:meth:`EpochPlan.advance` returns. The algorithm is described in :mod:`logitstore.sampling.plan`.
"""

from logitstore.sampling.plan import EpochPlan, Layout

__all__ = ["EpochPlan", "Layout"]
