"""Any student: LSTMs distilled from the cached real teachers, through ``trainer.fit.fit(config, model=...)``.

    .venv/bin/python tools/example_lstm_students.py            # both examples, 2 seeds (~6 min, 2 CPU cores)
    .venv/bin/python tools/example_lstm_students.py --quick    # one seed, fewer steps

1. An LSTM language model (embedding -> 1-layer LSTM -> vocabulary) distilled from
   SmolLM2-135M-Instruct's top-32 cache of the bundled prose: CE-only vs KD (alpha 0.5).
2. An LSTM classifier (its state at each text's last real token -> 3 classes) distilled from the
   two fine-tuned all-MiniLM-L6-v2 teachers of ``tools/experiment_classify.py`` (cached there):
   CE-only vs KD from T1 vs KD from T1 + T2 (mean-probs), T = 2.

A module of your own only needs ``forward(input_ids, attention_mask)`` returning logits, and a
``config`` dict of its constructor's keyword arguments so that ``final/`` can be rebuilt with
``trainer.checkpoint.load_module``; each run is reloaded that way and its logits compared with the
trained module's. Stores and teachers are cached; results go to ``tools/results/example_lstm_students.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from common import DATA_TRAIN, DATA_VAL, ROOT, half_range, machine, print_table, smollm2_dir, write_json


class LSTMLM(torch.nn.Module):
    """token ids [B, L] -> next-token logits [B, L, V]."""

    def __init__(self, vocab_size: int, hidden: int = 128):
        super().__init__()
        self.config = {"vocab_size": vocab_size, "hidden": hidden}
        self.emb = torch.nn.Embedding(vocab_size, hidden)
        self.lstm = torch.nn.LSTM(hidden, hidden, batch_first=True)
        self.out = torch.nn.Linear(hidden, vocab_size)

    def forward(self, input_ids, attention_mask=None):
        return self.out(self.lstm(self.emb(input_ids))[0])


class LSTMClassifier(torch.nn.Module):
    """token ids [B, L] -> class logits [B, C], from the LSTM state at each text's last real token."""

    def __init__(self, vocab_size: int, num_labels: int, hidden: int = 128):
        super().__init__()
        self.config = {"vocab_size": vocab_size, "num_labels": num_labels, "hidden": hidden}
        self.emb = torch.nn.Embedding(vocab_size, hidden)
        self.lstm = torch.nn.LSTM(hidden, hidden, batch_first=True)
        self.out = torch.nn.Linear(hidden, num_labels)

    def forward(self, input_ids, attention_mask):
        h = self.lstm(self.emb(input_ids))[0]
        last = attention_mask.sum(1).clamp_min(1) - 1
        return self.out(h[torch.arange(h.shape[0]), last])


def train(model: torch.nn.Module, store: str, val: str, run: Path, *, steps: int, seed: int, lr: float, **kw) -> dict:
    """Fit ``model`` from ``store``, reload ``final/`` with load_module and check it gives the same logits."""
    from trainer.checkpoint import load_module
    from trainer.config import FitConfig
    from trainer.fit import fit

    import shutil

    shutil.rmtree(run, ignore_errors=True)
    t0 = time.perf_counter()
    res = fit(FitConfig(logits=(store,), out=str(run), eval_logits=val, max_steps=steps, batch_size=16, lr=lr, seed=seed,
                        warmup_steps=max(1, steps // 10), num_workers=0, device="cpu", progress=False, **kw), model=model)
    again = load_module(run / "final").eval()
    model.eval()
    ids = torch.randint(0, model.config["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        diff = float((again(ids, torch.ones_like(ids)) - model(ids, torch.ones_like(ids))).abs().max())
    if diff > 1e-5:
        raise SystemExit(f"{run}/final: the reloaded module's logits differ by {diff:.3g}")
    return {**res["eval"], "fit_s": time.perf_counter() - t0, "reload_max_diff": diff}


def lm_example(args, out: Path) -> list[dict]:
    from logitstore.dump import DumpConfig, dump

    a = smollm2_dir()
    common = dict(teachers=(f"A={a}",), top_k=32, seq_len=128, batch_size=4, device="cpu", dtype="fp32", progress=False)
    store, val = out / "stores" / "lm-train", out / "stores" / "lm-val"
    dump(DumpConfig(data=str(DATA_TRAIN), out=str(store), max_tokens=8192, **common))
    dump(DumpConfig(data=str(DATA_VAL), out=str(val), max_tokens=1536, **common))
    from logitstore import open as open_store

    vocab = open_store(str(val)).manifest["tokenizer"]["vocab_size"]
    rows = []
    for name, alpha in (("LSTM LM, CE only", 0.0), ("LSTM LM, KD (alpha 0.5)", 0.5)):
        for seed in args.seeds:
            torch.manual_seed(seed)
            ev = train(LSTMLM(vocab), str(store), str(val), out / "runs" / f"lm-{alpha}-{seed}", steps=args.steps, seed=seed,
                       lr=3e-3, alpha=alpha)
            rows.append({"arm": name, "seed": seed, "val CE": ev["ce"], "KL(A||student)": ev["kl"], "fit s": ev["fit_s"]})
            print(f"  {name} seed {seed}: val CE {ev['ce']:.3f} ({ev['fit_s']:.0f} s; reload diff {ev['reload_max_diff']:.1e})", flush=True)
    return rows


def classify_example(args, out: Path) -> list[dict]:
    from experiment_classify import fine_tune, paragraphs, split_by_document, write_rows

    from common import cache_dir
    from logitstore.dump import DumpConfig, dump

    train_rows, val_rows = split_by_document(paragraphs(DATA_TRAIN) + paragraphs(DATA_VAL))
    t1 = fine_tune(train_rows, cache_dir() / "minilm-pydocs-sections-T1", epochs=2, seed=0)
    t2 = fine_tune(train_rows, cache_dir() / "minilm-pydocs-sections-T2", epochs=1, seed=1)
    stores = {}
    for split, rows in (("train", train_rows), ("val", val_rows)):
        stores[split] = str(out / "stores" / f"cls-{split}")
        dump(DumpConfig(teachers=(f"T1={t1}", f"T2={t2}"), data=str(write_rows(rows, out / f"cls-{split}.jsonl")), out=stores[split],
                        task="classify", label_field="label", seq_len=128, batch_size=32, device="cpu", progress=False))
    from logitstore import open as open_store

    m = open_store(stores["val"]).manifest
    vocab, C = m["tokenizer"]["vocab_size"], m["num_labels"]
    arms = [("LSTM classifier, CE only", dict(alpha=0.0)), ("LSTM classifier, KD T1", dict(alpha=0.5, weights=(1.0, 0.0))),
            ("LSTM classifier, KD T1+T2", dict(alpha=0.5, weights=(0.5, 0.5)))]
    rows = []
    for name, kw in arms:
        for seed in args.seeds:
            torch.manual_seed(seed)
            ev = train(LSTMClassifier(vocab, C), stores["train"], stores["val"], out / "runs" / f"cls-{len(rows)}", steps=args.steps * 4,
                       seed=seed, lr=3e-3, temperature=2.0, **kw)
            rows.append({"arm": name, "seed": seed, "accuracy": ev["accuracy"], "macro-F1": ev["macro_f1"], "val CE": ev["ce"],
                         "fit s": ev["fit_s"]})
            print(f"  {name} seed {seed}: accuracy {ev['accuracy']:.3f}, val CE {ev['ce']:.3f} ({ev['fit_s']:.0f} s)", flush=True)
    return rows


def summary(rows: list[dict], metrics: list[str]) -> list[dict]:
    out = []
    for arm in dict.fromkeys(r["arm"] for r in rows):
        rs = [r for r in rows if r["arm"] == arm]
        row = {"arm": arm, "seeds": len(rs)}
        for k in metrics:
            vals = [r[k] for r in rs]
            row[k], row[f"{k} ±"] = statistics.mean(vals), half_range(vals)
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one seed, 10 steps")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 (quick: 0)")
    ap.add_argument("--steps", type=int, default=None, help="LM steps (the classifier takes 4x); default 40, quick 10")
    args = ap.parse_args()
    args.seeds = args.seeds or ([0] if args.quick else [0, 1])
    args.steps = args.steps or (10 if args.quick else 40)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = ROOT / "runs" / "example_lstm_students"
    out.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}", flush=True)
    t0 = time.perf_counter()
    lm, cls = lm_example(args, out), classify_example(args, out)
    lm_rows, cls_rows = summary(lm, ["val CE", "KL(A||student)"]), summary(cls, ["accuracy", "macro-F1", "val CE"])
    print()
    print_table(lm_rows)
    print()
    print_table(cls_rows)
    name = "example_lstm_students_quick.json" if args.quick else "example_lstm_students.json"
    write_json((ROOT / "runs" if args.quick else ROOT / "tools" / "results") / name,
               {"machine": machine(), "args": vars(args), "lm": lm_rows, "classify": cls_rows, "runs": lm + cls,
                "total_s": time.perf_counter() - t0})


if __name__ == "__main__":
    main()
