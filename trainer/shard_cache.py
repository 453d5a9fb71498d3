"""Decoded shards kept exactly as long as a loader worker's plan still needs them.

A worker knows every row it will read this epoch, so it counts the rows each shard still owes and
frees a shard after its last row was taken: a shard is decoded once per worker and epoch, and
memory holds only the shards the mixing window spans (about ``mix / shard_sequences + 1`` per
stream: :func:`open_at_once` computes it exactly from the plan), not an LRU's guess. A secondary
store in another order is bounded by the primary's count: past it the least recently used shard
is dropped and decoded again when needed; ``decodes`` counts every decode, so the cost is visible.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np


class ShardCache:
    """Decoded shards of one store for one worker's plan (``rows``: every sequence index, in
    order, that the plan will read from this store, fillers included)."""

    def __init__(self, store, rows: np.ndarray, teachers: list[str] | None, max_shards: int | None = None, hidden=False):
        """``max_shards``: most shards kept at once (default: :func:`open_at_once` of ``rows``, so
        nothing is decoded twice); ``hidden``: the stored hidden layers to decode too (see ``Store.load_shard``)."""
        self.store = store
        self.hidden = hidden
        self.teachers = teachers
        shards = store.index.shards_of(np.asarray(rows, np.int64)) if len(rows) else np.zeros(0, np.int64)
        self.max_shards = max(1, open_at_once(shards) if max_shards is None else max_shards)
        self._owed = dict(zip(*[a.tolist() for a in np.unique(shards, return_counts=True)]))
        self._live: OrderedDict[int, dict] = OrderedDict()
        self.decodes: dict[int, int] = {}

    def row(self, i: int) -> tuple[dict, int]:
        """``(decoded shard, row)`` of sequence ``i``; the shard is freed after its last planned row."""
        j, r = self.store.index.locate(int(i))
        sh = self._live.get(j)
        if sh is None:
            sh = self.store.decode_shard(j, self.teachers, self.hidden)
            self.decodes[j] = self.decodes.get(j, 0) + 1
            self._live[j] = sh
            while len(self._live) > self.max_shards:
                self._live.popitem(last=False)
        self._live.move_to_end(j)
        owed = self._owed.get(j, 0) - 1
        self._owed[j] = owed
        if owed <= 0:
            self._live.pop(j, None)  # the caller copies the row out before it asks for the next one
        return sh, r

    @property
    def resident(self) -> int:
        return len(self._live)


def open_at_once(shards: np.ndarray) -> int:
    """The most shards whose rows are still owed at one time, reading ``shards`` [n] (the shard of
    each planned row) in order: from each shard's first row to its last it must stay decoded."""
    if not len(shards):
        return 0
    uniq, first = np.unique(shards, return_index=True)
    last = len(shards) - 1 - np.unique(shards[::-1], return_index=True)[1]
    events = np.concatenate([np.stack([first, np.ones_like(first)], 1), np.stack([last + 1, -np.ones_like(last)], 1)])
    events = events[np.lexsort((events[:, 1], events[:, 0]))]  # at one position, closings before openings
    return int(np.cumsum(events[:, 1]).max())
