"""The shard index of an open store: which shard holds sequence ``i``, and the arrays (dtype and
shape) each part of a shard must hold, which backends check before they decode anything."""

from __future__ import annotations

import bisect

import numpy as np

from logitstore.format import layout
from logitstore.format.backends import AtMost
from logitstore.format.codec import Encoding, id_dtype
from logitstore.format.hashing import SEQ_HASH_BYTES


class ShardIndex:
    """Shards of a manifest in sequence order (``shards[j]["start"]`` ascending, tiling
    ``[0, n_sequences)``: the manifest validator checks it)."""

    def __init__(self, manifest: dict, encoding: Encoding):
        self.shards: list[dict] = manifest["shards"]
        self.teachers: list[dict] = manifest["teachers"]
        self.n_sequences: int = manifest["n_sequences"]
        self.seq_len: int = manifest["seq_len"]
        self.vocab_size: int = manifest["tokenizer"]["vocab_size"]
        self.encoding = encoding
        self._starts = [s["start"] for s in self.shards]

    def __len__(self) -> int:
        return len(self.shards)

    def locate(self, i: int) -> tuple[int, int]:
        """``(shard, row)`` of sequence ``i`` (negative ``i`` counts from the end)."""
        n = self.n_sequences
        if not -n <= i < n:
            raise IndexError(f"sequence {i} out of range for {n} sequences")
        i %= max(n, 1)
        j = bisect.bisect_right(self._starts, i) - 1
        return j, i - self._starts[j]

    def shards_of(self, indices: np.ndarray) -> np.ndarray:
        """The shard of each sequence index in ``indices`` (in range, non-negative) [n], vectorised."""
        return np.searchsorted(np.asarray(self._starts), indices, side="right") - 1

    def where(self, shard: int, part: str | None = None) -> str:
        """The path of a shard (or of one of its parts) inside the store, for error messages."""
        path = self.shards[shard]["path"]
        return f"{path}/{part}" if part else path

    def files(self, shard: int, part: str) -> dict[str, dict]:
        """``{relative path: {"bytes", "sha256"}}`` of a part's files, from the manifest."""
        return self.shards[shard]["parts"][part]["files"]

    def part_specs(self, shard: int, part: str) -> dict:
        """``{array: (dtype, shape)}`` a part must hold; a shape entry may be :class:`AtMost`."""
        n, L, V = self.shards[shard]["n_sequences"], self.seq_len, self.vocab_size
        if part == layout.INPUTS:
            return {"input_ids": (id_dtype(V), (n, L)), "length": (np.dtype(np.uint32), (n,)),
                    "seq_hash": (np.dtype(np.uint8), (n, SEQ_HASH_BYTES))}
        t = next(t for t in self.teachers if t["part"] == part)
        specs = {name: (dt, (n, L) + shape) for name, (dt, shape) in self.encoding.array_specs(t["k"], V).items()}
        if self.encoding.name == "compact":
            specs["id_order"] = (id_dtype(V), (AtMost(V),))  # refused before decoding if longer
        return specs
