"""Unbiased sampled teacher targets (Random-Sampling KD; Anshumann et al. 2025, "Sparse Logit
Sampling: Accelerating Knowledge Distillation in LLMs").

Instead of the teacher's top-k (a biased target: the student learns nothing, or a renormalised
something, about the tail), each position keeps ``S`` ids drawn i.i.d. from a proposal ``q`` and
their teacher log-probs. Importance weights turn the draws into an estimate ``p_hat`` of the
teacher's distribution whose expectation is exactly ``p``, so every loss that is *linear in the
target* (forward KL, cross-entropy) is estimated without bias, value and gradient alike.

Proposal (``tau`` = ``proposal_temperature``, ``A`` = the allowed ids)::

    q_v = p_v^(1/tau) / Z   for v in A,   0 otherwise,   log Z = logsumexp_{v in A}(log p_v / tau)

``A`` is the whole vocabulary, or (the "both" mode, ``exclude`` given) every id not in the exact
top-k: the top-k is then kept exactly and the samples estimate only the tail. ``tau = 1`` samples the
teacher itself; ``tau > 1`` flattens the proposal (more distinct tail ids per position, at the cost of
unequal weights).

What a store must hold per position so that ``q`` can be recomputed from the stored teacher log-probs
(``log q_i = lp_i / tau - log_z``): the ids, their counts, their teacher log-probs, and ``log_z`` [N]
— one float. With ``tau = 1`` and no exclusion ``log_z = 0`` (nothing extra); in the "both" mode at
``tau = 1`` ``log_z`` is the log tail mass, which the format already stores as ``tail_mass``.

Shapes: ``N`` positions, ``V`` vocabulary, ``S`` samples per position, ``k`` exact top-k ids.
Everything is float32 on the inputs' device.
"""

from __future__ import annotations

import torch


def _neg_inf(like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(float("-inf"), device=like.device, dtype=torch.float32)


def proposal_logprob(teacher_logprobs: torch.Tensor, log_z: torch.Tensor, proposal_temperature: float = 1.0) -> torch.Tensor:
    """``log q_i = lp_i / tau - log_z`` [N, S] from stored teacher log-probs [N, S] (``-inf`` on
    padding stays ``-inf``) and the per-position ``log_z`` [N] that :func:`draw` returns."""
    lp = teacher_logprobs.float()
    return torch.where(torch.isneginf(lp), lp, lp / proposal_temperature - log_z.float()[:, None])


def draw(logprobs: torch.Tensor, samples: int, proposal_temperature: float = 1.0, generator: torch.Generator | None = None,
         exclude: torch.Tensor | None = None) -> dict:
    """Draw ``samples`` (= ``S``) ids per position i.i.d. from ``q ∝ p^(1/tau)`` over the allowed ids.

    ``logprobs`` [N, V]: the teacher's full log-probs at T = 1 (``-inf`` allowed). ``exclude`` [N, k]
    int64 (duplicates allowed): ids not to sample (the exact top-k of the "both" mode); ``q`` is then
    renormalised over the rest. ``generator``: a ``torch.Generator`` on the inputs' device.

    Returns a dict of tensors on ``logprobs.device``:

    - ``ids`` [N, S] int64: the distinct ids drawn, ascending, in the first slots; padding slots repeat
      the row's first id (so gathers and masks built from ``ids`` stay valid);
    - ``counts`` [N, S] int32: how often each id was drawn (0 on padding); each row sums to ``S``
      (to 0 in a row whose allowed ids have no teacher mass: nothing can be drawn there);
    - ``logprobs`` [N, S] float32: the teacher's log-prob ``lp_i`` of each id (``-inf`` on padding);
    - ``log_q`` [N, S] float32: the proposal's log-prob ``lp_i / tau - log_z`` (``-inf`` on padding);
    - ``log_z`` [N] float32: ``logsumexp`` of ``lp / tau`` over the allowed ids (``-inf``: none);
    - ``log_mass`` [N] float32: ``logsumexp`` of ``lp`` over the allowed ids (the teacher's tail mass
      in the "both" mode, 0 otherwise); informational, :func:`estimate` does not need it.
    """
    if samples < 1:
        raise ValueError(f"samples: expected >= 1, got {samples}")
    if not proposal_temperature > 0:
        raise ValueError(f"proposal_temperature: expected > 0, got {proposal_temperature}")
    lp = logprobs.float()
    N = lp.shape[0]
    if exclude is not None:
        lp = lp.scatter(-1, exclude.long(), float("-inf"))
    a = lp / proposal_temperature
    log_z = torch.logsumexp(a, -1)  # [N]
    dead = torch.isneginf(log_z)  # rows with nothing to draw
    probs = torch.where(dead[:, None], torch.ones_like(a), torch.exp(a - torch.where(dead, 0.0, log_z)[:, None]))
    draws = torch.multinomial(probs, samples, replacement=True, generator=generator)  # [N, S]
    srt = draws.sort(-1).values
    first = torch.ones_like(srt, dtype=torch.bool)
    first[:, 1:] = srt[:, 1:] != srt[:, :-1]
    slot = first.long().cumsum(-1) - 1  # [N, S]: the output slot of each draw
    counts = torch.zeros((N, samples), dtype=torch.int32, device=lp.device)
    counts.scatter_add_(1, slot, torch.ones_like(slot, dtype=torch.int32))
    counts = torch.where(dead[:, None], torch.zeros_like(counts), counts)
    ids = srt[:, :1].expand(N, samples).clone()
    ids.scatter_(1, slot, srt)  # every draw of an id writes the same value into its slot
    valid = counts > 0
    g = lp.gather(-1, ids)
    teacher = torch.where(valid, g, _neg_inf(g))
    log_q = torch.where(valid, g / proposal_temperature - log_z[:, None], _neg_inf(g))
    return {"ids": ids, "counts": counts, "logprobs": teacher, "log_q": log_q, "log_z": log_z,
            "log_mass": torch.logsumexp(lp, -1)}


def estimate(counts: torch.Tensor, teacher_logprobs: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Importance-weighted estimate ``p_hat`` [N, S] of the teacher's probability of each drawn id.

    ``counts`` [N, S] (0 on padding), ``teacher_logprobs`` [N, S] (``lp_i``, full-vocabulary log-probs
    at T = 1) and ``log_q`` [N, S] as returned by :func:`draw` (or :func:`proposal_logprob`)::

        p_hat_i = (count_i / S) * p_i / q_i,      S = sum_i count_i   (0 on padding)

    Unbiased for any ``f``: with ``x_1..x_S`` i.i.d. from ``q``,
    ``sum_i p_hat_i f(i) = (1/S) sum_s (p_{x_s} / q_{x_s}) f(x_s)``, and each term has expectation
    ``sum_{v in A} q_v (p_v / q_v) f(v) = sum_{v in A} p_v f(v)`` (``q_v > 0`` wherever ``p_v > 0`` in
    ``A``, since ``q ∝ p^(1/tau)``). So ``E[sum_i p_hat_i f(i)] = sum_{v in A} p_v f(v)``, which is
    ``sum_v p_v f(v)`` when ``A`` is the whole vocabulary.

    "Both" mode (``A`` = the tail outside the exact top-k): the formula is unchanged and estimates the
    tail part ``sum_{v in A} p_v f(v)``. The tail-mass scaling is already inside ``p_i / q_i``: with
    ``P_A = sum_{v in A} p_v`` and the renormalised tail ``p~ = p / P_A``, ``p_i / q_i = P_A * p~_i / q_i``;
    at ``tau = 1`` ``q = p~`` and ``p_hat_i = P_A * count_i / S``. ``sum_i p_hat_i`` is 1 (or ``P_A``)
    exactly at ``tau = 1`` and only in expectation otherwise. A row with ``S = 0`` gives zeros.
    """
    c = counts.float()
    n = c.sum(-1, keepdim=True).clamp(min=1)
    valid = counts > 0
    lr = torch.where(valid, teacher_logprobs.float() - log_q.float(), torch.zeros_like(c))
    return torch.where(valid, c / n * torch.exp(lr), torch.zeros_like(c))


def sampled_kd_loss(student_logits: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor, teacher_logprobs: torch.Tensor,
                    log_q: torch.Tensor, topk: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Per-position estimate [N] of the forward KL(p || s) from sampled targets.

    ``student_logits`` [N, V] (any float dtype; computed in float32), ``log s = log_softmax`` at T = 1
    over the full vocabulary. ``ids``/``counts``/``teacher_logprobs``/``log_q`` [N, S] from :func:`draw`.
    ``topk``: ``(topk_ids [N, k], topk_logprobs [N, k])``, the exact top-k of the "both" mode (ids that
    :func:`draw` excluded; ``-inf`` log-probs contribute nothing)::

        L = sum_{j in topk} p_j (lp_j - log s_j)  +  sum_i p_hat_i (lp_i - log s_i)

    ``E[L] = KL(p || s)`` (:func:`estimate` with ``f(v) = lp_v - log s_v``). The gradient w.r.t. the
    logits is ``(sum_j p_j + sum_i p_hat_i) s - (p on the top-k + p_hat on the drawn ids)``, whose
    expectation is ``s - p``, the full KL's gradient (``E[sum_i p_hat_i] = P_A``). Padding contributes 0.
    """
    log_s = torch.log_softmax(student_logits.float(), dim=-1)
    p_hat = estimate(counts, teacher_logprobs, log_q)
    valid = counts > 0
    diff = torch.where(valid, teacher_logprobs.float() - log_s.gather(-1, ids), torch.zeros_like(p_hat))
    loss = (p_hat * diff).sum(-1)
    if topk is not None:
        t_ids, t_lp = topk
        t_lp = t_lp.float()
        live = ~torch.isneginf(t_lp)
        d = torch.where(live, t_lp - log_s.gather(-1, t_ids.long()), torch.zeros_like(t_lp))
        loss = loss + (torch.where(live, t_lp.exp(), torch.zeros_like(t_lp)) * d).sum(-1)
    return loss
