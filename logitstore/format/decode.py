"""Decoding parsed parts into the arrays the reader hands out, and slicing/joining them into
batches. Everything here works on arrays already checked for dtype and shape by a backend."""

from __future__ import annotations

import numpy as np

from logitstore.errors import FormatError
from logitstore.format.codec import SCALARS, Encoding


def check_lengths(lengths: np.ndarray, seq_len: int, where: str) -> None:
    if lengths.size and (lengths.min() < 1 or lengths.max() > seq_len):
        raise FormatError(f"{where}/inputs/length: values must lie in [1, {seq_len}]")


def decode_teacher(encoding: Encoding, arrays: dict[str, np.ndarray], vocab_size: int, where: str) -> dict[str, np.ndarray]:
    """A teacher part's stored arrays ([S, L, ...] plus ``id_order`` for ``compact``, as
    :meth:`~logitstore.format.reader.Store.read_part` returns them) to ``ids``,
    ``logprobs`` [S, L, k] and ``tail_mass``, ``gold_logprob``, ``entropy`` [S, L]."""
    n, L, k = arrays["ids"].shape
    flat = {a: v.reshape(n * L, *v.shape[2:]) for a, v in arrays.items() if a != "id_order"}
    if "id_order" in arrays:
        flat["id_order"] = arrays["id_order"]
    try:
        ids, lps, scalars = encoding.decode(flat, vocab_size)
    except FormatError as e:
        raise FormatError(f"{where}/{e}") from None
    out = {"ids": ids.reshape(n, L, k), "logprobs": lps.reshape(n, L, k)}
    out.update({s: scalars[s].reshape(n, L) for s in SCALARS})
    return out


def slice_rows(sh: dict, a: int, b: int) -> dict:
    """Rows ``a:b`` of a decoded shard (views, no copy)."""
    return {"input_ids": sh["input_ids"][a:b], "length": sh["length"][a:b], "seq_hash": sh["seq_hash"][a:b],
            "teachers": {n: {k: v[a:b] for k, v in td.items()} for n, td in sh["teachers"].items()}}


def join_rows(parts: list[dict], as_torch: bool) -> dict:
    """One batch from row slices (no copy when there is one slice); ``as_torch``: tensors, with
    token ids as int64 (what ``gather``/``Embedding`` take; the store keeps them as small uints)."""
    if len(parts) == 1:
        out = parts[0]
    else:
        out = {k: np.concatenate([p[k] for p in parts]) for k in ("input_ids", "length", "seq_hash")}
        out["teachers"] = {n: {k: np.concatenate([p["teachers"][n][k] for p in parts]) for k in parts[0]["teachers"][n]}
                           for n in parts[0]["teachers"]}
    if not as_torch:
        return out
    import torch

    def conv(a: np.ndarray):
        return torch.from_numpy(a if a.flags.writeable else a.copy())  # torch wants writable memory

    return {"input_ids": conv(out["input_ids"].astype(np.int64)), "length": conv(out["length"].astype(np.int64)),
            "seq_hash": out["seq_hash"],
            "teachers": {n: {k: conv(v.astype(np.int64) if k == "ids" else v) for k, v in td.items()}
                         for n, td in out["teachers"].items()}}
