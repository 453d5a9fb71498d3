"""Reading a store: ``logitstore.open(path_or_url)`` returns a :class:`Store`.

Opening reads only the manifest (:mod:`~logitstore.format.opening`). Each access then fetches a
whole part's files, checked against the manifest's sizes and sha256 before any parser sees them
(:mod:`logitstore.storage.fetch`), lets the backend parse them against the shapes the shard index
expects (:mod:`~logitstore.format.index`) and decodes the teacher arrays
(:mod:`~logitstore.format.decode`). The most recently decoded shards are kept, so sequential and
batched access decode each shard once.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

import numpy as np

from logitstore.format import layout
from logitstore.format.backends import get_backend
from logitstore.format.codec import Encoding
from logitstore.format.decode import check_lengths, decode_teacher, join_rows, slice_rows
from logitstore.format.index import ShardIndex
from logitstore.format.opening import read_manifest
from logitstore.storage.fetch import PartFetcher
from logitstore.storage.fsio import StoreFS


class Store:
    """A complete store. ``store[i]`` is sequence ``i``; see :meth:`__getitem__`."""

    def __init__(self, url: str, *, verify_checksums: bool = True, cache_shards: int = 2, cache_dir: str | None = None):
        """``cache_shards``: decoded shards kept in memory; ``cache_dir``: keep fetched files in a
        local read-through cache (see :mod:`logitstore.storage.cache`)."""
        self.fs = StoreFS(url)
        self.url = url
        self.manifest = m = read_manifest(self.fs, url)
        self.encoding = Encoding.from_dict(m["encoding"])
        self.backend = get_backend(m["backend"])
        self.seq_len: int = m["seq_len"]
        self.vocab_size: int = m["tokenizer"]["vocab_size"]
        self.index = ShardIndex(m, self.encoding)
        self.fetcher = PartFetcher(self.fs, self._files_of, verify_checksums=verify_checksums, cache_dir=cache_dir)
        self._cache: OrderedDict[tuple, dict] = OrderedDict()
        self._cache_size = cache_shards

    # ------------------------------------------------------------------ metadata
    @property
    def teachers(self) -> list[str]:
        return [t["name"] for t in self.manifest["teachers"]]

    def teacher(self, name: str) -> dict:
        for t in self.manifest["teachers"]:
            if t["name"] == name:
                return t
        raise KeyError(f"no teacher {name!r} in {self.url} (teachers: {', '.join(self.teachers)})")

    @property
    def n_shards(self) -> int:
        return len(self.index)

    @property
    def verify_checksums(self) -> bool:
        return self.fetcher.verify_checksums

    @verify_checksums.setter
    def verify_checksums(self, value: bool) -> None:
        self.fetcher.verify_checksums = bool(value)

    @property
    def file_cache(self):
        return self.fetcher.file_cache

    @file_cache.setter
    def file_cache(self, cache) -> None:
        self.fetcher.file_cache = cache

    def __len__(self) -> int:
        return self.manifest["n_sequences"]

    def __repr__(self) -> str:
        return f"Store({self.url!r}, sequences={len(self)}, tokens={self.manifest['n_tokens']}, teachers={self.teachers})"

    # ------------------------------------------------------------------ raw parts
    def _files_of(self, key: tuple[int, str]) -> tuple[str, dict[str, dict]]:
        return self.index.where(*key), self.index.files(*key)

    def part_files(self, shard: int, part: str) -> dict[str, bytes]:
        """Fetch a part's files; raise :class:`FormatError` naming the file on a size or checksum mismatch."""
        return self.fetcher.get((shard, part))

    def prefetch(self, shards: list[int], teachers: list[str] | None = None, depth: int = 4) -> None:
        """Fetch the parts of ``shards`` (in that order) ahead of :meth:`load_shard`, ``depth`` parts
        in flight on as many threads. Replaces any earlier plan; ``depth=0`` stops prefetching."""
        self.fetcher.close()  # the earlier plan ends even if this one is refused
        parts = [layout.INPUTS] + [self.teacher(n)["part"] for n in (self.teachers if teachers is None else teachers)]
        self.fetcher.prefetch([(j, p) for j in shards for p in parts], depth)

    def close(self) -> None:
        """Stop prefetching (threads end; nothing else is held open)."""
        self.fetcher.close()

    def part_specs(self, shard: int, part: str) -> dict:
        return self.index.part_specs(shard, part)

    def read_part(self, shard: int, part: str) -> dict[str, np.ndarray]:
        """The arrays of one part as stored (still encoded)."""
        where = self.index.where(shard, part)  # the backend refuses arrays off their specs (id_order: at most V)
        return self.backend.decode_part(self.part_files(shard, part), self.part_specs(shard, part), where)

    # ------------------------------------------------------------------ decoded shards
    def load_shard(self, shard: int, teachers: list[str] | None = None) -> dict:
        """Decode shard ``shard``: ``input_ids`` [S, L], ``length`` [S], ``seq_hash`` [S, 16] and
        ``teachers`` {name: {ids, logprobs [S, L, k]; tail_mass, gold_logprob, entropy [S, L]}}."""
        names = tuple(self.teachers if teachers is None else teachers)
        key = (shard, names)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        if not 0 <= shard < self.n_shards:
            raise IndexError(f"shard {shard} out of range [0, {self.n_shards})")
        out = dict(self.read_part(shard, layout.INPUTS))
        check_lengths(out["length"], self.seq_len, self.index.where(shard))
        out["teachers"] = {}
        for name in names:
            part = self.teacher(name)["part"]
            out["teachers"][name] = decode_teacher(self.encoding, self.read_part(shard, part), self.vocab_size,
                                                   self.index.where(shard, part))
        self._cache[key] = out
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return out

    def __getitem__(self, i: int) -> dict:
        """Sequence ``i``: ``input_ids`` [n], ``seq_hash`` (16 bytes) and ``teachers`` {name: {``ids``,
        ``logprobs`` [n, k]; ``tail_mass``, ``gold_logprob``, ``entropy`` [n]}} with ``n`` its length.
        Position ``t`` describes the teacher's distribution of token ``t + 1`` given tokens ``<= t``."""
        j, r = self.index.locate(int(i))
        sh = self.load_shard(j)
        n = int(sh["length"][r])
        return {
            "input_ids": sh["input_ids"][r, :n],
            "seq_hash": bytes(sh["seq_hash"][r]),
            "teachers": {name: {a: v[r, :n] for a, v in td.items()} for name, td in sh["teachers"].items()},
        }

    def iter_batches(self, batch_size: int, teachers: list[str] | None = None, *, torch: bool = False) -> Iterator[dict]:
        """Yield padded batches in store order: ``input_ids`` [B, L], ``length`` [B], ``seq_hash``
        [B, 16] and ``teachers`` as in :meth:`load_shard` with a leading batch dimension. Arrays are
        views of the decoded shard where a batch lies inside one shard (no copy); with
        ``torch=True`` they are wrapped by ``torch.from_numpy`` (no copy), except token ids, which are
        int64 tensors (what ``gather``/``Embedding`` take; the store keeps them as small uints)."""
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        pending: list[dict] = []
        have = 0
        for j in range(self.n_shards):
            sh = self.load_shard(j, teachers)
            n = len(sh["length"])
            s = 0
            while s < n:
                take = min(batch_size - have, n - s)
                pending.append(slice_rows(sh, s, s + take))
                have += take
                s += take
                if have == batch_size:
                    yield join_rows(pending, torch)
                    pending, have = [], 0
        if pending:
            yield join_rows(pending, torch)
