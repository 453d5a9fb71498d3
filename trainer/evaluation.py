"""Evaluation on a held-out store, and sums over ranks: what ``trainer fit`` reports besides its
training loss (:func:`evaluate` for language-model stores, :func:`evaluate_classify` for classify
stores)."""

from __future__ import annotations

import math

import torch

from .data import DistillDataset
from .loader import make_loader


def all_sum(acc, x):
    """Sum a number or a CPU tensor over all ranks (no-op on one process)."""
    if acc.num_processes == 1:
        return x
    t = torch.as_tensor(x, dtype=torch.float64).to(acc.device)
    t = acc.reduce(t, reduction="sum").cpu()
    return t if isinstance(x, torch.Tensor) else (int(t) if isinstance(x, int) else float(t))



@torch.no_grad()
def evaluate(acc, module, evalset: DistillDataset, cfg, weights: list[float]) -> dict:
    """Validation CE / perplexity, KL(fused teachers || student) at T = 1, and top-1 agreement of the
    student with each teacher and with the fused target, over the whole held-out store. ``weights``:
    one per teacher of ``evalset``, in its order (see :func:`match_teachers`)."""
    from logitstore.distributions.fusion import fuse, position_weights

    inner = acc.unwrap_model(module)
    inner.eval()
    M = len(evalset.teachers)
    w = weights  # per eval teacher, matched to the training teachers by identity (match_teachers)
    sums = torch.zeros(3 + M + 1, dtype=torch.float64)  # ce, kd, n, agree_m..., agree_fused
    for i, batch in enumerate(make_loader(evalset, 0, False)):
        if cfg.eval_batches is not None and i >= cfg.eval_batches:
            break
        batch = {k: v.to(acc.device) for k, v in batch.items()}
        with acc.autocast():
            # one forward; the LM head, the losses and the top-1 ids run chunk_positions at a time
            ce, kd, n, pred = inner(batch, temperature=1.0, teacher_temperatures=[1.0] * M, weights=w, fuse_mode=cfg.fuse, loss="fkl",
                                    fuse_weights=cfg.fuse_weights, fuse_tau=cfg.fuse_weight_temperature,
                                    tail="bucket", beta=0.5, chunk_positions=cfg.chunk_positions, vocab_size=evalset.vocab_size,
                                    return_argmax=True)
        keep = batch["labels"].reshape(-1) != -100
        sup = batch["support"]
        agree = []
        for m in range(M):
            top = (batch["teacher_top1"][m] if "teacher_top1" in batch  # by the teacher's own log-probs (sampled targets)
                   else sup.gather(-1, batch["teacher_lp"][m].argmax(-1, keepdim=True))[:, 0])
            agree.append(float(((top == pred) & keep).sum()))
        pw = position_weights(cfg.fuse_weights, w, batch.get("teacher_entropy"), batch.get("teacher_gold_logprob"),
                              cfg.fuse_weight_temperature)
        target = fuse(batch["teacher_lp"], batch["rest_lp"], sup, batch["valid"], batch["n_out"], temperatures=[1.0] * M, weights=w,
                      mode=cfg.fuse, position_weights=pw)
        fused_top = sup.gather(-1, target.lp.argmax(-1, keepdim=True))[:, 0]
        agree.append(float(((fused_top == pred) & keep).sum()))
        sums += torch.tensor([float(ce), float(kd), float(n), *agree], dtype=torch.float64)
    sums = all_sum(acc, sums)
    n = max(float(sums[2]), 1.0)
    ce = float(sums[0]) / n
    res = {"ce": ce, "ppl": math.exp(min(ce, 50.0)), "kl": float(sums[1]) / n, "positions": int(sums[2]),
           "top1_agreement": {name: float(sums[3 + m]) / n for m, name in enumerate(evalset.teacher_names)}}
    res["top1_agreement"]["fused"] = float(sums[3 + M]) / n
    return res


