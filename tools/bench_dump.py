"""Dump overhead: wall time of ``logitstore dump`` vs the teacher's forward pass alone on the same
batches (SmolLM2-135M-Instruct, bundled corpus).

    .venv/bin/python tools/bench_dump.py [--tokens 8192] [--device cpu|cuda] [--out runs/bench_dump.json]

"forward-only" runs ``model(input_ids, attention_mask).logits`` over the same windows and batch size.
Forward-only and dump alternate for ``--rounds`` rounds and the median of the per-round ratios is
reported, so that drift in a shared machine's speed hits both sides alike. "dump" is the dump's pipeline time: the
teacher loop with on-device top-k statistics, device-to-host copies, encoding, compression, writes,
commits and the manifest; model loading and corpus tokenisation are excluded from both.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import DATA_TRAIN, ROOT, machine, print_table, smollm2_dir, write_json


def forward_only(model, input_ids: np.ndarray, lengths: np.ndarray, batch: int, device) -> float:
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        ids = torch.from_numpy(input_ids.astype(np.int64))
        mask = torch.from_numpy((np.arange(input_ids.shape[1])[None] < lengths[:, None]).astype(np.int64))
        model(input_ids=ids[:batch].to(device), attention_mask=mask[:batch].to(device))  # warm-up
        sync()
        t0 = time.perf_counter()
        for s in range(0, len(ids), batch):
            logits = model(input_ids=ids[s:s + batch].to(device), attention_mask=mask[s:s + batch].to(device)).logits
            del logits
        sync()
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "tools" / "results" / "bench_dump.json"))
    args = ap.parse_args()
    from logitstore.capture.corpus import pack
    from logitstore.capture.documents import load_texts
    from logitstore.dump import DumpConfig, dump
    from logitstore.capture.teacher import DTYPES, TeacherSpec, resolve_device

    device = resolve_device(args.device)
    dtype_name = "bf16" if device.type == "cuda" else "fp32"
    teacher = smollm2_dir()
    spec = TeacherSpec.parse(str(teacher))
    tok = spec.load_tokenizer()
    packed = pack(tok, load_texts(str(DATA_TRAIN)), args.seq_len, max_tokens=args.tokens)
    model = spec.load_model(device, DTYPES[dtype_name])
    print(f"machine: {machine()}; teacher SmolLM2-135M-Instruct ({dtype_name}) on {device}; "
          f"{packed.n_tokens} tokens, seq_len {args.seq_len}, batch {args.batch_size}, k {args.top_k}")
    rounds = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(args.rounds):
        fwd = forward_only(model, packed.input_ids, packed.lengths, args.batch_size, device)
        with tempfile.TemporaryDirectory() as tmp:
            r = dump(DumpConfig(teachers=(f"smollm2={teacher}",), data=str(DATA_TRAIN), out=f"{tmp}/store", top_k=args.top_k,
                                seq_len=args.seq_len, batch_size=args.batch_size, device=str(device), dtype=dtype_name,
                                max_tokens=args.tokens, shard_sequences=max(1, 4096 // args.seq_len), progress=False))
        rounds.append({"forward-only s": fwd, "dump s": r.pipeline_seconds, "ratio": r.pipeline_seconds / fwd,
                       "teacher compute share": r.forward_seconds / r.pipeline_seconds})
        print(f"round {i + 1}: forward-only {fwd:.2f} s, dump {r.pipeline_seconds:.2f} s, ratio {rounds[-1]['ratio']:.3f}")
    ratios = [x["ratio"] for x in rounds]
    mid = rounds[int(np.argsort(ratios)[len(ratios) // 2])]
    row = {
        "device": str(device), "tokens": packed.n_tokens, "rounds": args.rounds, "forward-only s": mid["forward-only s"],
        "dump s": mid["dump s"], "dump / forward-only (median)": mid["ratio"], "min ratio": min(ratios), "max ratio": max(ratios),
        "teacher compute share": mid["teacher compute share"], "dump tok/s": packed.n_tokens / mid["dump s"],
        "B/token": r.summary["bytes_per_token"],
        **({"peak CUDA GB": torch.cuda.max_memory_allocated() / 1e9} if device.type == "cuda" else {}),
    }
    print()
    print_table([row])
    write_json(Path(args.out), {"machine": machine(), **vars(args), "result": row, "rounds": rounds})


if __name__ == "__main__":
    main()
