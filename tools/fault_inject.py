"""Fault injection, many rounds: kill -9 of ``logitstore dump`` and flipped bytes in shard files.

    .venv/bin/python tools/fault_inject.py [--kill-rounds 20] [--flip-trials 100] [--out runs/fault_inject]

``kill``: a reference store is dumped without interruption; then, each round, the same
``logitstore dump`` command is started, killed with SIGKILL after a random delay (uniform over the
reference run's duration), checked (a killed store must not have a manifest, unless the kill came after the manifest was
written, and then the store must verify and equal the reference), and re-run to the
end. A round survives if the re-run exits 0, ``verify`` reports nothing and every data file has the
reference's sha256 (commit records differ only in the timings they record).

``flip``: each trial copies the reference store, flips one random bit of one random byte in a random
shard file, and runs ``verify``; a trial is found if ``verify`` reports a problem that names that
file's part. A trial also opens the store and reads every sequence with checksums on (the default),
which must raise an error.

The teacher is a tiny Llama (2 layers x 32) built here with SmolLM2's tokenizer and saved with
``save_pretrained``, so the rounds are about the store, not the model. Prints a table and writes
``OUT/fault_inject.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from common import DATA_TRAIN, ROOT, machine, print_table, smollm2_dir, write_json


def tiny_teacher(out: Path) -> Path:
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(smollm2_dir())
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def part_digests(store: Path) -> dict[str, str]:
    """sha256 of every data file (commit records are left out: they hold the part's timings)."""
    return {str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((store / "shards").rglob("*")) if p.is_file() and not p.name.endswith(".commit.json")}


def kill_rounds(args, teacher: Path, out: Path, env: dict) -> dict:
    from logitstore.tools.verify import verify

    cmd = [sys.executable, "-m", "logitstore", "dump", "--teacher", f"tiny={teacher}", "--data", str(DATA_TRAIN),
           "--top-k", "16", "--seq-len", "64", "--batch-size", "2", "--shard-sequences", "2", "--max-tokens", str(args.tokens), "-q"]
    ref = out / "ref"
    shutil.rmtree(ref, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run([*cmd, "--out", str(ref)], check=True, env=env, capture_output=True)
    duration = time.perf_counter() - t0
    want = part_digests(ref)
    rng = random.Random(args.seed)
    rounds = []
    for i in range(args.kill_rounds):
        store = out / "killed"
        shutil.rmtree(store, ignore_errors=True)
        delay = rng.uniform(0.0, duration)
        proc = subprocess.Popen([*cmd, "--out", str(store)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        finished = proc.poll() is not None
        if not finished:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        committed = len(list(store.glob("shards/*/*.commit.json")))
        looked_complete = (store / "manifest.json").exists()
        # killed after the manifest was written (during teardown): the store must then really be complete
        complete_ok = looked_complete and not verify(str(store)) and part_digests(store) == want
        rerun = subprocess.run([*cmd, "--out", str(store)], env=env, capture_output=True, text=True)

        problems = verify(str(store)) if rerun.returncode == 0 else ["re-run failed: " + rerun.stderr.strip()[-300:]]
        same = rerun.returncode == 0 and part_digests(store) == want
        ok = same and not problems and (finished or not looked_complete or complete_ok)
        rounds.append({"round": i, "delay_s": delay, "killed": not finished, "parts_committed_at_kill": committed,
                       "manifest_at_kill": looked_complete, "complete_and_valid_at_kill": complete_ok, "survived": ok, "problems": problems[:3]})
        print(f"  kill round {i + 1:>3}: {'killed' if not finished else 'finished'} after {delay:5.2f} s with {committed:>3} "
              f"parts committed -> {'ok' if ok else 'FAILED'}", flush=True)
    return {"reference_seconds": duration, "rounds": rounds, "survived": sum(r["survived"] for r in rounds),
            "killed_mid_run": sum(r["killed"] for r in rounds)}


def flip_trials(args, ref: Path, out: Path) -> dict:
    import logitstore
    from logitstore.errors import LogitStoreError
    from logitstore.tools.verify import verify

    files = [p for p in sorted((ref / "shards").rglob("*")) if p.is_file() and not p.name.endswith(".commit.json")]
    rng = random.Random(args.seed + 1)
    trials = []
    for i in range(args.flip_trials):
        store = out / "flipped"
        shutil.rmtree(store, ignore_errors=True)
        shutil.copytree(ref, store)
        victim = rng.choice(files)
        rel = victim.relative_to(ref)
        data = bytearray((store / rel).read_bytes())
        pos = rng.randrange(len(data))
        data[pos] ^= 1 << rng.randrange(8)
        (store / rel).write_bytes(bytes(data))
        problems = verify(str(store))
        named = any(str(rel) in p for p in problems)  # the damaged file is named
        try:
            s = logitstore.open(str(store))
            for j in range(len(s)):
                s[j]
            refused = False
        except LogitStoreError:
            refused = True
        trials.append({"trial": i, "file": str(rel), "byte": pos, "found": bool(problems) and named, "reader_refused": refused,
                       "first_problem": problems[0] if problems else None})
    found = sum(t["found"] for t in trials)
    print(f"  flipped bytes found by verify: {found}/{len(trials)}; reads refused: {sum(t['reader_refused'] for t in trials)}/{len(trials)}")
    return {"trials": trials, "found": found, "reader_refused": sum(t["reader_refused"] for t in trials)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kill-rounds", type=int, default=20)
    ap.add_argument("--flip-trials", type=int, default=100)
    ap.add_argument("--tokens", type=int, default=3072, help="tokens per dump (64-token windows, 2 per shard)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "runs" / "fault_inject"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    print(f"machine: {machine()}", flush=True)
    teacher = tiny_teacher(out / "tiny-teacher")
    kills = kill_rounds(args, teacher, out, env)
    flips = flip_trials(args, out / "ref", out)
    rows = [
        {"fault": "kill -9 of logitstore dump, then re-run", "injected": len(kills["rounds"]), "handled": kills["survived"],
         "note": f"{kills['killed_mid_run']} killed mid-run; handled = re-run ok, verify clean, parts identical to reference"},
        {"fault": "one flipped bit in a shard file", "injected": len(flips["trials"]), "handled": flips["found"],
         "note": f"handled = verify names the shard and part; reads with checksums refused {flips['reader_refused']}"},
    ]
    print()
    print_table(rows)
    write_json(out / "fault_inject.json", {"machine": machine(), "args": vars(args), "kill": kills, "flip": flips, "rows": rows})
    if kills["survived"] != len(kills["rounds"]) or flips["found"] != len(flips["trials"]):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
