"""``logitstore dump --task classify``: sequence-classification teachers' class logits, stored once."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import logitstore
from logitstore.dump import DumpConfig, dump
from logitstore.errors import ConfigError, LogitStoreError

from conftest import corpus_texts

LABELS = ["tutorial", "howto", "faq"]


def _classifier(path, tokenizer, *, seed=0, labels=LABELS, family="bert"):
    from transformers import (BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForSequenceClassification)

    torch.manual_seed(seed)
    kw = dict(num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)},
              pad_token_id=tokenizer.pad_token_id or 0)
    if family == "bert":
        cfg = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128, **kw)
        model = BertForSequenceClassification(cfg)
    else:
        cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128, **kw)
        model = LlamaForSequenceClassification(cfg)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def cls_tok(tokenizer):
    """The session tokenizer with a pad token, as a copy (the shared fixture must stay as it is)."""
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.pad_token = tok.eos_token
    return tok


@pytest.fixture(scope="module")
def setup(tmp_path_factory, cls_tok):
    tokenizer = cls_tok
    d = tmp_path_factory.mktemp("classify")
    rng = np.random.default_rng(0)
    words = " ".join(corpus_texts(2, 4000)).split()
    rows = []
    for i in range(23):
        a = int(rng.integers(0, len(words) - 80))
        rows.append({"text": " ".join(words[a:a + int(rng.integers(5, 60))]), "label": LABELS[i % 3] if i % 2 else i % 3})
    data = d / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return {"d": d, "data": data, "rows": rows, "bert": _classifier(d / "bert", tokenizer, seed=1),
            "llama": _classifier(d / "llamacls", tokenizer, seed=2, family="llama")}


def _dump(setup, out, teachers, **kw):
    cfg = dict(teachers=teachers, data=str(setup["data"]), out=str(out), seq_len=32, batch_size=5, task="classify",
               label_field="label", progress=False, shard_sequences=8)
    cfg.update(kw)
    return dump(DumpConfig(**cfg))


def test_class_logits_equal_each_teachers_own_forward(setup, cls_tok):
    tokenizer = cls_tok
    from transformers import AutoModelForSequenceClassification

    out = setup["d"] / "s"
    m = _dump(setup, out, (f"bert={setup['bert']}", f"llama={setup['llama']}")).manifest
    assert m["task"] == "classify" and m["num_labels"] == 3 and m["label_names"] == LABELS and m["format_version"] == 3
    store = logitstore.open(str(out))
    assert len(store) == len(setup["rows"]) and store.n_shards == 3
    models = {n: AutoModelForSequenceClassification.from_pretrained(setup[n]).eval() for n in ("bert", "llama")}
    for i, r in enumerate(setup["rows"]):
        s = store[i]
        ids = tokenizer(r["text"], add_special_tokens=True)["input_ids"][:32]
        np.testing.assert_array_equal(s["input_ids"], ids)
        assert s["label"] == (LABELS.index(r["label"]) if isinstance(r["label"], str) else r["label"]) and s["row"] == i
        for n, model in models.items():
            with torch.no_grad():
                ref = model(torch.tensor([ids])).logits[0].numpy()
            np.testing.assert_allclose(s["teachers"][n]["logits"], ref, atol=1e-5)
    from logitstore.tools.verify import verify

    assert verify(str(out)) == []
    again = _dump(setup, out, (f"bert={setup['bert']}", f"llama={setup['llama']}"))  # complete: nothing to do
    assert again.manifest["n_sequences"] == len(setup["rows"])


def test_a_teacher_without_a_classification_head_is_refused(setup, tmp_path, llama_dir):
    with pytest.raises(LogitStoreError, match="has no trained classification head"):
        _dump(setup, tmp_path / "s", (f"lm={llama_dir}",))
    assert not (tmp_path / "s" / "manifest.json").exists()


def test_teachers_with_different_labels_are_refused(setup, tmp_path, cls_tok):
    other = _classifier(tmp_path / "other", cls_tok, labels=["a", "b"])
    with pytest.raises(LogitStoreError, match=r"its labels \['a', 'b'\] differ from"):
        _dump(setup, tmp_path / "s", (f"bert={setup['bert']}", f"other={other}"))


@pytest.mark.parametrize("row, match", [
    ({"text": "a text", "label": 7}, "row 1: field 'label': 7 is not a class of the teachers"),
    ({"text": "a text"}, "row 1: field 'label': None is not a class"),
    ({"text": "a text", "label": "sports"}, "row 1: field 'label': 'sports' is not a class"),
    ({"text": None, "label": 1}, "row 1: field 'text': expected a non-empty text"),
])
def test_bad_rows_name_the_row_and_field(setup, tmp_path, row, match):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"text": "fine", "label": 0}) + "\n" + json.dumps(row) + "\n", encoding="utf-8")
    with pytest.raises(LogitStoreError, match=match):
        _dump(setup, tmp_path / "s", (f"bert={setup['bert']}",), data=str(data))
    assert not (tmp_path / "s" / "manifest.json").exists()


def test_label_field_is_required(setup, tmp_path):
    with pytest.raises(LogitStoreError, match="--label-field is required"):
        _dump(setup, tmp_path / "s", (f"bert={setup['bert']}",), label_field=None)


def test_export_and_the_tools_that_do_not_apply(setup, tmp_path):
    import pyarrow.parquet as pq

    from logitstore.errors import ConfigError
    from logitstore.tools.export import export
    from logitstore.tools.stats import store_stats
    from trainer.data import DistillDataset

    out = tmp_path / "s"
    _dump(setup, out, (f"bert={setup['bert']}",))
    export(str(out), str(tmp_path / "e"), progress=False)
    t = pq.read_table(sorted((tmp_path / "e" / "data").glob("*.parquet"))[0])
    store = logitstore.open(str(out))
    assert t.column("label").to_pylist() == [store[i]["label"] for i in range(t.num_rows)]
    np.testing.assert_array_equal(np.array(t.column("bert.logits").to_pylist()[2], np.float32), store[2]["teachers"]["bert"]["logits"])
    with pytest.raises(ConfigError, match="top-k coverage applies to language-model stores only"):
        store_stats(str(out))
    with pytest.raises(LogitStoreError, match="a classify store; this reads lm stores"):
        DistillDataset([str(out)], batch_size=2)  # the language-model dataset; trainer fit picks ClassifyDataset


def test_classification_kd_loss_equals_a_dense_reference_with_fusion(setup):
    """alpha * T^2 KL(fused teachers || student) + (1 - alpha) * CE, fused by brute force from the
    teachers' own class distributions, for both fusion modes and every divergence."""
    from trainer.classify import ClassifyDataset, ClassifyModule
    from trainer.losses import dense_divergence

    out = setup["d"] / "s"
    _dump(setup, out, (f"bert={setup['bert']}", f"llama={setup['llama']}"))
    ds = ClassifyDataset([str(out)], batch_size=6)
    batch = ds.make_batch(np.arange(7), np.array([1, 1, 1, 1, 1, 1, 0], np.float32))  # the last row a filler
    assert batch["labels"][-1] == -100 and batch["teacher_logits"].shape == (2, 7, 3)
    torch.manual_seed(0)

    class Student(torch.nn.Module):  # any module mapping ids to [B, C] logits
        def __init__(self):
            super().__init__()
            self.emb, self.out = torch.nn.Embedding(ds.vocab_size, 8), torch.nn.Linear(8, 3)

        def forward(self, input_ids, attention_mask):
            h = (self.emb(input_ids) * attention_mask[..., None]).sum(1) / attention_mask.sum(1, keepdim=True)
            return self.out(h)

    model = Student()
    module = ClassifyModule(model)
    w, T = [0.7, 0.3], 2.0
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["attention_mask"]).double()
        keep = batch["labels"] != -100
        probs = [torch.softmax(batch["teacher_logits"][m].double() / T, -1) for m in range(2)]
        for mode, fused in (("mean-probs", w[0] * probs[0] + w[1] * probs[1]),
                            ("mean-logits", torch.softmax(w[0] * probs[0].log() + w[1] * probs[1].log(), -1))):
            q = torch.log_softmax(logits / T, -1)
            ref_kl = float((fused * (fused.log() - q)).sum(-1)[keep].sum()) * T ** 2
            ref_ce = float(torch.nn.functional.cross_entropy(logits[keep], batch["labels"][keep], reduction="sum"))
            ce, kd, n = module(batch, temperature=T, teacher_temperatures=[T, T], weights=w, fuse_mode=mode, loss="fkl",
                               tail="bucket", beta=0.5, chunk_positions=0, vocab_size=0)
            assert int(n) == 6 and float(ce) == pytest.approx(ref_ce, rel=1e-5) and float(kd) == pytest.approx(ref_kl, rel=1e-4)
            for loss in ("rkl", "jsd"):
                _, kd2, _ = module(batch, temperature=T, teacher_temperatures=[T, T], weights=w, fuse_mode=mode, loss=loss,
                                   tail="bucket", beta=0.5, chunk_positions=0, vocab_size=0)
                ref = dense_divergence(q.float()[keep], fused.log().float()[keep], loss=loss, beta=0.5).sum() * T ** 2
                assert float(kd2) == pytest.approx(float(ref), rel=1e-4)


def test_trainer_fit_trains_a_classifier_student_and_saves_it(setup, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from trainer.config import FitConfig
    from trainer.fit import fit

    out = setup["d"] / "s"
    _dump(setup, out, (f"bert={setup['bert']}", f"llama={setup['llama']}"))
    student = tmp_path / "student.json"
    student.write_text(json.dumps({"model_type": "bert", "vocab_size": 512, "hidden_size": 16, "num_hidden_layers": 1,
                                   "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 64}))
    run = tmp_path / "run"
    res = fit(FitConfig(logits=(str(out),), student=str(student), out=str(run), eval_logits=str(out), max_steps=6, batch_size=4,
                        lr=3e-3, alpha=0.5, temperature=2.0, weights=(0.5, 0.5), num_workers=0, device="cpu", progress=False))
    ev = res["eval"]
    assert set(ev) >= {"ce", "kl", "accuracy", "macro_f1", "top1_agreement"} and ev["sequences"] == len(setup["rows"])
    assert 0 <= ev["accuracy"] <= 1 and 0 <= ev["macro_f1"] <= 1
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in rows if not r.get("eval"))
    saved = AutoModelForSequenceClassification.from_pretrained(res["final"])
    assert saved.config.num_labels == 3 and saved.config.id2label[1] == "howto"
    with pytest.raises(LogitStoreError, match="--task lm: .* is a classify store"):
        fit(FitConfig(logits=(str(out),), student=str(student), out=str(tmp_path / "r2"), task="lm", max_steps=1, device="cpu",
                      progress=False))


def test_decoder_classifiers_are_fed_their_own_pad_id(setup, tmp_path, cls_tok):
    """A decoder classifier pools at its last token that is not config.pad_token_id: a batch padded
    with another id would pool on padding. Stored logits equal each text's own unpadded forward."""
    from transformers import AutoModelForSequenceClassification

    d = _classifier(tmp_path / "dec", cls_tok, seed=4, family="llama")
    cfg = json.loads((d / "config.json").read_text())
    cfg["pad_token_id"] = 5  # another id than the tokenizer's pad
    (d / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "s"
    _dump(setup, out, (f"dec={d}",), batch_size=8)
    store, model = logitstore.open(str(out)), AutoModelForSequenceClassification.from_pretrained(d).eval()
    for i in range(len(store)):
        s = store[i]
        with torch.no_grad():
            ref = model(torch.from_numpy(s["input_ids"].astype(np.int64))[None]).logits[0].numpy()
        np.testing.assert_allclose(s["teachers"]["dec"]["logits"], ref, atol=1e-5)


def test_stores_with_other_classes_are_not_trained_together(setup, tmp_path, cls_tok):
    from trainer.classify import ClassifyDataset

    other = _classifier(tmp_path / "perm", cls_tok, labels=["faq", "howto", "tutorial"])
    a, b = tmp_path / "a", tmp_path / "b"
    _dump(setup, a, (f"bert={setup['bert']}",))
    rows = [json.loads(x) for x in setup["data"].read_text().splitlines()]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({**r, "label": r["label"] if isinstance(r["label"], int) else ["faq", "howto", "tutorial"].index(r["label"])}) + "\n" for r in rows))
    _dump(setup, b, (f"perm={other}",), data=str(data))
    with pytest.raises(LogitStoreError, match="label_names .* differ from"):
        ClassifyDataset([str(a), str(b)], batch_size=4)


def test_a_saved_datasets_class_labels_map_by_name(setup, tmp_path):
    """A ClassLabel column whose names are the teachers' in another order: its ints are mapped by name."""
    import datasets

    names = ["faq", "howto", "tutorial"]
    rows = [{"text": r["text"], "label": names.index(r["label"] if isinstance(r["label"], str) else LABELS[r["label"]])}
            for r in setup["rows"]]
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
    datasets.Dataset.from_list(rows, features=features).save_to_disk(str(tmp_path / "ds"))
    out = tmp_path / "s"
    _dump(setup, out, (f"bert={setup['bert']}",), data=str(tmp_path / "ds"))
    store = logitstore.open(str(out))
    assert [LABELS[store[i]["label"]] for i in range(len(store))] == [names[r["label"]] for r in rows]


def test_a_pretrained_student_with_its_classes_in_another_order_is_refused(setup, tmp_path, cls_tok):
    from trainer.config import FitConfig
    from trainer.fit import fit

    out = setup["d"] / "order"
    _dump(setup, out, (f"bert={setup['bert']}",))
    shuffled = _classifier(tmp_path / "shuffled", cls_tok, labels=[LABELS[1], LABELS[0], LABELS[2]])
    other = _classifier(tmp_path / "other", cls_tok, labels=["a", "b", "c"])
    base = dict(logits=(str(out),), max_steps=1, batch_size=4, num_workers=0, device="cpu", progress=False)
    with pytest.raises(ConfigError, match="in another order than the store's"):
        fit(FitConfig(**base, student=str(shuffled), out=str(tmp_path / "r1")))
    with pytest.raises(ConfigError, match="other classes than the store's"):
        fit(FitConfig(**base, student=str(other), out=str(tmp_path / "r2")))
    res = fit(FitConfig(**base, student=str(setup["bert"]), out=str(tmp_path / "r3")))  # the same classes in the same order
    assert res["steps"] == 1
