"""Scaling out: ``logitstore dump`` and ``trainer fit`` on 1 process vs ``torchrun`` with N processes.

    .venv/bin/python tools/bench_scaling.py [--nproc 2] [--tokens 65536] [--out tools/results/bench_scaling.json]

Dump: teacher B (``tools/train_teacher.py``: a 2-layer Llama with SmolLM2's 49,152-token
vocabulary, so the output head dominates as it does for real teachers) over the bundled corpus,
``--device cpu``. Fit: a small student streaming the store just written. Each process gets one
thread (``OMP_NUM_THREADS=1``), so N processes use N cores; the single process is also run with N
threads, which is what one process would get without torchrun. Throughput is tokens / wall time
of the whole command (model loading and corpus preparation included, as a user sees it), and the
two stores are checked to hold identical data files.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import DATA_TRAIN, ROOT, machine, print_table, write_json


def run(cmd: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:6])} ... failed:\n{p.stderr[-3000:]}")
    return time.perf_counter() - t0


def torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m"]


def data_files(store: Path) -> list:
    import logitstore

    return [{p: v["files"] for p, v in s["parts"].items()} for s in logitstore.open(str(store)).index.entries()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--fit-steps", type=int, default=30)
    ap.add_argument("--out", default=str(ROOT / "tools" / "results" / "bench_scaling.json"))
    args = ap.parse_args()
    from train_teacher import teacher_b_dir

    teacher = teacher_b_dir()
    N = args.nproc
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
        tmp = Path(tmp)
        dump_args = ["logitstore", "dump", "--teacher", f"b={teacher}", "--data", str(DATA_TRAIN), "--top-k", "32",
                     "--seq-len", "256", "--batch-size", "4", "--shard-sequences", "16", "--max-tokens", str(args.tokens),
                     "--device", "cpu", "-q"]
        runs = {}
        for name, cmd, threads, procs in [
            ("1 process, 1 thread", [sys.executable, "-m", *dump_args], 1, 1),
            (f"1 process, {N} threads", [sys.executable, "-m", *dump_args], N, 1),
            (f"torchrun {N} processes x 1 thread", [*torchrun(N), *dump_args], 1, N),
        ]:
            out = tmp / f"dump-{len(runs)}"
            wall = run([*cmd, "--out", str(out)], threads)
            runs[name] = out
            rows.append({"job": "dump", "setup": name, "cores": threads * procs, "wall_s": wall, "tokens_per_s": args.tokens / wall})
        stores = list(runs.values())
        identical = all(data_files(s) == data_files(stores[0]) for s in stores[1:])
        student = tmp / "student.json"
        student.write_text(json.dumps({"model_type": "llama", "vocab_size": 49152, "hidden_size": 128, "intermediate_size": 256,
                                       "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
                                       "max_position_embeddings": 256, "tie_word_embeddings": True}))
        fit_args = ["trainer", "fit", "--logits", str(stores[0]), "--student", str(student), "--max-steps", str(args.fit_steps),
                    "--num-workers", "0", "--device", "cpu", "-q"]
        gb = 8  # global batch (sequences per step), the same in every setup
        for name, cmd, threads, procs, extra in [
            ("1 process, 1 thread", [sys.executable, "-m", *fit_args], 1, 1, ["--batch-size", str(gb)]),
            (f"1 process, {N} threads", [sys.executable, "-m", *fit_args], N, 1, ["--batch-size", str(gb)]),
            (f"torchrun {N} processes x 1 thread (DDP)", [*torchrun(N), *fit_args], 1, N, ["--batch-size", str(gb // N)]),
        ]:
            out = tmp / f"fit-{len(rows)}"
            wall = run([*cmd, *extra, "--out", str(out)], threads)
            res = json.loads((out / "result.json").read_text())
            rows.append({"job": "fit", "setup": name, "cores": threads * procs, "wall_s": wall,
                         "tokens_per_s": res["tokens"] / wall, "train_tokens_per_s": res["tokens"] / res["seconds"]})
    for job in ("dump", "fit"):
        base = next(r for r in rows if r["job"] == job)["tokens_per_s"]
        for r in rows:
            if r["job"] == job:
                r["speedup"] = r["tokens_per_s"] / base
    print_table(rows, ["job", "setup", "cores", "wall_s", "tokens_per_s", "speedup"])
    print(f"dump stores identical across setups: {identical}")
    write_json(Path(args.out), {"machine": machine(), "nproc": N, "tokens": args.tokens, "identical_stores": identical, "rows": rows})


if __name__ == "__main__":
    main()
