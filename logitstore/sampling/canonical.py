"""The canonical sequence list of one epoch, computed piecewise, and the per-stream mixing shuffle.

The canonical list ``Q`` (see :mod:`logitstore.sampling.plan`) is never built whole:
:meth:`CanonicalOrder.take` returns ``Q[lo:hi]`` by decoding only the shards that overlap the range.
Memory is O(n_shards + len(excluded)) for the order itself, plus the requested range and the shards
it touches.
"""

from __future__ import annotations

import numpy as np

from logitstore.errors import ConfigError

_EMPTY = np.zeros(0, dtype=np.int64)


def as_index_array(values, what: str) -> np.ndarray:
    """``values`` as a 1-D int64 array; :class:`ConfigError` if not 1-D integers."""
    arr = np.asarray(values)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ConfigError(f"{what} must be a 1-D array of integers, got shape {arr.shape} dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def check_int(value, what: str, low: int) -> int:
    """``value`` as an int >= ``low``; :class:`ConfigError` otherwise (bools are refused)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < low:
        raise ConfigError(f"{what} must be an integer >= {low}, got {value!r}")
    return int(value)


class CanonicalOrder:
    """The canonical order ``Q`` of one epoch over shards that tile ``[0, n)``.

    ``sizes`` [n_shards] int64; ``starts`` [n_shards] int64 (default: the exclusive cumulative sum
    of ``sizes``, and any given value must equal it); ``excluded``: global indices left out.
    """

    def __init__(self, sizes, starts, seed: int, epoch: int, shuffle: bool, excluded) -> None:
        self.sizes = as_index_array(sizes, "sizes")
        if (self.sizes < 0).any():
            raise ConfigError("sizes must be >= 0 (sequences per shard)")
        tiled = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64) if self.sizes.size else _EMPTY
        self.starts = tiled if starts is None else as_index_array(starts, "starts")
        if self.starts.shape != tiled.shape or not np.array_equal(self.starts, tiled):
            raise ConfigError("starts must tile [0, n) in shard order: starts[0] = 0, starts[j+1] = starts[j] + sizes[j]")
        self.n_total = int(self.sizes.sum())
        self.seed, self.epoch, self.shuffle = seed, epoch, bool(shuffle)
        excl = as_index_array([] if excluded is None else excluded, "excluded")
        if excl.size > 1 and not (excl[1:] > excl[:-1]).all():  # sort and drop duplicates
            excl = np.sort(excl)
            excl = excl[np.concatenate([[True], excl[1:] != excl[:-1]])]
        if excl.size and (excl[0] < 0 or excl[-1] >= self.n_total):
            raise ConfigError(f"excluded must hold sequence indices in [0, {self.n_total}), got {excl[0]}..{excl[-1]}")
        self.excluded = excl
        n_shards = self.sizes.size
        # side="right" - 1 skips empty shards that share a start with the owning shard
        owner = np.searchsorted(self.starts, excl, side="right") - 1
        self.kept = self.sizes - np.bincount(owner, minlength=n_shards).astype(np.int64)
        if self.shuffle:
            self.order = np.random.default_rng([seed, epoch]).permutation(n_shards).astype(np.int64)
        else:
            self.order = np.arange(n_shards, dtype=np.int64)
        # cum[i]: position in Q of the first row of the i-th shard in shard order
        self.cum = np.concatenate([[0], np.cumsum(self.kept[self.order])]).astype(np.int64)
        self.n = int(self.cum[-1])

    def rows(self, j: int) -> np.ndarray:
        """Kept global indices of shard ``j`` in canonical order, [kept[j]] int64."""
        s0, size = int(self.starts[j]), int(self.sizes[j])
        if self.shuffle:
            local = np.random.default_rng([self.seed, self.epoch, 1, j]).permutation(size).astype(np.int64)
        else:
            local = np.arange(size, dtype=np.int64)
        e0, e1 = np.searchsorted(self.excluded, [s0, s0 + size])
        if e1 > e0:
            keep = np.ones(size, dtype=bool)
            keep[self.excluded[e0:e1] - s0] = False
            local = local[keep[local]]
        return local + s0

    def take(self, lo: int, hi: int) -> np.ndarray:
        """``Q[lo:hi]`` [hi - lo] int64, decoding only the shards that overlap it."""
        if hi <= lo:
            return _EMPTY.copy()
        i0 = int(np.searchsorted(self.cum, lo, side="right")) - 1
        i1 = int(np.searchsorted(self.cum, hi, side="left"))
        parts = []
        for i in range(i0, i1):
            a, b = int(self.cum[i]), int(self.cum[i + 1])
            if b > a:
                parts.append(self.rows(int(self.order[i]))[max(lo - a, 0):min(hi, b) - a])
        return np.concatenate(parts)


def mix_order(length: int, mix: int, rng: np.random.Generator) -> np.ndarray:
    """Bounded-displacement permutation [length] int64: every element moves fewer than ``mix`` places.

    Element ``i`` gets the key ``i + u``, ``u ~ U[0, mix)``; sorting by key can move it past at most
    ``mix - 1`` neighbours on either side (all ``j <= i - mix`` stay before it, all ``j >= i + mix``
    after it).
    """
    jitter = rng.uniform(0.0, float(mix), length)
    return np.argsort(np.arange(length, dtype=np.float64) + jitter, kind="stable").astype(np.int64)
