"""One optimizer step of ``trainer fit`` against a plain reimplementation of what the README
promises: ``alpha * KD + (1 - alpha) * CE`` summed over the target positions of every micro-batch,
divided by their total count, forward KL with the tail as one bucket, the global gradient norm
clipped, AdamW with weight decay on matrices only, at the warm-up's learning rate. The reference
uses the student's own full forward (``log_softmax(model(x).logits)``) and dense torch ops, none of
the trainer's loss code."""

import json

import pytest
import torch

from conftest import save_llama
from logitstore.dump import DumpConfig, dump
from trainer.config import FitConfig
from trainer.fit import Run, fit

ALPHA, LR, WD, CLIP, WARMUP = 0.3, 1e-2, 0.1, 0.05, 4


@pytest.fixture(scope="module")
def step_setup(tmp_path_factory, llama_dir, corpus, tokenizer):
    root = tmp_path_factory.mktemp("step")
    store = root / "store"
    dump(DumpConfig(teachers=(f"a={llama_dir}",), data=str(corpus), out=str(store), top_k=8, seq_len=16, max_tokens=400,
                    shard_sequences=8, progress=False))
    student = save_llama(root / "student", tokenizer, seed=3)
    return store, student


def reference_loss(model, micro, vocab):
    """(loss, kd, ce) summed over the step's micro-batches and divided by its target positions."""
    n = sum(int((mb["labels"] != -100).sum()) for mb in micro)
    kd_sum = ce_sum = 0.0
    for mb in micro:
        B, L = mb["input_ids"].shape
        lq = torch.log_softmax(model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits.float()[..., :vocab], -1)
        lq = lq.reshape(B * L, vocab)
        labels = mb["labels"].reshape(-1)
        m = labels != -100
        ce = -lq[m].gather(1, labels[m][:, None]).sum()
        sup, valid = mb["support"], mb["valid"]
        # the teacher's distribution on the support plus one bucket for the rest, renormalised
        t = torch.cat([torch.where(valid, mb["teacher_lp"][0], torch.tensor(-torch.inf)),
                       (mb["rest_lp"][0] + torch.log(mb["n_out"]))[:, None]], -1).log_softmax(-1)
        off = torch.ones_like(lq, dtype=torch.bool).scatter(1, torch.where(valid, sup, sup[:, :1]), False)
        s = torch.cat([torch.where(valid, lq.gather(1, sup), torch.tensor(-torch.inf)),
                       torch.logsumexp(lq.masked_fill(~off, -torch.inf), -1)[:, None]], -1)
        p = t.exp()
        kl = torch.where(p > 0, p * (t - s), torch.zeros_like(p)).sum(-1)
        kd = kl[m].sum()
        kd_sum, ce_sum = kd_sum + kd, ce_sum + ce
    return (ALPHA * kd_sum + (1 - ALPHA) * ce_sum) / n, kd_sum / n, ce_sum / n


def test_one_step_equals_the_plain_computation(step_setup, tmp_path, monkeypatch):
    from transformers import LlamaForCausalLM

    store, student = step_setup
    captured = []
    real = Run.step

    def spy(self, micro, data_wait):
        captured.append([{k: v.clone() for k, v in mb.items()} for mb in micro])
        return real(self, micro, data_wait)

    monkeypatch.setattr(Run, "step", spy)
    run = tmp_path / "run"
    fit(FitConfig(logits=(str(store),), student=str(student), out=str(run), batch_size=2, grad_accum=3, max_steps=1, lr=LR,
                  warmup_steps=WARMUP, weight_decay=WD, grad_clip=CLIP, alpha=ALPHA, num_workers=0, progress=False, seed=5,
                  loss="fkl", tail="bucket", save_dtype="fp32"))
    (micro,) = captured
    assert len(micro) == 3
    row = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()][0]

    model = LlamaForCausalLM.from_pretrained(student, dtype=torch.float32)
    vocab = int(micro[0]["n_out"][0] + micro[0]["valid"][0].sum())
    loss, kd, ce = reference_loss(model, micro, vocab)
    assert row["loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
    assert row["kd_loss"] == pytest.approx(float(kd), rel=1e-5) and row["ce_loss"] == pytest.approx(float(ce), rel=1e-5)
    assert row["tokens"] == sum(int(mb["attention_mask"].sum()) for mb in micro)
    assert row["lr"] == pytest.approx(LR / WARMUP)  # step 0 of a 4-step warm-up

    loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    assert row["grad_norm"] == pytest.approx(float(norm), rel=1e-4)
    assert float(norm) > CLIP, "the fixture must clip, or clipping is not tested"
    for p in params:
        p.grad.mul_(CLIP / (float(norm) + 1e-6))
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": WD},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=LR / WARMUP)
    opt.step()
    trained = LlamaForCausalLM.from_pretrained(run / "final", dtype=torch.float32).state_dict()
    ref = model.state_dict()
    for name, w in ref.items():
        torch.testing.assert_close(trained[name], w, rtol=1e-4, atol=1e-6, msg=name)
    before = LlamaForCausalLM.from_pretrained(student, dtype=torch.float32).state_dict()
    assert any(not torch.equal(before[k], trained[k]) for k in before), "the step must change the weights"
