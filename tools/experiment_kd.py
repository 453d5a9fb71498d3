"""Does the cache work? The same student trained with and without teachers, online and offline.

    .venv/bin/python tools/experiment_kd.py            # full experiment: 11 arms x 2 seeds (~15 min, 2 CPU cores)
    .venv/bin/python tools/experiment_kd.py --smoke    # CE-only vs offline KD from A (k=32), 2 seeds (~2 min)

Every arm trains the same Llama-shaped student (2 layers x 128, SmolLM2's 49,152-token vocabulary)
from the same initialisation, on the same windows in the same order, for the same number of steps
(seed s fixes both). Arms:

1. ``ce``: hard labels only (``alpha = 0``);
2. ``online``: teacher A (SmolLM2-135M-Instruct) runs in the loop on every batch, full-vocabulary
   forward KL (``trainer fit --online-teacher``);
3. ``A k=K tail``: offline KD from the cache of teacher A at k in {8, 32, 128}, tail ``bucket`` or ``renorm``;
4. ``B alone``, ``A+B mean-probs``, ``A+B mean-logits``: teacher B (a small Llama trained on the
   bundled corpus by ``tools/train_teacher.py``) alone and fused with A at equal weights, k = 32.

KD arms use ``alpha = 0.5``, T = 1. Validation: held-out prose (``data/pydocs-validation.jsonl``),
CE / perplexity of the student, KL(A || student) and top-1 agreement with A, every quarter of the
run. Runs go two at a time, one thread each (independent jobs; nothing is distributed). Outputs:
a table on stdout, ``OUT/experiment_kd.json``, and ``OUT/val_loss.png`` (validation CE vs step per
arm, mean over seeds). Stores and teacher B are cached, so a second run repeats only the fits.
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
from train_teacher import teacher_b_dir


def arms(smoke: bool) -> list[dict]:
    """name, store key, and the fit settings that differ from the CE arm."""
    kd = {"alpha": 0.5}
    if smoke:
        return [{"name": "ce", "store": "A32", "alpha": 0.0}, {"name": "A k=32 bucket", "store": "A32", **kd}]
    out = [{"name": "ce", "store": "AB32", "alpha": 0.0}, {"name": "online (A, full vocab)", "store": "A8", "online": True, **kd}]
    for k in (8, 32, 128):
        for tail in ("bucket", "renorm"):
            store, w = ("AB32", (1.0, 0.0)) if k == 32 else (f"A{k}", None)
            out.append({"name": f"A k={k} {tail}", "store": store, "weights": w, "tail": tail, **kd})
    out.append({"name": "B alone k=32", "store": "AB32", "weights": (0.0, 1.0), **kd})
    out.append({"name": "A+B mean-probs k=32", "store": "AB32", "weights": (0.5, 0.5), "fuse": "mean-probs", **kd})
    out.append({"name": "A+B mean-logits k=32", "store": "AB32", "weights": (0.5, 0.5), "fuse": "mean-logits", **kd})
    return out


def prepare(args, out: Path) -> dict:
    """Dump the stores the arms need (cached: a complete store is not dumped again)."""
    from logitstore.dump import DumpConfig, dump

    a = smollm2_dir()
    common = dict(seq_len=args.seq_len, batch_size=4, device="cpu", dtype="fp32", progress=False)
    if args.smoke:  # teacher A only: no teacher B to train
        b, wanted = None, {"A32": ((f"A={a}",), 32)}
    else:
        b = teacher_b_dir()
        wanted = {"AB32": ((f"A={a}", f"B={b}"), 32), "A8": ((f"A={a}",), 8), "A128": ((f"A={a}",), 128)}
    stores, info = {}, {}
    for key, (teachers, k) in wanted.items():
        tag = hashlib.sha256(json.dumps([teachers, k, args.train_tokens, args.seq_len]).encode()).hexdigest()[:8]
        path = out / "stores" / f"{key}-{tag}"  # other teachers or settings: another store, never a refused re-dump
        t0 = time.perf_counter()
        r = dump(DumpConfig(teachers=teachers, data=str(DATA_TRAIN), out=str(path), top_k=k, max_tokens=args.train_tokens, **common))
        stores[key] = str(path)
        sm = r.summary
        info[key] = {"k": k, "tokens": sm["tokens"], "B/token": sm["bytes_per_token"], "inputs B/token": sm["inputs_bytes_per_token"],
                     "teacher B/token": {n: t["bytes_per_token"] for n, t in sm["teachers"].items()},
                     "dump s (this run)": time.perf_counter() - t0}
        print(f"store {key}: k={k}, teachers {list(sm['teachers'])}, {sm['bytes_per_token']:.1f} B/token", flush=True)
    val = out / "stores" / f"val-A32-{args.val_tokens}-{args.seq_len}"
    dump(DumpConfig(teachers=(f"A={a}",), data=str(DATA_VAL), out=str(val), top_k=32, max_tokens=args.val_tokens, **common))
    stores["val"] = str(val)
    return {"stores": stores, "store_info": info, "teacher_a": str(a), "teacher_b": str(b) if b else None}


def run_arm(job: dict) -> dict:
    """One (arm, seed) fit; returns its eval curve, final metrics and wall time."""
    from trainer.config import FitConfig
    from trainer.fit import fit

    arm, seed, run = job["arm"], job["seed"], Path(job["run_dir"])
    shutil.rmtree(run, ignore_errors=True)
    cfg = FitConfig(logits=(job["stores"][arm["store"]],), student=job["student"], out=str(run), eval_logits=job["stores"]["val"],
                    max_steps=job["steps"], batch_size=job["batch_size"], lr=job["lr"], warmup_steps=max(1, job["steps"] // 10),
                    seed=seed, alpha=arm.get("alpha", 0.5), tail=arm.get("tail", "bucket"), fuse=arm.get("fuse", "mean-probs"),
                    weights=arm.get("weights"), online_teacher=job["teacher_a"] if arm.get("online") else None,
                    eval_every=max(1, job["steps"] // 4), num_workers=0, device="cpu", progress=False)
    t0 = time.perf_counter()
    res = fit(cfg)
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["step"], r["ce"]) for r in rows if r.get("eval")]
    ev = res["eval"]
    return {"arm": arm["name"], "seed": seed, "val_ce": ev["ce"], "val_ppl": ev["ppl"], "kl_to_A": ev["kl"],
            "top1_agree_A": ev["top1_agreement"]["A"], "fit_s": wall, "train_s": res["seconds"], "tokens": res["tokens"], "curve": curve}


def summarise(results: list[dict], arm_list: list[dict], store_info: dict) -> list[dict]:
    rows = []
    for arm in arm_list:
        rs = [r for r in results if r["arm"] == arm["name"]]
        ces = [r["val_ce"] for r in rs]
        info = store_info.get(arm["store"], {})
        # bytes this arm reads per token: the inputs plus every teacher it uses (weight > 0)
        used = [n for i, n in enumerate(info.get("teacher B/token", {})) if arm.get("weights") is None or arm["weights"][i] > 0]
        bpt = info["inputs B/token"] + sum(info["teacher B/token"][n] for n in used) if info else None
        rows.append({
            "arm": arm["name"], "seeds": len(rs), "val CE": statistics.mean(ces), "± (half range)": half_range(ces),
            "val ppl": statistics.mean(r["val_ppl"] for r in rs), "KL(A||student)": statistics.mean(r["kl_to_A"] for r in rs),
            "top-1 agree A": statistics.mean(r["top1_agree_A"] for r in rs), "train s/run": statistics.mean(r["train_s"] for r in rs),
            "cache B/tok": None if arm.get("online") or arm.get("alpha") == 0.0 else bpt,
        })
    return rows


def plot(results: list[dict], arm_list: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for arm in arm_list:
        curves = [r["curve"] for r in results if r["arm"] == arm["name"]]
        steps = [s for s, _ in curves[0]]
        mean = [statistics.mean(c[i][1] for c in curves) for i in range(len(steps))]
        kw = {"color": "k", "ls": "--"} if arm.get("alpha") == 0.0 else ({"color": "k", "lw": 2.5} if arm.get("online") else {})
        ax.plot(steps, mean, marker="o", ms=3, label=arm["name"], **kw)
    ax.set(xlabel="optimizer step", ylabel="validation CE (nats, mean over seeds)", title="Student validation loss per arm")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CE-only vs offline KD at k=32 only, fewer steps")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 28; smoke 24)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--train-tokens", type=int, default=None, help="default 8192; smoke 4096")
    ap.add_argument("--val-tokens", type=int, default=1536)
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    ap.add_argument("--out", default=None, help="default runs/experiment_kd (smoke: runs/experiment_kd_smoke)")
    args = ap.parse_args()
    args.steps = args.steps or (24 if args.smoke else 28)
    args.train_tokens = args.train_tokens or (4096 if args.smoke else 8192)
    out = Path(args.out or ROOT / "runs" / ("experiment_kd_smoke" if args.smoke else "experiment_kd"))
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    print(f"machine: {machine()}", flush=True)
    t_all = time.perf_counter()
    prep = prepare(args, out)
    student = write_student(out, prep["stores"]["val"], args.seq_len)
    arm_list = arms(args.smoke)
    jobs = [{"arm": arm, "seed": seed, "run_dir": str(out / "runs" / f"{i:02d}-seed{seed}"), "stores": prep["stores"],
             "student": str(student), "teacher_a": prep["teacher_a"], "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr}
            for i, arm in enumerate(arm_list) for seed in args.seeds]
    jobs.sort(key=lambda j: not j["arm"].get("online"))  # the slow online runs first, so the pool ends together
    print(f"{len(jobs)} runs ({len(arm_list)} arms x {len(args.seeds)} seeds), {args.steps} steps of {args.batch_size} x "
          f"{args.seq_len} tokens, {args.jobs} at a time", flush=True)
    results = []
    t_fit = time.perf_counter()
    for r in run_jobs(run_arm, jobs, args.jobs):
        print(f"  {r['arm']:<24} seed {r['seed']}: val CE {r['val_ce']:.3f}  top-1 agree A {r['top1_agree_A']:.3f}  "
              f"({r['train_s']:.0f} s)", flush=True)
        results.append(r)
    fit_s = time.perf_counter() - t_fit
    rows = summarise(results, arm_list, prep["store_info"])
    print()
    print_table(rows)
    plot(results, arm_list, out / "val_loss.png")
    ce = next(r for r in rows if r["arm"] == "ce")
    kd = next(r for r in rows if r["arm"] == "A k=32 bucket")
    ce_runs = [r["val_ce"] for r in results if r["arm"] == "ce"]
    kd_runs = [r["val_ce"] for r in results if r["arm"] == "A k=32 bucket"]
    margin = ce["val CE"] - kd["val CE"]
    spread = max(max(ce_runs) - min(ce_runs), max(kd_runs) - min(kd_runs))
    verdict = {"kd_minus_ce_margin": margin, "largest_seed_spread": spread, "kd_beats_ce_beyond_spread": margin > spread}
    online = next((r for r in rows if r["arm"].startswith("online")), None)
    if online is not None:
        verdict["offline_k32_vs_online_rel"] = kd["val CE"] / online["val CE"] - 1
        verdict["online_over_offline_train_time"] = online["train s/run"] / kd["train s/run"]
    print(f"\nKD (A, k=32, bucket) vs CE-only: {margin:+.3f} nats of validation CE (largest seed spread {spread:.3f}); "
          f"total {time.perf_counter() - t_all:.0f} s (fits {fit_s:.0f} s); plot: {out / 'val_loss.png'}")
    write_json(out / "experiment_kd.json", {"machine": machine(), "args": vars(args), "stores": prep["store_info"], "rows": rows,
                                            "verdict": verdict, "runs": results, "total_s": time.perf_counter() - t_all})


if __name__ == "__main__":
    main()
