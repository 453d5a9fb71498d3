"""Reading a store: ``logitstore.open(path_or_url)``.

Each access fetches a whole part's files, checks them against the manifest's sizes and sha256
(before any parser sees them), lets the backend parse them and decodes the teacher arrays. The most
recently decoded shards are cached, so sequential and batched access decode each shard once.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Iterator

import numpy as np

from . import layout
from .backends import AtMost, get_backend
from .cache import FileCache
from .codec import SCALARS, Encoding, id_dtype
from .errors import FormatError
from .fsio import StoreFS
from .hashing import SEQ_HASH_BYTES, sha256_hex
from .manifest import MANIFEST, MAX_MANIFEST_BYTES, parse_manifest
from .prefetch import Prefetcher


class Store:
    """A complete store. ``store[i]`` is sequence ``i``; see :meth:`__getitem__`."""

    def __init__(self, url: str, *, verify_checksums: bool = True, cache_shards: int = 2, cache_dir: str | None = None):
        """``cache_dir``: keep fetched files in a local read-through cache (see :mod:`logitstore.cache`)."""
        self.fs = StoreFS(url)
        self.url = url
        if not self.fs.exists(MANIFEST):
            if not self.fs.exists():
                raise FormatError(f"{url}: no such store (nothing at this path)")
            hint = ""
            if self.fs.exists("plan.json"):
                from .lock import describe, lock_is_live, read_lock

                rec = read_lock(self.fs)
                hint = (f" (a {describe(rec)} is still writing it)" if rec is not None and lock_is_live(rec)
                        else " (a dump is unfinished or crashed: re-run it to complete)")
            raise FormatError(f"{url}: no {MANIFEST}; not a complete logitstore store{hint}")
        self.manifest = parse_manifest(self.fs.read(MANIFEST, MAX_MANIFEST_BYTES), f"{url}/{MANIFEST}")
        m = self.manifest
        self.encoding = Encoding.from_dict(m["encoding"])
        self.backend = get_backend(m["backend"])
        self.seq_len: int = m["seq_len"]
        self.vocab_size: int = m["tokenizer"]["vocab_size"]
        self.verify_checksums = verify_checksums
        self._starts = [s["start"] for s in m["shards"]]
        self._cache: OrderedDict[tuple, dict] = OrderedDict()
        self._cache_size = cache_shards
        self.file_cache = FileCache(cache_dir) if cache_dir else None
        self._prefetcher: Prefetcher | None = None

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
        return len(self.manifest["shards"])

    def __len__(self) -> int:
        return self.manifest["n_sequences"]

    def __repr__(self) -> str:
        return f"Store({self.url!r}, sequences={len(self)}, tokens={self.manifest['n_tokens']}, teachers={self.teachers})"

    # ------------------------------------------------------------------ raw parts
    def part_files(self, shard: int, part: str) -> dict[str, bytes]:
        """Fetch a part's files; raise :class:`FormatError` naming the file on a size or checksum mismatch."""
        if self._prefetcher is not None:
            got = self._prefetcher.take((shard, part))
            if got is not None:
                return got
        return self._fetch_part((shard, part))

    def _fetch_part(self, key: tuple[int, str]) -> dict[str, bytes]:
        shard, part = key
        entry = self.manifest["shards"][shard]
        files = entry["parts"][part]["files"]
        out = {}
        for rel, meta in files.items():
            where = f"{entry['path']}/{part}/{rel}"
            if self.file_cache is not None:
                data = self.file_cache.get(meta["sha256"], meta["bytes"], verify=self.verify_checksums)
                if data is not None:
                    out[rel] = data
                    continue
            data = self.fs.read(where, size=meta["bytes"])  # a regular file of exactly that size, or refused
            if (self.verify_checksums or self.file_cache is not None) and sha256_hex(data) != meta["sha256"]:
                raise FormatError(f"{where}: sha256 mismatch (file is corrupt)")
            if self.file_cache is not None:
                self.file_cache.put(meta["sha256"], data)
            out[rel] = data
        return out

    def prefetch(self, shards: list[int], teachers: list[str] | None = None, depth: int = 4) -> None:
        """Fetch the parts of ``shards`` (in that order) ahead of :meth:`load_shard`, ``depth`` parts
        in flight on as many threads. Replaces any earlier plan; ``depth=0`` stops prefetching."""
        self.close()
        if depth <= 0:
            return
        parts = [layout.INPUTS] + [self.teacher(n)["part"] for n in (self.teachers if teachers is None else teachers)]
        self._prefetcher = Prefetcher(self._fetch_part, [(j, p) for j in shards for p in parts], depth)

    def close(self) -> None:
        """Stop prefetching (threads end; nothing else is held open)."""
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None

    def part_specs(self, shard: int, part: str) -> dict:
        n = self.manifest["shards"][shard]["n_sequences"]
        L = self.seq_len
        if part == layout.INPUTS:
            return {"input_ids": (id_dtype(self.vocab_size), (n, L)), "length": (np.dtype(np.uint32), (n,)),
                    "seq_hash": (np.dtype(np.uint8), (n, SEQ_HASH_BYTES))}
        t = next(t for t in self.manifest["teachers"] if t["part"] == part)
        specs = {name: (dt, (n, L) + shape) for name, (dt, shape) in self.encoding.array_specs(t["k"], self.vocab_size).items()}
        if self.encoding.name == "compact":
            specs["id_order"] = (id_dtype(self.vocab_size), (AtMost(self.vocab_size),))  # refused before decoding if longer
        return specs

    def read_part(self, shard: int, part: str) -> dict[str, np.ndarray]:
        """The arrays of one part as stored (still encoded)."""
        where = f"{self.manifest['shards'][shard]['path']}/{part}"
        specs = self.part_specs(shard, part)
        arrays = self.backend.decode_part(self.part_files(shard, part), specs, where)
        if "id_order" in arrays and arrays["id_order"].shape[0] > self.vocab_size:
            raise FormatError(f"{where}/id_order: longer than the vocabulary")
        return arrays

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
        lengths = out["length"]
        where = self.manifest["shards"][shard]["path"]
        if lengths.size and (lengths.min() < 1 or lengths.max() > self.seq_len):
            raise FormatError(f"{where}/inputs/length: values must lie in [1, {self.seq_len}]")
        out["teachers"] = {}
        for name in names:
            t = self.teacher(name)
            arrays = self.read_part(shard, t["part"])
            n, L, k = arrays["ids"].shape
            flat = {a: v.reshape(n * L, *v.shape[2:]) for a, v in arrays.items() if a != "id_order"}
            if "id_order" in arrays:
                flat["id_order"] = arrays["id_order"]
            try:
                ids, lps, scalars = self.encoding.decode(flat, self.vocab_size)
            except FormatError as e:
                raise FormatError(f"{where}/{t['part']}/{e}") from None
            td = {"ids": ids.reshape(n, L, k), "logprobs": lps.reshape(n, L, k)}
            td.update({s: scalars[s].reshape(n, L) for s in SCALARS})
            out["teachers"][name] = td
        self._cache[key] = out
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return out

    def _locate(self, i: int) -> tuple[int, int]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sequence {i} out of range for {len(self)} sequences")
        i %= max(len(self), 1)
        j = bisect.bisect_right(self._starts, i) - 1
        return j, i - self._starts[j]

    def __getitem__(self, i: int) -> dict:
        """Sequence ``i``: ``input_ids`` [n], ``seq_hash`` (16 bytes) and ``teachers`` {name: {``ids``,
        ``logprobs`` [n, k]; ``tail_mass``, ``gold_logprob``, ``entropy`` [n]}} with ``n`` its length.
        Position ``t`` describes the teacher's distribution of token ``t + 1`` given tokens ``<= t``."""
        j, r = self._locate(int(i))
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
                pending.append(_slice(sh, s, s + take))
                have += take
                s += take
                if have == batch_size:
                    yield _finish(pending, torch)
                    pending, have = [], 0
        if pending:
            yield _finish(pending, torch)


def _slice(sh: dict, a: int, b: int) -> dict:
    return {"input_ids": sh["input_ids"][a:b], "length": sh["length"][a:b], "seq_hash": sh["seq_hash"][a:b],
            "teachers": {n: {k: v[a:b] for k, v in td.items()} for n, td in sh["teachers"].items()}}


def _finish(parts: list[dict], as_torch: bool) -> dict:
    if len(parts) == 1:
        out = parts[0]
    else:
        out = {k: np.concatenate([p[k] for p in parts]) for k in ("input_ids", "length", "seq_hash")}
        out["teachers"] = {n: {k: np.concatenate([p["teachers"][n][k] for p in parts]) for k in parts[0]["teachers"][n]}
                           for n in parts[0]["teachers"]}
    if as_torch:
        import torch

        def conv(a: np.ndarray):
            return torch.from_numpy(a if a.flags.writeable else a.copy())  # torch wants writable memory

        out = {"input_ids": conv(out["input_ids"].astype(np.int64)), "length": conv(out["length"].astype(np.int64)),
               "seq_hash": out["seq_hash"],
               "teachers": {n: {k: conv(v.astype(np.int64) if k == "ids" else v) for k, v in td.items()}
                            for n, td in out["teachers"].items()}}
    return out


def open_store(url: str, **kwargs) -> Store:
    return Store(url, **kwargs)
