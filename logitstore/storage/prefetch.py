"""Fetching a store's files ahead of the reader, on a few threads.

The reader knows the order in which it will need parts (the trainer's batch plan fixes it), so a
``Prefetcher`` keeps up to ``depth`` of the next parts in flight while the current one is decoded.
Fetching is I/O and sha256 (both release the GIL), so threads overlap it with decoding. Only the
consuming thread calls :meth:`take`; a part asked for out of plan order is simply not prefetched.
"""

from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Hashable


class Prefetcher:
    def __init__(self, fetch: Callable[[Hashable], object], keys: list, depth: int = 4):
        self._fetch = fetch
        self._keys = list(dict.fromkeys(keys))  # first-need order, each key once
        self._index = {k: i for i, k in enumerate(self._keys)}
        self._pos = 0
        self._depth = max(1, depth)
        self._futures: OrderedDict[Hashable, Future] = OrderedDict()
        self._pool = ThreadPoolExecutor(max_workers=self._depth, thread_name_prefix="logitstore-prefetch")
        self._fill()

    def _fill(self) -> None:
        while len(self._futures) < self._depth and self._pos < len(self._keys):
            key = self._keys[self._pos]
            self._pos += 1
            self._futures[key] = self._pool.submit(self._fetch, key)

    def take(self, key: Hashable):
        """The fetched value for ``key`` (re-raising its error), or None if it was not planned."""
        fut = self._futures.pop(key, None)
        if fut is None:
            at = self._index.get(key, -1)
            if at >= self._pos:  # the reader is ahead of the window: what is in flight is stale
                for f in self._futures.values():
                    f.cancel()
                self._futures.clear()
                self._pos = at + 1
                self._fill()
            return None
        try:
            return fut.result()
        finally:
            self._fill()

    def close(self) -> None:
        for f in self._futures.values():
            f.cancel()
        self._futures.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)
