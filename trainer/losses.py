"""Knowledge-distillation losses against sparse targets, and their chunked evaluation.

Every divergence is computed over ``K + 1`` outcomes per position: the ``K`` support ids and, with
``tail="bucket"``, one bucket for all other tokens (the target's ``out_lp`` against the student's
total probability off the support). With ``tail="renorm"`` the bucket is dropped and both
distributions are renormalised over the support. When the support is the whole vocabulary both
modes equal the dense divergence. Per position the divergence is summed over outcomes; the loss
is the mean over target positions (padding and positions without a next token excluded).

- ``fkl``: forward KL(teacher || student) (Hinton); ``rkl``: reverse KL(student || teacher);
- ``jsd``: generalised Jensen-Shannon with mixture ``m = beta * teacher + (1 - beta) * student``,
  ``beta * KL(teacher || m) + (1 - beta) * KL(student || m)`` (the convention of TRL's GKD).

Distillation at temperature ``T`` softens the student as ``log_softmax(logits / T)`` and multiplies
the divergence by ``T**2`` so gradients keep their scale (Hinton et al.).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from logitstore.distributions.fusion import SparseTarget

LOSSES = ("fkl", "rkl", "jsd")
TAILS = ("bucket", "renorm")


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, stable at both ends, with finite gradients everywhere.

    ``torch.where`` evaluates and differentiates both branches at every element, so each branch's
    input is clamped into the range where it is used (the "safe where"): otherwise, for ``x`` within
    ~3e-8 of 0 (a student whose float32 support mass rounds to 1), ``log1p(-exp(x))`` is ``-inf``
    there, its derivative ``inf``, and ``0 * inf`` puts a NaN into the gradient of the whole step.
    ``x`` is capped just below 0 (``-1e-12`` in float32), so the off-support log-mass is at least
    ``log(1e-12) = -27.6``: float32 log-probs cannot resolve smaller masses anyway.
    """
    x = x.clamp(max=-1e-30) if x.dtype == torch.float64 else x.clamp(max=-1e-12)
    near0 = x > -math.log(2)
    a = torch.log(-torch.expm1(torch.where(near0, x, -math.log(2))))  # used where x > -log 2
    b = torch.log1p(-torch.exp(torch.where(near0, -math.log(2), x)))  # used where x <= -log 2
    return torch.where(near0, a, b)


def _kl_terms(p_lp: torch.Tensor, q_lp: torch.Tensor) -> torch.Tensor:
    """Per-outcome ``p * (log p - log q)``, 0 where ``p = 0``, with finite gradients there: the
    difference is replaced before the product (``-inf - -inf`` would back-propagate ``0 * nan``)."""
    p = p_lp.exp()
    return p * torch.where(p > 0, p_lp - q_lp, torch.zeros_like(p))


def _kl(p_lp: torch.Tensor, q_lp: torch.Tensor) -> torch.Tensor:
    """sum over the last axis of p * (log p - log q), with 0 * anything = 0."""
    return _kl_terms(p_lp, q_lp).sum(-1)


class _OffSupportLogMass(torch.autograd.Function):
    """``logsumexp`` of ``lp`` [N, V] over the ids not in ``idx`` [N, K]. Saves only ``lp`` (which
    the log-softmax before it keeps anyway) and the result, not the masked [N, V] copy, which lives
    only inside forward; backward is ``exp(lp - out)`` off the support, 0 on it."""

    @staticmethod
    def forward(ctx, lp, idx):
        out = torch.logsumexp(lp.scatter(-1, idx, float("-inf")), -1)
        ctx.save_for_backward(lp, idx, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        lp, idx, out = ctx.saved_tensors
        g = torch.exp(lp - out[:, None]) * grad[:, None]  # [N, V], the gradient itself
        g.scatter_(-1, idx, 0.0)
        g.nan_to_num_(nan=0.0)  # rows with nothing off the support: out = -inf (the bucket is dropped there)
        return g, None


def off_support_logmass(student_lp: torch.Tensor, support: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``log`` of the student's total probability off the support [N], summed directly over the
    other ``V - K`` tokens of ``student_lp`` [N, V] rather than as ``log(1 - mass on the support)``:
    float32 resolves the latter only down to ~6e-8, and a confident student lives below that (its
    gradient would be lost or wrong there). A masked copy of ``student_lp`` exists only while it runs."""
    idx = torch.where(valid, support, support[:, :1])  # padding repeats a real id: same mask
    return _OffSupportLogMass.apply(student_lp, idx)


def divergence(student_lp: torch.Tensor | None, target: SparseTarget, *, loss: str = "fkl", tail: str = "bucket",
               beta: float = 0.5, gathered: torch.Tensor | None = None, student_out_lp: torch.Tensor | None = None) -> torch.Tensor:
    """Per-position divergence [N] between the student's full log-probs ``student_lp`` [N, V] and a
    sparse target over ``target.support`` [N, K]. ``gathered``: the student's log-probs at the
    support ids [N, K], if already gathered (then ``student_lp`` is not used). ``student_out_lp``
    [N]: the student's log-mass off the support (:func:`off_support_logmass`), if known; otherwise
    it is computed from ``student_lp`` when given, else as ``log(1 - exp(logsumexp(gathered)))``."""
    if loss not in LOSSES:
        raise ValueError(f"--loss: expected one of {LOSSES}, got {loss!r}")
    if tail not in TAILS:
        raise ValueError(f"--tail: expected one of {TAILS}, got {tail!r}")
    if gathered is None:
        gathered = student_lp.gather(-1, target.support)
        if tail == "bucket" and student_out_lp is None:
            student_out_lp = off_support_logmass(student_lp, target.support, target.valid)
    neg_inf = torch.tensor(float("-inf"), device=gathered.device, dtype=gathered.dtype)
    valid = target.valid
    s = torch.where(valid, gathered, neg_inf)  # [N, K]
    t = torch.where(valid, target.lp.to(gathered.dtype), neg_inf)
    if tail == "bucket":
        has_out = target.n_out > 0
        if student_out_lp is None:
            student_out_lp = _log1mexp(torch.logsumexp(s, -1))
        s_out = torch.where(has_out, student_out_lp.to(s.dtype), neg_inf)
        t_out = torch.where(has_out, target.out_lp.to(gathered.dtype), neg_inf)
        s = torch.cat([s, s_out[:, None]], -1)
        t = torch.cat([t, t_out[:, None]], -1)
    else:
        s = s - torch.logsumexp(s, -1, keepdim=True)
        t = t - torch.logsumexp(t, -1, keepdim=True)
    return dense_divergence(s, t, loss=loss, beta=beta)


def dense_divergence(student_lp: torch.Tensor, teacher_lp: torch.Tensor, *, loss: str = "fkl", beta: float = 0.5) -> torch.Tensor:
    """Per-position divergence [N] between aligned log-prob rows [N, K] (``-inf`` allowed): the full
    vocabulary for online KD, the support (+ bucket) for :func:`divergence`."""
    if loss == "fkl":
        return _kl(teacher_lp, student_lp)
    if loss == "rkl":
        return _kl(student_lp, teacher_lp)
    if loss != "jsd":
        raise ValueError(f"--loss: expected one of {LOSSES}, got {loss!r}")
    if not 0.0 < beta < 1.0:
        raise ValueError(f"--beta: expected 0 < beta < 1 for jsd, got {beta}")
    # outcomes impossible under both (padding, a bucket that does not exist) are left out: the
    # mixture's log-sum-exp of two -inf would back-propagate nan into the student's row
    dead = torch.isneginf(teacher_lp) & torch.isneginf(student_lp)
    t = torch.where(dead, torch.zeros_like(teacher_lp), teacher_lp)
    s = torch.where(dead, torch.zeros_like(student_lp), student_lp)
    m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log(1 - beta)]), 0)
    terms = beta * _kl_terms(t, m) + (1 - beta) * _kl_terms(s, m)
    return torch.where(dead, torch.zeros_like(terms), terms).sum(-1)


def _chunk_losses(x: torch.Tensor, head, labels: torch.Tensor, kd_mask: torch.Tensor, support, valid, t_lp, t_out, n_out,
                  t_logits, temperature: float, loss: str, tail: str, beta: float, want_kd: bool, vocab_size: int | None,
                  want_argmax: bool = False):
    ce, kd, logits = _chunk_ce_kd(x, head, labels, kd_mask, support, valid, t_lp, t_out, n_out, t_logits, temperature, loss, tail, beta,
                                  want_kd, vocab_size)
    if want_argmax:  # the student's top-1 id per position, from the same logits (evaluation)
        return ce, kd, logits.detach().argmax(-1)
    return ce, kd


def _chunk_ce_kd(x, head, labels, kd_mask, support, valid, t_lp, t_out, n_out, t_logits, temperature, loss, tail, beta, want_kd,
                 vocab_size):
    """(ce_sum, kd_sum, float32 logits [c, V]) of one chunk."""
    logits = head(x) if head is not None else x
    if vocab_size is not None:
        logits = logits[:, :vocab_size]  # rows of a padded student vocabulary take no probability
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # [c, V] float32 exists only per chunk
    if not want_kd:
        return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum"), torch.zeros((), device=logits.device), logits
    log_p = F.log_softmax(logits, dim=-1)
    if t_logits is not None:  # online KD: the teacher's full distribution
        ce = F.nll_loss(log_p, labels, ignore_index=-100, reduction="sum")
        s_lp = log_p if temperature == 1.0 else F.log_softmax(logits / temperature, dim=-1)
        t_full = F.log_softmax(t_logits[:, : s_lp.shape[-1]].float() / temperature, dim=-1)
        kd = dense_divergence(s_lp, t_full, loss=loss, beta=beta)
        return ce, torch.where(kd_mask, kd, torch.zeros_like(kd)).sum() * temperature**2, logits
    target = SparseTarget(support, valid, t_lp, t_out, n_out)
    if temperature == 1.0:
        # one gather for the support and the label: backward fills one [c, V] gradient, not two,
        # and the KD term reuses the CE log-softmax
        g = log_p.gather(-1, torch.cat([support, labels.clamp(min=0)[:, None]], dim=-1))
        ce = -torch.where(labels != -100, g[:, -1], torch.zeros_like(g[:, -1])).sum()
        out = off_support_logmass(log_p, support, valid) if tail == "bucket" else None
        kd = divergence(None, target, loss=loss, tail=tail, beta=beta, gathered=g[:, :-1], student_out_lp=out)
    else:
        ce = F.nll_loss(log_p, labels, ignore_index=-100, reduction="sum")
        kd = divergence(F.log_softmax(logits / temperature, dim=-1), target, loss=loss, tail=tail, beta=beta)
    kd = torch.where(kd_mask, kd, torch.zeros_like(kd)).sum() * temperature**2
    return ce, kd, logits


def kd_ce_loss(x: torch.Tensor, labels: torch.Tensor, target: SparseTarget | None, *, head=None, temperature: float = 1.0,
               loss: str = "fkl", tail: str = "bucket", beta: float = 0.5, chunk_positions: int = 1024,
               vocab_size: int | None = None, teacher_logits: torch.Tensor | None = None, return_argmax: bool = False,
               kd_positions: torch.Tensor | None = None):
    """Summed CE and KD over positions, computed ``chunk_positions`` at a time.

    ``x`` [N, V] logits, or [N, H] hidden states with ``head`` mapping them to logits (then the full
    logits never exist). ``labels`` [N] next-token ids, ``-100`` where there is none (KD is skipped
    there too). ``target`` (or None for CE only) as in :func:`divergence`. ``vocab_size``: the
    store's vocabulary; logit columns beyond it (a padded student vocabulary) are dropped.
    ``teacher_logits`` [N, >= V] (no grad) instead of ``target``: online KD against the teacher's full
    distribution (``tail`` does not apply; the divergence runs over the whole vocabulary). Each chunk is
    checkpointed, so backward recomputes its float32 logits instead of keeping them: peak float32
    memory is ``chunk_positions * V``, not ``N * V``. Returns ``(ce_sum, kd_sum, n_positions)``, and
    with ``return_argmax`` (no gradients: evaluation) also the student's top-1 id per position [N],
    taken from the same per-chunk logits, so evaluation needs neither a second forward nor ``[N, V]``.
    ``kd_positions`` [N] bool: KD only there (``--kd-positions``, :mod:`trainer.positions`); CE everywhere.
    """
    N = x.shape[0]
    kd_mask = labels != -100
    if kd_positions is not None:
        kd_mask = kd_mask & kd_positions
    n = (labels != -100).sum()
    ce_total = x.new_zeros((), dtype=torch.float32)
    kd_total = x.new_zeros((), dtype=torch.float32)
    preds = []
    for a in range(0, N, chunk_positions):
        sl = slice(a, a + chunk_positions)
        if target is None:
            args = (None, None, None, None, None, None if teacher_logits is None else teacher_logits[sl])
        else:
            args = (target.support[sl], target.valid[sl], target.lp[sl], target.out_lp[sl], target.n_out[sl], None)
        want_kd = target is not None or teacher_logits is not None
        if return_argmax:
            ce, kd, pred = _chunk_losses(x[sl], head, labels[sl], kd_mask[sl], *args, temperature, loss, tail, beta, want_kd, vocab_size,
                                         want_argmax=True)
            preds.append(pred)
        else:
            fn = lambda xc, lab, km, *t: _chunk_losses(xc, head, lab, km, *t, temperature, loss, tail, beta, want_kd, vocab_size)  # noqa: E731
            if torch.is_grad_enabled() and x.requires_grad:
                ce, kd = checkpoint(fn, x[sl], labels[sl], kd_mask[sl], *args, use_reentrant=False)
            else:
                ce, kd = fn(x[sl], labels[sl], kd_mask[sl], *args)
        ce_total = ce_total + ce
        kd_total = kd_total + kd
    if return_argmax:
        return ce_total, kd_total, n, torch.cat(preds) if preds else labels.new_zeros(0)
    return ce_total, kd_total, n
