"""Decoding parsed parts into the arrays the reader hands out, and slicing/joining them into
batches. Everything here works on arrays already checked for dtype and shape by a backend."""

from __future__ import annotations

import numpy as np

from logitstore.errors import FormatError
from logitstore.format.codec import Encoding


def check_lengths(lengths: np.ndarray, seq_len: int, where: str) -> None:
    if lengths.size and (lengths.min() < 1 or lengths.max() > seq_len):
        raise FormatError(f"{where}/inputs/length: values must lie in [1, {seq_len}]")


def decode_teacher(encoding: Encoding, arrays: dict[str, np.ndarray], vocab_size: int, where: str,
                   trained: np.ndarray | None = None, absent: bool = False) -> dict[str, np.ndarray]:
    """A teacher part's stored arrays ([S, L, ...] plus ``id_order`` for ``compact``, as
    :meth:`~logitstore.format.reader.Store.read_part` returns them) to ``ids``,
    ``logprobs`` [S, L, k] and ``tail_mass``, ``gold_logprob``, ``entropy`` [S, L].

    ``trained`` [S, L] bool: the part holds only these positions, as ``[P, ...]`` rows in
    sequence-major order (``targets: "trained"``); they are scattered back to ``[S, L, ...]`` with
    zeros elsewhere, as at padding. ``P`` must equal ``trained.sum()``. ``absent``: the teacher has
    adaptive k (``top_p``) or sampled targets, so some entries are absent and read as log-prob ``-inf``;
    sampled targets also return ``counts`` and ``log_z`` (FORMAT.md, "Sampled targets")."""
    if trained is None:
        n, L = arrays["ids"].shape[:2]
        flat = {a: v.reshape(n * L, *v.shape[2:]) for a, v in arrays.items() if a != "id_order"}
    else:
        n, L = trained.shape
        if arrays["ids"].shape[0] != int(trained.sum()):
            raise FormatError(f"{where}/ids: holds {arrays['ids'].shape[0]} positions, the inputs' loss_mask trains "
                              f"{int(trained.sum())}")
        flat = {a: v for a, v in arrays.items() if a != "id_order"}
    if "id_order" in arrays:
        flat["id_order"] = arrays["id_order"]
    sampled = {a: flat.pop(a) for a in ("counts", "log_z") if a in flat}  # sampled targets (FORMAT.md)
    try:
        ids, lps, scalars = encoding.decode(flat, vocab_size, absent=absent)
        check_sampled(sampled, lps)
    except FormatError as e:
        raise FormatError(f"{where}/{e}") from None
    per = {"ids": ids, "logprobs": lps, **scalars, **sampled}
    if trained is None:
        return {a: v.reshape(n, L, *v.shape[1:]) for a, v in per.items()}
    out = {}
    for a, v in per.items():  # zeros where the store holds no targets, as at padding
        out[a] = np.zeros((n, L, *v.shape[1:]), v.dtype if a != "logprobs" else np.float32)
        out[a][trained] = v
    return out


def check_sampled(sampled: dict, logprobs: np.ndarray) -> None:
    """Counts only on held entries, and a finite or ``-inf`` ``log_z`` (``-inf``: nothing was drawn)."""
    if "counts" in sampled and sampled["counts"].size and (sampled["counts"][np.isneginf(logprobs)] > 0).any():
        raise FormatError("counts: a draw counted on an absent entry")
    z = sampled.get("log_z")
    if z is not None and z.size and (np.isnan(z).any() or np.isposinf(z).any()):
        raise FormatError("log_z: NaN or +inf")


def decode_class_logits(arrays: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    """A classify teacher part: ``logits`` [S, C] float32, checked finite."""
    logits = arrays["logits"]
    if logits.size and not np.isfinite(logits).all():
        raise FormatError(f"{where}/logits: non-finite values")
    return {"logits": logits}


def check_inputs(part: dict[str, np.ndarray], seq_len: int, where: str, num_labels: int | None = None) -> dict[str, np.ndarray]:
    """Check a decoded inputs part's lengths and optional arrays (FORMAT.md, version 3) and add what
    readers hand out: ``loss_mask`` [S, L] bool (stored, or every position with a next token in the
    window) and ``position_ids`` [S, L] int32 (restarting at each ``doc_start``, else ``0 .. L - 1``)."""
    lengths = part["length"]
    check_lengths(lengths, seq_len, where)
    n = len(lengths)
    pos = np.arange(seq_len)[None, :]
    out = dict(part)
    if "loss_mask" in part:
        m = part["loss_mask"]
        if m.size and (m.max() > 1 or np.any(m[pos + 1 >= lengths[:, None]])):
            raise FormatError(f"{where}/inputs/loss_mask: expected 0 or 1, and 0 from each window's last token on")
        out["loss_mask"] = m.astype(bool)
    else:
        out["loss_mask"] = np.broadcast_to(pos + 1 < lengths[:, None], (n, seq_len))
    if "doc_start" in part:
        d = part["doc_start"]
        if d.size and (d.max() > 1 or np.any(d[:, 0] != 1)):
            raise FormatError(f"{where}/inputs/doc_start: expected 0 or 1, and 1 at position 0")
        out["doc_start"] = d.astype(bool)
        out["position_ids"] = position_ids(out["doc_start"])
    else:
        out["position_ids"] = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (n, seq_len))
    if "row" in part and part["row"].size and part["row"].min() < 0:
        raise FormatError(f"{where}/inputs/row: expected indices >= 0")
    if "label" in part and part["label"].size and (part["label"].min() < -1 or part["label"].max() >= (num_labels or 0)):
        raise FormatError(f"{where}/inputs/label: expected classes in [0, {num_labels}) or -1")
    return out


def position_ids(doc_start: np.ndarray) -> np.ndarray:
    """Positions that restart at every document start: ``doc_start`` [S, L] bool -> [S, L] int32."""
    S, L = doc_start.shape
    idx = np.broadcast_to(np.arange(L), (S, L))
    last_start = np.maximum.accumulate(np.where(doc_start, idx, 0), axis=1)
    return (idx - last_start).astype(np.int32)


#: per-sequence arrays of a decoded shard besides the teachers' (``doc_start``, ``row``: only where stored)
ROW_KEYS = ("input_ids", "length", "seq_hash", "loss_mask", "position_ids", "doc_start", "row", "label")


def slice_rows(sh: dict, a: int, b: int) -> dict:
    """Rows ``a:b`` of a decoded shard (views, no copy)."""
    out = {k: sh[k][a:b] for k in ROW_KEYS if k in sh}
    out["teachers"] = {n: {k: v[a:b] for k, v in td.items()} for n, td in sh["teachers"].items()}
    return out


def join_rows(parts: list[dict], as_torch: bool) -> dict:
    """One batch from row slices (no copy when there is one slice); ``as_torch``: tensors, with
    token ids as int64 (what ``gather``/``Embedding`` take; the store keeps them as small uints)."""
    if len(parts) == 1:
        out = parts[0]
    else:
        out = {k: np.concatenate([p[k] for p in parts]) for k in ROW_KEYS if k in parts[0]}
        out["teachers"] = {n: {k: np.concatenate([p["teachers"][n][k] for p in parts]) for k in parts[0]["teachers"][n]}
                           for n in parts[0]["teachers"]}
    if not as_torch:
        return out
    import torch

    def conv(a: np.ndarray):
        return torch.from_numpy(a if a.flags.writeable else a.copy())  # torch wants writable memory

    extra = {k: conv(np.ascontiguousarray(out[k], np.int64 if k in ("position_ids", "row", "label") else None))
             for k in ("loss_mask", "position_ids", "doc_start", "row", "label") if k in out}
    return {"input_ids": conv(out["input_ids"].astype(np.int64)), "length": conv(out["length"].astype(np.int64)),
            "seq_hash": out["seq_hash"], **extra,
            "teachers": {n: {k: conv(v.astype(np.int64) if k == "ids" else v) for k, v in td.items()}
                         for n, td in out["teachers"].items()}}
