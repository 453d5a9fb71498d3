"""Aligning several teachers' top-k sets on one support (runs in data-loader workers, numpy).

Input per teacher ``m``: ``ids`` [N, k_m], ``logprobs`` [N, k_m], ``tail_mass`` [N]; with
``absent: True`` (a teacher with adaptive k or sampled targets: FORMAT.md, "Version 4") a ``-inf``
log-prob is an absent entry, so that position holds fewer entries and its tail is spread over
``V - n_m(t)`` tokens. Output: the
fields documented in :mod:`logitstore.distributions.fusion` (``support``, ``valid``, ``teacher_lp``, ``rest_lp``,
``n_out``), as numpy arrays. ``K`` is the largest union size in the batch (at most ``sum k_m``).
"""

from __future__ import annotations

import numpy as np

#: Smallest tail mass a teacher is read with when ``k < V`` (FORMAT.md, "Reading the tail"). A
#: stored tail of 0 does not mean the teacher gives those ``V - k`` tokens no probability: it was
#: below what the encoding represents (float16 rounds tails under 3e-8 to 0; float32 softmax
#: underflows). Read as exactly 0 it makes reverse KL and mean-logits fusion infinite (``log 0``),
#: so every tail is read as ``max(tail, TAIL_FLOOR)``. Below 1e-10 the tail carries nothing a
#: float32 student can learn from (forward KL weighs it by itself), and ``log(1e-10) = -23`` keeps
#: reverse KL finite while still pushing the student's off-support mass down.
TAIL_FLOOR = 1e-10


def rest_logprob(tail_mass: np.ndarray, vocab_size: int, k) -> np.ndarray:
    """log-prob of one token outside a teacher's top-k: ``log(max(tail, TAIL_FLOOR) / (V - k))``;
    ``-inf`` when ``k = V`` (there is no such token). ``k``: an int, or ``[N]`` entries per position."""
    n = vocab_size - np.asarray(k, dtype=np.int64)
    if n.ndim == 0 and n <= 0:
        return np.full(tail_mass.shape, -np.inf, dtype=np.float32)
    tail = np.maximum(np.nan_to_num(tail_mass.astype(np.float64), nan=0.0), TAIL_FLOOR)
    with np.errstate(divide="ignore"):
        return np.where(n > 0, np.log(tail) - np.log(np.maximum(n, 1)), -np.inf).astype(np.float32)


def sampled_weights(t: dict) -> np.ndarray:
    """log of the estimator's target weights [N, k] for a teacher with sampled targets
    (:mod:`logitstore.distributions.sampled`): ``lp`` on exact entries (count 0), and on drawn ones
    ``log((c_i / S) * p_i / q_i)`` with ``log q_i = lp_i / tau - log_z``, ``S`` the row's draws."""
    c = t["counts"].astype(np.float64)
    lp = t["logprobs"].astype(np.float64)
    S = np.maximum(c.sum(1, keepdims=True), 1)
    tau = float(t["proposal_temperature"])
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.log(c / S) + lp - (lp / tau - t["log_z"].astype(np.float64)[:, None])
    return np.where(c > 0, w, lp).astype(np.float32)


def build_targets(teachers: list[dict], vocab_size: int) -> dict[str, np.ndarray]:
    """The fused-target fields (module docstring). A teacher dict with ``counts`` (sampled targets)
    contributes the estimator's weights and nothing off its entries (its tail is what the draws estimate)."""
    N = teachers[0]["ids"].shape[0]
    V = vocab_size
    extra = {}
    if any("counts" in t for t in teachers):  # sampled weights replace the log-probs: keep each teacher's top-1
        extra["teacher_top1"] = np.stack([np.take_along_axis(t["ids"], t["logprobs"].argmax(1)[:, None], 1)[:, 0].astype(np.int64)
                                          for t in teachers])
        teachers = [{**t, "logprobs": sampled_weights(t)} if "counts" in t else t for t in teachers]
    # absent entries (-inf, only for teachers that declare them) become the sentinel id V
    holes = [np.isneginf(t["logprobs"]) if t.get("absent") or "counts" in t else None for t in teachers]
    ragged = any(h is not None and h.any() for h in holes)
    present = [~h if h is not None else np.ones(t["ids"].shape, bool) for t, h in zip(teachers, holes)] if ragged else None
    ids_of = [np.where(p, t["ids"].astype(np.int64), V) for t, p in zip(teachers, present)] if ragged else \
        [t["ids"].astype(np.int64) for t in teachers]
    all_ids = np.concatenate(ids_of, axis=1)  # [N, sum k]; absent entries as the sentinel V
    s = np.sort(all_ids, axis=1)
    dup = np.zeros_like(s, dtype=bool)
    dup[:, 1:] = s[:, 1:] == s[:, :-1]
    if ragged:
        dup |= s == V
    u = s.shape[1] - dup.sum(1)
    K = int(u.max()) if N else 0
    s = np.sort(np.where(dup, V, s), axis=1)[:, :K]  # unique ids first, sentinel V after
    valid = s < V
    support = np.where(valid, s, 0)
    rows = np.arange(N, dtype=np.int64)[:, None]
    q = (rows * (V + 1) + support).ravel()
    teacher_lp = np.empty((len(teachers), N, K), dtype=np.float32)
    rest = np.empty((len(teachers), N), dtype=np.float32)
    for m, t in enumerate(teachers):
        k = present[m].sum(1) if ragged else t["ids"].shape[1]
        order = np.argsort(ids_of[m], axis=1, kind="stable")
        ids_sorted = np.take_along_axis(ids_of[m], order, 1)
        lp_sorted = np.take_along_axis(t["logprobs"].astype(np.float32), order, 1)
        keys = (rows * (V + 1) + ids_sorted).ravel()  # globally sorted: rows ascend, ids ascend per row
        pos = np.minimum(np.searchsorted(keys, q), keys.size - 1)
        found = (keys[pos] == q).reshape(N, K)
        rest[m] = rest_logprob(t["tail_mass"], V, k) if "counts" not in t else -np.inf
        teacher_lp[m] = np.where(found, lp_sorted.ravel()[pos].reshape(N, K), rest[m][:, None])
        teacher_lp[m][~valid] = -np.inf
    return {"support": support, "valid": valid, "teacher_lp": teacher_lp, "rest_lp": rest,
            "n_out": (V - u).astype(np.float32), **extra}
