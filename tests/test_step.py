"""One optimizer step of ``trainer fit`` against a plain reimplementation of what the README
promises: ``alpha * T^2 * KD + (1 - alpha) * CE`` summed over the target positions of every
micro-batch, divided by their total count; forward KL with the tail as one bucket (or, with an
online teacher, over the whole vocabulary); the student softened by ``T`` and each teacher by its
own temperature; the global gradient norm clipped; AdamW with weight decay on matrices only, at
the warm-up's learning rate. The reference uses the student's own full forward
(``log_softmax(model(x).logits)``) and dense torch ops, none of the trainer's loss code."""

import json

import pytest
import torch

from conftest import save_llama
from logitstore.dump import DumpConfig, dump
from trainer.config import FitConfig
from trainer.fit import Run, fit

LR, WD, CLIP, WARMUP = 1e-2, 0.1, 0.05, 4

#: name: (store seq_len, padded student rows, FitConfig settings)
CASES = {
    "accumulated": (16, 0, dict(batch_size=2, grad_accum=3, alpha=0.3)),
    "unequal micro-batches": ("short", 0, dict(batch_size=2, grad_accum=3, alpha=0.3)),
    "tempered": (16, 0, dict(batch_size=2, grad_accum=1, alpha=0.6, temperature=2.0, teacher_temperatures=(0.5,))),
    "one target, padded student": (2, 16, dict(batch_size=1, grad_accum=1, alpha=0.4)),
    "online teacher": (16, 0, dict(batch_size=2, grad_accum=2, alpha=0.5, temperature=1.5)),
    "labels only": (16, 0, dict(batch_size=2, grad_accum=2, alpha=0.0)),
}


@pytest.fixture(scope="module")
def stores(tmp_path_factory, llama_dir, corpus):
    root = tmp_path_factory.mktemp("step")
    out = {}
    for L in (2, 16):
        out[L] = root / f"store-{L}"
        dump(DumpConfig(teachers=(f"a={llama_dir}",), data=str(corpus), out=str(out[L]), top_k=8, seq_len=L, max_tokens=400,
                        shard_sequences=8, progress=False))
    out["short"] = root / "store-short"  # 5 full windows and one of 10 tokens: micro-batches of unequal target counts
    dump(DumpConfig(teachers=(f"a={llama_dir}",), data=str(corpus), out=str(out["short"]), top_k=8, seq_len=16, max_tokens=90,
                    shard_sequences=8, progress=False))
    return out


def reference_loss(model, micro, vocab, alpha, T, t_temp, teacher=None):
    """(loss, kd, ce) of the step: sums over its micro-batches divided by its target positions."""
    n = sum(int((mb["labels"] != -100).sum()) for mb in micro)
    kd_sum = ce_sum = 0.0
    ninf = torch.tensor(-torch.inf)
    for mb in micro:
        B, L = mb["input_ids"].shape
        logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits.float()[..., :vocab]
        logits = logits.reshape(B * L, vocab)
        labels = mb["labels"].reshape(-1)
        m = labels != -100
        ce = -torch.log_softmax(logits, -1)[m].gather(1, labels[m][:, None]).sum()
        if alpha == 0:  # labels only
            ce_sum = ce_sum + ce
            continue
        lq = torch.log_softmax(logits / T, -1)
        if teacher is not None:  # the teacher's whole distribution at T
            with torch.no_grad():
                t = torch.log_softmax(teacher(input_ids=mb["input_ids"]).logits.float()[..., :vocab].reshape(B * L, vocab) / T, -1)
            s = lq
        else:  # the teacher's support at its own temperature, plus one bucket for the rest, renormalised
            sup, valid = mb["support"], mb["valid"]
            t = torch.cat([torch.where(valid, mb["teacher_lp"][0] / t_temp, ninf),
                           (mb["rest_lp"][0] / t_temp + torch.log(mb["n_out"]))[:, None]], -1).log_softmax(-1)
            off = torch.ones_like(lq, dtype=torch.bool).scatter(1, torch.where(valid, sup, sup[:, :1]), False)
            s = torch.cat([torch.where(valid, lq.gather(1, sup), ninf), torch.logsumexp(lq.masked_fill(~off, -torch.inf), -1)[:, None]], -1)
        p = t.exp()
        kl = torch.where(p > 0, p * (t - s), torch.zeros_like(p)).sum(-1)
        kd_sum, ce_sum = kd_sum + kl[m].sum() * T**2, ce_sum + ce
    return (alpha * kd_sum + (1 - alpha) * ce_sum) / n, kd_sum / n, ce_sum / n


@pytest.mark.parametrize("case", list(CASES))
def test_one_step_equals_the_plain_computation(case, stores, llama_dir, tokenizer, tmp_path, monkeypatch):
    from transformers import LlamaForCausalLM

    seq_len, padded, settings = CASES[case]
    student = save_llama(tmp_path / "student", tokenizer, seed=3, padded_vocab=padded)
    online = case == "online teacher"
    captured, real = [], Run.step

    def spy(self, micro, data_wait):
        captured.append([{k: v.clone() for k, v in mb.items()} for mb in micro])
        return real(self, micro, data_wait)

    monkeypatch.setattr(Run, "step", spy)
    stepped, real_adam = [], torch.optim.AdamW.step

    def record(self, *a, **k):  # the gradients the optimizer is given: after clipping, whatever the trainer did
        stepped.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"]])
        return real_adam(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    run = tmp_path / "run"
    fit(FitConfig(logits=(str(stores[seq_len]),), student=str(student), out=str(run), max_steps=1, lr=LR, warmup_steps=WARMUP,
                  weight_decay=WD, grad_clip=CLIP, num_workers=0, progress=False, seed=5, loss="fkl", tail="bucket",
                  save_dtype="fp32", online_teacher=str(llama_dir) if online else None, **settings))
    (micro,) = captured
    assert len(micro) == settings["grad_accum"]
    row = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()][0]
    assert row["step"] == 1 and row["epoch"] == 0 and row["data_wait_s"] >= 0
    assert row["tokens"] == sum(int(mb["attention_mask"].sum()) for mb in micro)
    assert 0 < row["tokens_per_s"] < float("inf")
    if seq_len == "short":
        counts = [int((mb["labels"] != -100).sum()) for mb in micro]
        assert len(set(counts)) > 1 and any(int(mb["attention_mask"].sum()) < mb["attention_mask"].numel() for mb in micro), counts
    if seq_len == 2:
        assert sum(int((mb["labels"] != -100).sum()) for mb in micro) == 1, "the case is a step with one target position"

    model = LlamaForCausalLM.from_pretrained(student, dtype=torch.float32)
    teacher = LlamaForCausalLM.from_pretrained(llama_dir, dtype=torch.float32) if online else None
    vocab = len(tokenizer)
    T = settings.get("temperature", 1.0)
    t_temp = (settings.get("teacher_temperatures") or (T,))[0]
    loss, kd, ce = reference_loss(model, micro, vocab, settings["alpha"], T, t_temp, teacher)
    assert row["loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
    if settings["alpha"] == 0:  # labels only: no KD is computed (nor its targets read), and none is logged
        assert row["kd_loss"] == 0 and "support" not in micro[0]
    else:
        assert row["kd_loss"] == pytest.approx(float(kd.detach()), rel=1e-5)
    assert row["ce_loss"] == pytest.approx(float(ce.detach()), rel=1e-5)
    assert row["lr"] == pytest.approx(LR / WARMUP)  # step 0 of a 4-step warm-up
    assert row["temperature"] == T

    loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    assert row["grad_norm"] == pytest.approx(float(norm), rel=1e-4)
    assert float(norm) > CLIP, "the case must clip, or clipping is not tested"
    for p in params:
        p.grad.mul_(CLIP / (float(norm) + 1e-6))
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": WD},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=LR / WARMUP)
    (given,) = stepped
    ref_grads = [p.grad for g in opt.param_groups for p in g["params"]]
    for i, (a, b) in enumerate(zip(given, ref_grads, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-9, msg=lambda m, i=i: f"clipped grad {i}: {m}")
    g_of = {id(p): p.grad.clone() for p in params}
    opt.step()
    trained = LlamaForCausalLM.from_pretrained(run / "final", dtype=torch.float32).state_dict()
    by_id = {id(p): n for n, p in model.named_parameters()}
    for p in params:
        name, g = by_id[id(p)], g_of[id(p)]
        # Adam's first step is lr * g / (|g| + eps): where |g| is near eps the update is float noise
        keep = (g.abs() > 1e-5) | (g == 0)
        torch.testing.assert_close(trained[name][keep], p.detach()[keep], rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    before = LlamaForCausalLM.from_pretrained(student, dtype=torch.float32).state_dict()
    assert any(not torch.equal(before[k], trained[k]) for k in before), "the step must change the weights"


@pytest.mark.parametrize("schedule, extra, want", [
    ("exp", {"temperature_gamma": 0.25}, [2.0 * 0.25 ** (s / 3) for s in range(3)]),
    ("linear", {"temperature_final": 1.0}, [2.0 - s / 3 for s in range(3)]),
])
def test_the_temperature_schedule_reaches_the_step_and_tokens_accumulate(schedule, extra, want, stores, tokenizer, tmp_path):
    student = save_llama(tmp_path / "student", tokenizer, seed=3)
    run = tmp_path / "run"
    fit(FitConfig(logits=(str(stores[16]),), student=str(student), out=str(run), max_steps=3, batch_size=2, num_workers=0,
                  progress=False, temperature=2.0, temperature_schedule=schedule, **extra))
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [r["temperature"] for r in rows] == pytest.approx(want)
    steps = [rows[0]["tokens"]] + [b["tokens"] - a["tokens"] for a, b in zip(rows, rows[1:])]
    assert all(t > 0 for t in steps), "the logged tokens count every step so far"
