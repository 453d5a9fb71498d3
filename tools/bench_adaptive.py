"""Adaptive k (--top-p) against fixed k at equal bytes, on real teacher distributions.

    .venv/bin/python tools/bench_adaptive.py [--out tools/results/bench_adaptive.json]

SmolLM2-135M-Instruct over the bundled validation prose (the distributions ``tools/bench_store.py``
caches: top-128 per position plus the exact tail mass). For each setting the store's bytes per
token (compact, companded 8-bit, zarr, one part) and how much of the teacher the stored target
loses: the mean top-k mass it keeps, and KL(p || p_hat) where ``p`` is the teacher (its top-128
exactly, the rest as one bucket) and ``p_hat`` the trainer's reading of the stored target (kept
entries exact, the tail spread evenly over the other V - n ids; FORMAT.md "Reading the tail"). The
bucket beyond the top-128 reads the same in both, so the KL counts only what the truncation loses.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from bench_store import SEQ, real_distributions
from common import ROOT, machine, print_table, write_json


def reading_kl(lp128: np.ndarray, tail128: np.ndarray, keep: np.ndarray, V: int) -> float:
    """Mean KL(p || p_hat) in nats; ``keep`` [N, 128] bool (a prefix of each row)."""
    p = np.exp(lp128.astype(np.float64))
    n = keep.sum(1)
    tail = tail128.astype(np.float64) + np.where(keep, 0.0, p).sum(1)  # what the stored tail holds
    share = tail / (V - n)  # p_hat of every id not kept
    with np.errstate(divide="ignore", invalid="ignore"):
        dropped = np.where(keep, 0.0, p * (np.log(p) - np.log(share[:, None]))).sum(1)
        rest = tail128 * (np.log(np.maximum(tail128, 1e-300) / (V - 128)) - np.log(share))  # bucket beyond 128: same shape
    return float(np.nan_to_num(dropped + rest).mean())


def stored_bytes(d: dict, keep: np.ndarray, k: int, V: int) -> float:
    from logitstore.format.backends import get_backend
    from logitstore.format.codec import Encoding

    N = keep.shape[0]
    lp = np.where(keep[:, :k], d["logprobs"][:N, :k], -np.inf).astype(np.float32)
    p = np.exp(d["logprobs"][:N].astype(np.float64))
    tail = (d["tail_mass"][:N] + np.where(keep, 0.0, p).sum(1)).astype(np.float32)
    scal = {"tail_mass": tail, "gold_logprob": d["gold_logprob"][:N], "entropy": d["entropy"][:N]}
    arrays = Encoding().encode(d["ids"][:N, :k], lp, scal, V, absent=True)
    arrays = {n: (v if n == "id_order" else v.reshape(N // SEQ, SEQ, *v.shape[1:])) for n, v in arrays.items()}
    files = get_backend("zarr").encode_part(arrays, chunk_rows=128)
    return sum(len(b) for b in files.values()) / N


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--positions", type=int, default=32768)
    ap.add_argument("--out", default=str(ROOT / "tools" / "results" / "bench_adaptive.json"))
    args = ap.parse_args()
    d = real_distributions(args.positions)
    V = int(d["vocab"])
    N = d["ids"].shape[0] // SEQ * SEQ
    lp128, tail128 = d["logprobs"][:N], d["tail_mass"][:N]
    cum = np.cumsum(np.exp(lp128.astype(np.float64)), 1)
    rows = []
    for k in (4, 8, 16, 32, 64, 128):
        keep = np.zeros(lp128.shape, bool)
        keep[:, :k] = True
        rows.append({"target": f"top-{k}", "mean entries": float(k), "B/token": stored_bytes(d, keep, k, V),
                     "mean kept mass": float(cum[:, k - 1].mean()), "KL(p||read)": reading_kl(lp128, tail128, keep, V)})
    for top_p in (0.8, 0.9, 0.95, 0.99):
        for max_k in (64, 128):
            n = np.where((cum >= top_p).any(1), (cum >= top_p).argmax(1) + 1, 128)
            n = np.minimum(n, max_k)
            keep = np.arange(128)[None, :] < n[:, None]
            rows.append({"target": f"top-p {top_p}, k <= {max_k}", "mean entries": float(n.mean()),
                         "B/token": stored_bytes(d, keep, max_k, V),
                         "mean kept mass": float(np.where(keep, np.exp(lp128.astype(np.float64)), 0).sum(1).mean()),
                         "KL(p||read)": reading_kl(lp128, tail128, keep, V)})
    print(f"machine: {machine()}\n{N} positions of real SmolLM2-135M-Instruct distributions, V = {V}\n")
    print_table(rows)
    write_json(Path(args.out), {"machine": machine(), "positions": N, "vocab": V, "rows": rows})


if __name__ == "__main__":
    main()
