"""KD on a subset of the trained positions (``--kd-positions``); CE stays on all of them.

``all`` (default), or ``KIND:FRAC`` with ``0 < FRAC <= 1``: in each micro-batch, KD runs on the
``ceil(FRAC * n)`` of its ``n`` trained positions with the highest

- ``teacher-entropy``: the stored full-vocabulary entropy of the teachers (their weighted mean,
  with the ``--weights``), known before the step and free;
- ``student-entropy``: the student's own predictive entropy at T = 1 (SE-KD: distil where the student
  is unsure), from a no-grad pass of the LM head over the positions, chunk by chunk (``[chunk, V]``
  float32 at a time; it costs one more head matmul per position).

The KD sum over the chosen positions is scaled by ``n / n_chosen``, so after the trainer's division
by ``n`` the KD term is each micro-batch's mean over its chosen positions (averaged over micro-batches
weighted by their ``n``), and keeps its scale as FRAC changes. Selection is per micro-batch and per
rank (a global top-FRAC would need the scores of every rank).
"""

from __future__ import annotations

import math

import torch

KINDS = ("all", "teacher-entropy", "student-entropy")


def parse_kd_positions(spec: str) -> tuple[str, float]:
    """``"all"`` -> ``("all", 1.0)``; ``"teacher-entropy:0.5"`` -> ``("teacher-entropy", 0.5)``.
    Raises ``ValueError`` naming the flag."""
    kind, _, frac = str(spec).partition(":")
    if kind == "all" and not frac:
        return "all", 1.0
    if kind not in KINDS[1:]:
        raise ValueError(f"--kd-positions: expected all, teacher-entropy:FRAC or student-entropy:FRAC, got {spec!r}")
    try:
        f = float(frac)
    except ValueError:
        raise ValueError(f"--kd-positions: {kind} needs a fraction, e.g. {kind}:0.5; got {spec!r}") from None
    if not 0 < f <= 1:
        raise ValueError(f"--kd-positions: the fraction must be in (0, 1], got {f}")
    return kind, f


@torch.no_grad()
def student_entropy(x: torch.Tensor, head, vocab_size: int | None, chunk: int) -> torch.Tensor:
    """[N] float32 entropy of the student's softmax; ``x`` [N, V] logits or [N, H] with ``head``."""
    out = []
    for a in range(0, x.shape[0], chunk):
        logits = head(x[a:a + chunk]) if head is not None else x[a:a + chunk]
        logits = logits[:, :vocab_size].float() if vocab_size is not None else logits.float()
        lp = torch.log_softmax(logits, dim=-1)
        out.append(-(lp.exp() * lp).sum(-1))
    return torch.cat(out) if out else x.new_zeros(0, dtype=torch.float32)


def choose(kind: str, frac: float, labels: torch.Tensor, *, teacher_entropy: torch.Tensor | None = None,
           weights: list[float] | None = None, x: torch.Tensor | None = None, head=None, vocab_size: int | None = None,
           chunk: int = 1024) -> tuple[torch.Tensor | None, float]:
    """``(mask [N] bool, scale)``: the positions that get KD and the factor ``n / n_chosen`` for the
    KD sum; ``(None, 1.0)`` for ``all``. ``teacher_entropy`` [M, N] (batch ``teacher_entropy``)."""
    if kind == "all" or frac >= 1:
        return None, 1.0
    trained = labels != -100
    n = int(trained.sum())
    if n == 0:
        return None, 1.0
    if kind == "teacher-entropy":
        if teacher_entropy is None:
            raise ValueError("--kd-positions teacher-entropy: the batch holds no stored teacher entropy")
        w = torch.tensor(weights, dtype=torch.float32, device=teacher_entropy.device)[:, None]
        score = (w * teacher_entropy.float()).sum(0)
    else:
        score = student_entropy(x, head, vocab_size, chunk)
    score = torch.where(trained, score, torch.full_like(score, float("-inf")))
    keep = max(1, math.ceil(frac * n - 1e-9))  # 0.07 * 100 is 7.000000000000001 in floating point
    idx = torch.topk(score, keep).indices
    mask = torch.zeros_like(trained)
    mask[idx] = True
    return mask, n / keep
