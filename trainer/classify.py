"""Sequence-classification KD from a classify store (``logitstore dump --task classify``).

``trainer fit`` trains from a classify store with the same loop, epoch order, resume and DDP as
for language models; three pieces differ, all here:

- :class:`ClassifyDataset`: the batches: ``input_ids``/``attention_mask`` [B, L] (``L`` the
  batch's longest text), ``labels`` [B] (-100 for fillers), ``teacher_logits`` [M, B, C].
- :class:`ClassifyModule`: ``forward`` returns ``(ce_sum, kd_sum, n)`` like
  :class:`trainer.student.DistillModule`, so ``loss = alpha * KD + (1 - alpha) * CE`` normalised by
  the step's count of labelled texts. KD: the teachers' class distributions at their temperatures,
  fused by ``mean-probs`` (weighted mean of probabilities) or ``mean-logits`` (weighted mean of
  log-probabilities, renormalised), against the student's ``log_softmax(logits / T)`` with
  :func:`trainer.losses.dense_divergence` (``fkl``, ``rkl``, ``jsd``), times ``T**2`` (Hinton).
  All ``C`` classes are stored, so there is no tail: ``--tail`` does not apply.
- :func:`evaluate_classify`: CE, accuracy and macro-F1 against the labels, KL(fused teachers ||
  student) and the student's agreement with each teacher's and the fused argmax.

The student is an ``AutoModelForSequenceClassification`` (a directory or hub id, or a model config
``.json``/``.yaml``, built with the store's ``num_labels`` and label names), or any module mapping
``input_ids``/``attention_mask`` to ``[B, C]`` logits (``fit(config, model=...)``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from logitstore.errors import ConfigError, LogitStoreError

from .data import DistillDataset
from .losses import dense_divergence


class ClassifyDataset(DistillDataset):
    """:class:`DistillDataset` over classify stores (same order, partition, joins and resume)."""

    TASK = "classify"

    def make_batch(self, indices: np.ndarray, weights: np.ndarray, caches=None) -> dict:
        rows0 = [self._row(0, int(i), caches) for i in indices]
        B, L = len(indices), max([int(sh["length"][r]) for sh, r in rows0], default=1)
        input_ids = np.zeros((B, L), np.int64)
        lengths = np.zeros(B, np.int64)
        labels = np.full(B, -100, np.int64)
        logits = np.zeros((len(self.teachers), B, self.num_labels), np.float32) if self.with_targets else None
        hidden = {(m, layer): np.zeros((B, self.hidden_dims[m]), np.float32) for m, layer in self.hidden}
        for b, i in enumerate(indices):
            sh, r = rows0[b]
            lengths[b] = sh["length"][r]
            input_ids[b] = sh["input_ids"][r, :L]
            if weights[b] > 0 and sh["label"][r] >= 0:
                labels[b] = sh["label"][r]
            if logits is None:
                continue
            for t, (si, name) in enumerate(self.teachers):
                tsh, tr = (sh, r) if si == 0 else self._row(si, int(i), caches)
                if si and bytes(tsh["seq_hash"][tr]) != bytes(sh["seq_hash"][r]):
                    raise LogitStoreError(f"--logits {self.urls[si]}: its text for {self.urls[0]}'s text {int(i)} differs "
                                      "(content hash); the stores do not hold the same data")
                logits[t, b] = tsh["teachers"][name]["logits"][tr]
                for layer in (layer for m, layer in self.hidden if m == t):  # pooled states (trainer/features.py)
                    hidden[t, layer][b] = tsh["teachers"][name][f"hidden_{layer}"][tr]
        batch = {"input_ids": torch.from_numpy(input_ids),
                 "attention_mask": torch.from_numpy((np.arange(L)[None, :] < lengths[:, None]).astype(np.int64)),
                 "labels": torch.from_numpy(labels), "index": torch.from_numpy(np.asarray(indices, np.int64)),
                 "weight": torch.from_numpy(np.asarray(weights, np.float32))}
        if logits is not None:
            batch["teacher_logits"] = torch.from_numpy(logits)
        for (m, layer), v in hidden.items():
            batch[f"hidden_{m}_{layer}"] = torch.from_numpy(v)  # [B, dim]
        return batch

    @property
    def num_labels(self) -> int:
        return int(self.stores[0].manifest["num_labels"])


def fuse_classes(teacher_logits: torch.Tensor, *, temperatures: list[float], weights: list[float], mode: str) -> torch.Tensor:
    """Fused class log-probs [B, C] from ``teacher_logits`` [M, B, C] (see the module docstring)."""
    T = torch.tensor(temperatures, dtype=torch.float32, device=teacher_logits.device)[:, None, None]
    w = torch.tensor(weights, dtype=torch.float32, device=teacher_logits.device)[:, None, None]
    lp = torch.log_softmax(teacher_logits.float() / T, -1)  # [M, B, C]
    if mode == "mean-probs":
        keep = w[:, 0, 0] > 0  # a teacher of weight 0 must not contribute log(0) terms
        return torch.logsumexp(lp[keep] + torch.log(w[keep]), 0)
    if mode == "mean-logits":
        return torch.log_softmax((lp * w).sum(0), -1)
    raise ConfigError(f"--fuse: expected mean-probs or mean-logits, got {mode!r}")


class ClassifyModule(torch.nn.Module):
    """Wraps a classification student; ``forward(batch, ...)`` -> ``(ce_sum, kd_sum, n)`` (and the
    student's predicted classes [B] with ``return_argmax``), the interface of ``DistillModule``."""

    def __init__(self, student: torch.nn.Module, num_labels: int | None = None):
        super().__init__()
        self.student = student
        self.num_labels = num_labels
        #: feature / relation KD (trainer/features.py) and the pooling of the store's hidden states
        self.features, self.pooling = None, None

    def logits(self, input_ids, attention_mask, capture=None) -> torch.Tensor:
        """[B, C]; with ``capture`` (:class:`trainer.features.StudentLayers`) ``(logits, layers [B, L, n, H])``."""
        # decoder classifiers pool at the last token that is not config.pad_token_id: pad with it
        pad = getattr(getattr(self.student, "config", None), "pad_token_id", None)
        if pad is not None:
            input_ids = torch.where(attention_mask.bool(), input_ids, torch.full_like(input_ids, int(pad)))
        extra = {"output_hidden_states": capture.arg} if capture is not None else {}
        out = self.student(input_ids=input_ids, attention_mask=attention_mask, **extra)
        logits = (out.logits if hasattr(out, "logits") else out).float()
        if logits.ndim != 2 or logits.shape != (input_ids.shape[0], self.num_labels or logits.shape[-1]):
            raise ConfigError(f"--student: gives logits of shape {tuple(logits.shape)}, expected [batch, {self.num_labels}] "
                              "(one logit per class of the store)")
        return logits if capture is None else (logits, capture.pick(getattr(out, "hidden_states", None)))

    def forward(self, batch: dict, *, temperature: float, teacher_temperatures: list[float], weights: list[float], fuse_mode: str,
                loss: str, tail: str, beta: float, chunk_positions: int, vocab_size: int, with_kd: bool = True,
                return_argmax: bool = False, with_aux: bool = False):
        """``with_aux`` (training): also the feature and relation terms (see ``DistillModule``)."""
        cap = self.features.layers if self.features is not None and with_aux else None
        aux = {}
        logits = self.logits(batch["input_ids"], batch["attention_mask"], capture=cap)  # [B, C]
        labels = batch["labels"]
        keep = labels != -100
        if cap is not None:
            logits, stacked = logits
            aux.update(self.features(cap.split(stacked), batch, keep, self.pooling, batch["attention_mask"]))
        n = keep.sum()
        ce = F.cross_entropy(logits[keep], labels[keep], reduction="sum") if bool(n) else logits.sum() * 0.0
        kd = logits.sum() * 0.0
        if with_kd and "teacher_logits" in batch:
            target = fuse_classes(batch["teacher_logits"], temperatures=teacher_temperatures, weights=weights, mode=fuse_mode)
            student = torch.log_softmax(logits / temperature, -1)
            kd = dense_divergence(student[keep], target[keep], loss=loss, beta=beta).sum() * temperature ** 2
        out = (ce, kd, n, logits.argmax(-1)) if return_argmax else (ce, kd, n)
        return (*out, aux) if with_aux else out


def check_classifier_student(model: torch.nn.Module, vocab_size: int, seq_len: int, where: str) -> None:
    """Refuse, in one line, a student whose embeddings or positions cannot take the store's texts."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and emb.num_embeddings < vocab_size:
        raise ConfigError(f"--student {where}: {emb.num_embeddings} token embeddings, fewer than the store's vocabulary of {vocab_size}")
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(positions, int) and positions < seq_len:
        raise ConfigError(f"--student {where}: takes {positions} positions, the store's texts up to {seq_len}")


def load_classifier_student(spec: str, num_labels: int, label_names: list[str], *, trust_remote_code: bool = False):
    """An ``AutoModelForSequenceClassification`` student with the store's classes: from a model
    config file (fresh), or a directory / hub id (a pretrained body; a missing head is initialised)."""
    from pathlib import Path

    from .student import load_student

    if Path(spec).suffix not in (".json", ".yaml", ".yml"):
        _check_student_labels(spec, label_names, trust_remote_code)
    return load_student(spec, trust_remote_code=trust_remote_code, classify=True, num_labels=num_labels,
                        id2label=dict(enumerate(label_names)), label2id={n: i for i, n in enumerate(label_names)})


def _check_student_labels(spec: str, label_names: list[str], trust_remote_code: bool) -> None:
    """A pretrained classifier whose trained head names other classes, or the store's in another
    order, is refused: loading it with the store's labels would rename its outputs, not reorder
    them, and every class would be trained against another's logit."""
    import re

    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(spec, trust_remote_code=trust_remote_code)
    except Exception:  # unreadable: load_student reports it in one line
        return
    arch = getattr(config, "architectures", None) or []
    id2label = getattr(config, "id2label", None) or {}
    names = [str(id2label.get(i, id2label.get(str(i), ""))) for i in range(len(id2label))]
    if not any(a.endswith("ForSequenceClassification") for a in arch) or all(re.fullmatch(r"LABEL_\d+", n) for n in names):
        return  # a body without a trained head, or a head without class names: initialised or used as is
    if names != list(label_names):
        how = "in another order" if sorted(names) == sorted(label_names) else "other classes"
        raise ConfigError(f"--student {spec}: its classification head names {names}, {how} than the store's {list(label_names)}; "
                          "its logits would be trained against the wrong classes (drop its head, or dump with its labels)")


@torch.no_grad()
def evaluate_classify(acc, module, evalset: ClassifyDataset, cfg, weights: list[float]) -> dict:
    """CE, accuracy and macro-F1 against the labels, KL(fused teachers || student) at T = 1, and
    the student's agreement with each teacher's and the fused argmax, over the whole store."""
    from .evaluation import all_sum
    from .loader import make_loader

    inner = acc.unwrap_model(module)
    inner.eval()
    M, C = len(evalset.teachers), evalset.num_labels
    sums = torch.zeros(4 + M + 1, dtype=torch.float64)  # ce, kl, n, correct, agree_m..., agree_fused
    counts = torch.zeros(3, C, dtype=torch.float64)  # per class: true positives, labelled (support), predicted
    for i, batch in enumerate(make_loader(evalset, 0, False)):
        if cfg.eval_batches is not None and i >= cfg.eval_batches:
            break
        batch = {k: v.to(acc.device) for k, v in batch.items()}
        with acc.autocast():
            ce, kd, n, pred = inner(batch, temperature=1.0, teacher_temperatures=[1.0] * M, weights=weights, fuse_mode=cfg.fuse,
                                    loss="fkl", tail="bucket", beta=0.5, chunk_positions=0, vocab_size=0, return_argmax=True)
        keep = batch["labels"] != -100
        lab = batch["labels"][keep]
        p = pred[keep]
        counts += torch.stack([torch.bincount(lab[p == lab], minlength=C), torch.bincount(lab, minlength=C),
                               torch.bincount(p, minlength=C)]).double().cpu()
        agree = [float((batch["teacher_logits"][m].argmax(-1) == pred)[keep].sum()) for m in range(M)]
        fused = fuse_classes(batch["teacher_logits"], temperatures=[1.0] * M, weights=weights, mode=cfg.fuse)
        agree.append(float((fused.argmax(-1) == pred)[keep].sum()))
        sums += torch.tensor([float(ce), float(kd), float(n), float((pred[keep] == lab).sum()), *agree], dtype=torch.float64)
    sums, counts = all_sum(acc, sums), all_sum(acc, counts)
    n = max(float(sums[2]), 1.0)
    tp, support, predicted = counts
    f1 = torch.where(support + predicted > 0, 2 * tp / (support + predicted).clamp_min(1), torch.zeros_like(tp))
    present = (support + predicted) > 0  # macro-F1 over the classes that occur as labels or predictions (sklearn's)
    res = {"ce": float(sums[0]) / n, "kl": float(sums[1]) / n, "accuracy": float(sums[3]) / n,
           "macro_f1": float(f1[present].mean()) if present.any() else 0.0, "sequences": int(sums[2]),
           "top1_agreement": {name: float(sums[4 + m]) / n for m, name in enumerate(evalset.teacher_names)}}
    res["top1_agreement"]["fused"] = float(sums[4 + M]) / n
    return res
