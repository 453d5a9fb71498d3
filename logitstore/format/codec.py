"""Encodings of per-position top-k teacher distributions (format spec: ``FORMAT.md``).

A *teacher part* holds, for ``S`` sequences of ``L`` positions, the top-``k`` token ids and their
log-probabilities (normalised over the whole vocabulary, T = 1) plus three per-position scalars.
Two encodings turn these into plain named arrays that a backend stores as they are:

``lossless``
    ``ids`` [S, L, k] in rank order (descending log-prob), ``logprobs`` float32, scalars float32.
    Decodes bit-exactly to what the teacher runner produced.

``compact`` (default)
    ``ids``: each part ranks the ids it uses by frequency (``id_order``, most frequent first); per
    position the ranks are sorted ascending and delta-coded, so the entropy coder sees small gaps.
    ``codes``, codebook ``companded`` (what this version writes, 8 bits by default): log-probs on the
    grid of :mod:`logitstore.format.codebook`, fine where the probability is (steps from 1/456 nat at
    the top to 1/8 nat at 8 bits), as uint16 offsets from the position's bottom code ``code_lo``;
    absolute error at most ``1 / 2 ** (value_bits - 4)`` nats. Codebook ``uniform`` (stores without
    ``codebook``): a uniform grid of ``2**value_bits - 1`` steps between ``lp_lo`` and ``lp_hi``
    (multiples of 1/64 nat, rounded outwards), error at most ``(lp_hi - lp_lo) / (2 * (2**value_bits - 1))``.
    ``gold_logprob`` and ``entropy`` are fixed-point in 1/256 nat (error <= 1/512 nat). The tail mass
    is ``tail_nlog`` (``tail: "log"``, written by this version): ``round(-ln(tail) * 1024)`` as
    uint16, relative error <= exp(2^-11) - 1 + 2^-23 < 4.9e-4 for every tail >= e^-64 (1.6e-28), 65535 for a
    tail of exactly 0; stores written before it (no ``tail`` field) hold ``tail_mass`` in float16
    (relative error <= 2^-11 only above 2^-14 = 6.1e-5; below, absolute error <= 2^-25 = 3e-8 and
    tails under 3e-8 read as 0), and are still read. Entries come back ordered by id rank, not by
    probability.

All functions work on flattened positions: ``ids``/``logprobs`` are ``[N, k]`` with ``N = S * L``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from logitstore.errors import FormatError
from logitstore.format import codebook as cb

ENCODINGS = ("compact", "lossless")
SCALARS = ("tail_mass", "gold_logprob", "entropy")
#: compact: ``lp_lo``/``lp_hi`` are stored as ``-lp * BOUND_SCALE`` (uint32), rounded outwards
BOUND_SCALE = 64
#: compact: ``gold_logprob`` as ``round(-lp * SCALAR_SCALE)`` (uint32), ``entropy`` as ``round(H * SCALAR_SCALE)`` (uint16)
SCALAR_SCALE = 256
#: compact, ``tail: "log"``: ``tail_nlog = round(-ln(tail) * TAIL_SCALE)`` (uint16), clipped to
#: ``TAIL_MAX_CODE`` (tails below e^-64 ~ 1.6e-28); ``TAIL_ZERO`` stands for a tail of exactly 0
TAIL_SCALE = 1024
TAIL_MAX_CODE = 65534
TAIL_ZERO = 65535
#: how compact stores the tail mass: "log" (``tail_nlog``, above) or "float16" (``tail_mass``, the
#: first version's; implied by a manifest without ``tail``)
TAILS = ("log", "float16")
#: compact: how log-probs become codes: "companded" (:mod:`logitstore.format.codebook`) or "uniform"
#: (per-position affine, the earlier versions'; implied by a manifest without ``codebook``)
CODEBOOKS = ("companded", "uniform")


def id_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype holding every id below ``vocab_size``."""
    if vocab_size <= 1 << 8:
        return np.dtype(np.uint8)
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


@dataclass(frozen=True)
class Encoding:
    """How a teacher part is encoded. Stored in the manifest as :meth:`to_dict`."""

    name: str = "compact"
    #: compact only: precision of the log-prob codes (see :data:`CODEBOOKS`)
    value_bits: int = 8
    #: compact only: how the tail mass is stored (:data:`TAILS`); new stores use "log"
    tail: str = "log"
    #: compact only: :data:`CODEBOOKS`; new stores use "companded"
    codebook: str = "companded"

    def __post_init__(self) -> None:
        if self.name not in ENCODINGS:
            raise FormatError(f"encoding.name: expected one of {ENCODINGS}, got {self.name!r}")
        if not isinstance(self.value_bits, int) or not 2 <= self.value_bits <= 8:
            raise FormatError(f"encoding.value_bits: expected an integer in [2, 8], got {self.value_bits!r}")
        if self.tail not in TAILS:
            raise FormatError(f"encoding.tail: expected one of {TAILS}, got {self.tail!r}")
        if self.codebook not in CODEBOOKS:
            raise FormatError(f"encoding.codebook: expected one of {CODEBOOKS}, got {self.codebook!r}")
        if self.name == "lossless":  # float32 values and tails; the fields mean nothing there
            object.__setattr__(self, "tail", "log")
            object.__setattr__(self, "codebook", "companded")
        elif self.codebook == "companded" and self.value_bits not in cb.BITS:
            raise FormatError(f"encoding.value_bits: the companded codebook takes one of {cb.BITS}, got {self.value_bits!r}")

    def to_dict(self) -> dict:
        if self.name == "lossless":
            return {"name": "lossless"}
        d = {"name": self.name, "value_bits": self.value_bits}
        if self.tail != "float16":  # the first version's stores have no "tail": their ids stay the same
            d["tail"] = self.tail
        if self.codebook != "uniform":  # nor "codebook", like every store written before it
            d["codebook"] = self.codebook
        return d

    @classmethod
    def from_dict(cls, d: object) -> "Encoding":
        if not isinstance(d, dict) or not isinstance(d.get("name"), str):
            raise FormatError(f"encoding: expected an object with a string 'name', got {d!r}")
        unknown = set(d) - {"name", "value_bits", "tail", "codebook"}
        if unknown:
            raise FormatError(f"encoding: unknown fields {sorted(unknown)}")
        for f in ("tail", "codebook"):
            if d["name"] == "lossless" and f in d:
                raise FormatError(f"encoding.{f}: only the compact encoding has one")
        return cls(name=d["name"], value_bits=d.get("value_bits", 7), tail=d.get("tail", "float16"),
                   codebook=d.get("codebook", "uniform"))

    @property
    def levels(self) -> int:
        return (1 << self.value_bits) - 1

    def array_specs(self, k: int, vocab_size: int) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """Per-sequence dtype and trailing shape of every array in a teacher part (without ``id_order``)."""
        idt = id_dtype(vocab_size)
        if self.name == "lossless":
            f = np.dtype(np.float32)
            return {"ids": (idt, (k,)), "logprobs": (f, (k,)), "tail_mass": (f, ()), "gold_logprob": (f, ()), "entropy": (f, ())}
        u32 = np.dtype(np.uint32)
        values = ({"codes": (np.dtype(np.uint16), (k,)), "code_lo": (u32, ())} if self.codebook == "companded" else
                  {"codes": (np.dtype(np.uint8), (k,)), "lp_lo": (u32, ()), "lp_hi": (u32, ())})
        return {
            "ids": (idt, (k,)),
            **values,
            **({"tail_nlog": (np.dtype(np.uint16), ())} if self.tail == "log" else {"tail_mass": (np.dtype(np.float16), ())}),
            "gold_logprob": (u32, ()),
            "entropy": (np.dtype(np.uint16), ()),
        }

    # ------------------------------------------------------------------ encode
    def encode(self, ids: np.ndarray, logprobs: np.ndarray, scalars: dict[str, np.ndarray], vocab_size: int,
               absent: bool = False, draws: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Encode ``ids``/``logprobs`` [N, k] and ``scalars`` [N] into the arrays of a part.
        ``absent`` (adaptive k): ``-inf`` log-probs are absent entries, stored as zero id deltas
        (otherwise a ``-inf`` is a value, stored as the codebook's floor). ``draws`` [N, k] (sampled
        targets: draws per entry): stored as uint8 ``counts`` in the entries' stored order.

        Returns flat arrays (``[N, k]`` / ``[N]``) plus, for ``compact``, the part-level ``id_order``.
        """
        idt = id_dtype(vocab_size)
        if self.name == "lossless":
            out = {"ids": ids.astype(idt, copy=False), "logprobs": logprobs.astype(np.float32, copy=False)}
            for s in SCALARS:
                out[s] = scalars[s].astype(np.float32, copy=False)
            if draws is not None:
                out["counts"] = draws.astype(np.uint8)
            return out
        if logprobs.size and not float(logprobs.max()) <= VALUE_TOL:  # one reduction; NaN fails it too
            raise FormatError(f"logprobs: expected values in [-inf, 0], found max {float(logprobs.max())!r} "
                              f"(NaN or a positive log-prob would be stored as a valid-looking value)")
        out = {}
        holes = np.isneginf(logprobs) if absent else None  # FORMAT.md, "Version 4": absent entries
        any_absent = holes is not None and bool(holes.any())
        # Rank ids by frequency inside this part: frequent ids get small ranks, so gaps between the
        # sorted ranks of one position are small and compress well.
        counts = np.bincount(ids[~holes] if any_absent else ids.ravel(), minlength=vocab_size)
        used = np.flatnonzero(counts)
        id_order = used[np.argsort(-counts[used], kind="stable")].astype(idt)
        rank = np.zeros(vocab_size, dtype=idt)
        rank[id_order] = np.arange(id_order.size, dtype=idt)
        r = rank[ids]
        lp = logprobs.astype(np.float32, copy=False)
        if any_absent:  # absent entries sort last; their value is the row's smallest, so no bound moves
            r = np.where(holes, vocab_size, r.astype(np.int64))
            row_min = np.where(holes, np.float32(np.inf), lp).min(axis=-1, keepdims=True)
            lp = np.where(holes, np.where(np.isfinite(row_min), row_min, np.float32(0)), lp)
        perm = np.argsort(r, axis=-1, kind="stable")
        r = np.take_along_axis(r, perm, axis=-1)
        lp = np.take_along_axis(lp, perm, axis=-1)
        deltas = np.empty(r.shape, dtype=idt)
        deltas[:, 0] = r[:, 0] if not any_absent else np.where(r[:, 0] < vocab_size, r[:, 0], 0)
        np.subtract(r[:, 1:], r[:, :-1], out=deltas[:, 1:], casting="unsafe")
        if any_absent:
            holes = np.take_along_axis(holes, perm, axis=-1)  # in stored order from here on
            deltas[holes] = 0
        out["id_order"] = id_order
        out["ids"] = deltas
        if self.codebook == "companded":
            # offsets from the position's bottom code: most entries of a top-k sit near its bottom, so
            # these cluster near 0 and entropy-code better than distances from the top (measured 20% smaller)
            # a block of rows at a time: distance() holds three float64/int64 copies of its input
            codes, code_lo = np.empty(lp.shape, np.uint16), np.zeros(lp.shape[0], np.uint32)
            for a in range(0, lp.shape[0], _ENCODE_ROWS):
                dist = cb.distance(lp[a:a + _ENCODE_ROWS], self.value_bits)
                lo = dist.max(axis=-1)
                codes[a:a + _ENCODE_ROWS], code_lo[a:a + _ENCODE_ROWS] = lo[:, None] - dist, lo
            out["codes"], out["code_lo"] = codes, code_lo
        else:
            # Per-position affine quantisation. The bounds are rounded outwards to the 1/64-nat grid, so
            # every value lies inside [lo, hi] and the error bound holds for the stored bounds.
            lo_q, hi_q = _bounds_q(lp)
            lo32, hi32 = _bounds(lo_q, hi_q)
            span = np.maximum(hi32 - lo32, np.float32(1e-30))
            q = np.rint((lp - lo32[:, None]) * (self.levels / span)[:, None])
            out["codes"] = np.clip(q, 0, self.levels).astype(np.uint8)
            out["lp_lo"], out["lp_hi"] = lo_q, hi_q
        if any_absent:
            out["codes"][holes] = 0
        if draws is not None:
            out["counts"] = np.take_along_axis(draws, perm, axis=-1).astype(np.uint8)
        if self.tail == "log":
            out["tail_nlog"] = encode_tail(scalars["tail_mass"])
        else:
            out["tail_mass"] = scalars["tail_mass"].astype(np.float16)
        gold = np.clip(np.rint(-scalars["gold_logprob"].astype(np.float64) * SCALAR_SCALE), 0, 2**32 - 1)
        out["gold_logprob"] = gold.astype(np.uint32)
        ent = np.clip(np.rint(scalars["entropy"].astype(np.float64) * SCALAR_SCALE), 0, 2**16 - 1)
        out["entropy"] = ent.astype(np.uint16)
        return out

    # ------------------------------------------------------------------ decode
    def decode(self, arrays: dict[str, np.ndarray], vocab_size: int,
               absent: bool = False) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Inverse of :meth:`encode`: ``(ids [N, k] int64, logprobs [N, k] float32, scalars)``.
        ``absent`` (a teacher with adaptive k): compact entries after the first whose id delta is 0
        are absent and read as ``-inf`` (lossless stores them as ``-inf`` already).

        Raises :class:`FormatError` if the arrays decode to ids outside the vocabulary.
        """
        if self.name == "lossless":
            ids = arrays["ids"]
            if ids.size and int(ids.max()) >= vocab_size:
                raise FormatError(f"ids: found id {int(ids.max())} >= vocab_size {vocab_size}")
            scalars = {s: arrays[s] for s in SCALARS}
            check_values(arrays["logprobs"], scalars, absent=absent)
            return ids, arrays["logprobs"], scalars
        id_order = arrays["id_order"]
        if id_order.size and int(id_order.max()) >= vocab_size:
            raise FormatError(f"id_order: found id {int(id_order.max())} >= vocab_size {vocab_size}")
        ids = _ids_from_deltas(arrays["ids"], id_order)
        if self.codebook == "companded":
            logprobs = cb.values(arrays["code_lo"], arrays["codes"], self.value_bits)
        else:
            lo, hi = _bounds(arrays["lp_lo"], arrays["lp_hi"])
            step = (hi - lo) / np.float32(self.levels)
            logprobs = arrays["codes"].astype(np.float32)
            logprobs *= step[:, None]
            logprobs += lo[:, None]
        if absent and arrays["ids"].shape[-1] > 1:  # a zero delta after the first entry is an absent entry (adaptive k)
            holes = arrays["ids"][:, 1:] == 0
            if holes.any():
                logprobs[:, 1:][holes] = -np.inf
        scalars = {
            "tail_mass": decode_tail(arrays["tail_nlog"]) if self.tail == "log" else arrays["tail_mass"].astype(np.float32),
            "gold_logprob": arrays["gold_logprob"].astype(np.float32) * np.float32(-1.0 / SCALAR_SCALE),
            "entropy": arrays["entropy"].astype(np.float32) * np.float32(1.0 / SCALAR_SCALE),
        }
        if self.tail != "log":  # the other compact values are bounded by construction (unsigned fixed point)
            check_values(None, {"tail_mass": scalars["tail_mass"]})
        return ids, logprobs, scalars

    def error_bound(self, logprobs: np.ndarray) -> np.ndarray:
        """Documented per-position bound on ``|decoded - original|`` log-prob error, ``[N]``."""
        if self.name == "lossless":
            return np.zeros(logprobs.shape[0], dtype=np.float32)
        if self.codebook == "companded":
            return cb.error_bound(logprobs.min(axis=-1), self.value_bits)
        lo, hi = _bounds(*_bounds_q(logprobs))
        return ((hi.astype(np.float64) - lo) / (2 * self.levels) + 1e-6 * np.maximum(1.0, np.abs(lo))).astype(np.float32)


#: slack for float32 rounding in the value checks (a log-prob of +1e-6 is rounding, +0.1 is not)
VALUE_TOL = 1e-4


def check_values(logprobs: np.ndarray | None, scalars: dict[str, np.ndarray], absent: bool = False) -> None:
    """Refuse decoded values no teacher can produce (non-finite, log-probs above 0, tails outside
    [0, 1], negative entropy), naming the field; padding positions hold zeros, which pass. Two
    reductions per array (a NaN makes ``min``/``max`` NaN), so it costs little next to decoding."""
    checks = [("logprobs", logprobs, -np.inf, VALUE_TOL, "(-inf, 0]")] if logprobs is not None else []
    checks += [(n, scalars[n], lo, hi, label) for n, lo, hi, label in (
        ("tail_mass", 0.0, 1.0 + VALUE_TOL, "[0, 1]"), ("gold_logprob", -np.inf, VALUE_TOL, "(-inf, 0]"),
        ("entropy", -VALUE_TOL, np.inf, "[0, inf)")) if n in scalars]
    for name, arr, lo, hi, label in checks:
        if not arr.size:
            continue
        mn, mx = float(arr.min()), float(arr.max())
        if absent and name == "logprobs" and mn == -np.inf and np.isfinite(mx):  # absent entries (version 4)
            mn = mx
        if not (np.isfinite(mn) and np.isfinite(mx)):
            raise FormatError(f"{name}: non-finite values (found [{mn:.6g}, {mx:.6g}])")
        if not (lo <= mn and mx <= hi):
            raise FormatError(f"{name}: outside {label} (found [{mn:.6g}, {mx:.6g}])")


def encode_tail(tail: np.ndarray) -> np.ndarray:
    """``tail_nlog`` of tail masses: ``round(-ln(tail) * 1024)`` as uint16, clipped to [0, 65534]
    (a tail above 1 from float32 rounding reads as 1, one below e^-64 as e^-64); 65535 for 0."""
    t = np.asarray(tail, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        code = np.rint(-np.log(t) * TAIL_SCALE)
    code = np.clip(np.nan_to_num(code, nan=TAIL_MAX_CODE, posinf=TAIL_MAX_CODE), 0, TAIL_MAX_CODE).astype(np.uint16)
    code[~(t > 0)] = TAIL_ZERO
    return code


def decode_tail(code: np.ndarray) -> np.ndarray:
    """Tail masses (float32) from ``tail_nlog``: ``exp(-code / 1024)``, 0 for 65535."""
    out = np.exp(code.astype(np.float32) * np.float32(-1.0 / TAIL_SCALE))
    out[code == TAIL_ZERO] = 0
    return out


def tail_error_bound(tail: np.ndarray, encoding: "Encoding") -> np.ndarray:
    """Documented bound on ``|decoded - exact|`` of tail masses (FORMAT.md), float64."""
    t = np.asarray(tail, dtype=np.float64)
    if encoding.name == "lossless":
        return np.zeros_like(t)
    if encoding.tail == "log":
        rel = np.expm1(0.5 / TAIL_SCALE) + 2.0**-23  # half a step in log space, plus float32 exp/rounding
        return np.where(t >= np.exp(-TAIL_MAX_CODE / TAIL_SCALE), rel * t, np.exp(-TAIL_MAX_CODE / TAIL_SCALE))
    # float16 round to nearest: relative 2^-11 for normal numbers (>= 2^-14), absolute 2^-25 below
    return np.where(t >= 2.0**-14, 2.0**-11 * t, 2.0**-25)


#: rows per block of the companded encode (16,384 x 128 entries: 16 MiB per float64 copy)
_ENCODE_ROWS = 16384
#: rows per block when decoding ids: the rank buffer stays in cache (1.4x faster than whole arrays)
_DECODE_ROWS = 4096


def _ids_from_deltas(deltas: np.ndarray, id_order: np.ndarray) -> np.ndarray:
    """``id_order[cumsum(deltas, -1)]`` [N, k], blockwise; refuses ranks outside ``id_order``."""
    # int32 prefix sums are ~4x faster than int64 and cannot overflow for 16-bit deltas
    acc = np.int32 if deltas.dtype.itemsize <= 2 and deltas.shape[-1] < (1 << 15) else np.int64
    ids = np.empty(deltas.shape, dtype=id_order.dtype)
    ranks = np.empty((min(_DECODE_ROWS, deltas.shape[0]),) + deltas.shape[1:], dtype=acc)
    for start in range(0, deltas.shape[0], _DECODE_ROWS):
        n = min(_DECODE_ROWS, deltas.shape[0] - start)
        r = ranks[:n]
        np.cumsum(deltas[start : start + n], axis=-1, dtype=acc, out=r)
        if r.size and int(r[:, -1].max()) >= id_order.size:  # ranks grow along a row
            raise FormatError(f"ids: rank {int(r[:, -1].max())} outside id_order of length {id_order.size}")
        np.take(id_order, r, mode="wrap", out=ids[start : start + n])  # in range (checked above)
    return ids


def _bounds_q(lp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-position [lo, hi] of ``lp`` [N, k] on the 1/64-nat grid, rounded outwards, as uint32
    ``-bound * 64`` (log-probs are <= 0; the floor of -1e4 nats fits easily)."""
    lo = np.ceil(-lp.min(axis=-1).astype(np.float64) * BOUND_SCALE)
    hi = np.floor(-lp.max(axis=-1).astype(np.float64) * BOUND_SCALE)
    return np.clip(lo, 0, 2**32 - 1).astype(np.uint32), np.clip(hi, 0, 2**32 - 1).astype(np.uint32)


def _bounds(lo_q: np.ndarray, hi_q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scale = np.float32(-1.0 / BOUND_SCALE)
    return lo_q.astype(np.float32) * scale, hi_q.astype(np.float32) * scale
