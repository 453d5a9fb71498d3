"""Top-k vs adaptive k vs sampled targets at about equal bytes: the student's validation CE.

    .venv/bin/python tools/experiment_targets.py     # 6 stores x 3 seeds (~12 min on 2 CPU cores)

Teacher SmolLM2-135M-Instruct over 8,192 tokens of the bundled prose; stores: top-16 and top-32,
adaptive ``--top-p 0.9 --top-k 64`` (about the bytes of top-32 here: tools/bench_adaptive.py),
``--targets sampled --samples 12`` and ``--targets both --top-k 8 --samples 12`` (RS-KD: unbiased
draws from the teacher, alone or after the exact top-8), and top-8 (what ``both`` adds samples to).
The KD student of ``tools/experiment_kd.py`` (``alpha = 0.5``, T = 1, forward KL), the same windows
and initialisation per seed. Validation: held-out prose, CE and KL to the teacher. Writes
``runs/experiment_targets/experiment_targets.json`` and prints a table with each store's bytes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from common import DATA_TRAIN, DATA_VAL, ROOT, half_range, machine, print_table, run_jobs, smollm2_dir, write_json, write_student
from experiment_kd import run_arm

STORES = {"top-8": {"top_k": 8}, "top-16": {"top_k": 16}, "top-32": {"top_k": 32},
          "top-p 0.9, k <= 64": {"top_k": 64, "top_p": 0.9}, "12 samples": {"targets": "sampled", "samples": 12},
          "top-8 + 12 samples": {"top_k": 8, "targets": "both", "samples": 12}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--train-tokens", type=int, default=8192)
    ap.add_argument("--val-tokens", type=int, default=1536)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--out", default=str(ROOT / "runs" / "experiment_targets"))
    args = ap.parse_args()
    from logitstore.dump import DumpConfig, dump

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    a = smollm2_dir()
    common = dict(teachers=(f"A={a}",), seq_len=args.seq_len, batch_size=4, device="cpu", dtype="fp32", progress=False)
    stores, info = {}, {}
    for i, (name, kw) in enumerate(STORES.items()):
        path = out / "stores" / f"s{i}-{args.train_tokens}"
        r = dump(DumpConfig(data=str(DATA_TRAIN), out=str(path), max_tokens=args.train_tokens, **kw, **common))
        stores[name] = str(path)
        info[name] = {"teacher B/token": r.summary["teachers"]["A"]["bytes_per_token"], "B/token": r.summary["bytes_per_token"]}
        print(f"{name}: teacher {info[name]['teacher B/token']:.1f} B/token", flush=True)
    val = out / "stores" / f"val-{args.val_tokens}"
    dump(DumpConfig(data=str(DATA_VAL), out=str(val), top_k=32, max_tokens=args.val_tokens, **common))
    stores["val"] = str(val)
    student = write_student(out, str(val), args.seq_len)
    jobs = [{"arm": {"name": name, "store": name, "alpha": 0.5}, "seed": s, "run_dir": str(out / "runs" / f"{i}-seed{s}"),
             "stores": stores, "student": str(student), "teacher_a": str(a), "steps": args.steps, "batch_size": 4, "lr": 2e-3}
            for i, name in enumerate(STORES) for s in args.seeds]
    results = list(run_jobs(run_arm, jobs, 2))
    rows = []
    for name in STORES:
        rs = [r for r in results if r["arm"] == name]
        ces = [r["val_ce"] for r in rs]
        rows.append({"store": name, "teacher B/token": info[name]["teacher B/token"], "seeds": len(rs),
                     "val CE": statistics.mean(ces), "± (half range)": half_range(ces),
                     "KL(A||student)": statistics.mean(r["kl_to_A"] for r in rs)})
    print(f"\nmachine: {machine()}")
    print_table(rows)
    write_json(out / "experiment_targets.json", {"machine": machine(), "args": vars(args), "rows": rows, "runs": results,
                                                  "total_s": time.perf_counter() - t0})


if __name__ == "__main__":
    main()
