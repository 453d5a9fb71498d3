"""trainer.hf: a logitstore cache under ``transformers.Trainer``.

The promise: ``KDTrainer``'s loss of an optimizer step is ``trainer fit``'s (the mean over the step's
target positions of ``alpha * T^2 * KD + (1 - alpha) * CE``, whatever the gradient accumulation),
and ``KDDataCollator`` builds exactly the batch ``DistillDataset.make_batch`` builds for the same
sequences, found by their content hash."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import logitstore
from conftest import build_tokenizer, save_llama
from logitstore.dump import DumpConfig, dump
from logitstore.errors import ConfigError, LogitStoreError
from trainer.config import FitConfig
from trainer.data import DistillDataset
from trainer.fit import Run, fit
from trainer.hf import KDDataCollator, KDTrainer, TeacherTargets, kd_loss_for_batch

SEQ_LEN = 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory, llama_dir, corpus, tokenizer):
    root = tmp_path_factory.mktemp("hf")
    teacher_b = save_llama(root / "teacher-b", tokenizer, seed=4)
    # 390 tokens in 16-token windows: 24 full windows and one of 6 tokens (rows of unequal length)
    base = dict(data=str(corpus), top_k=8, seq_len=SEQ_LEN, max_tokens=390, shard_sequences=8, progress=False)
    out = {"root": root}
    for name, teachers in {"both": (f"a={llama_dir}", f"b={teacher_b}"), "only_a": (f"a={llama_dir}",),
                           "only_b": (f"b={teacher_b}",)}.items():
        out[name] = root / name
        dump(DumpConfig(teachers=teachers, out=str(out[name]), **base))
    out["student"] = save_llama(root / "student", tokenizer, seed=3)
    return out


def store_rows(url, idx):
    s = logitstore.open(str(url))
    return [s[int(i)] for i in idx]


def features_of(batch):
    """The unpadded rows of a trainer-fit batch as Trainer features (``input_ids`` lists)."""
    out = []
    for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
        out.append({"input_ids": ids[mask.bool()].tolist()})
    return out


def make_trainer(setup, tmp_path, *, alpha, batch_size, grad_accum, max_steps, train_dataset=None, eval_dataset=None, **kw):
    from transformers import LlamaForCausalLM, TrainingArguments

    model = LlamaForCausalLM.from_pretrained(setup["student"], dtype=torch.float32)
    targets = TeacherTargets([str(setup["both"])])
    args = TrainingArguments(output_dir=str(tmp_path / "hf-run"), per_device_train_batch_size=batch_size,
                             per_device_eval_batch_size=batch_size, gradient_accumulation_steps=grad_accum,
                             max_steps=max_steps, learning_rate=1e-3, max_grad_norm=0.0, logging_steps=1,
                             save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0, seed=11,
                             disable_tqdm=True, lr_scheduler_type="constant", warmup_steps=0)
    return KDTrainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                     data_collator=KDDataCollator(targets, pad_token_id=0), kd_alpha=alpha, **kw)


def fit_one_step(setup, tmp_path, monkeypatch, **settings):
    """trainer fit's first step on the two-teacher store: (its metrics row, its micro-batches)."""
    captured, real = [], Run.step

    def spy(self, micro, data_wait):
        captured.append([{k: v.clone() for k, v in mb.items()} for mb in micro])
        return real(self, micro, data_wait)

    monkeypatch.setattr(Run, "step", spy)
    run = tmp_path / f"fit-{len(list(tmp_path.iterdir()))}"
    fit(FitConfig(logits=(str(setup["both"]),), student=str(setup["student"]), out=str(run), max_steps=1, num_workers=0,
                  progress=False, seed=5, lr=1e-3, checkpoint_every=0, **settings))
    monkeypatch.setattr(Run, "step", real)
    row = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()][0]
    return row, captured[0]


# ------------------------------------------------------------------------------------- (a) = trainer fit
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_compute_loss_equals_trainer_fits_step_loss(alpha, setup, tmp_path, monkeypatch):
    kw = dict(temperature=2.0, teacher_weights=(0.7, 0.3)) if alpha == 0.5 else {}
    row, micro = fit_one_step(setup, tmp_path, monkeypatch, batch_size=3, grad_accum=2, alpha=alpha,
                              **({"temperature": 2.0, "weights": (0.7, 0.3)} if kw else {}))
    trainer = make_trainer(setup, tmp_path, alpha=alpha, batch_size=3, grad_accum=2, max_steps=1, **kw)
    batches = [trainer.data_collator(features_of(mb)) for mb in micro]
    for mine, theirs in zip(batches, micro):  # the same labels as trainer fit's batches (shifted, -100 elsewhere)
        L = theirs["labels"].shape[1]
        assert torch.equal(mine["labels"], theirs["labels"][:, :mine["labels"].shape[1]])
        assert (theirs["labels"][:, mine["labels"].shape[1]:] == -100).all() and mine["labels"].shape[1] <= L
    n = sum(int((b["labels"] != -100).sum()) for b in batches)
    trainer.model.train()
    with torch.no_grad():
        got = sum(float(trainer.compute_loss(trainer.model, b, num_items_in_batch=torch.tensor(n))) for b in batches)
        whole = trainer.data_collator([f for mb in micro for f in features_of(mb)])
        alone = float(trainer.compute_loss(trainer.model, whole))  # one batch, its own count
    assert got == pytest.approx(row["loss"], rel=1e-5)
    assert alone == pytest.approx(row["loss"], rel=1e-5)


def test_trainer_train_step_equals_trainer_fit_and_the_step_mean(setup, tmp_path, monkeypatch):
    """(b) Trainer.train with gradient accumulation: the logged loss of step 1 is trainer fit's for the
    same sequences, and its gradient is that of the mean over the whole step's target positions."""
    import datasets
    from transformers import TrainerCallback

    row, micro = fit_one_step(setup, tmp_path, monkeypatch, batch_size=2, grad_accum=2, alpha=0.5)
    feats = [f for mb in micro for f in features_of(mb)]
    more = [{"input_ids": r["input_ids"].tolist()} for r in store_rows(setup["both"], range(4, 16))]
    first = datasets.Dataset.from_dict({"input_ids": [f["input_ids"] for f in feats]})
    grads = []

    class Grads(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            if state.global_step == 0:
                grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})

    # step 1 over exactly the four sequences of trainer fit's step (any order, any split: the step mean is the same)
    trainer = make_trainer(setup, tmp_path, alpha=0.5, batch_size=2, grad_accum=2, max_steps=1, train_dataset=first)
    trainer.add_callback(Grads())
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged[0]["loss"] == pytest.approx(row["loss"], rel=1e-5)
    assert logged[0]["kd_loss"] == pytest.approx(row["kd_loss"], rel=1e-5)
    assert logged[0]["ce_loss"] == pytest.approx(row["ce_loss"], rel=1e-5)

    # the direct computation: one batch of the step's sequences, the same initial weights
    ref = make_trainer(setup, tmp_path, alpha=0.5, batch_size=2, grad_accum=2, max_steps=1)
    whole = ref.data_collator(feats)
    loss, parts = kd_loss_for_batch(ref.model, whole, vocab_size=ref.kd_targets.vocab_size, kd_alpha=0.5)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(row["loss"], rel=1e-5) and parts["n"] == sum(int((m["labels"] != -100).sum()) for m in micro)
    (g,) = grads
    for name, p in ref.model.named_parameters():
        torch.testing.assert_close(g[name], p.grad, rtol=1e-4, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")

    # a few more steps with accumulation over rows of unequal length (the short last window too): finite losses
    ds = datasets.Dataset.from_dict({"input_ids": [f["input_ids"] for f in feats + more]
                                     + [logitstore.open(str(setup["both"]))[24]["input_ids"].tolist()]})
    trainer = make_trainer(setup, tmp_path, alpha=0.5, batch_size=3, grad_accum=2, max_steps=4, train_dataset=ds)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(np.isfinite(losses)), losses
    ev = trainer.evaluate(ds)
    assert np.isfinite(ev["eval_loss"])


# ------------------------------------------------------------------------------------- (c) the collator
def test_collator_builds_make_batchs_batch_from_the_stores_rows(setup):
    idx = [3, 24, 7, 0]  # 24 is the short last window
    rows = store_rows(setup["both"], idx)
    targets = TeacherTargets([str(setup["both"])])
    col = KDDataCollator(targets, pad_token_id=0)
    got = col([{"input_ids": r["input_ids"].tolist()} for r in rows])
    ref = DistillDataset([str(setup["both"])], batch_size=4, shuffle=False, num_workers=0).make_batch(np.array(idx), np.ones(4, np.float32))
    for k in ("input_ids", "attention_mask", "labels", "support", "valid", "teacher_lp", "rest_lp", "n_out"):
        assert torch.equal(got[k], ref[k]), k
    assert got["shift_labels"] is got["labels"]
    import pickle  # DataLoader workers get a pickled collator: it reopens the stores

    again = pickle.loads(pickle.dumps(col))([{"input_ids": r["input_ids"].tolist()} for r in rows])
    assert all(torch.equal(again[k], got[k]) for k in got)
    # the targets are the store's own top-k: each stored (id, log-prob) is on the support with that log-prob
    B, L = got["input_ids"].shape
    for b, r in enumerate(rows):
        for m, name in enumerate(("a", "b")):
            td = r["teachers"][name]
            assert targets.lookup(r["input_ids"])[name]["ids"].tolist() == td["ids"].tolist()
            for t in range(len(r["input_ids"])):
                pos = b * L + t
                sup = got["support"][pos][got["valid"][pos]].tolist()
                for j, (i, lp) in enumerate(zip(td["ids"][t].tolist(), td["logprobs"][t].tolist())):
                    assert got["teacher_lp"][m, pos, sup.index(i)] == pytest.approx(lp, abs=0)
    # several stores (one teacher each), joined by hash, give the same targets as the two-teacher store
    two = KDDataCollator(TeacherTargets([str(setup["only_a"]), str(setup["only_b"])]), pad_token_id=0)
    again = two([{"input_ids": r["input_ids"]} for r in rows])
    for k in ("support", "valid", "teacher_lp", "rest_lp", "n_out", "labels"):
        assert torch.equal(again[k], got[k]), k


def test_labels_attention_masks_and_padding_of_user_features(setup):
    r = store_rows(setup["both"], [5])[0]
    ids = r["input_ids"].tolist()
    col = KDDataCollator(TeacherTargets(str(setup["both"])), pad_token_id=7, pad_to_multiple_of=8)
    lab = [-100] * 6 + ids[6:]  # Hugging Face labels (unshifted): the first 6 tokens are a prompt
    padded = {"input_ids": ids + [7, 7, 7], "attention_mask": [1] * len(ids) + [0, 0, 0], "labels": lab + [-100] * 3}
    got = col([padded, {"input_ids": ids[:0] + store_rows(setup["both"], [24])[0]["input_ids"].tolist()}])
    want = np.full(len(ids), -100)
    want[5:-1] = ids[6:]  # labels[t] = input_ids[t + 1] where token t + 1 is trained
    assert got["labels"][0, :len(ids)].tolist() == want.tolist() and (got["labels"][0, len(ids):] == -100).all()
    assert got["input_ids"].shape[1] % 8 == 0 and got["input_ids"][1, 6:].eq(7).all()
    assert got["attention_mask"].sum(1).tolist() == [len(ids), 6]


def test_rows_the_store_does_not_hold_end_in_one_line(setup, tmp_path):
    s = logitstore.open(str(setup["both"]))
    col = KDDataCollator(TeacherTargets([str(setup["both"])]), pad_token_id=0)
    good = {"input_ids": s[0]["input_ids"].tolist()}
    changed = s[1]["input_ids"].tolist()
    changed[3] = (changed[3] + 1) % 300
    with pytest.raises(LogitStoreError) as e:
        col([good, {"input_ids": changed}])
    msg = str(e.value)
    assert "\n" not in msg and "row 1 of the batch" in msg and "tokenised differently" in msg
    assert TeacherTargets.hash_of(np.array(changed)).hex() in msg
    with pytest.raises(LogitStoreError, match=r"row 0 of the batch has 32 tokens, more than the store's seq_len 16"):
        col([{"input_ids": s[0]["input_ids"].tolist() + s[1]["input_ids"].tolist()}])
    wrong = s[2]["input_ids"].tolist()
    with pytest.raises(LogitStoreError, match=r"row 0 of the batch: labels\[4\] = .* is not the input token"):
        col([{"input_ids": wrong, "labels": wrong[:4] + [(wrong[4] + 1) % 300] + wrong[5:]}])
    # the same teacher in two stores would count twice in the fusion
    with pytest.raises(LogitStoreError, match="same model as teacher"):
        TeacherTargets([str(setup["both"]), str(setup["only_a"])])
    with pytest.raises(ConfigError, match="kd_alpha"):
        make_trainer(setup, tmp_path, alpha=1.5, batch_size=1, grad_accum=1, max_steps=1)
    with pytest.raises(ConfigError, match="teacher_weights: 3 weight"):
        make_trainer(setup, tmp_path, alpha=0.5, batch_size=1, grad_accum=1, max_steps=1, teacher_weights=(1, 1, 1))


def test_another_tokenizer_is_refused(setup, tmp_path, corpus):
    other_tok = build_tokenizer(vocab_size=400)
    other = tmp_path / "other"
    dump(DumpConfig(teachers=(f"x={save_llama(tmp_path / 'tx', other_tok)}",), data=str(corpus), out=str(other), top_k=8,
                    seq_len=SEQ_LEN, max_tokens=64, progress=False))
    with pytest.raises(LogitStoreError, match="tokenizer fingerprint differs"):
        TeacherTargets([str(setup["both"]), str(other)])


def test_the_stores_loss_mask_is_followed_when_present(setup, monkeypatch):
    """Rows of a store with ``loss_mask`` (position t True when token t + 1 is trained)."""
    targets = TeacherTargets([str(setup["both"])])
    real = TeacherTargets.row

    def with_mask(self, i):
        row = real(self, i)
        n = len(row["input_ids"])
        row["loss_mask"] = np.arange(n) >= 4  # the first 4 predictions are not trained (a prompt)
        row["loss_mask"][-1] = False
        return row

    monkeypatch.setattr(TeacherTargets, "row", with_mask)
    col = KDDataCollator(targets, pad_token_id=0)
    ids = store_rows(setup["both"], [9])[0]["input_ids"].tolist()
    got = col([{"input_ids": ids}])  # no labels: what the store trains
    assert got["labels"][0].tolist() == [-100] * 4 + ids[5:] + [-100]
    ok = [-100] * 6 + ids[6:]  # trains a subset of the store's positions
    assert col([{"input_ids": ids, "labels": ok}])["labels"][0].tolist() == [-100] * 5 + ids[6:] + [-100]
    with pytest.raises(LogitStoreError, match=r"row 1 of the batch \(store sequence 9\): labels train position 0 .* loss_mask"):
        col([{"input_ids": ids, "labels": ok}, {"input_ids": ids, "labels": ids}])


DDP_SCRIPT = """
import json, sys
import datasets, logitstore, torch
from transformers import AutoModelForCausalLM, TrainingArguments
from trainer.hf import KDDataCollator, KDTrainer, TeacherTargets
url, student, out, bs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
s = logitstore.open(url)
ds = datasets.Dataset.from_dict({"input_ids": [s[i]["input_ids"].tolist() for i in (0, 1, 2, 24)]})
args = TrainingArguments(output_dir=out, per_device_train_batch_size=bs, max_steps=1, learning_rate=0.1, optim="sgd",
                         max_grad_norm=0.0, weight_decay=0.0, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                         disable_tqdm=True, lr_scheduler_type="constant")
tr = KDTrainer(model=AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32), args=args, train_dataset=ds,
               data_collator=KDDataCollator(TeacherTargets(url), 0), kd_alpha=0.5)
tr.train()
if tr.accelerator.is_main_process:
    h = [x for x in tr.state.log_history if "loss" in x][0]
    torch.save(tr.accelerator.unwrap_model(tr.model).state_dict(), out + "/w.pt")
    json.dump({"loss": h["loss"], "wrapper": type(tr.model_wrapped).__name__}, open(out + "/r.json", "w"))
"""


def test_ddp_two_processes_take_the_same_step_as_one(setup, tmp_path):
    """Under torchrun (2 CPU processes, gloo) the loss runs through the DDP wrapper and is normalised by
    the global count: the logged loss and the SGD step equal one process with the whole batch."""
    import os
    import subprocess
    import sys

    script = tmp_path / "ddp_kd.py"
    script.write_text(DDP_SCRIPT)
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    common = [str(script), str(setup["both"]), str(setup["student"])]
    subprocess.run([sys.executable, *common, str(tmp_path / "one"), "4"], check=True, env=env, capture_output=True)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *common,
                        str(tmp_path / "two"), "2"], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    one, two = (json.loads((tmp_path / d / "r.json").read_text()) for d in ("one", "two"))
    assert two["wrapper"] == "DistributedDataParallel" and one["wrapper"] != two["wrapper"]
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
    a, b = (torch.load(tmp_path / d / "w.pt") for d in ("one", "two"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


def test_packed_documents_carry_position_ids_and_the_loss_still_equals_fits(setup, tmp_path, monkeypatch, llama_dir, corpus):
    """A store that records document starts (--doc-boundaries on): the collator hands out make_batch's
    restarting position_ids, and the loss through them is trainer fit's."""
    seg = tmp_path / "segmented"
    dump(DumpConfig(teachers=(f"a={llama_dir}",), data=str(corpus), out=str(seg), top_k=8, seq_len=64, max_tokens=2000,
                    shard_sequences=8, progress=False, doc_boundaries="on"))
    s = logitstore.open(str(seg))
    starts = [i for i in range(len(s)) if int(s[i]["position_ids"].max()) < len(s[i]["input_ids"]) - 1]
    assert starts, "the case needs windows in which a new document starts"
    targets = TeacherTargets(str(seg))
    assert targets.segmented
    idx = sorted(set(starts[:2]) | {0})  # window 0 is full: the batch is seq_len long, as make_batch's
    got = KDDataCollator(targets, pad_token_id=0)([{"input_ids": s[i]["input_ids"]} for i in idx])
    ref = DistillDataset([str(seg)], batch_size=len(idx), shuffle=False, num_workers=0).make_batch(np.array(idx),
                                                                                                  np.ones(len(idx), np.float32))
    for k in ("input_ids", "attention_mask", "labels", "position_ids", "support", "valid", "teacher_lp", "rest_lp", "n_out"):
        assert torch.equal(got[k], ref[k]), k
    monkeypatch.setitem(setup, "both", seg)  # fit and the trainer below read the segmented store
    row, micro = fit_one_step(setup, tmp_path, monkeypatch, batch_size=3, grad_accum=1, alpha=0.5)
    assert "position_ids" in micro[0]
    trainer = make_trainer(setup, tmp_path, alpha=0.5, batch_size=3, grad_accum=1, max_steps=1)
    trainer.model.train()
    with torch.no_grad():
        loss = float(trainer.compute_loss(trainer.model, trainer.data_collator(features_of(micro[0]))))
    assert loss == pytest.approx(row["loss"], rel=1e-5)
