"""Adaptive k (``--top-p P --min-k a``, ``--top-k``/``--max-k`` b): per position, the smallest number of
entries whose probability reaches ``P``, at least ``a`` and at most ``b``.

The teacher runner keeps the top ``b`` entries in rank order (descending log-prob); this keeps the
first ``n_t`` of them at position ``t`` and marks the rest *absent* (log-prob ``-inf``; FORMAT.md,
"Absent entries"), moving their probability into the exact tail mass, so that the top-k mass plus the
tail is still the whole distribution. Confident positions (most of an instruct model's) then cost one
or two entries, uncertain ones up to ``b``.
"""

from __future__ import annotations

import numpy as np


def truncate_top_p(res: dict, top_p: float, min_k: int, valid: np.ndarray) -> dict:
    """``res``: the runner's ``ids``/``logprobs`` ``[n, L, b]`` (rank order) and ``tail_mass`` ``[n, L]``;
    ``valid`` ``[n, L]``: real positions (padding is left as it is). Returns ``res`` with entries past
    ``n_t`` set to ``-inf``, their mass added to ``tail_mass``, and ``n_entries`` ``[n, L]`` (int32)."""
    lp = res["logprobs"]
    p = np.exp(lp.astype(np.float64))
    b = lp.shape[-1]
    reached = np.cumsum(p, axis=-1) >= top_p  # [n, L, b]
    n_t = np.where(reached.any(-1), reached.argmax(-1) + 1, b)
    n_t = np.clip(n_t, min(min_k, b), b)
    n_t = np.where(valid, n_t, b)  # padding positions keep their zeros
    drop = np.arange(b)[None, None, :] >= n_t[..., None]
    dropped = np.where(drop, p, 0.0).sum(-1)
    res = dict(res)
    res["logprobs"] = np.where(drop, np.float32(-np.inf), lp).astype(np.float32)
    res["tail_mass"] = np.minimum(res["tail_mass"].astype(np.float64) + dropped, 1.0).astype(np.float32)
    held = np.minimum(n_t, np.isfinite(lp).sum(-1))  # a masked-vocabulary -inf kept by min_k is absent too
    res["n_entries"] = np.where(valid, held, 0).astype(np.int32)
    return res
