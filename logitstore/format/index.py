"""The shard index of an open store: which shard holds sequence ``i``, which files each part of a
shard has (sizes and sha256), and the arrays (dtype and shape) each part must hold, which backends
check before they decode anything.

The index is columnar (numpy arrays, a few dozen bytes per shard and per file), whatever the
store's version: a version-2 store keeps it in ``index/shards.parquet`` and ``index/files.parquet``
(read once per process, see :mod:`~logitstore.format.index_files`); a version-1 manifest holds it
as JSON, converted here. Lookups build a small dict for one part at a time.
"""

from __future__ import annotations

import bisect

import numpy as np

from logitstore.errors import FormatError
from logitstore.format import layout
from logitstore.format.backends import AtMost
from logitstore.format.codec import Encoding, id_dtype
from logitstore.format.hashing import SEQ_HASH_BYTES
from logitstore.format.hidden import part_specs as hidden_specs
from logitstore.format.manifest import (MAX_FILE_NAMES, MAX_SHARD_SEQUENCES, check_relpath, inputs_arrays, task_of,
                                       trained_only)


class ShardIndex:
    """Shards of a store in sequence order (``starts`` ascending, tiling ``[0, n_sequences)``) and
    the table of their files, as arrays:

    - ``starts``, ``sizes`` (sequences), ``tokens`` [S] int64;
    - files [F]: ``file_shard`` int64, ``file_part`` uint8 (0 = inputs, ``i + 1`` = teacher ``i``),
      ``file_name`` uint16 (index into ``names``), ``file_bytes`` int64, ``file_sha256`` [F, 32] uint8,
      sorted by (shard, part) so a part's files are one contiguous run."""

    def __init__(self, manifest: dict, encoding: Encoding, shards: dict[str, np.ndarray], files: dict[str, np.ndarray],
                 names: list[str], paths: list[str] | None = None, where: str = "index"):
        self.teachers: list[dict] = manifest["teachers"]
        self.parts: list[str] = [layout.INPUTS] + [t["part"] for t in self.teachers]
        self.n_sequences: int = manifest["n_sequences"]
        self.seq_len: int = manifest["seq_len"]
        self.vocab_size: int = manifest["tokenizer"]["vocab_size"]
        self.optional_inputs = inputs_arrays(manifest)
        self.trained_only = trained_only(manifest)
        self.task = task_of(manifest)
        self.num_labels = manifest.get("num_labels")
        self.encoding = encoding
        self.names = names
        self._paths = paths  # version 1 only: the manifest's shard paths; else shards/NNNNNN
        self.starts = shards["start"].astype(np.int64)
        self.sizes = shards["n_sequences"].astype(np.int64)
        self.tokens = shards["n_tokens"].astype(np.int64)
        self.file_shard = files["shard"].astype(np.int64, copy=False)
        self.file_part = files["part"]  # uint8 (int64 for a version-1 or live index)
        self.file_name = files["name"]  # uint16
        self.file_bytes = files["bytes"].astype(np.int64, copy=False)
        self.file_sha256 = files["sha256"]
        self._check(manifest, where)
        self._keys = self.file_shard * len(self.parts) + self.file_part
        self._starts_list = self.starts.tolist()

    # ------------------------------------------------------------------ validation
    def _check(self, manifest: dict, where: str) -> None:
        """Everything a hostile index could get wrong, vectorised: shards tile the sequences, counts
        match the manifest, every part of every shard has files, names and parts are known."""
        S, P, L = len(self.starts), len(self.parts), self.seq_len
        if not (len(self.sizes) == len(self.tokens) == S):
            raise FormatError(f"{where}: shard columns differ in length")
        if S and (self.sizes.min() < 1 or self.sizes.max() > MAX_SHARD_SEQUENCES):
            raise FormatError(f"{where}: n_sequences: expected integers in [1, {MAX_SHARD_SEQUENCES}]")
        if S and (self.tokens.min() < 1 or np.any(self.tokens > self.sizes * L)):
            raise FormatError(f"{where}: n_tokens: expected integers in [1, n_sequences * seq_len]")
        expect = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]) if S else self.starts
        bad = np.flatnonzero(self.starts != expect)
        if bad.size:
            raise FormatError(f"{where}: shard {int(bad[0])} starts at {int(self.starts[bad[0]])}, expected "
                              f"{int(expect[bad[0]])} (shards must tile the sequences in order)")
        if int(self.sizes.sum()) != self.n_sequences:
            raise FormatError(f"{where}: the shards hold {int(self.sizes.sum())} sequences, the manifest says {self.n_sequences}")
        if int(self.tokens.sum()) != manifest["n_tokens"]:
            raise FormatError(f"{where}: the shards hold {int(self.tokens.sum())} tokens, the manifest says {manifest['n_tokens']}")
        F = len(self.file_shard)
        if not all(len(a) == F for a in (self.file_part, self.file_name, self.file_bytes, self.file_sha256)):
            raise FormatError(f"{where}: file columns differ in length")
        if len(self.names) > MAX_FILE_NAMES:
            raise FormatError(f"{where}: more than {MAX_FILE_NAMES} distinct file names")
        if F and (self.file_shard.min() < 0 or self.file_shard.max() >= S or self.file_part.min() < 0
                  or self.file_part.max() >= P or self.file_name.min() < 0 or self.file_name.max() >= len(self.names)
                  or self.file_bytes.min() < 0 or self.file_bytes.max() > 1 << 40):
            raise FormatError(f"{where}: a file row names a shard, part or name that does not exist, or a size out of range")
        keys = (self.file_shard * P + self.file_part) * len(self.names) + self.file_name.astype(np.int64)
        if F and np.any(np.diff(keys) <= 0):
            raise FormatError(f"{where}: file rows must be sorted by shard, part and name, each once")
        have = np.unique(self.file_shard * P + self.file_part)
        if len(have) != S * P:
            missing = sorted(set(range(S * P)) - set(have.tolist()))[0] if S * P else 0
            raise FormatError(f"{where}: shard {missing // P} part {self.parts[missing % P]!r} lists no files")

    # ------------------------------------------------------------------ lookups
    def __len__(self) -> int:
        return len(self.starts)

    def locate(self, i: int) -> tuple[int, int]:
        """``(shard, row)`` of sequence ``i`` (negative ``i`` counts from the end)."""
        n = self.n_sequences
        if not -n <= i < n:
            raise IndexError(f"sequence {i} out of range for {n} sequences")
        i %= max(n, 1)
        j = bisect.bisect_right(self._starts_list, i) - 1
        return j, i - self._starts_list[j]

    def shards_of(self, indices: np.ndarray) -> np.ndarray:
        """The shard of each sequence index in ``indices`` (in range, non-negative) [n], vectorised."""
        return np.searchsorted(self.starts, indices, side="right") - 1

    def shard_entry(self, shard: int) -> dict:
        """``{"index", "path", "start", "n_sequences", "n_tokens"}`` of one shard."""
        return {"index": shard, "path": self.path(shard), "start": int(self.starts[shard]),
                "n_sequences": int(self.sizes[shard]), "n_tokens": int(self.tokens[shard])}

    def path(self, shard: int) -> str:
        return self._paths[shard] if self._paths is not None else layout.shard_dir(shard)

    def where(self, shard: int, part: str | None = None) -> str:
        """The path of a shard (or of one of its parts) inside the store, for error messages."""
        path = self.path(shard)
        return f"{path}/{part}" if part else path

    def files(self, shard: int, part: str) -> dict[str, dict]:
        """``{relative path: {"bytes", "sha256"}}`` of a part's files."""
        key = shard * len(self.parts) + self.parts.index(part)
        lo, hi = np.searchsorted(self._keys, [key, key + 1])
        return {self.names[self.file_name[f]]: {"bytes": int(self.file_bytes[f]), "sha256": bytes(self.file_sha256[f]).hex()}
                for f in range(lo, hi)}

    def entries(self) -> list[dict]:
        """The index as a list of shard entries ``{"index", "path", "start", "n_sequences",
        "n_tokens", "parts": {part: {"files": {rel: {"bytes", "sha256"}}}}}`` (the shape of a
        version-1 manifest's ``shards``); a few kB per shard, for inspection and small stores."""
        return [{**self.shard_entry(j), "parts": {p: {"files": self.files(j, p)} for p in self.parts}} for j in range(len(self))]

    def part_bytes(self) -> dict[str, int]:
        """Total bytes of each part over all shards."""
        sums = np.bincount(self.file_part, weights=self.file_bytes, minlength=len(self.parts))
        return {p: int(sums[i]) for i, p in enumerate(self.parts)}

    def part_specs(self, shard: int, part: str) -> dict:
        """``{array: (dtype, shape)}`` a part must hold; a shape entry may be :class:`AtMost`."""
        n, L, V = int(self.sizes[shard]), self.seq_len, self.vocab_size
        if part == layout.INPUTS:
            return inputs_specs(n, L, V, self.optional_inputs)
        t = next(t for t in self.teachers if t["part"] == part)
        if self.task == "classify":  # every class's logit per sequence, float32; pooled hidden states [n, dim]
            return {"logits": (np.dtype(np.float32), (n, self.num_labels)), **(hidden_specs(t["hidden"], (n,)) if "hidden" in t else {})}
        # trained positions only: one row per position the loss mask trains, at most every position
        # of the shard (the exact count is checked against the inputs' loss mask before decoding)
        rows = (AtMost(n * L),) if self.trained_only else (n, L)
        specs = {name: (dt, rows + shape) for name, (dt, shape) in self.encoding.array_specs(t["k"], V).items()}
        if self.encoding.name == "compact":
            specs["id_order"] = (id_dtype(V), (AtMost(V),))  # refused before decoding if longer
        if "hidden" in t:  # per token: the same rows as the targets
            specs.update(hidden_specs(t["hidden"], rows))
        if "sampled" in t:  # version 4: draws per entry (0: exact) and the proposal's log-normaliser
            specs.update({"counts": (np.dtype(np.uint8), rows + (t["k"],)), "log_z": (np.dtype(np.float32), rows)})
        return specs


#: the optional inputs arrays (manifest ``inputs``, version 3): dtype and per-sequence trailing shape
#: (``None``: ``seq_len``). ``loss_mask``/``doc_start`` hold 0 or 1; ``row`` is an index into ``--data``;
#: ``label`` a class in ``[0, num_labels)`` or -1 (none) in a classify store.
OPTIONAL_SPECS = {"loss_mask": (np.dtype(np.uint8), (None,)), "doc_start": (np.dtype(np.uint8), (None,)),
                  "row": (np.dtype(np.int64), ()), "label": (np.dtype(np.int64), ())}


def inputs_specs(n: int, seq_len: int, vocab_size: int, optional: tuple[str, ...] = ()) -> dict:
    """``{array: (dtype, shape)}`` of the ``inputs`` part of a shard of ``n`` sequences, with the
    store's ``optional`` arrays."""
    specs = {"input_ids": (id_dtype(vocab_size), (n, seq_len)), "length": (np.dtype(np.uint32), (n,)),
             "seq_hash": (np.dtype(np.uint8), (n, SEQ_HASH_BYTES))}
    for name in optional:
        dt, tail = OPTIONAL_SPECS[name]
        specs[name] = (dt, (n,) + tuple(seq_len if d is None else d for d in tail))
    return specs


def file_table(per_shard: list[list[dict[str, dict]]], where: str) -> tuple[dict[str, np.ndarray], list[str]]:
    """The file table (columns as :class:`ShardIndex` takes them) and its distinct names, from
    ``per_shard[j][i]`` = ``{relative path: {"bytes", "sha256"}}`` of part ``i`` of shard ``j``."""
    names = sorted({rel for parts in per_shard for files in parts for rel in files})
    if len(names) > MAX_FILE_NAMES:
        raise FormatError(f"{where}: parts name more than {MAX_FILE_NAMES} distinct files")
    code = {n: i for i, n in enumerate(names)}
    rows = [(j, pi, code[rel], meta["bytes"], meta["sha256"]) for j, parts in enumerate(per_shard) for pi, files in enumerate(parts)
            for rel, meta in sorted(files.items(), key=lambda kv: code[kv[0]])]
    try:
        sha = np.frombuffer(b"".join(bytes.fromhex(r[4]) for r in rows), np.uint8).reshape(len(rows), 32)
    except ValueError:
        raise FormatError(f"{where}: a sha256 is not 64 hex digits") from None
    return {"shard": np.array([r[0] for r in rows], np.int64), "part": np.array([r[1] for r in rows], np.uint8),
            "name": np.array([r[2] for r in rows], np.uint16), "bytes": np.array([r[3] for r in rows], np.int64),
            "sha256": sha}, names


def index_from_v1(manifest: dict, encoding: Encoding) -> ShardIndex:
    """The columnar index of a version-1 manifest (its ``shards`` list, already validated)."""
    shards = manifest["shards"]
    parts = [layout.INPUTS] + [t["part"] for t in manifest["teachers"]]
    files, names = file_table([[s["parts"][p]["files"] for p in parts] for s in shards], "manifest.json")
    table = {k: np.array([s[k] for s in shards], np.int64) for k in ("start", "n_sequences", "n_tokens")}
    for s in shards:
        check_relpath(s["path"], "manifest.json: shards.path")
    return ShardIndex(manifest, encoding, table, files, names, paths=[s["path"] for s in shards], where="manifest.json")
