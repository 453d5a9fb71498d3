"""The main job end to end on the bundled data, with the real SmolLM2-135M-Instruct teacher.

    bash tools/demo.sh            # installs, then runs this

Runs the same commands a user would type (printed as it goes): ``logitstore dump`` of the teacher
over the bundled Python-docs corpus (train slice, and a held-out validation store),
``logitstore info``, ``logitstore verify``, then ``trainer fit`` of a small Llama-shaped student
twice with the same data, steps and seed: once from hard labels only (``--alpha 0``), once with
the cached teacher (``--alpha 0.5``). It ends with a table of validation loss with and without KD.
A second run reuses the converted teacher and the stores, so only the two fits run again.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import DATA_TRAIN, DATA_VAL, ROOT, machine, print_table, smollm2_dir


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
    ap.add_argument("--max-tokens", type=int, default=24576)
    ap.add_argument("--val-tokens", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()
    out = Path(args.out)
    bin_dir = Path(sys.executable).parent
    logitstore = str(bin_dir / "logitstore")

    print(f"machine: {machine()}")
    teacher = smollm2_dir()
    store, val = out / "store", out / "val-store"
    common = ["--teacher", f"smollm2={teacher}", "--top-k", str(args.top_k), "--seq-len", str(args.seq_len), "--batch-size", "4"]
    t0 = time.perf_counter()
    sh(logitstore, "dump", *common, "--data", str(DATA_TRAIN), "--out", str(store), "--max-tokens", str(args.max_tokens))
    dump_s = time.perf_counter() - t0
    sh(logitstore, "dump", *common, "--data", str(DATA_VAL), "--out", str(val), "--max-tokens", str(args.val_tokens))
    sh(logitstore, "info", str(store))
    sh(logitstore, "verify", str(store))
    d = json.loads(subprocess.run([logitstore, "info", str(store), "--json"], text=True, capture_output=True, check=True).stdout)
    t = d["teachers"][0]

    student = out / "student.json"
    student.write_text(json.dumps({"model_type": "llama", "vocab_size": d["tokenizer"]["vocab_size"], "hidden_size": 128,
                                   "intermediate_size": 384, "num_hidden_layers": 2, "num_attention_heads": 4,
                                   "num_key_value_heads": 4, "max_position_embeddings": args.seq_len, "tie_word_embeddings": True}))
    results = {}
    for name, alpha in (("CE only (no teacher)", "0"), ("KD from the cache", "0.5")):
        run = out / ("run-ce" if alpha == "0" else "run-kd")
        shutil.rmtree(run, ignore_errors=True)
        t0 = time.perf_counter()
        sh(str(bin_dir / "trainer"), "fit", "--logits", str(store), "--eval-logits", str(val), "--student", str(student),
           "--out", str(run), "--alpha", alpha, "--max-steps", str(args.steps), "--batch-size", "8", "--lr", "2e-3",
           "--eval-every", str(max(1, args.steps // 4)), "--seed", "0", "warmup_steps=5")
        results[name] = (json.loads((run / "result.json").read_text()), time.perf_counter() - t0, run)
    bits = (d["tokenizer"]["vocab_size"] - 1).bit_length()
    distillkit = t["k"] * (bits + 16) / 8  # ids bit-packed at ceil(log2 V) bits + bf16 values
    print()
    print_table([{"student run": name, "val CE": r["eval"]["ce"], "val ppl": r["eval"]["ppl"], "val KL to teacher": r["eval"]["kl"],
                  "top-1 agree": r["eval"]["top1_agreement"]["fused"], "fit s": secs}
                 for name, (r, secs, _) in results.items()])
    print()
    print_table([{"teacher": t["name"], "train tokens": d["tokens"], "k": t["k"], "store B/token": d["bytes_per_token"],
                  "DistillKit B/token": distillkit, "top-k mass": t["mean_topk_mass"], "dump s (this run)": dump_s}])
    print(f"\ncurves: {results['KD from the cache'][2] / 'curves.png'}, {results['CE only (no teacher)'][2] / 'curves.png'}")


if __name__ == "__main__":
    main()
