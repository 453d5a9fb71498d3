"""The main job end to end on the bundled data, with two real teachers that share a tokenizer.

    bash tools/demo.sh            # installs, then runs this

Runs the same commands a user would type (printed as it goes): ``logitstore dump`` of teacher A
(SmolLM2-135M-Instruct) and teacher B (a small Llama trained on the bundled corpus by
``tools/train_teacher.py``) into one store over the bundled Python-docs corpus (train slice, and a
held-out validation store), ``logitstore info``, ``logitstore verify``, then ``trainer fit`` of a
small Llama-shaped student twice with the same data, steps and seed: once from hard labels only
(``--alpha 0``), once from the two teachers fused (``--fuse mean-probs --weights 0.7,0.3``). It
ends with a table: validation loss with and without KD, store bytes/token, dump and fit times.
A second run reuses the converted teacher A, teacher B and the stores, so only the two fits run again.
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
from train_teacher import teacher_b_dir


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
    teacher_a, teacher_b = smollm2_dir(), teacher_b_dir()
    store, val = out / "store-ab", out / "val-store-ab"
    common = ["--teacher", f"smollm2={teacher_a}", "--teacher", f"pydocs-llama={teacher_b}", "--top-k", str(args.top_k),
              "--seq-len", str(args.seq_len), "--batch-size", "4"]
    t0 = time.perf_counter()
    sh(logitstore, "dump", *common, "--data", str(DATA_TRAIN), "--out", str(store), "--max-tokens", str(args.max_tokens))
    dump_s = time.perf_counter() - t0
    sh(logitstore, "dump", *common, "--data", str(DATA_VAL), "--out", str(val), "--max-tokens", str(args.val_tokens))
    sh(logitstore, "info", str(store))
    sh(logitstore, "verify", str(store))
    d = json.loads(subprocess.run([logitstore, "info", str(store), "--json"], text=True, capture_output=True, check=True).stdout)

    student = out / "student.json"
    student.write_text(json.dumps({"model_type": "llama", "vocab_size": d["tokenizer"]["vocab_size"], "hidden_size": 128,
                                   "intermediate_size": 384, "num_hidden_layers": 2, "num_attention_heads": 4,
                                   "num_key_value_heads": 4, "max_position_embeddings": args.seq_len, "tie_word_embeddings": True}))
    results = {}
    kd_name = "KD, A+B fused from the cache"
    fusion = ["--fuse", "mean-probs", "--weights", "0.7,0.3"]  # both runs: the eval KL is then to the same target
    for name, extra in (("CE only (no teacher)", ["--alpha", "0", *fusion]), (kd_name, ["--alpha", "0.5", *fusion])):
        run = out / ("run-ce" if name.startswith("CE") else "run-kd")
        shutil.rmtree(run, ignore_errors=True)
        t0 = time.perf_counter()
        sh(str(bin_dir / "trainer"), "fit", "--logits", str(store), "--eval-logits", str(val), "--student", str(student),
           "--out", str(run), *extra, "--max-steps", str(args.steps), "--batch-size", "8", "--lr", "2e-3",
           "--eval-every", str(max(1, args.steps // 4)), "--seed", "0", "warmup_steps=5")
        results[name] = (json.loads((run / "result.json").read_text()), time.perf_counter() - t0, run)
    bits = (d["tokenizer"]["vocab_size"] - 1).bit_length()
    print()
    print_table([{"student run": name, "val CE": r["eval"]["ce"], "val ppl": r["eval"]["ppl"],
                  "val KL to fused teachers": r["eval"]["kl"], "top-1 agree A": r["eval"]["top1_agreement"]["smollm2"],
                  "fit s": secs} for name, (r, secs, _) in results.items()])
    print()
    print_table([{"teacher": t["name"], "train tokens": d["tokens"], "k": t["k"], "B/token": t["bytes_per_token"],
                  "DistillKit B/token": t["k"] * (bits + 16) / 8,  # ids bit-packed at ceil(log2 V) bits + bf16 values
                  "top-k mass": t["mean_topk_mass"], "entropy": t["mean_entropy"]} for t in d["teachers"]])
    print(f"\nstore: {d['bytes_per_token']:.1f} B/token in all (inputs {d['inputs_bytes_per_token']:.1f}); "
          f"dump of both teachers {dump_s:.0f} s this run" + (" (already complete: nothing to do)" if dump_s < 15 else ""))
    print(f"curves: {results[kd_name][2] / 'curves.png'}, {results['CE only (no teacher)'][2] / 'curves.png'}")


if __name__ == "__main__":
    main()
