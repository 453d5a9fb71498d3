"""The training knobs of offline KD through ``trainer fit``, for classify stores and LM stores, each
against a reference computed by hand from the student's (and, for LM, the teachers') own forward and
dense torch ops, none of the trainer's loss, fusion or clipping code.

Already covered elsewhere (not repeated here):
- LM, one step against a plain reimplementation (sparse targets, one teacher): T^2, alpha in
  {0, 0.3, 0.4, 0.5, 0.6}, grad_accum=3, teacher temperatures, grad_norm before clipping, the clipped
  gradients and AdamW's update: tests/test_step.py::test_one_step_equals_the_plain_computation.
- LM, exp and linear temperature schedules in metrics.jsonl: tests/test_step.py; cosine end points
  through the CLI: tests/test_fit.py::test_cli_end_to_end; ``temperature_at`` values of every
  schedule (the stepwise one and its floor included): tests/test_fit.py::test_temperature_and_lr_schedules,
  tests/test_mutation_kills.py::test_temperature_at_exact_values.
- LM, grad_accum 2 x 2 vs 1 x 4: equal logged losses over 3 steps: tests/test_fit.py::test_grad_accum_equals_larger_batch.
- LM, bf16 autocast on CPU with fp32 master weights: tests/test_precision.py.
- LM, logged loss == 0.3 kd + 0.7 ce: tests/test_fit_runs.py::test_alpha_weights_kd_and_ce_as_documented;
  alpha in {0, 0.5, 1} vs the HF Trainer: tests/test_hf_trainer.py.
- classify, ``ClassifyModule`` alone: T^2 KL against dense fusion (mean-probs / mean-logits, two
  weighted teachers): tests/test_classify.py::test_classification_kd_loss_equals_a_dense_reference_with_fusion.

New here: the whole classify step of ``fit`` (logged loss, kd, ce, grad_norm, clipped update) at
alpha 0 / 0.3 / 0.5 / 1, both fusions, per-teacher temperatures, grad accumulation; LM with two
teachers stored losslessly over the whole vocabulary, so the KD term is checked against the
teachers' own dense forward (T^2 KL, fusion, alpha 1); parameters after grad_accum=2 x 4 vs 1 x 8
for both tasks; the stepwise and cosine temperature schedules as logged *and as given to the loss*
for both tasks; bf16 autocast of a classifier on CPU; fp16's loss scaler on CUDA; fp16 on CPU.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import corpus_texts, save_llama
from logitstore.dump import DumpConfig, dump
from test_classify import LABELS, _classifier
from trainer.config import FitConfig
from trainer.fit import Run, fit

LR, WD, CLIP = 1e-2, 0.1, 0.05
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cls(tmp_path_factory, tokenizer):
    """A classify store of two teachers (BERT and Llama classifiers) over 24 texts, and a BERT
    student without dropout (so its training forward can be repeated by hand)."""
    from transformers import BertConfig, BertForSequenceClassification

    tok = copy.deepcopy(tokenizer)  # the session fixture stays as it is
    tok.pad_token = tok.eos_token
    d = tmp_path_factory.mktemp("knobs-cls")
    rng = np.random.default_rng(123)
    words = " ".join(corpus_texts(2, 4000)).split()
    rows = []
    for i in range(24):
        a = int(rng.integers(0, len(words) - 80))
        rows.append({"text": " ".join(words[a:a + int(rng.integers(5, 40))]), "label": int(rng.integers(0, 3))})
    data = d / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    bert, llama = _classifier(d / "bert", tok, seed=11), _classifier(d / "llama", tok, seed=12, family="llama")
    for path in (bert, llama):  # sharper heads than the default init: class distributions far from uniform
        _sharpen(path)
    store = d / "store"
    dump(DumpConfig(teachers=(f"bert={bert}", f"llama={llama}"), data=str(data), out=str(store), seq_len=32, batch_size=8,
                    task="classify", label_field="label", progress=False, shard_sequences=8))
    torch.manual_seed(21)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
                     id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)}, pad_token_id=tok.pad_token_id)
    student = d / "student"
    BertForSequenceClassification(cfg).save_pretrained(student)
    tok.save_pretrained(student)
    return {"store": store, "student": student, "root": d}


@pytest.fixture(scope="module")
def lm(tmp_path_factory, llama_dir, gpt2_dir, corpus, tokenizer):
    """An LM store of two teachers with every token of the vocabulary stored losslessly (top-k = V):
    its targets are the teachers' full distributions, so the reference is their own forward."""
    d = tmp_path_factory.mktemp("knobs-lm")
    store = d / "store"
    dump(DumpConfig(teachers=(f"a={llama_dir}", f"b={gpt2_dir}"), data=str(corpus), out=str(store), top_k=len(tokenizer),
                    encoding="lossless", seq_len=16, max_tokens=300, shard_sequences=8, progress=False))
    student = save_llama(d / "student", tokenizer, seed=3)
    return {"store": store, "student": student, "teachers": (llama_dir, gpt2_dir), "root": d}


# ---------------------------------------------------------------- helpers
def _sharpen(path: Path, factor: float = 30.0) -> None:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path)
    head = model.classifier if hasattr(model, "classifier") else model.score
    with torch.no_grad():
        head.weight.mul_(factor)
    model.save_pretrained(path)


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip() and not json.loads(x).get("eval")]


def spy_step(monkeypatch) -> dict:
    """Record the micro-batches of every step and the gradients AdamW is given (after clipping)."""
    seen = {"micro": [], "grads": []}
    real_step, real_adam = Run.step, torch.optim.AdamW.step

    def step(self, micro, data_wait):
        seen["micro"].append([{k: v.clone() for k, v in mb.items()} for mb in micro])
        return real_step(self, micro, data_wait)

    def adam(self, *a, **k):
        seen["grads"].append([p.grad.detach().clone() for g in self.param_groups for p in g["params"]])
        return real_adam(self, *a, **k)

    monkeypatch.setattr(Run, "step", step)
    monkeypatch.setattr(torch.optim.AdamW, "step", adam)
    return seen


def dense_kd(s_logits, t_logits, T, t_temps, weights, mode):
    """Sum over rows of T^2 KL(fused teachers || softmax(s / T)), float64, from dense logits:
    ``s_logits`` [N, C], ``t_logits`` [M, N, C]."""
    probs = [torch.softmax(t_logits[m].double() / t_temps[m], -1) for m in range(len(weights))]
    if mode == "mean-probs":
        fused = sum(w * p for w, p in zip(weights, probs))
    else:
        fused = torch.softmax(sum(w * p.log() for w, p in zip(weights, probs)), -1)
    q = torch.log_softmax(s_logits.double() / T, -1)
    kl = torch.where(fused > 0, fused * (fused.log() - q), torch.zeros_like(q)).sum(-1)
    return kl.sum() * T**2


def check_update(model, loss, row, given, trained: dict, *, lr, wd, clip):
    """Back-propagate the reference ``loss`` through ``model``; the logged grad_norm must be its
    global norm before clipping, the gradients AdamW was given the clipped ones, and ``trained``
    (the run's final weights) one AdamW step from them."""
    loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.double()) for p in params])))
    if clip:
        assert row["grad_norm"] == pytest.approx(norm, rel=1e-4)
        assert norm > clip, "the case must clip, or clipping is not tested"
        for p in params:
            p.grad.mul_(clip / (norm + 1e-6))
    else:
        assert row["grad_norm"] is None
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": wd},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=lr)
    ref = [p.grad for g in opt.param_groups for p in g["params"]]
    assert len(given) == len(ref)
    for i, (a, b) in enumerate(zip(given, ref)):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-9, msg=lambda m, i=i: f"clipped grad {i}: {m}")
    if clip:  # the global norm of what the optimizer got is the clip value
        assert float(torch.linalg.vector_norm(torch.stack([g.double().norm() for g in given]))) == pytest.approx(clip, rel=1e-4)
    g_of = {id(p): p.grad.clone() for p in params}
    opt.step()
    changed = 0
    for name, p in model.named_parameters():
        g = g_of[id(p)]
        keep = (g.abs() > 1e-5) | (g == 0)  # Adam's first step is lr * g / (|g| + eps): near eps it is float noise
        torch.testing.assert_close(trained[name][keep], p.detach()[keep], rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
        changed += int((g != 0).any())
    assert changed > 0


def final_weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


# ---------------------------------------------------------------- 1, 2, 5: T^2, alpha, clipping: classify
CLS_CASES = {
    "mean-probs T=2 alpha=0.3": dict(fuse="mean-probs", weights=(0.7, 0.3), temperature=2.0, alpha=0.3, batch_size=6),
    "mean-logits T=3 alpha=1": dict(fuse="mean-logits", weights=(0.2, 0.8), temperature=3.0, alpha=1.0, batch_size=6),
    "labels only alpha=0": dict(alpha=0.0, batch_size=6, temperature=2.0),
    "accumulated, teacher temperatures": dict(fuse="mean-probs", weights=(0.5, 0.5), temperature=2.0, teacher_temperatures=(1.0, 4.0),
                                              alpha=0.5, batch_size=3, grad_accum=2),
}


@pytest.mark.parametrize("case", list(CLS_CASES))
def test_classify_step_equals_the_dense_computation(case, cls, tmp_path, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    s = CLS_CASES[case]
    seen = spy_step(monkeypatch)
    run = tmp_path / "run"
    fit(FitConfig(logits=(str(cls["store"]),), student=str(cls["student"]), out=str(run), max_steps=1, lr=LR, weight_decay=WD,
                  grad_clip=CLIP, num_workers=0, progress=False, seed=7, save_dtype="fp32", device="cpu", **s))
    (micro,), (given,) = seen["micro"], seen["grads"]
    (row,) = metrics(run)
    assert len(micro) == s.get("grad_accum", 1)
    model = AutoModelForSequenceClassification.from_pretrained(cls["student"], dtype=torch.float32)
    model.train()
    pad = model.config.pad_token_id
    alpha, T = s["alpha"], s["temperature"]
    t_temps = s.get("teacher_temperatures") or (T, T)
    w = [x / sum(s.get("weights", (1, 1))) for x in s.get("weights", (1, 1))]
    n = sum(int((mb["labels"] != -100).sum()) for mb in micro)
    kd = ce = torch.zeros((), dtype=torch.float64)
    for mb in micro:
        ids = torch.where(mb["attention_mask"].bool(), mb["input_ids"], torch.full_like(mb["input_ids"], pad))
        logits = model(input_ids=ids, attention_mask=mb["attention_mask"]).logits
        keep = mb["labels"] != -100
        ce = ce + F.cross_entropy(logits[keep].double(), mb["labels"][keep], reduction="sum")
        if alpha > 0:
            kd = kd + dense_kd(logits[keep], mb["teacher_logits"][:, keep], T, t_temps, w, s.get("fuse", "mean-probs"))
    if alpha == 0:  # labels only: the teachers' logits are not even read
        assert "teacher_logits" not in micro[0] and row["kd_loss"] == 0
    else:
        assert row["kd_loss"] == pytest.approx(float(kd.detach()) / n, rel=1e-5, abs=1e-7)
    assert row["ce_loss"] == pytest.approx(float(ce.detach()) / n, rel=1e-5)
    loss = (alpha * kd + (1 - alpha) * ce) / n
    assert row["loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
    assert row["temperature"] == T and row["lr"] == pytest.approx(LR)
    check_update(model, loss, row, given, final_weights(run / "final"), lr=LR, wd=WD, clip=CLIP)


# ---------------------------------------------------------------- 1, 2: T^2, fusion, alpha on LM, against the teachers' forward
LM_CASES = {
    "mean-probs T=2 alpha=1": dict(fuse="mean-probs", weights=(0.7, 0.3), temperature=2.0, alpha=1.0),
    "mean-logits T=1.5 alpha=0.3": dict(fuse="mean-logits", weights=(0.4, 0.6), temperature=1.5, alpha=0.3),
}


@pytest.mark.parametrize("case", list(LM_CASES))
def test_lm_step_equals_the_teachers_dense_forward(case, lm, tokenizer, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    s = LM_CASES[case]
    seen = spy_step(monkeypatch)
    run = tmp_path / "run"
    fit(FitConfig(logits=(str(lm["store"]),), student=str(lm["student"]), out=str(run), max_steps=1, lr=LR, weight_decay=WD,
                  grad_clip=CLIP, num_workers=0, progress=False, seed=7, save_dtype="fp32", device="cpu", batch_size=2, grad_accum=2,
                  tail="bucket", loss="fkl", **s))
    (micro,), (given,) = seen["micro"], seen["grads"]
    (row,) = metrics(run)
    V = len(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(lm["student"], dtype=torch.float32)
    teachers = [AutoModelForCausalLM.from_pretrained(t, dtype=torch.float32).eval() for t in lm["teachers"]]
    alpha, T = s["alpha"], s["temperature"]
    w = [x / sum(s["weights"]) for x in s["weights"]]
    n = sum(int((mb["labels"] != -100).sum()) for mb in micro)
    kd = ce = torch.zeros((), dtype=torch.float64)
    for mb in micro:
        fwd = dict(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"])
        if "position_ids" in mb:
            fwd["position_ids"] = mb["position_ids"]
        keep = (mb["labels"] != -100).reshape(-1)
        logits = model(**fwd).logits[..., :V].reshape(-1, V)[keep]
        with torch.no_grad():
            t = torch.stack([m(**fwd).logits[..., :V].reshape(-1, V)[keep] for m in teachers])
        ce = ce + F.cross_entropy(logits.double(), mb["labels"].reshape(-1)[keep], reduction="sum")
        kd = kd + dense_kd(logits, t, T, (T, T), w, s["fuse"])
    assert row["kd_loss"] == pytest.approx(float(kd.detach()) / n, rel=1e-4)
    assert row["ce_loss"] == pytest.approx(float(ce.detach()) / n, rel=1e-5)
    loss = (alpha * kd + (1 - alpha) * ce) / n
    assert row["loss"] == pytest.approx(float(loss.detach()), rel=1e-4)
    check_update(model, loss, row, given, final_weights(run / "final"), lr=LR, wd=WD, clip=CLIP)


# ---------------------------------------------------------------- 4: grad accumulation
@pytest.mark.parametrize("task", ["classify", "lm"])
def test_grad_accum_2x4_updates_the_weights_as_1x8(task, cls, lm, tmp_path, monkeypatch):
    setup = cls if task == "classify" else lm
    common = dict(logits=(str(setup["store"]),), student=str(setup["student"]), max_steps=1, num_workers=0, progress=False, seed=3,
                  lr=1e-3, weight_decay=0.01, grad_clip=0.0, save_dtype="fp32", device="cpu", alpha=0.5, temperature=2.0)
    seen = spy_step(monkeypatch)
    fit(FitConfig(out=str(tmp_path / "acc"), batch_size=4, grad_accum=2, **common))
    fit(FitConfig(out=str(tmp_path / "big"), batch_size=8, grad_accum=1, **common))
    (acc_micro, big_micro), (g_acc, g_big) = seen["micro"], seen["grads"]
    assert [len(acc_micro), len(big_micro)] == [2, 1]
    idx_acc = torch.cat([mb["index"] for mb in acc_micro])
    assert torch.equal(idx_acc, big_micro[0]["index"]), "both runs must see the same 8 sequences"
    a, b = metrics(tmp_path / "acc")[0], metrics(tmp_path / "big")[0]
    assert a["tokens"] == b["tokens"] and a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    for i, (x, y) in enumerate(zip(g_acc, g_big, strict=True)):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-7, msg=lambda m, i=i: f"grad {i}: {m}")
    wa, wb = final_weights(tmp_path / "acc" / "final"), final_weights(tmp_path / "big" / "final")
    before = final_weights(setup["student"])
    assert set(wa) == set(wb)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    assert any(not torch.equal(before[k].float(), wa[k]) for k in before if k in wa)


# ---------------------------------------------------------------- 3: temperature schedules, as logged and as used
SCHEDULES = {
    "step": (dict(temperature=3.0, temperature_schedule="step", temperature_gamma=0.5, temperature_every=2, temperature_final=1.0),
             lambda s, total: max(3.0 * 0.5 ** (s // 2), 1.0)),
    "cosine": (dict(temperature=3.0, temperature_schedule="cosine", temperature_final=1.0),
               lambda s, total: 1.0 + (3.0 - 1.0) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total)))),
}


@pytest.mark.parametrize("task", ["classify", "lm"])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_temperature_schedule_is_logged_and_used_per_step(task, schedule, cls, lm, tmp_path, monkeypatch):
    from trainer.classify import ClassifyModule
    from trainer.student import DistillModule

    setup = cls if task == "classify" else lm
    Module = ClassifyModule if task == "classify" else DistillModule
    used, real = [], Module.forward

    def forward(self, batch, **kw):
        used.append((kw["temperature"], tuple(kw["teacher_temperatures"])))
        return real(self, batch, **kw)

    monkeypatch.setattr(Module, "forward", forward)
    settings, formula = SCHEDULES[schedule]
    total = 7
    run = tmp_path / "run"
    fit(FitConfig(logits=(str(setup["store"]),), student=str(setup["student"]), out=str(run), max_steps=total, batch_size=2,
                  num_workers=0, progress=False, device="cpu", alpha=0.5, **settings))
    want = [formula(s, total) for s in range(total)]
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, total + 1))
    assert [r["temperature"] for r in rows] == pytest.approx(want, rel=1e-12)
    if schedule == "step":
        assert want == [3.0, 3.0, 1.5, 1.5, 1.0, 1.0, 1.0]  # 0.75 floored at temperature_final
    assert len(used) == total  # one micro-batch per step; student and teachers both at the step's T
    assert [u[0] for u in used] == pytest.approx(want, rel=1e-12)
    assert all(u[1] == (u[0], u[0]) for u in used)


# ---------------------------------------------------------------- 6: precision
def _script(body: str, *args: str, timeout: int = 240) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    p = subprocess.run([sys.executable, "-c", body, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT))
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


BF16_CLASSIFY = """
import json, sys, torch
from trainer.classify import ClassifyModule
from trainer.config import FitConfig
from trainer.fit import fit
seen = {"out": set(), "autocast": set(), "params": set()}
real_fwd, real_adam = ClassifyModule.forward, torch.optim.AdamW.step
def forward(self, batch, **kw):
    h = self.student.register_forward_hook(lambda m, i, o: seen["out"].add(str(o.logits.dtype)))
    seen["autocast"].add(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
    try:
        return real_fwd(self, batch, **kw)
    finally:
        h.remove()
def adam(self, *a, **k):
    seen["params"].update(str(p.dtype) for g in self.param_groups for p in g["params"])
    return real_adam(self, *a, **k)
ClassifyModule.forward, torch.optim.AdamW.step = forward, adam
fit(FitConfig(logits=(sys.argv[1],), student=sys.argv[2], out=sys.argv[3], max_steps=2, batch_size=4, num_workers=0, progress=False,
              device="cpu", precision="bf16", save_dtype="fp32", lr=1e-6, grad_clip=0.0, weight_decay=0.0, alpha=0.5, temperature=2.0))
print(json.dumps({k: sorted(v) for k, v in seen.items()}))
"""


def test_bf16_autocast_trains_a_classifier_on_cpu_with_fp32_master_weights(cls, tmp_path):
    """Its own process: accelerate fixes the mixed precision once per process."""
    out = tmp_path / "bf16"
    seen = _script(BF16_CLASSIFY, str(cls["store"]), str(cls["student"]), str(out))
    assert seen == {"out": ["torch.bfloat16"], "autocast": [True], "params": ["torch.float32"]}
    rows = metrics(out)
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) and math.isfinite(r["kd_loss"]) and r["kd_loss"] > 0 for r in rows)
    before, after = final_weights(cls["student"]), final_weights(out / "final")
    assert {v.dtype for v in after.values()} == {torch.float32}
    changed = [k for k in before if not torch.equal(before[k], after[k])]  # a 1e-6 step, below a bf16 ulp, survives
    assert len(changed) >= 0.9 * len(before), sorted(set(before) - set(changed))


FP16_PROBE = """
import json, sys, torch
from trainer.config import FitConfig
from trainer.fit import Run, fit
cfg = FitConfig(logits=(sys.argv[1],), student=sys.argv[2], out=sys.argv[3], max_steps=1, batch_size=4, num_workers=0, progress=False,
                device=sys.argv[4], precision="fp16", alpha=0.5, temperature=2.0)
try:
    run = Run(cfg, None)
except Exception as e:
    print(json.dumps({"error": type(e).__name__, "message": str(e)}))
    raise SystemExit(0)
seen = {}
from trainer.classify import ClassifyModule
real = ClassifyModule.forward
def forward(self, batch, **kw):
    seen["autocast_fp16"] = torch.is_autocast_enabled(batch["input_ids"].device.type) and \\
        torch.get_autocast_dtype(batch["input_ids"].device.type) == torch.float16
    return real(self, batch, **kw)
ClassifyModule.forward = forward
res = fit(cfg)
rows = [json.loads(x) for x in open(sys.argv[3] + "/metrics.jsonl")]
print(json.dumps({"scaler": run.acc.scaler is not None, "mixed_precision": run.acc.mixed_precision, "loss": rows[0]["loss"], **seen}))
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 mixed precision (with accelerate's GradScaler) needs a CUDA device; none here")
def test_fp16_on_cuda_uses_a_loss_scaler(cls, tmp_path):
    seen = _script(FP16_PROBE, str(cls["store"]), str(cls["student"]), str(tmp_path / "fp16"), "cuda")
    assert seen.get("error") is None, seen
    assert seen["scaler"] and seen["mixed_precision"] == "fp16" and seen["autocast_fp16"] and math.isfinite(seen["loss"])


def test_fp16_on_cpu_is_refused_rather_than_silently_fp32(cls, tmp_path):
    seen = _script(FP16_PROBE, str(cls["store"]), str(cls["student"]), str(tmp_path / "fp16"), "cpu")
    # either a one-line ConfigError naming --precision fp16, or fp16 that really is fp16
    assert (seen.get("error") == "ConfigError" and "--precision fp16" in seen["message"]) or seen.get("autocast_fp16"), seen
