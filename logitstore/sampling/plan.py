"""Deterministic, elastic epoch plans: which sequences each (rank, worker) reads, in which order.

A store holds ``n`` sequences in shards; shard ``j`` holds the global indices
``[starts[j], starts[j] + sizes[j])`` and the shards tile ``[0, n)`` in order. Training runs on ``W``
ranks with ``nw`` DataLoader workers each (a loader without workers counts as ``nw = 1``) and ``B``
sequences per rank and batch. Each (rank, worker) pair is a *slot*. A plan gives each slot only
sequences from a few neighbouring shards, so a slot decodes each of its shards once per epoch and a
rank touches about ``1/W`` of the store. The order is a pure function of
``(seed, epoch, n_streams)``; the hardware layout only decides who reads what.

Algorithm
---------
1. *Canonical list Q* (length ``N`` = ``n`` minus ``excluded``). With ``shuffle``, the shard order
   is ``default_rng([seed, epoch]).permutation(n_shards)`` and shard ``j``'s rows are
   ``starts[j] + default_rng([seed, epoch, 1, j]).permutation(sizes[j])``; without, both are the
   identity. Excluded sequences are dropped and ``Q`` is the concatenation in shard order. ``Q`` is
   never built whole: per-shard kept counts (``excluded`` bincounted by shard), cumulated in shard
   order, locate any range ``Q[lo:hi]`` by binary search, and only the shards overlapping it are
   decoded (:class:`~logitstore.sampling.canonical.CanonicalOrder`).
2. *Streams*. ``Q`` is cut into ``C = n_streams`` contiguous blocks; block ``c`` has
   ``N // C + (c < N % C)`` elements. With ``shuffle`` and ``mix > 1`` each block is then mixed by
   ``argsort(arange(len) + default_rng([seed, epoch, 2, c]).uniform(0, mix, len))``: every element
   moves fewer than ``mix`` places, so ``mix`` acts as a shuffle buffer across the block's shard
   boundaries without widening the set of shards it reads.
3. *Slots*. Stream ``c`` belongs to rank ``c % W``, worker ``(c // W) % nw``; neighbouring streams,
   which may share a boundary shard, go to different ranks. ``C >= W * nw`` is required; ``C`` need
   not be a multiple of ``W * nw``.
4. *Batches*. Element ``p`` of stream ``c`` has the canonical key ``p * C + c``. A slot emits the
   elements of its streams with ``p >= pos[c]`` (``pos``: the resume vector, zeros at epoch start)
   sorted by key, cut into batches of ``B``. Every slot gets ``K`` batches, ``K`` = the maximum over
   all slots of ``ceil(remaining / B)``; missing rows are fillers with weight 0 so that all ranks
   take the same number of steps and each sequence still counts exactly once. A filler's index is
   the slot's last remaining real index; a slot with nothing left repeats the last index of its
   whole list (the last one it read, so its shard is already local); a slot whose streams are all
   empty (``N < C``) uses ``Q[0]``. Fillers never occur when ``N = 0`` (then ``K = 0``).
5. *Rank order*. Rank ``r``'s ``i``-th batch of a segment (the batches after a (re)start) is batch
   ``i // nw`` of slot ``(r, i % nw)``: the round-robin in which ``torch.utils.data.DataLoader``
   takes batches from its workers. A rank has ``K * nw`` batches.
6. *Resume*. After every rank consumed ``consumed`` batches, slot ``(r, w)`` consumed
   ``k_w = max(0, ceil((consumed - w) / nw))`` batches, i.e. the first ``min(k_w * B, remaining)``
   elements of its key-sorted list. Since a slot's list is sorted by key, what it consumed is, per
   stream, every element with key below some threshold ``X``; ``X`` is found by a vectorised binary
   search over all slots at once, using that stream ``c`` has
   ``clip(ceil((X - c) / C), pos[c], len[c]) - pos[c]`` remaining elements with key ``< X``. The
   new ``pos`` (one position per stream) is layout-free: a run may resume on any ``(W, nw, B)`` with
   ``W * nw <= C`` and reads exactly the sequences not yet read. On the same layout, after a whole
   number of loader rounds (``consumed % nw == 0``), the new segment is the rest of the
   uninterrupted run batch for batch. Otherwise each worker still continues with its own remaining
   batches, but the new loader starts its round-robin at worker 0, so the batches come in a
   different order across workers and the number of trailing filler batches may change.

With ``nw = 1``, ``C % W == 0`` and a fixed global batch ``W * B``, global step ``t`` holds the
sequences at positions ``[t * W * B, (t + 1) * W * B)`` of the key order for every ``W``, because
each rank holds every ``W``-th key. Each stream touches at most
``ceil(len / min_kept_shard_size) + 1`` shards.

Relation to mosaicml-streaming
------------------------------
The idea is that of ``streaming.base.partition.orig.get_partitions_orig`` and its shuffles: a fixed
number of canonical partitions (there: canonical nodes, here: streams) of a shard-shuffled list
makes the order independent of the hardware. It differs in three ways:

(a) *Padding.* mosaic makes partitions equal by repeating samples (short canonical rows repeat their
    last id, uneven ranks repeat neighbours), and the repeats train twice. Here rows are never
    repeated as training data: padding is a filler row with weight 0.
(b) *Resume.* mosaic resumes from a scalar ``sample_in_epoch``, rounded down to a multiple of the
    node count, and requires canonical and physical node counts to divide one another. Here the
    state is the per-stream position vector, so resuming on any layout is exact, with no rounding.
(c) *Mixing.* mosaic's shuffles walk shards and blocks in Python loops. Here mixing is one
    vectorised bounded-displacement shuffle per stream (a jittered argsort).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from logitstore.errors import ConfigError
from logitstore.sampling.canonical import CanonicalOrder, as_index_array, check_int, mix_order


def _ceil_div(a, b):
    """Ceiling of ``a / b`` for integers (arrays allowed), correct for negative ``a``."""
    return -((-a) // b)


@dataclass(frozen=True)
class Layout:
    """Hardware layout of one run: ``world_size`` ranks, ``num_workers`` loader workers per rank,
    ``batch_size`` sequences per rank and batch. ``num_workers=0`` (loading in the main process)
    is stored as 1."""

    world_size: int
    num_workers: int
    batch_size: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "world_size", check_int(self.world_size, "world_size", 1))
        workers = check_int(self.num_workers, "num_workers", 0)
        object.__setattr__(self, "num_workers", max(workers, 1))
        object.__setattr__(self, "batch_size", check_int(self.batch_size, "batch_size", 1))

    @property
    def n_slots(self) -> int:
        return self.world_size * self.num_workers


class EpochPlan:
    """The plan of one epoch over a sharded store (see the module docstring for the algorithm).

    ``sizes`` [n_shards]: sequences per shard; ``starts`` [n_shards]: first global index of each
    shard (must tile ``[0, n)``; default derived from ``sizes``); ``excluded``: global indices to
    leave out (any order, duplicates ignored). ``mix`` >= 1: bound on the displacement of the
    in-stream shuffle (1 = none; only with ``shuffle``). ``n_streams``: ``C``, fixed for the life
    of a run; any layout with ``world_size * num_workers <= C`` can read the plan.

    ``lengths`` [n] (tokens per sequence) with ``group`` > 1: length grouping. Each stream is cut
    into consecutive blocks of ``group`` elements and each block sorted longest first (stable), so
    a batch, which takes the same positions of every stream of its slot, holds sequences of similar
    length and little padding (what ``transformers``' ``group_by_length`` does with its megabatches).
    The epoch's sequences, and each stream's membership, do not change; only the order inside blocks.
    """

    def __init__(self, sizes, *, starts=None, seed: int = 0, epoch: int = 0, shuffle: bool = True,
                 mix: int = 1, n_streams: int = 1, excluded=None, lengths=None, group: int = 0) -> None:
        seed = check_int(seed, "seed", 0)
        epoch = check_int(epoch, "epoch", 0)
        self.mix = check_int(mix, "mix", 1)
        self._c = check_int(n_streams, "n_streams", 1)
        self._q = CanonicalOrder(sizes, starts, seed, epoch, shuffle, excluded)
        self.seed, self.epoch, self.shuffle = seed, epoch, bool(shuffle)
        self._group = check_int(group, "group", 0)
        self._seq_lengths = None if lengths is None or self._group < 2 else np.asarray(lengths)
        n, c = self._q.n, self._c
        ids = np.arange(c, dtype=np.int64)
        self._lengths = n // c + (ids < n % c).astype(np.int64)
        self._block_starts = ids * (n // c) + np.minimum(ids, n % c)

    @property
    def n_sequences(self) -> int:
        """``N``: sequences in the epoch (the store's minus the excluded)."""
        return self._q.n

    @property
    def n_streams(self) -> int:
        return self._c

    @property
    def stream_lengths(self) -> np.ndarray:
        """Elements per stream, [C] int64."""
        return self._lengths.copy()

    # -- streams and slots -------------------------------------------------------------------

    def stream(self, c: int) -> np.ndarray:
        """Global indices of stream ``c`` in emission order (after mixing), [stream_lengths[c]] int64."""
        c = self._check_stream(c)
        lo = int(self._block_starts[c])
        block = self._q.take(lo, lo + int(self._lengths[c]))
        if self.shuffle and self.mix > 1 and block.size > 1:
            block = block[mix_order(block.size, self.mix, np.random.default_rng([self.seed, self.epoch, 2, c]))]
        if self._seq_lengths is not None:
            g = self._group
            for a in range(0, block.size, g):
                part = block[a:a + g]
                block[a:a + g] = part[np.argsort(-self._seq_lengths[part].astype(np.int64), kind="stable")]
        return block

    def slot_streams(self, layout: Layout, rank: int, worker: int) -> list[int]:
        """Streams of slot ``(rank, worker)``, ascending: ``rank + W * (worker + nw * t)``."""
        self._check_layout(layout)
        rank = self._check_below(rank, layout.world_size, "rank", "world_size")
        worker = self._check_below(worker, layout.num_workers, "worker", "num_workers")
        return list(range(rank + layout.world_size * worker, self._c, layout.n_slots))

    def _slot_of_stream(self, layout: Layout) -> np.ndarray:
        """Slot id ``rank + W * worker`` of each stream, [C] int64."""
        c = np.arange(self._c, dtype=np.int64)
        w = layout.world_size
        return c % w + w * ((c // w) % layout.num_workers)

    # -- batches -----------------------------------------------------------------------------

    def _remaining(self, layout: Layout, pos: np.ndarray) -> np.ndarray:
        """Remaining elements per slot, [W * nw] int64 (slot id ``rank + W * worker``)."""
        rem = self._lengths - pos
        out = np.zeros(layout.n_slots, dtype=np.int64)
        np.add.at(out, self._slot_of_stream(layout), rem)
        return out

    def n_batches(self, layout: Layout, pos=None) -> int:
        """``K``: batches per slot; a rank has ``K * num_workers`` batches."""
        self._check_layout(layout)
        rem = self._remaining(layout, self._check_pos(pos))
        return int(_ceil_div(rem, layout.batch_size).max())

    def n_steps(self, layout: Layout, pos=None) -> int:
        """Batches per rank once trailing steps in which every rank holds only fillers are dropped:
        one past the last rank batch (``i = b * nw + w``) that holds a real row on any rank. Every
        rank reads ``min(K, ...)`` batches of each worker so that DataLoader order is kept."""
        self._check_layout(layout)
        rem = self._remaining(layout, self._check_pos(pos)).reshape(layout.num_workers, layout.world_size)
        last = _ceil_div(rem, layout.batch_size) - 1  # [nw, W]: last batch with a real row (-1: none)
        w = np.arange(layout.num_workers, dtype=np.int64)[:, None]
        steps = np.where(last >= 0, last * layout.num_workers + w + 1, 0)
        return int(steps.max()) if steps.size else 0

    def slot_batches(self, layout: Layout, rank: int, worker: int, pos=None) -> tuple[np.ndarray, np.ndarray]:
        """Batches of slot ``(rank, worker)``: indices [K, B] int64 and weights [K, B] float32
        (1 for a real row, 0 for a filler)."""
        streams = self.slot_streams(layout, rank, worker)
        pos = self._check_pos(pos)
        k, b = self.n_batches(layout, pos), layout.batch_size
        full = [self.stream(c) for c in streams]
        idx = np.concatenate([s[pos[c]:] for c, s in zip(streams, full)])
        keys = np.concatenate([np.arange(pos[c], self._lengths[c], dtype=np.int64) * self._c + c for c in streams])
        idx = idx[np.argsort(keys, kind="stable")]
        out = np.full(k * b, self._filler(streams, full, idx), dtype=np.int64)
        out[:idx.size] = idx
        weights = np.zeros(k * b, dtype=np.float32)
        weights[:idx.size] = 1.0
        return out.reshape(k, b), weights.reshape(k, b)

    def _filler(self, streams: list[int], full: list[np.ndarray], remaining: np.ndarray) -> int:
        """Index of a filler row: the last remaining real index, else the last index of the whole
        slot list (highest key), else ``Q[0]``, else 0 (empty store: no batches at all)."""
        if remaining.size:
            return int(remaining[-1])
        nonempty = [(int(self._lengths[c] - 1) * self._c + c, s) for c, s in zip(streams, full) if s.size]
        if nonempty:
            return int(max(nonempty, key=lambda t: t[0])[1][-1])
        return int(self._q.take(0, 1)[0]) if self._q.n else 0

    def rank_batches(self, layout: Layout, rank: int, pos=None) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Rank ``rank``'s batches in DataLoader order: ``K * nw`` index arrays [B] int64 and weight
        arrays [B] float32; batch ``i`` is batch ``i // nw`` of worker ``i % nw``."""
        nw = layout.num_workers
        slots = [self.slot_batches(layout, rank, w, pos) for w in range(nw)]
        k = slots[0][0].shape[0]
        order = [(i % nw, i // nw) for i in range(k * nw)]
        return [slots[w][0][j] for w, j in order], [slots[w][1][j] for w, j in order]

    # -- resume ------------------------------------------------------------------------------

    def advance(self, layout: Layout, consumed: int, pos=None) -> np.ndarray:
        """Position vector [C] int64 after each rank consumed ``consumed`` batches (in DataLoader
        order) of the segment that started at ``pos``. Valid for any later layout."""
        pos = self._check_pos(pos)
        k = self.n_batches(layout, pos)
        nw, b = layout.num_workers, layout.batch_size
        consumed = check_int(consumed, "consumed", 0)
        if consumed > k * nw:
            raise ConfigError(f"consumed = {consumed} batches, but a rank has only {k * nw} in this epoch")
        slot = self._slot_of_stream(layout)
        k_w = np.maximum(0, _ceil_div(consumed - np.arange(nw, dtype=np.int64), nw))
        target = np.minimum(np.repeat(k_w, layout.world_size) * b, self._remaining(layout, pos))
        c = np.arange(self._c, dtype=np.int64)

        def below(x: np.ndarray) -> np.ndarray:
            # per stream: remaining elements with key < x[slot]
            return np.clip(_ceil_div(x[slot] - c, self._c), pos, self._lengths) - pos

        lo = np.zeros(layout.n_slots, dtype=np.int64)
        hi = np.full(layout.n_slots, self._c * int(self._lengths.max()), dtype=np.int64)
        while (lo < hi).any():
            mid = (lo + hi) // 2
            count = np.zeros(layout.n_slots, dtype=np.int64)
            np.add.at(count, slot, below(mid))
            enough = count >= target
            hi, lo = np.where(enough, mid, hi), np.where(enough, lo, mid + 1)
        return pos + below(lo)

    # -- validation --------------------------------------------------------------------------

    def _check_layout(self, layout: Layout) -> None:
        if not isinstance(layout, Layout):
            raise ConfigError(f"layout must be a Layout, got {type(layout).__name__}")
        if self._c < layout.n_slots:
            raise ConfigError(f"n_streams = {self._c} is below world size {layout.world_size} x {layout.num_workers} "
                              f"workers = {layout.n_slots}; raise n_streams to at least {layout.n_slots}")

    def _check_stream(self, c: int) -> int:
        return self._check_below(c, self._c, "stream", "n_streams")

    @staticmethod
    def _check_below(value, bound: int, what: str, bound_name: str) -> int:
        value = check_int(value, what, 0)
        if value >= bound:
            raise ConfigError(f"{what} = {value} must be below {bound_name} = {bound}")
        return value

    def _check_pos(self, pos) -> np.ndarray:
        """``pos`` as [C] int64 (``None``: zeros); :class:`ConfigError` unless 0 <= pos <= lengths."""
        if pos is None:
            return np.zeros(self._c, dtype=np.int64)
        arr = as_index_array(pos, "pos")
        if arr.shape != (self._c,):
            raise ConfigError(f"pos must have one entry per stream ({self._c}), got {arr.shape[0]}")
        if (arr < 0).any() or (arr > self._lengths).any():
            raise ConfigError("pos must satisfy 0 <= pos[c] <= stream_lengths[c] for every stream")
        return arr
