"""Feature and relation KD from stored hidden states (trainer/features.py): the terms equal a
direct computation from the student's own ``output_hidden_states`` and the store's values, RKD
equals its definition computed with loops, and ``trainer fit`` trains and saves the projections."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import logitstore
from logitstore.dump import DumpConfig, dump
from logitstore.errors import ConfigError
from trainer.config import FitConfig
from trainer.data import DistillDataset
from trainer.features import FeatureKD, rkd_angle, rkd_distance
from trainer.fit import fit
from trainer.student import DistillModule, load_student

from test_classify import _classifier, cls_tok, setup  # noqa: F401  (module fixtures)


def _huber(a: float, b: float) -> float:
    d = abs(a - b)
    return 0.5 * d * d if d < 1 else d - 0.5


def _direct_rkd(s: np.ndarray, t: np.ndarray) -> tuple[float, float]:
    """RKD distance and angle by their definitions (Park et al. 2019), with loops."""
    N = len(s)

    def dist(x, i, j):
        return float(np.linalg.norm(x[i] - x[j]))

    pairs = [(i, j) for i in range(N) for j in range(N) if i != j]
    mu_s, mu_t = np.mean([dist(s, i, j) for i, j in pairs]), np.mean([dist(t, i, j) for i, j in pairs])
    d = np.mean([_huber(dist(s, i, j) / mu_s, dist(t, i, j) / mu_t) for i, j in pairs])

    def cos(x, i, j, k):
        a, b = x[i] - x[j], x[k] - x[j]
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    triplets = [p for p in itertools.permutations(range(N), 3)]
    a = np.mean([_huber(cos(s, i, j, k), cos(t, i, j, k)) for i, j, k in triplets])
    return float(d), float(a)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rkd_equals_its_definition(seed):
    g = torch.Generator().manual_seed(seed)
    N = 3 + seed * 2
    s, t = torch.randn(N, 7, generator=g, dtype=torch.float64) * (1 + seed), torch.randn(N, 11, generator=g, dtype=torch.float64)
    d_ref, a_ref = _direct_rkd(s.numpy(), t.numpy())
    assert float(rkd_distance(s, t)) == pytest.approx(d_ref, rel=1e-5, abs=1e-7)
    assert float(rkd_angle(s, t)) == pytest.approx(a_ref, rel=1e-5, abs=1e-7)
    # a relation is the teacher's whatever its scale or position: scaled and shifted students match
    assert float(rkd_distance(t * 3 + 1, t)) < 1e-6 and float(rkd_angle(t * 3 + 1, t)) < 1e-6


def test_rkd_at_the_extremes():
    one, two = torch.randn(1, 4), torch.randn(2, 4)
    assert float(rkd_distance(one, one)) == 0 and float(rkd_angle(two, two)) == 0  # too few to relate
    x = torch.randn(4, 5)
    x[1] = x[0]  # two identical sequences: gradients stay finite
    x.requires_grad_(True)
    (rkd_distance(x, torch.randn(4, 6)) + rkd_angle(x, torch.randn(4, 6))).backward()
    assert torch.isfinite(x.grad).all()


@pytest.fixture(scope="module")
def hidden_store(tmp_path_factory, llama_dir, corpus, tokenizer):
    root = tmp_path_factory.mktemp("feat")
    out = root / "store"
    dump(DumpConfig(teachers=(f"t={llama_dir}",), data=str(corpus), out=str(out), top_k=8, seq_len=32, max_tokens=1200,
                    shard_sequences=8, progress=False, hidden_layers="1,2", hidden_dim=8))
    student = root / "student.json"
    student.write_text(json.dumps({"model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": 24, "intermediate_size": 48,
                                   "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
                                   "max_position_embeddings": 64, "tie_word_embeddings": False}))
    return {"root": root, "store": out, "student": student}


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_feature_and_relation_terms_equal_a_direct_computation(hidden_store, kind):
    torch.manual_seed(0)
    student = load_student(str(hidden_store["student"]))
    ds = DistillDataset([str(hidden_store["store"])], batch_size=5, shuffle=False)
    entry = ds.stores[0].teacher("t")["hidden"]
    fk = FeatureKD(feature_map=[(1, 2), (2, 1)], loss=kind, weight=0.7, norm="none", rkd_map=(2, 2), rkd_distance=2.0, rkd_angle=3.0,
                   teachers=[(0, 1.0, entry)], widths={1: 24, 2: 24})
    ds.request_hidden([(0, 1), (0, 2)], {0: 8})
    module = DistillModule(student)
    module.features = fk
    batch = ds.make_batch(np.arange(5), np.ones(5, np.float32))
    *_, aux = module(batch, temperature=1.0, teacher_temperatures=[1.0], weights=[1.0], fuse_mode="mean-probs", loss="fkl",
                     tail="bucket", beta=0.5, chunk_positions=64, vocab_size=ds.vocab_size, with_aux=True)
    # the reference: the student's own forward, the store's own values (store[i]), the projections' weights
    store = logitstore.open(str(hidden_store["store"]))
    with torch.no_grad():
        hs = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True).hidden_states
    keep = batch["labels"] != -100
    feat, pooled_s, pooled_t = 0.0, [], []
    for b in range(5):
        x = store[b]
        n = len(x["input_ids"])
        assert np.array_equal(batch["input_ids"][b, :n].numpy(), x["input_ids"].astype(np.int64))
        for s, t in [(1, 2), (2, 1)]:
            W = fk.projections[f"t0_s{s}_t{t}"]
            pred = W(hs[s][b, :n]).detach().double()
            target = torch.from_numpy(x["teachers"]["t"]["hidden"][t]).double()
            per = ((pred - target) ** 2).mean(-1) if kind == "mse" else 1 - F.cosine_similarity(pred, target, dim=-1)
            feat += float(per[keep[b, :n]].sum()) / 2
        m = keep[b, :n].numpy()
        if m.any():
            pooled_s.append(hs[2][b, :n][m].double().mean(0).numpy())
            pooled_t.append(x["teachers"]["t"]["hidden"][2][m].astype(np.float64).mean(0))
    d_ref, a_ref = _direct_rkd(np.stack(pooled_s), np.stack(pooled_t))
    n_keep = int(keep.sum())
    aux = {k: float(v.detach()) for k, v in aux.items()}
    assert aux["feature"] == pytest.approx(0.7 * feat, rel=1e-4)
    assert aux["rkd_distance"] == pytest.approx(2.0 * d_ref * n_keep, rel=1e-4)
    assert aux["rkd_angle"] == pytest.approx(3.0 * a_ref * n_keep, rel=1e-4)


def test_fit_trains_the_feature_loss_and_saves_the_projections(hidden_store, tokenizer):
    from safetensors.torch import load_file

    run = hidden_store["root"] / "run"
    res = fit(FitConfig(logits=(str(hidden_store["store"]),), student=str(hidden_store["student"]), out=str(run), max_steps=25,
                        batch_size=4, lr=3e-3, alpha=0.5, feature_weight=1.0, feature_map="1:1,2:2", rkd_distance=1.0, rkd_map="2:2",
                        num_workers=0, device="cpu", progress=False, grad_accum=2), tokenizer=tokenizer)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' not in x]
    f = [r["feature_loss"] for r in rows]
    assert all(np.isfinite(f)) and np.mean(f[-5:]) < 0.7 * np.mean(f[:5]), f
    assert all(r["rkd_distance_loss"] > 0 for r in rows) and all(r["rkd_angle_loss"] == 0 for r in rows)
    # the loss is the sum of its weighted terms
    for r in rows:
        assert r["loss"] == pytest.approx(0.5 * r["kd_loss"] + 0.5 * r["ce_loss"] + r["feature_loss"] + r["rkd_distance_loss"], rel=1e-6)
    final = run / "final"
    w = load_file(str(final / "feature_projections.safetensors"))
    meta = json.loads((final / "feature_projections.json").read_text())
    assert sorted(w) == ["t0_s1_t1.bias", "t0_s1_t1.weight", "t0_s2_t2.bias", "t0_s2_t2.weight"]
    assert w["t0_s2_t2.weight"].shape == (8, 24) and meta["projections"]["t0_s2_t2"]["teacher_layer"] == 2
    assert res["steps"] == 25


def test_classify_feature_terms_use_the_stores_pooling(setup, tmp_path, cls_tok):  # noqa: F811
    from trainer.classify import ClassifyDataset, ClassifyModule

    out = tmp_path / "c"
    dump(DumpConfig(teachers=(f"t={setup['bert']}",), data=str(setup["data"]), out=str(out), seq_len=32, batch_size=5,
                    task="classify", label_field="label", progress=False, shard_sequences=8, hidden_layers="2",
                    hidden_pooling="last"))
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)

    student = AutoModelForSequenceClassification.from_pretrained(setup["llama"])  # a decoder student of a BERT teacher
    ds = ClassifyDataset([str(out)], batch_size=6, shuffle=False)
    entry = ds.stores[0].teacher("t")["hidden"]
    fk = FeatureKD(feature_map=[(1, 2)], loss="mse", weight=1.0, norm="layer", rkd_map=(1, 2), rkd_distance=1.0, rkd_angle=1.0,
                   teachers=[(0, 1.0, entry)], widths={1: 32})
    ds.request_hidden([(0, 2)], {0: 32})
    module = ClassifyModule(student, 3)
    module.features, module.pooling = fk, "last"
    batch = ds.make_batch(np.arange(6), np.ones(6, np.float32))
    *_, aux = module(batch, temperature=1.0, teacher_temperatures=[1.0], weights=[1.0], fuse_mode="mean-probs", loss="fkl",
                     tail="bucket", beta=0.5, chunk_positions=0, vocab_size=0, with_aux=True)
    store = logitstore.open(str(out))
    feats_s, feats_t, feat = [], [], 0.0
    for b in range(6):
        x = store[b]
        ids = torch.from_numpy(x["input_ids"].astype(np.int64))[None]
        with torch.no_grad():
            h = student(input_ids=ids, output_hidden_states=True).hidden_states[1][0, -1].double()
        t = torch.from_numpy(x["teachers"]["t"]["hidden"][2]).double()
        p = fk.projections["t0_s1_t2"](h.float()).detach().double()
        ln = [(v - v.mean()) / torch.sqrt(v.var(unbiased=False) + 1e-5) for v in (p, t)]  # layer norm, no affine
        feat += float(((ln[0] - ln[1]) ** 2).mean())
        feats_s.append(h.numpy())
        feats_t.append(t.numpy())
    d_ref, a_ref = _direct_rkd(np.stack(feats_s), np.stack(feats_t))
    assert float(aux["feature"]) == pytest.approx(feat, rel=1e-4)
    assert float(aux["rkd_distance"]) == pytest.approx(d_ref * 6, rel=1e-4)
    assert float(aux["rkd_angle"]) == pytest.approx(a_ref * 6, rel=1e-4)


def test_feature_maps_that_cannot_be_used_are_refused_in_one_line(hidden_store, tmp_path, corpus, llama_dir):
    base = dict(logits=(str(hidden_store["store"]),), student=str(hidden_store["student"]), max_steps=1, batch_size=3,
                num_workers=0, device="cpu", progress=False)
    with pytest.raises(ConfigError, match=r"teacher t stores hidden states at layers \[1, 2\], not \[0\]"):
        fit(FitConfig(**base, out=str(tmp_path / "a"), feature_weight=1.0, feature_map="1:0"))
    with pytest.raises(ConfigError, match="student layer 5 does not exist"):
        fit(FitConfig(**base, out=str(tmp_path / "b"), feature_weight=1.0, feature_map="5:1"))
    with pytest.raises(ConfigError, match="needs --feature-map"):
        FitConfig(**base, out=str(tmp_path / "c"), feature_weight=1.0)
    with pytest.raises(ConfigError, match="--batch-size 2 is too few"):  # 2 sequences: no relation to learn
        FitConfig(**{**base, "batch_size": 2}, out=str(tmp_path / "c"), rkd_distance=1.0, rkd_map="1:1")
    with pytest.raises(ConfigError, match="STUDENT_LAYER:TEACHER_LAYER pairs"):
        FitConfig(**base, out=str(tmp_path / "c"), feature_weight=1.0, feature_map="1-2")
    plain = tmp_path / "plain"
    dump(DumpConfig(teachers=(f"t={llama_dir}",), data=str(corpus), out=str(plain), top_k=8, seq_len=32, max_tokens=300, progress=False))
    with pytest.raises(ConfigError, match="stores hidden states \\(dump with --hidden-layers\\)"):
        fit(FitConfig(**{**base, "logits": (str(plain),)}, out=str(tmp_path / "d"), rkd_angle=1.0, rkd_map="1:1"))

    class LSTM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.out = torch.nn.Embedding(300, 8), torch.nn.Linear(8, 300)

        def forward(self, input_ids, attention_mask=None):
            return self.out(self.emb(input_ids))

    with pytest.raises(ConfigError, match="does not take output_hidden_states"):
        fit(FitConfig(**base, out=str(tmp_path / "e"), feature_weight=1.0, feature_map="1:1"), model=LSTM())
    r = subprocess.run([sys.executable, "-m", "trainer", "fit", "--logits", str(hidden_store["store"]), "--student",
                        str(hidden_store["student"]), "--out", str(tmp_path / "cli"), "--max-steps", "1", "--device", "cpu",
                        "--feature-weight", "1", "--feature-map", "1:7", "-q"], capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "not [7]" in r.stderr
    assert not (tmp_path / "cli" / "final").exists()
