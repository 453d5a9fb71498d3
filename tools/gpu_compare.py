"""On a CUDA machine: the same store written three ways, compared position by position.

    .venv/bin/python tools/gpu_compare.py [--tokens 16384] [--out tools/results/gpu/device_map.json]

SmolLM2-135M-Instruct in bf16, k = 64, lossless encoding: (a) one device (``--device cuda``),
(b) ``--device-map auto`` over the visible GPUs, (c) ``--device-map auto --max-memory 0=150MB``,
which leaves part of the layers on the CPU (accelerate moves them in per forward). Reported: max
|log-prob difference| over positions whose top-k ids agree, the share of positions whose top-k ids
agree, and dump tokens/s of each. bf16 layers on CPU and GPU round differently, so (c) is not
expected bit-equal to (a); (b) on one GPU is the same placement as (a).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from common import DATA_TRAIN, ROOT, machine, print_table, smollm2_dir, write_json


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--out", default=str(ROOT / "tools" / "results" / "gpu" / "device_map.json"))
    args = ap.parse_args()
    import logitstore
    from logitstore.dump import DumpConfig, dump

    teacher = smollm2_dir()
    arms = {"one device": {"device": "cuda"}, "device map auto": {"device_map": "auto"},
            "device map, part on CPU": {"device_map": "auto", "max_memory": "0=150MB,cpu=64GiB"}}
    rows, stores = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, kw in arms.items():
            out = f"{tmp}/{len(stores)}"
            t0 = time.perf_counter()
            dump(DumpConfig(teachers=(f"smollm2={teacher}",), data=str(DATA_TRAIN), out=out, top_k=64, seq_len=512,
                            batch_size=8, max_tokens=args.tokens, encoding="lossless", dtype="bf16", progress=False, **kw))
            stores[name] = out
            rows.append({"arm": name, "wall s": time.perf_counter() - t0})
        ref = logitstore.open(stores["one device"])
        for row in rows:
            s = logitstore.open(stores[row["arm"]])
            agree, worst = [], 0.0
            for j in range(ref.n_shards):
                a, b = ref.load_shard(j)["teachers"]["smollm2"], s.load_shard(j)["teachers"]["smollm2"]
                same = (a["ids"] == b["ids"]).all(-1)
                agree.append(same.ravel())
                if same.any():
                    worst = max(worst, float(np.abs(a["logprobs"][same] - b["logprobs"][same]).max()))
            row["top-k ids agree"] = float(np.concatenate(agree).mean())
            row["max |dlogprob| where ids agree"] = worst
            row["tokens/s"] = s.manifest["n_tokens"] / row["wall s"]
    print(f"machine: {machine()}")
    print_table(rows)
    write_json(Path(args.out), {"machine": machine(), "tokens": args.tokens, "rows": rows})


if __name__ == "__main__":
    main()
