"""Feature and relation KD from stored hidden states: what they cost in bytes and what they do.

    .venv/bin/python tools/experiment_features.py           # 8 arms x 3 seeds (~12 min, 2 CPU cores)
    .venv/bin/python tools/experiment_features.py --smoke   # 3 arms x 2 seeds, fewer steps (~3 min)

Teacher: SmolLM2-135M-Instruct (30 layers x 576), dumped once per hidden width over the bundled
Python-docs prose with top-32 targets and ``--hidden-layers 15,30`` at ``--hidden-dim`` in
{576 (full), 256, 64}. Student: the Llama-shaped 2 x 128 of ``tools/experiment_kd.py`` from the same
initialisation, same windows, same steps per seed. Arms (``alpha = 0.5`` KD + CE unless CE-only):
CE-only; KD; KD + feature MSE of layer-normalised states (weight 1; student layers 1, 2 -> teacher
15, 30) at each width, and at weight 0.1 at 64; KD + feature cosine at 64; KD + RKD (distance 1, angle 2, student 2 -> teacher 30) at 64. Validation CE on the
held-out prose. Outputs: tables on stdout and ``tools/results/experiment_features.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

from common import DATA_TRAIN, DATA_VAL, ROOT, half_range, machine, print_table, run_jobs, smollm2_dir, write_json, write_student

DIMS = (576, 256, 64)
LAYERS = "15,30"


def arms(smoke: bool) -> list[dict]:
    feat = {"feature_weight": 1.0, "feature_map": "1:15,2:30"}
    if smoke:
        return [{"name": "ce", "store": 64, "alpha": 0.0}, {"name": "kd", "store": 64},
                {"name": "kd + mse d=64", "store": 64, **feat}]
    return [{"name": "ce", "store": 64, "alpha": 0.0}, {"name": "kd", "store": 64},
            *({"name": f"kd + mse d={d}", "store": d, **feat} for d in DIMS),
            {"name": "kd + 0.1 mse d=64", "store": 64, **feat, "feature_weight": 0.1},
            {"name": "kd + cosine d=64", "store": 64, **feat, "feature_loss": "cosine"},
            {"name": "kd + rkd d=64", "store": 64, "rkd_distance": 1.0, "rkd_angle": 2.0, "rkd_map": "2:30"}]


def prepare(args, out: Path) -> dict:
    """One store per hidden width (cached), and the validation store; bytes per token of each part."""
    import logitstore
    from logitstore.dump import DumpConfig, dump

    a = smollm2_dir()
    common = dict(seq_len=args.seq_len, batch_size=4, device="cpu", dtype="fp32", progress=False, top_k=32)
    stores, info = {}, []
    for d in (DIMS if not args.smoke else (64,)):
        path = out / "stores" / f"A32-h{d}-{args.train_tokens}-{args.seq_len}"
        t0 = time.perf_counter()
        dump(DumpConfig(teachers=(f"A={a}",), data=str(DATA_TRAIN), out=str(path), max_tokens=args.train_tokens,
                        hidden_layers=LAYERS, hidden_dim=d if d < 576 else None, **common))
        stores[d] = str(path)
        s = logitstore.open(str(path))
        n = s.manifest["n_tokens"]
        # the teacher part holds targets and hidden states: split its bytes by file size of one decoded-free read
        hidden_b, target_b = _split_bytes(s)
        info.append({"hidden dim": d, "tokens": n, "targets B/token": target_b / n, "hidden B/token (2 layers)": hidden_b / n,
                     "hidden B/token/layer": hidden_b / n / 2, "raw bf16 B/token/layer": 2 * d, "dump s": time.perf_counter() - t0})
        print(f"store d={d}: {info[-1]['hidden B/token/layer']:.1f} B/token/layer hidden, {info[-1]['targets B/token']:.1f} B/token targets",
              flush=True)
    val = out / "stores" / f"val-A32-{args.val_tokens}-{args.seq_len}"
    dump(DumpConfig(teachers=(f"A={a}",), data=str(DATA_VAL), out=str(val), max_tokens=args.val_tokens, **common))
    stores["val"] = str(val)
    return {"stores": stores, "bytes": info}


def _split_bytes(store) -> tuple[int, int]:
    """(hidden, targets) bytes of the teacher parts: each part re-encoded without / with its hidden arrays."""
    from logitstore.format.backends import get_backend

    backend = get_backend(store.manifest["backend"])
    part = store.teacher("A")["part"]
    hidden = targets = 0
    for j in range(store.n_shards):
        arrays = store.read_part(j, part)
        h = {k: v for k, v in arrays.items() if k.startswith("hidden_")}
        t = {k: v for k, v in arrays.items() if not k.startswith("hidden_")}
        rows = max(1, 4096 // store.seq_len)
        hidden += sum(len(b) for b in backend.encode_part(h, rows).values())
        targets += sum(len(b) for b in backend.encode_part(t, rows).values())
    return hidden, targets



def run_arm(job: dict) -> dict:
    from trainer.config import FitConfig
    from trainer.fit import fit

    arm, seed, run = job["arm"], job["seed"], Path(job["run_dir"])
    shutil.rmtree(run, ignore_errors=True)
    extra = {k: arm[k] for k in ("feature_weight", "feature_map", "feature_loss", "rkd_distance", "rkd_angle", "rkd_map") if k in arm}
    cfg = FitConfig(logits=(job["stores"][str(arm["store"])],), student=job["student"], out=str(run), eval_logits=job["stores"]["val"],
                    max_steps=job["steps"], batch_size=job["batch_size"], lr=job["lr"], warmup_steps=max(1, job["steps"] // 10),
                    seed=seed, alpha=arm.get("alpha", 0.5), num_workers=0, device="cpu", progress=False, **extra)
    res = fit(cfg)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' not in x]
    ev = res["eval"]
    return {"arm": arm["name"], "seed": seed, "val_ce": ev["ce"], "kl_to_A": ev["kl"], "train_s": res["seconds"],
            "feature_first": rows[0].get("feature_loss"), "feature_last": rows[-1].get("feature_loss")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (smoke: 0 1)")
    ap.add_argument("--steps", type=int, default=None, help="default 28 (smoke 16)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--train-tokens", type=int, default=8192)
    ap.add_argument("--val-tokens", type=int, default=1536)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default=None, help="default runs/experiment_features")
    args = ap.parse_args()
    args.seeds = args.seeds or ([0, 1] if args.smoke else [0, 1, 2])
    args.steps = args.steps or (16 if args.smoke else 28)
    out = Path(args.out or ROOT / "runs" / ("experiment_features_smoke" if args.smoke else "experiment_features"))
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"machine: {machine()}", flush=True)
    t_all = time.perf_counter()
    prep = prepare(args, out)
    stores = {str(k): v for k, v in prep["stores"].items()}
    student = write_student(out, stores["val"], args.seq_len)
    arm_list = arms(args.smoke)
    jobs = [{"arm": arm, "seed": s, "run_dir": str(out / "runs" / f"{i:02d}-seed{s}"), "stores": stores, "student": str(student),
             "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr} for i, arm in enumerate(arm_list) for s in args.seeds]
    print(f"{len(jobs)} runs ({len(arm_list)} arms x {len(args.seeds)} seeds), {args.steps} steps of {args.batch_size} x {args.seq_len}",
          flush=True)
    results = []
    for r in run_jobs(run_arm, jobs, args.jobs):
        print(f"  {r['arm']:<20} seed {r['seed']}: val CE {r['val_ce']:.3f} ({r['train_s']:.0f} s)", flush=True)
        results.append(r)
    rows = []
    for arm in arm_list:
        rs = [r for r in results if r["arm"] == arm["name"]]
        ces = [r["val_ce"] for r in rs]
        fl = [r["feature_last"] / r["feature_first"] for r in rs if r.get("feature_first")]
        rows.append({"arm": arm["name"], "seeds": len(rs), "val CE": statistics.mean(ces), "± (half range)": half_range(ces),
                     "KL(A||student)": statistics.mean(r["kl_to_A"] for r in rs),
                     "feature loss last/first": statistics.mean(fl) if fl else None,
                     "train s/run": statistics.mean(r["train_s"] for r in rs)})
    print("\nbytes per token (SmolLM2-135M teacher, top-32 targets, bf16 hidden states, zarr + zstd):")
    print_table(prep["bytes"])
    print("\nstudent validation CE:")
    print_table(rows)
    kd = next(r for r in rows if r["arm"] == "kd")
    best = min((r for r in rows if r["arm"].startswith("kd +")), key=lambda r: r["val CE"])
    spread = max(r["± (half range)"] for r in rows) * 2
    verdict = {"best_hidden_arm": best["arm"], "kd_minus_best": kd["val CE"] - best["val CE"], "largest_seed_spread": spread,
               "beats_kd_beyond_spread": kd["val CE"] - best["val CE"] > spread}
    print(f"\nbest arm with hidden states: {best['arm']} ({kd['val CE'] - best['val CE']:+.3f} nats vs KD; largest seed spread "
          f"{spread:.3f}); total {time.perf_counter() - t_all:.0f} s")
    dest = ROOT / "tools" / "results" / ("experiment_features_smoke.json" if args.smoke else "experiment_features.json")
    write_json(dest, {"machine": machine(), "args": vars(args), "bytes": prep["bytes"], "rows": rows, "verdict": verdict,
                      "runs": results, "total_s": time.perf_counter() - t_all})


if __name__ == "__main__":
    main()
