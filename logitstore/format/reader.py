"""Reading a store: ``logitstore.open(path_or_url)`` returns a :class:`Store`.

Opening reads only the manifest (:mod:`~logitstore.format.opening`), a few kB whatever the size of
the store; the shard index (:mod:`~logitstore.format.index_files`) is read on first use, once per
process, and the sequence index only when asked for (:meth:`Store.sequences`). Each access then fetches a
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
from logitstore.format.decode import check_inputs, check_lengths, decode_class_logits, decode_teacher, join_rows, slice_rows
from logitstore.format.hidden import decode_hidden, stored_projection
from logitstore.format.index import ShardIndex
from logitstore.format.index_files import read_index, read_sequences
from logitstore.format.live import LiveView
from logitstore.format.manifest import MANIFEST, PLAN
from logitstore.format.opening import read_manifest
from logitstore.storage.fetch import PartFetcher
from logitstore.storage.fsio import StoreFS


class Store:
    """A complete store. ``store[i]`` is sequence ``i``; see :meth:`__getitem__`."""

    def __init__(self, url: str, *, verify_checksums: bool = True, cache_shards: int = 2, cache_dir: str | None = None,
                 follow: bool = False):
        """``cache_shards``: decoded shards kept in memory; ``cache_dir``: keep fetched files in a
        local read-through cache (see :mod:`logitstore.storage.cache`); ``follow``: a store still
        being written opens as the shards committed so far (:mod:`~logitstore.format.live`;
        :meth:`refresh` picks up more)."""
        self.fs = StoreFS(url)
        self.url = url
        self.follow = follow
        self._live: LiveView | None = None
        if follow and not self.fs.exists(MANIFEST) and self.fs.exists(PLAN):
            self._live = LiveView(self.fs, url)
            m = self.manifest = self._live.manifest
        else:
            self.manifest = m = read_manifest(self.fs, url)
        self.encoding = Encoding.from_dict(m["encoding"])
        self.backend = get_backend(m["backend"])
        self.seq_len: int = m["seq_len"]
        self.vocab_size: int = m["tokenizer"]["vocab_size"]
        self.fetcher = PartFetcher(self.fs, self._files_of, verify_checksums=verify_checksums, cache_dir=cache_dir)
        self._index: ShardIndex | None = self._live.index if self._live else None
        self._sequences: tuple[np.ndarray, np.ndarray] | None = self._live.sequences if self._live else None
        self._cache: OrderedDict[tuple, dict] = OrderedDict()
        self._cache_size = cache_shards

    # ------------------------------------------------------------------ a store being written
    @property
    def complete(self) -> bool:
        """The store has its manifest (False: a view of the shards committed so far)."""
        return self._live is None

    def refresh(self) -> int:
        """Pick up shards committed since the store was opened (or last refreshed), or the manifest
        once the writer finished; return how many shards were added. Earlier sequences keep their
        numbers. A complete store never changes: 0."""
        if self._live is None:
            return 0
        before = self.n_shards
        if self.fs.exists(MANIFEST):
            self._live = None
            self.manifest = read_manifest(self.fs, self.url)
            self._index = self._sequences = None
        else:
            self._live.refresh()
            self.manifest, self._index, self._sequences = self._live.manifest, self._live.index, self._live.sequences
        self._cache.clear()
        return self.n_shards - before

    # ------------------------------------------------------------------ metadata
    @property
    def format_version(self) -> int:
        return self.manifest["format_version"]

    @property
    def index(self) -> ShardIndex:
        """The shard index (read from the index files on first use, once)."""
        if self._index is None:
            self._index = read_index(self.fetcher.read_file, self.manifest, self.encoding)
        return self._index

    def sequences(self) -> tuple[np.ndarray, np.ndarray]:
        """``(seq_hash [n, 16] uint8, length [n] uint32)`` of every sequence: 20 bytes per sequence,
        read from ``index/sequences.parquet``, or, in a version-1 store, from every inputs part."""
        if self._sequences is None:
            if self.format_version == 1:
                got = [self.read_part(j, layout.INPUTS) for j in range(self.n_shards)]
                for j, p in enumerate(got):
                    check_lengths(p["length"], self.seq_len, self.index.where(j))
                self._sequences = ((np.concatenate([p["seq_hash"] for p in got]), np.concatenate([p["length"] for p in got]))
                                   if got else (np.zeros((0, 16), np.uint8), np.zeros(0, np.uint32)))
            else:
                self._sequences = read_sequences(self.fetcher.read_file, self.manifest, self.index)
        return self._sequences

    @property
    def task(self) -> str:
        """``lm`` (next-token distributions per position) or ``classify`` (class logits per sequence)."""
        return self.index.task

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
        return self.manifest["n_shards"] if "n_shards" in self.manifest else len(self.manifest["shards"])

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
    def load_shard(self, shard: int, teachers: list[str] | None = None, hidden=False) -> dict:
        """Decode shard ``shard``: ``input_ids`` [S, L], ``length`` [S], ``seq_hash`` [S, 16],
        ``loss_mask`` [S, L] bool (position ``t`` trains token ``t + 1``), ``position_ids`` [S, L]
        (restarting per document where the store records document starts), ``doc_start`` [S, L] and
        ``row`` [S] where stored, and ``teachers`` {name: {ids, logprobs [S, L, k]; tail_mass,
        gold_logprob, entropy [S, L]}} (zeros where a trained-only store holds no target). ``hidden``
        (stores dumped with ``--hidden-layers``): also ``hidden_{layer}`` float32 per teacher, for
        every stored layer (True) or those listed; off by default, as decoding them costs
        ``4 * dim`` bytes per position and layer."""
        names = tuple(self.teachers if teachers is None else teachers)
        key = (shard, names, hidden if isinstance(hidden, bool) else tuple(sorted(hidden)))
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        out = self.decode_shard(shard, list(names), hidden)
        self._cache[key] = out
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return out

    def decode_shard(self, shard: int, teachers: list[str] | None = None, hidden=False) -> dict:
        """:meth:`load_shard` without keeping the result (the caller decides how long it lives)."""
        names = tuple(self.teachers if teachers is None else teachers)
        if not 0 <= shard < self.n_shards:
            raise IndexError(f"shard {shard} out of range [0, {self.n_shards})")
        out = check_inputs(self.read_part(shard, layout.INPUTS), self.seq_len, self.index.where(shard), self.index.num_labels)
        trained = out["loss_mask"] if self.index.trained_only else None
        out["teachers"] = {}
        for name in names:
            t = self.teacher(name)
            part, where = t["part"], self.index.where(shard, t["part"])
            arrays = self.read_part(shard, part)
            states = {}
            if "hidden" in t:  # --hidden-layers: hidden_{layer} as float32 (logitstore/format/hidden.py), if asked for
                if hidden:
                    want = t["hidden"]["layers"] if hidden is True else [x for x in t["hidden"]["layers"] if x in set(hidden)]
                    states = decode_hidden(t["hidden"], arrays, where, trained, want)
                arrays = {a: v for a, v in arrays.items() if not a.startswith("hidden_")}
            if self.task == "classify":
                out["teachers"][name] = {**decode_class_logits(arrays, where), **states}
                continue
            out["teachers"][name] = {**decode_teacher(self.encoding, arrays, self.vocab_size, where, trained,
                                                    absent="top_p" in t or "sampled" in t),
                                     **states}
        return out

    def hidden_projection(self, teacher: str) -> np.ndarray | None:
        """The fixed projection ``[model_dim, dim]`` float32 a teacher's stored hidden states went
        through (``--hidden-dim``), rebuilt from the manifest and checked against its sha256; None if
        they are stored at the model's width. Raises KeyError for a teacher without hidden states."""
        t = self.teacher(teacher)
        if "hidden" not in t:
            raise KeyError(f"teacher {teacher!r} of {self.url} stores no hidden states (dump with --hidden-layers)")
        return stored_projection(t["hidden"], f"{self.url}/{MANIFEST}: teacher {teacher!r}.hidden")

    def __getitem__(self, i: int) -> dict:
        """Sequence ``i``: ``input_ids`` [n], ``seq_hash`` (16 bytes), ``loss_mask`` [n] bool
        (position ``t`` is True when token ``t + 1`` is trained), ``position_ids`` [n], ``row`` (the
        ``--data`` row it came from, or None) and ``teachers`` {name: {``ids``, ``logprobs`` [n, k];
        ``tail_mass``, ``gold_logprob``, ``entropy`` [n]; ``hidden`` {layer: [n, dim] float32} where the
        store holds hidden states}} with ``n`` its length (a classify store: ``label``, and per teacher
        ``logits`` [C] and ``hidden`` {layer: [dim]}). Position ``t``
        describes the teacher's distribution of token ``t + 1`` given tokens ``<= t`` of its document."""
        j, r = self.index.locate(int(i))
        sh = self.load_shard(j, hidden=True)
        n = int(sh["length"][r])
        if self.task == "classify":  # one class per sequence: the label and every class's logit
            return {"input_ids": sh["input_ids"][r, :n], "seq_hash": bytes(sh["seq_hash"][r]), "label": int(sh["label"][r]),
                    "row": int(sh["row"][r]) if "row" in sh else None,
                    "teachers": {name: _nest_hidden({a: v[r] for a, v in td.items()}) for name, td in sh["teachers"].items()}}
        return {
            "input_ids": sh["input_ids"][r, :n],
            "seq_hash": bytes(sh["seq_hash"][r]),
            "loss_mask": sh["loss_mask"][r, :n],
            "position_ids": sh["position_ids"][r, :n],
            "row": int(sh["row"][r]) if "row" in sh else None,
            "teachers": {name: _nest_hidden({a: v[r, :n] for a, v in td.items()}) for name, td in sh["teachers"].items()},
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


def _nest_hidden(td: dict) -> dict:
    """A teacher's arrays for one sequence with its ``hidden_{layer}`` arrays under ``hidden`` {layer: array}."""
    hidden = {int(a.removeprefix("hidden_")): v for a, v in td.items() if a.startswith("hidden_")}
    out = {a: v for a, v in td.items() if not a.startswith("hidden_")}
    if hidden:
        out["hidden"] = hidden
    return out
