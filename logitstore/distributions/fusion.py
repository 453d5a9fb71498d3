"""Fusing the sparse distributions of several teachers into one sparse target.

What a teacher's cached distribution means: for position ``t`` teacher ``m`` stores its top-``k_m``
log-probs and its exact ``tail_mass``. We read that as a full distribution over the vocabulary
``V`` in which every token outside the top-``k_m`` gets an equal share of the tail:
``p_m(i) = tail_m / (V - k_m)``. Everything below is exact for that reading, and when every
``k_m = V`` it is exactly the fusion of the full teacher distributions.

The fused target lives on the **union** of the teachers' top-k ids (the *support*, padded to ``K``)
plus one number for the total mass on the ``n_out = V - |support|`` remaining tokens.

Batch fields (built by :mod:`logitstore.distributions.targets` in the data workers), shapes with ``N`` positions:
- ``support`` [N, K] int64 and ``valid`` [N, K] bool (padding is invalid);
- ``teacher_lp`` [M, N, K] float32: teacher ``m``'s log-prob of each support id (its tail share if the
  id is not in its top-k; ``-inf`` on padding);
- ``rest_lp`` [M, N]: teacher ``m``'s log-prob of any single token outside its top-k
  (``log(tail_m / (V - k_m))``, ``-inf`` when the tail is empty);
- ``n_out`` [N] float32: ``V - |support|``.

Modes:
- ``mean-probs``: ``q = sum_m w_m p_m^{(T_m)}``, the weighted arithmetic mean of probabilities;
- ``mean-logits``: ``q ∝ exp(sum_m w_m log p_m^{(T_m)})``, the weighted mean of log-probs (the
  classic mean of logits; log-probs differ from logits by a per-teacher constant that the
  renormalisation removes), renormalised over the whole vocabulary.

Per-position weights (``--fuse-weights``), from what every store holds per position and teacher:
- ``fixed`` (default): ``w_m`` as given, the same at every position;
- ``entropy``: ``w_m(t) ∝ w_m * exp(-H_m(t) / tau)``, with ``H_m(t)`` the teacher's full-vocabulary
  entropy at ``t`` (stored exactly, not from the top-k): a confident teacher counts more there;
- ``gold``: ``w_m(t) ∝ w_m * p_m(y_t)^(1 / tau) = w_m * exp(log p_m(y_t) / tau)``, with ``y_t`` the
  real next token and ``log p_m(y_t)`` its stored gold log-prob (at T = 1): the teacher that found
  the data likelier counts more. It uses the label, so it is a training-time weighting (at
  evaluation it weighs teachers with the same labels the student is scored on).
Both normalise over teachers at each position (a softmax of ``log w_m + score_m / tau``, so teachers of
weight 0 stay at 0); ``tau -> inf`` gives the fixed weights back, ``tau -> 0`` picks one teacher per
position. The weights then enter ``mean-probs`` / ``mean-logits`` in place of ``w_m``.

Per-teacher temperature ``T_m``: ``p_m^{(T)} ∝ p_m^{1/T}`` over the whole vocabulary (top-k entries and
every tail token), i.e. the softmax of the teacher's logits at temperature ``T`` (log-probs and logits
differ by a constant per position). Weights are normalised to sum to 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MODES = ("mean-probs", "mean-logits")
#: ``--fuse-weights``: how teacher weights vary by position (module docstring)
WEIGHTINGS = ("fixed", "entropy", "gold")


@dataclass
class SparseTarget:
    """A (fused) target distribution: ``lp`` [N, K] log-probs on ``support`` (``-inf`` where
    invalid) and ``out_lp`` [N], the log of the total mass on the ``n_out`` tokens off the support."""

    support: torch.Tensor
    valid: torch.Tensor
    lp: torch.Tensor
    out_lp: torch.Tensor
    n_out: torch.Tensor


def normalize_weights(weights, n_teachers: int) -> list[float]:
    """Validate and normalise teacher weights (``None``: equal). Raises ``ValueError`` with a reason."""
    if weights is None:
        return [1.0 / n_teachers] * n_teachers
    w = [float(x) for x in weights]
    if len(w) != n_teachers:
        raise ValueError(f"--weights: {len(w)} weight(s) for {n_teachers} teacher(s)")
    if any(x < 0 or x != x for x in w):
        raise ValueError(f"--weights: weights must be >= 0, got {w}")
    total = sum(w)
    if total <= 0:
        raise ValueError(f"--weights: weights sum to {total}; at least one must be positive")
    return [x / total for x in w]


def position_weights(weighting: str, weights: list[float], entropy: torch.Tensor | None, gold_logprob: torch.Tensor | None,
                     tau: float = 1.0) -> torch.Tensor | None:
    """Per-position teacher weights ``[M, N]`` (each column sums to 1), or ``None`` for ``fixed``.
    ``entropy`` / ``gold_logprob``: ``[M, N]``, each teacher's stored scalars at the positions."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"--fuse-weights: expected one of {WEIGHTINGS}, got {weighting!r}")
    if weighting == "fixed":
        return None
    if not tau > 0:
        raise ValueError(f"--fuse-weight-temperature: expected > 0, got {tau}")
    score = -entropy.float() if weighting == "entropy" else gold_logprob.float()
    w = torch.tensor(weights, device=score.device, dtype=torch.float32)
    logw = torch.where(w > 0, torch.log(w.clamp(min=1e-30)), torch.tensor(float("-inf"), device=score.device))
    return torch.softmax(logw[:, None] + score / tau, dim=0)


def _log_n(n_out: torch.Tensor) -> torch.Tensor:
    return torch.where(n_out > 0, torch.log(n_out.clamp(min=1)), torch.full_like(n_out, float("-inf")))


def temper(teacher_lp: torch.Tensor, rest_lp: torch.Tensor, valid: torch.Tensor, n_out: torch.Tensor, temperature: float):
    """One teacher at temperature ``T``: ``(lp [N, K], out_lp [N])``, normalised over the vocabulary."""
    neg_inf = torch.tensor(float("-inf"), device=teacher_lp.device)
    a = torch.where(valid, teacher_lp / temperature, neg_inf)
    b = rest_lp / temperature + _log_n(n_out)  # all off-support tokens together
    z = torch.logsumexp(torch.cat([a, b[:, None]], dim=-1), dim=-1)
    return a - z[:, None], b - z


def fuse(teacher_lp: torch.Tensor, rest_lp: torch.Tensor, support: torch.Tensor, valid: torch.Tensor, n_out: torch.Tensor,
         *, temperatures: list[float], weights: list[float], mode: str = "mean-probs",
         position_weights: torch.Tensor | None = None) -> SparseTarget:
    """Fuse ``M`` teachers (see the module docstring for the fields and modes). ``position_weights``
    ``[M, N]`` (from :func:`position_weights`) replaces ``weights`` position by position."""
    if mode not in MODES:
        raise ValueError(f"--fuse: expected one of {MODES}, got {mode!r}")
    M = teacher_lp.shape[0]
    if len(temperatures) != M or len(weights) != M:
        raise ValueError(f"fuse: {M} teachers but {len(temperatures)} temperatures and {len(weights)} weights")
    neg_inf = torch.tensor(float("-inf"), device=teacher_lp.device)
    parts = [temper(teacher_lp[m].float(), rest_lp[m].float(), valid, n_out, temperatures[m]) for m in range(M)]
    if M == 1:
        lp, out = parts[0]
        return SparseTarget(support, valid, lp, out, n_out)
    if position_weights is not None:
        w = position_weights.to(device=teacher_lp.device, dtype=torch.float32)  # [M, N]
        wk = w[:, :, None]  # broadcasts over the support
    else:
        w = torch.tensor(weights, device=teacher_lp.device, dtype=torch.float32)
        wk = w
    if mode == "mean-probs":
        lp = torch.log(sum(wk[m] * parts[m][0].exp() for m in range(M)))
        out = torch.log(sum(w[m] * parts[m][1].exp() for m in range(M)))
        lp = torch.where(valid, lp, neg_inf)
        return SparseTarget(support, valid, lp, out, n_out)
    # mean-logits: weighted sum of log-probs; off-support tokens all share one value per teacher.
    # Teachers with zero weight must not contribute -inf * 0 = nan.
    log_n = _log_n(n_out)
    s = sum(torch.where(wk[m] > 0, wk[m] * parts[m][0], torch.zeros_like(parts[m][0])) for m in range(M))
    has_out = n_out > 0
    tok_out = sum(torch.where(w[m] > 0, w[m] * (parts[m][1] - torch.where(has_out, log_n, torch.zeros_like(log_n))),
                              torch.zeros_like(log_n)) for m in range(M))
    b = torch.where(has_out, tok_out + log_n, neg_inf)
    s = torch.where(valid, s, neg_inf)
    z = torch.logsumexp(torch.cat([s, b[:, None]], dim=-1), dim=-1)
    return SparseTarget(support, valid, s - z[:, None], b - z, n_out)
