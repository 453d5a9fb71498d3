"""Bytes/token, encode/decode speed and reconstruction error of every encoding, on real teacher
distributions (SmolLM2-135M-Instruct over the bundled validation prose), with DistillKit's scheme
(ids bit-packed at ceil(log2 V) bits + bf16 log-probs, no entropy coding) as the comparison.

    .venv/bin/python tools/bench_store.py [--positions 8192] [--out runs/bench_store.json]

Speeds are per core: the process is pinned to one CPU and blosc runs single-threaded.
Speeds are the median of ``--repeat`` timed runs. "Decode" parses a part's files and decodes them into ids / float32 log-probs / scalars; "read" adds the
sha256 check of every file that the reader does by default.
KL is KL(reconstructed || exact) over the k+1 outcomes (top-k plus the exact tail bucket), in nats.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from common import DATA_VAL, ROOT, cache_dir, machine, print_table, smollm2_dir, write_json

SEQ = 256


def real_distributions(positions: int, kmax: int = 128) -> dict:
    path = cache_dir() / f"smollm2-val-top{kmax}-{positions}.npz"
    if path.exists():
        return dict(np.load(path))
    import torch

    from logitstore.capture.corpus import pack
    from logitstore.capture.documents import load_texts
    from logitstore.capture.teacher import TeacherRunner, TeacherSpec

    spec = TeacherSpec.parse(str(smollm2_dir()))
    tok = spec.load_tokenizer()
    packed = pack(tok, load_texts(str(DATA_VAL)), SEQ, max_tokens=positions)
    runner = TeacherRunner(spec.load_model(torch.device("cpu"), torch.float32), len(tok), kmax)
    outs = [runner.run(packed.input_ids[i:i + 4], packed.lengths[i:i + 4]) for i in range(0, len(packed.lengths), 4)]
    d = {k: np.concatenate([o[k] for o in outs]).reshape(-1, *outs[0][k].shape[2:]) for k in outs[0]}
    d["vocab"] = np.array(len(tok))
    np.savez(path, **d)
    return d


def kl_recon(lp_exact, tail_exact, lp_hat, tail_hat) -> float:
    p = np.concatenate([np.exp(lp_exact.astype(np.float64)), tail_exact[:, None].astype(np.float64)], 1)
    q = np.concatenate([np.exp(lp_hat.astype(np.float64)), np.maximum(tail_hat, 0)[:, None].astype(np.float64)], 1)
    p /= p.sum(1, keepdims=True)
    q /= q.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(q > 0, q * (np.log(q) - np.log(np.maximum(p, 1e-300))), 0.0)
    return float(t.sum(1).mean())


def match_back(ids, lp, ids_hat, lp_hat):
    """Reorder decoded entries into the original rank order (compact returns them by id rank)."""
    o1, o2 = np.argsort(ids, 1), np.argsort(ids_hat, 1)
    assert (np.take_along_axis(ids, o1, 1) == np.take_along_axis(ids_hat, o2, 1)).all(), "id sets differ"
    out = np.empty_like(lp_hat)
    np.put_along_axis(out, o1, np.take_along_axis(lp_hat, o2, 1), 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--positions", type=int, default=32768, help="real positions, encoded as one part")
    ap.add_argument("--k", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--repeat", type=int, default=9, help="timed decodes per measurement (the median is reported)")
    ap.add_argument("--out", default=str(ROOT / "tools" / "results" / "bench_store.json"))
    args = ap.parse_args()
    d = real_distributions(args.positions)
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    import numcodecs

    numcodecs.blosc.set_nthreads(1)
    import torch

    torch.set_num_threads(1)
    from logitstore.format.backends import get_backend
    from logitstore.format.codec import Encoding
    from logitstore.format.hashing import sha256_hex

    V = int(d["vocab"])
    N = d["ids"].shape[0] // SEQ * SEQ
    S = N // SEQ
    p_all = np.exp(d["logprobs"][:N].astype(np.float64))
    print(f"machine: {machine()} (pinned to 1 core)\nreal distributions: {N} positions, V = {V}, "
          f"mean top-1 p {p_all[:, 0].mean():.3f}, entropy {d['entropy'][:N].mean():.2f} nats")
    rows = []
    for k in args.k:
        ids = d["ids"][:N, :k]
        lp = d["logprobs"][:N, :k]
        tail = (d["tail_mass"][:N] + p_all[:, k:].sum(1)).astype(np.float32)
        scal = {"tail_mass": tail, "gold_logprob": d["gold_logprob"][:N], "entropy": d["entropy"][:N]}
        bits = (V - 1).bit_length()
        dk_bytes = k * (bits + 16) / 8
        lp_bf16 = torch.from_numpy(lp).bfloat16().float().numpy()
        rows.append({"k": k, "scheme": "DistillKit (bit-packed ids + bf16)", "backend": "-", "B/token": dk_bytes,
                     "x DistillKit": 1.0, "max |err|": float(np.abs(lp_bf16 - lp).max()),
                     "mean KL": kl_recon(lp, tail, lp_bf16, tail)})
        encodings = [Encoding("lossless")] + [Encoding("compact", b, codebook="uniform") for b in (7, 8)] + \
            [Encoding("compact", b) for b in (6, 7, 8)]
        for enc in encodings:
            for bname in ("zarr", "arrow"):
                backend = get_backend(bname)
                t0 = time.perf_counter()
                arrays = enc.encode(ids, lp, scal, V)
                arrays = {n: (v if n == "id_order" else v.reshape(S, SEQ, *v.shape[1:])) for n, v in arrays.items()}
                files = backend.encode_part(arrays, chunk_rows=max(1, 32768 // SEQ))
                enc_s = time.perf_counter() - t0
                nbytes = sum(len(v) for v in files.values())
                hashes = {n: sha256_hex(b) for n, b in files.items()}
                specs = {n: (v.dtype, v.shape) for n, v in arrays.items()}
                if "id_order" in specs:
                    specs["id_order"] = (arrays["id_order"].dtype, (None,))
                def read(check: bool):
                    if check:
                        for n, b in files.items():
                            if sha256_hex(b) != hashes[n]:
                                raise RuntimeError("checksum")
                    got = backend.decode_part(files, specs, "bench")
                    flat = {n: (v if n == "id_order" else v.reshape(N, *v.shape[2:])) for n, v in got.items()}
                    return enc.decode(flat, V)

                timings = {}
                for check in (False, True):
                    read(check)
                    times = []
                    for _ in range(args.repeat):
                        t0 = time.perf_counter()
                        ids_hat, lp_hat, sc_hat = read(check)
                        times.append(time.perf_counter() - t0)
                    timings[check] = float(np.median(times))  # robust to another process taking the core
                lp_back = match_back(ids, lp, ids_hat, lp_hat)
                rows.append({
                    "k": k, "scheme": enc.name + (f" {enc.codebook} {enc.value_bits}-bit" if enc.name == "compact" else ""), "backend": bname,
                    "B/token": nbytes / N, "x DistillKit": nbytes / N / dk_bytes,
                    "max |err|": float(np.abs(lp_back - lp).max()), "mean KL": kl_recon(lp, tail, lp_back, sc_hat["tail_mass"]),
                    "encode Mtok/s": N / enc_s / 1e6, "decode Mtok/s": N / timings[False] / 1e6,
                    "read Mtok/s": N / timings[True] / 1e6,
                })
    print()
    print_table(rows, ["k", "scheme", "backend", "B/token", "x DistillKit", "max |err|", "mean KL", "encode Mtok/s", "decode Mtok/s", "read Mtok/s"])
    write_json(__import__("pathlib").Path(args.out), {"machine": machine(), "positions": N, "vocab": V, "rows": rows})


if __name__ == "__main__":
    main()
