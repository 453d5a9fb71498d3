"""KD on all positions or on the most uncertain ones (--kd-positions): quality and step time.

    .venv/bin/python tools/experiment_positions.py     # 5 arms x 3 seeds (~8 min on 2 CPU cores)

Teacher SmolLM2-135M-Instruct, top-32 over 8,192 tokens of the bundled prose (the store of
``tools/experiment_targets.py``'s settings); the KD student of ``tools/experiment_kd.py``
(``alpha = 0.5``), 28 steps, the same windows and initialisation per seed. Arms: ``all``,
``teacher-entropy:0.5`` and ``:0.25``, ``student-entropy:0.5`` and ``:0.25``. Validation on held-out
prose: CE and KL to the teacher; seconds per step from the run's own clock. Writes
``runs/experiment_positions/experiment_positions.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from pathlib import Path

from common import DATA_TRAIN, DATA_VAL, ROOT, half_range, machine, print_table, run_jobs, smollm2_dir, write_json, write_student

ARMS = ("all", "teacher-entropy:0.5", "teacher-entropy:0.25", "student-entropy:0.5", "student-entropy:0.25")


def run(job: dict) -> dict:
    from trainer.config import FitConfig
    from trainer.fit import fit

    out = Path(job["run_dir"])
    shutil.rmtree(out, ignore_errors=True)
    cfg = FitConfig(logits=(job["train"],), student=job["student"], out=str(out), eval_logits=job["val"], max_steps=job["steps"],
                    batch_size=4, lr=2e-3, warmup_steps=max(1, job["steps"] // 10), seed=job["seed"], alpha=0.5,
                    kd_positions=job["arm"], eval_every=job["steps"], num_workers=0, device="cpu", progress=False)
    res = fit(cfg)
    step_s = res["seconds"] / job["steps"]  # the run's own clock up to its last step (before the final evaluation)
    return {"arm": job["arm"], "seed": job["seed"], "val_ce": res["eval"]["ce"], "kl": res["eval"]["kl"], "step_s": step_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--out", default=str(ROOT / "runs" / "experiment_positions"))
    args = ap.parse_args()
    from logitstore.dump import DumpConfig, dump

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    common = dict(teachers=(f"A={smollm2_dir()}",), seq_len=128, batch_size=4, device="cpu", dtype="fp32", top_k=32, progress=False)
    train, val = out / "stores" / "train-8192", out / "stores" / "val-1536"
    dump(DumpConfig(data=str(DATA_TRAIN), out=str(train), max_tokens=8192, **common))
    dump(DumpConfig(data=str(DATA_VAL), out=str(val), max_tokens=1536, **common))
    student = write_student(out, str(val), 128)
    jobs = [{"arm": a, "seed": s, "run_dir": str(out / "runs" / f"{i}-seed{s}"), "train": str(train), "val": str(val),
             "student": str(student), "steps": args.steps} for i, a in enumerate(ARMS) for s in args.seeds]
    results = list(run_jobs(run, jobs, 2))
    rows = []
    for a in ARMS:
        rs = [r for r in results if r["arm"] == a]
        ces = [r["val_ce"] for r in rs]
        rows.append({"kd positions": a, "seeds": len(rs), "val CE": statistics.mean(ces), "± (half range)": half_range(ces),
                     "KL(A||student)": statistics.mean(r["kl"] for r in rs), "s/step": statistics.mean(r["step_s"] for r in rs)})
    print(f"machine: {machine()}")
    print_table(rows)
    write_json(out / "experiment_positions.json", {"machine": machine(), "args": vars(args), "rows": rows, "runs": results,
                                                   "total_s": time.perf_counter() - t0})


if __name__ == "__main__":
    main()
