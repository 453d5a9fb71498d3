"""The main job end to end on the bundled data, with the real SmolLM2-135M-Instruct teacher.

    bash tools/demo.sh            # installs, then runs this

Runs the same commands a user would type (printed as it goes): ``logitstore dump`` of the teacher
over a slice of the bundled Python-docs corpus, ``logitstore info`` and ``logitstore verify``.
A second run reuses the converted teacher and finds the store complete, so it takes seconds.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from common import DATA_TRAIN, ROOT, machine, print_table, smollm2_dir


def sh(*args: str) -> str:
    print("$ " + " ".join(shlex.quote(a) for a in args), flush=True)
    proc = subprocess.run(args, text=True, stdout=subprocess.PIPE, stderr=None)
    print(proc.stdout, end="", flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"command failed with exit code {proc.returncode}")
    return proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "runs" / "demo"))
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()
    out = Path(args.out)
    bin_dir = Path(sys.executable).parent
    logitstore = str(bin_dir / "logitstore")

    print(f"machine: {machine()}")
    teacher = smollm2_dir()
    store = out / "store"
    t0 = time.perf_counter()
    sh(logitstore, "dump", "--teacher", f"smollm2={teacher}", "--data", str(DATA_TRAIN), "--out", str(store),
       "--top-k", str(args.top_k), "--seq-len", str(args.seq_len), "--max-tokens", str(args.max_tokens),
       "--batch-size", "4")
    dump_s = time.perf_counter() - t0
    sh(logitstore, "info", str(store))
    sh(logitstore, "verify", str(store))
    d = json.loads(subprocess.run([logitstore, "info", str(store), "--json"], text=True, capture_output=True, check=True).stdout)
    t = d["teachers"][0]
    # DistillKit stores ids bit-packed at ceil(log2 V) bits plus bf16 values: its bytes/token at this k
    bits = (d["tokenizer"]["vocab_size"] - 1).bit_length()
    distillkit = t["k"] * (bits + 16) / 8
    print()
    print_table([{
        "teacher": t["name"], "tokens": d["tokens"], "k": t["k"], "store MB": d["total_bytes"] / 1e6,
        "B/token": d["bytes_per_token"], "DistillKit B/token": distillkit, "top-k mass": t["mean_topk_mass"],
        "entropy": t["mean_entropy"], "dump s (this run)": dump_s,
    }])


if __name__ == "__main__":
    main()
