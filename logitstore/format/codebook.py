"""The companded codebook of the compact encoding: log-prob steps fine where the probability is.

A uniform grid in log space spends its precision evenly, but the KL between a reconstructed and an
exact distribution weighs each entry's error by its probability: with ``p_i`` the probability and
``d_i`` the step at entry ``i``, the quantisation KL is about ``sum_i p_i d_i^2 / 24``, and after
entropy coding each entry costs about ``-log2 d_i`` bits. Minimising the first at a fixed total of
the second gives ``d_i ∝ p_i^{-1/2}`` (the entropy-constrained optimum), i.e. a grid uniform in
``sqrt(p)``. Pure ``sqrt(p)`` steps grow without bound for small ``p``; a linear term caps the
step at ``1 / s`` nats, so the maximum error stays ``1 / (2 s)``. The code scale is

    t(lp) = s * (2 F exp(lp / 2) + lp),         s = 2 ** (value_bits - 5),  F = FINE = 56

whose step ``1 / t'(lp) = 1 / (s * (F exp(lp / 2) + 1))`` is ``1 / (57 s)`` nats at ``lp = 0``
and tends to ``1 / s`` far below it. Stored integers are *distances from the top of the scale*,
``distance(lp) = round(t(0) - t(lp)) = round(s * (2 F (1 - exp(lp / 2)) - lp))`` (>= 0), and a
distance decodes to the exact inverse of ``t`` (rounded to float32): by bisection down to
``-TABLE_LP`` nats, and ``2 F - distance / s`` below it, where ``exp(lp / 2)`` is under 1e-13;
one table holds every distance, so decoding is a subtraction and a gather.
Log-probs below ``LP_FLOOR`` are stored as ``LP_FLOOR``.

Measured on SmolLM2-135M-Instruct's distributions (``tools/bench_store.py``): at 8 bits
the mean KL is below bf16's (DistillKit) at every k in {32, 64, 128}, max error 1/16 nat.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from logitstore.errors import FormatError

#: the ``sqrt(p)`` term's weight: the top step is ``1 / ((FINE + 1) s)``
FINE = 56
#: log-probs below this are stored as this (distances then stay below 2^16 at 8 bits)
LP_FLOOR = -4096.0
#: the decode table covers log-probs down to ``-TABLE_LP``; below, ``2 F - distance / s`` is exact in float32
TABLE_LP = 64
#: value_bits the companded codebook accepts (``s`` = 2, 4, 8 codes per nat at the bottom)
BITS = (6, 7, 8)


def scale(value_bits: int) -> int:
    """Codes per nat far below the top (``s``): the maximum error is ``1 / (2 s)``."""
    return 1 << (value_bits - 5)


def max_distance(value_bits: int) -> int:
    """The distance of ``LP_FLOOR``: no valid stored distance is larger."""
    return int(np.rint(scale(value_bits) * (2 * FINE - LP_FLOOR)))


def distance(lp: np.ndarray, value_bits: int) -> np.ndarray:
    """``round(t(0) - t(lp))`` as int64, same shape as ``lp``; ``lp`` clipped to ``[LP_FLOOR, 0]``."""
    x = np.clip(lp.astype(np.float64), LP_FLOOR, 0.0)
    s = scale(value_bits)
    return np.rint(s * (2 * FINE * -np.expm1(x / 2) - x)).astype(np.int64)


@lru_cache(maxsize=None)
def _table(value_bits: int) -> np.ndarray:
    """float32 log-prob of every distance ``0 .. max_distance`` (at most 33,665 entries, 132 KiB: it
    stays in cache). Down to ``-TABLE_LP`` nats the exact inverse by bisection in float64 (60 halvings
    of a 4096-nat bracket, far below float32 resolution); below, ``2 F - d / s``, where the
    ``exp(x / 2)`` term is under 1e-13 nats."""
    s = scale(value_bits)
    d = np.arange(max_distance(value_bits) + 1, dtype=np.float64)
    out = 2 * FINE - d / s
    near = d[: s * (2 * FINE + TABLE_LP) + 1]
    lo, hi = np.full_like(near, LP_FLOOR), np.zeros_like(near)
    for _ in range(60):
        mid = (lo + hi) / 2
        over = s * (2 * FINE * -np.expm1(mid / 2) - mid) > near  # distance of mid too large: mid too low
        lo, hi = np.where(over, mid, lo), np.where(over, hi, mid)
    out[: near.size] = hi  # the upper end (bracket 4e-15 nats wide): distance 0 decodes to exactly 0
    out = np.maximum(out, LP_FLOOR).astype(np.float32)
    out.setflags(write=False)
    return out


def values(code_lo: np.ndarray, codes: np.ndarray, value_bits: int) -> np.ndarray:
    """float32 log-probs ``[N, k]`` of the distances ``code_lo[:, None] - codes``. Raises
    :class:`FormatError` for a distance outside ``[0, max_distance]``, which no writer produces."""
    top = max_distance(value_bits)
    if code_lo.size and int(code_lo.max()) > top:
        raise FormatError(f"code_lo: {int(code_lo.max())} is above {top}, the largest distance of the "
                          f"{value_bits}-bit companded codebook")
    lo16 = code_lo.astype(np.uint16)[:, None]  # <= 33,664 (checked): exact
    if codes.size and (codes > lo16).any():
        raise FormatError("codes: an offset exceeds its position's code_lo (a negative distance)")
    dist = lo16 - codes  # uint16, in [0, code_lo] after the checks: 3x faster than int32 arithmetic
    return np.take(_table(value_bits), dist, mode="wrap")  # indices in range; "wrap" skips clip's extra pass


def error_bound(lp_min: np.ndarray, value_bits: int) -> np.ndarray:
    """Per-position bound on ``|decoded - exact|`` given each position's smallest log-prob ``[N]``:
    half the largest step, float32 rounding, and what the floor clips off."""
    lo = lp_min.astype(np.float64)
    return (0.5 / scale(value_bits) + 1e-6 * np.maximum(1.0, np.abs(lo)) + np.maximum(0.0, LP_FLOOR - lo)).astype(np.float32)
