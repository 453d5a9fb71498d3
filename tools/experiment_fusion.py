"""Does fusing two teachers teach more than the better one? A general and a code teacher on mixed data.

    .venv/bin/python tools/experiment_fusion.py            # 6 arms x 3 seeds (~20 min on 2 CPU cores)
    .venv/bin/python tools/experiment_fusion.py --smoke    # 3 arms x 2 seeds, fewer steps (~5 min)

Teachers: ``A`` = SmolLM2-135M-Instruct (general English) and ``C`` = the same model fine-tuned once
on Python standard-library source (``tools/train_code_teacher.py``, cached). Student data mixes both
domains: the bundled Python-docs prose (``data/pydocs-train.jsonl``) and stdlib code
(``data/pystdlib-train.jsonl``), the same number of tokens of each, documents interleaved. One store
holds both teachers (k = 32); arms differ only in how the targets fuse them:

1. ``ce``: hard labels only (``alpha = 0``);
2. ``A alone``, ``C alone``: KD from one teacher (``--weights 1,0`` / ``0,1``);
3. ``A+C fixed``: mean-probs at equal weights;
4. ``A+C entropy``: mean-probs with per-position weights ``softmax(-H_m / tau)`` (``--fuse-weights entropy``);
5. ``A+C gold``: per-position weights ``softmax(log p_m(y) / tau)`` (``--fuse-weights gold``).

Validation: each domain's held-out file (``pydocs-validation``, ``pystdlib-validation``), CE of the
final student over packed windows, and overall (the token-weighted mean). The same fusions are also
scored *as teachers* from the validation stores' stored gold log-probs (the fused probability of the
real next token: no model runs). Every arm trains the same student from the same initialisation on
the same windows in the same order (seed s fixes both); runs go two at a time, one thread each
(independent jobs). Outputs: tables on stdout, ``OUT/experiment_fusion.json`` and
``OUT/experiment_fusion.png``; stores and the code teacher are cached.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import time
from pathlib import Path

from common import DATA_TRAIN, DATA_VAL, ROOT, half_range, machine, print_table, run_jobs, smollm2_dir, write_json, write_student
from train_code_teacher import code_teacher_dir

CODE_TRAIN = ROOT / "data" / "pystdlib-train.jsonl"
CODE_VAL = ROOT / "data" / "pystdlib-validation.jsonl"
DOMAINS = {"prose": DATA_VAL, "code": CODE_VAL}


def arms(smoke: bool, tau: float) -> list[dict]:
    kd = {"alpha": 0.5}
    out = [{"name": "ce", "alpha": 0.0}, {"name": "A alone", "weights": (1.0, 0.0), **kd},
           {"name": "C alone", "weights": (0.0, 1.0), **kd}, {"name": "A+C fixed", "weights": (0.5, 0.5), **kd},
           {"name": "A+C entropy", "weights": (0.5, 0.5), "fuse_weights": "entropy", **kd},
           {"name": "A+C gold", "weights": (0.5, 0.5), "fuse_weights": "gold", **kd}]
    for a in out:
        if a.get("fuse_weights"):
            a["tau"] = tau
    return [a for a in out if a["name"] in ("C alone", "A+C fixed", "A+C gold")] if smoke else out


def mixed_corpus(tokenizer, tokens_per_domain: int, path: Path) -> dict:
    """``path``: prose and code documents interleaved, each domain cut to ``tokens_per_domain`` tokens."""
    from logitstore.capture.documents import load_texts

    picked = {}
    for name, src in (("prose", DATA_TRAIN), ("code", CODE_TRAIN)):
        docs, n = [], 0
        for text in load_texts(str(src)):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            take = min(len(ids), tokens_per_domain - n)
            docs.append(tokenizer.decode(ids[:take]) if take < len(ids) else text)
            n += take
            if n >= tokens_per_domain:
                break
        picked[name] = docs
    rows = [d for pair in zip_longest_lists(picked["prose"], picked["code"]) for d in pair if d is not None]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    return {name: len(docs) for name, docs in picked.items()}


def zip_longest_lists(a: list, b: list) -> list[tuple]:
    n = max(len(a), len(b))
    return [(a[i] if i < len(a) else None, b[i] if i < len(b) else None) for i in range(n)]


def prepare(args, out: Path) -> dict:
    from transformers import AutoTokenizer

    from logitstore.dump import DumpConfig, dump

    a, c = smollm2_dir(), code_teacher_dir()
    teachers = (f"A={a}", f"C={c}")
    common = dict(teachers=teachers, seq_len=args.seq_len, batch_size=4, device="cpu", dtype="fp32", progress=False)
    tag = hashlib.sha256(json.dumps([teachers, args.tokens_per_domain, args.seq_len]).encode()).hexdigest()[:8]
    data = out / f"mixed-train-{tag}.jsonl"
    docs = mixed_corpus(AutoTokenizer.from_pretrained(a), args.tokens_per_domain, data)
    stores = {"train": out / "stores" / f"AC32-{tag}"}
    t0 = time.perf_counter()
    r = dump(DumpConfig(data=str(data), out=str(stores["train"]), top_k=32, **common))
    info = {"train": {"docs": docs, "tokens": r.summary["tokens"], "B/token": r.summary["bytes_per_token"],
                      "dump s (this run)": time.perf_counter() - t0}}
    for name, src in DOMAINS.items():
        stores[name] = out / "stores" / f"val-{name}-{tag}-{args.val_tokens}"
        dump(DumpConfig(data=str(src), out=str(stores[name]), top_k=32, max_tokens=args.val_tokens, **common))
    print(f"train store: {info['train']['tokens']} tokens ({docs}), {info['train']['B/token']:.1f} B/token", flush=True)
    return {"stores": {k: str(v) for k, v in stores.items()}, "info": info}


def teacher_scores(stores: dict, tau: float) -> list[dict]:
    """CE of each teacher and of each fusion *as a predictor*, from the stored gold log-probs."""
    import numpy as np

    import logitstore

    rows = []
    for name in DOMAINS:
        st = logitstore.open(stores[name])
        gold, ent, mask = {"A": [], "C": []}, {"A": [], "C": []}, []
        for j in range(st.n_shards):
            sh = st.load_shard(j)
            L = sh["input_ids"].shape[1]
            m = np.arange(L)[None, :] + 1 < sh["length"][:, None]  # positions with a next token
            mask.append(m.ravel())
            for t in ("A", "C"):
                gold[t].append(sh["teachers"][t]["gold_logprob"].ravel())
                ent[t].append(sh["teachers"][t]["entropy"].ravel())
        keep = np.concatenate(mask)
        g = np.stack([np.concatenate(gold[t])[keep] for t in ("A", "C")]).astype(np.float64)
        h = np.stack([np.concatenate(ent[t])[keep] for t in ("A", "C")]).astype(np.float64)

        def fused(score):
            w = np.exp(score - score.max(0))
            w /= w.sum(0)
            return -np.log((w * np.exp(g)).sum(0)).mean()

        rows.append({"domain": name, "positions": int(keep.sum()), "A": -g[0].mean(), "C": -g[1].mean(),
                     "A+C fixed": fused(np.zeros_like(g)), "A+C entropy": fused(-h / tau), "A+C gold": fused(g / tau)})
    return rows



def domain_ce(model_dir: Path, seq_len: int, val_tokens: int) -> dict:
    """Mean nats per predicted token of the student on each domain's held-out text."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from logitstore.capture.corpus import pack
    from logitstore.capture.documents import load_texts

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = {}
    for name, src in DOMAINS.items():
        p = pack(tok, load_texts(str(src)), seq_len, max_tokens=val_tokens)
        ids, lens = torch.from_numpy(p.input_ids.astype(np.int64)), torch.from_numpy(p.lengths.astype(np.int64))
        mask = (torch.arange(ids.shape[1])[None] < lens[:, None]).long()
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
        nll = -lp.gather(-1, ids[:, 1:, None])[..., 0]
        valid = mask[:, 1:].bool()
        out[name] = (float(nll[valid].sum()), int(valid.sum()))
    return {**{k: s / n for k, (s, n) in out.items()},
            "overall": sum(s for s, _ in out.values()) / sum(n for _, n in out.values())}


def run_arm(job: dict) -> dict:
    from trainer.config import FitConfig
    from trainer.fit import fit

    arm, run = job["arm"], Path(job["run_dir"])
    shutil.rmtree(run, ignore_errors=True)
    cfg = FitConfig(logits=(job["stores"]["train"],), student=job["student"], out=str(run), eval_logits=job["stores"]["prose"],
                    max_steps=job["steps"], batch_size=job["batch_size"], lr=job["lr"], warmup_steps=max(1, job["steps"] // 10),
                    seed=job["seed"], alpha=arm.get("alpha", 0.5), weights=arm.get("weights"),
                    fuse_weights=arm.get("fuse_weights", "fixed"), fuse_weight_temperature=arm.get("tau", 1.0),
                    eval_every=job["steps"], num_workers=0, device="cpu", progress=False)
    res = fit(cfg)
    ce = domain_ce(run / "final", job["seq_len"], job["val_tokens"])
    return {"arm": arm["name"], "seed": job["seed"], **{f"val CE {k}": v for k, v in ce.items()}, "train_s": res["seconds"]}


def summarise(results: list[dict], arm_list: list[dict]) -> list[dict]:
    rows = []
    for arm in arm_list:
        rs = [r for r in results if r["arm"] == arm["name"]]
        row = {"arm": arm["name"], "seeds": len(rs)}
        for d in ("prose", "code", "overall"):
            v = [r[f"val CE {d}"] for r in rs]
            row[f"{d} CE"], row[f"{d} ±"] = statistics.mean(v), half_range(v)
        rows.append(row)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    for ax, d in zip(axes, ("prose", "code", "overall")):
        names = [r["arm"] for r in rows]
        ax.bar(range(len(rows)), [r[f"{d} CE"] for r in rows], yerr=[r[f"{d} ±"] for r in rows], capsize=3,
               color=["0.6" if n == "ce" else ("C0" if "alone" in n else "C2") for n in names])
        lo = min(r[f"{d} CE"] for r in rows)
        ax.set_ylim(lo - 0.15, max(r[f"{d} CE"] for r in rows) + 0.05)
        ax.set_xticks(range(len(rows)), names, rotation=35, ha="right", fontsize=8)
        ax.set_title(f"student val CE: {d}")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def verdict(rows: list[dict], results: list[dict]) -> dict:
    """Does the best fusion beat the better single teacher overall by more than the seed spread?"""
    by = {r["arm"]: r for r in rows}
    singles = [a for a in ("A alone", "C alone") if a in by]
    best_single = min(singles, key=lambda a: by[a]["overall CE"])
    fusions = [a for a in by if a.startswith("A+C")]
    best_fused = min(fusions, key=lambda a: by[a]["overall CE"])
    spread = max(by[a]["overall ±"] * 2 for a in (best_single, best_fused))
    margin = by[best_single]["overall CE"] - by[best_fused]["overall CE"]
    return {"best_single": best_single, "best_fused": best_fused, "margin_nats": margin, "largest_seed_range": spread,
            "fused_beats_best_single_beyond_spread": margin > spread}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (smoke: 0 1)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 40; smoke 12)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--tokens-per-domain", type=int, default=None, help="training tokens of each domain (default 8192; smoke 2048)")
    ap.add_argument("--val-tokens", type=int, default=2048, help="held-out tokens per domain")
    ap.add_argument("--tau", type=float, default=1.0, help="--fuse-weight-temperature of the entropy and gold arms")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default=None, help="default runs/experiment_fusion (smoke: runs/experiment_fusion_smoke)")
    args = ap.parse_args()
    args.seeds = args.seeds or ([0, 1] if args.smoke else [0, 1, 2])
    args.steps = args.steps or (12 if args.smoke else 40)
    args.tokens_per_domain = args.tokens_per_domain or (2048 if args.smoke else 8192)
    out = Path(args.out or ROOT / "runs" / ("experiment_fusion_smoke" if args.smoke else "experiment_fusion"))
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"machine: {machine()}", flush=True)
    t_all = time.perf_counter()
    prep = prepare(args, out)
    teach = teacher_scores(prep["stores"], args.tau)
    print("\nteachers and fusions as predictors (CE of the real next token, nats):")
    print_table(teach)
    student = write_student(out, prep["stores"]["prose"], args.seq_len)
    arm_list = arms(args.smoke, args.tau)
    jobs = [{"arm": arm, "seed": s, "run_dir": str(out / "runs" / f"{i:02d}-seed{s}"), "stores": prep["stores"], "student": str(student),
             "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seq_len": args.seq_len, "val_tokens": args.val_tokens}
            for i, arm in enumerate(arm_list) for s in args.seeds]
    print(f"\n{len(jobs)} runs ({len(arm_list)} arms x {len(args.seeds)} seeds), {args.steps} steps of {args.batch_size} x "
          f"{args.seq_len} tokens, {args.jobs} at a time", flush=True)
    results = []
    for i, r in enumerate(run_jobs(run_arm, jobs, args.jobs), 1):
        print(f"  [{i}/{len(jobs)}] {r['arm']:<12} seed {r['seed']}: prose {r['val CE prose']:.3f}  code {r['val CE code']:.3f}  "
              f"overall {r['val CE overall']:.3f}  ({r['train_s']:.0f} s)", flush=True)
        results.append(r)
    rows = summarise(results, arm_list)
    print()
    print_table(rows)
    v = verdict(rows, results)
    print(f"\nbest fusion {v['best_fused']} vs best single teacher {v['best_single']}: {v['margin_nats']:+.3f} nats overall "
          f"(largest seed range {v['largest_seed_range']:.3f}); beats it beyond the spread: {v['fused_beats_best_single_beyond_spread']}")
    plot(rows, out / "experiment_fusion.png")
    write_json(out / "experiment_fusion.json", {"machine": machine(), "args": vars(args), "stores": prep["info"], "teachers": teach,
                                                "rows": rows, "verdict": v, "runs": results, "total_s": time.perf_counter() - t_all})


if __name__ == "__main__":
    main()
