"""Reading a store from object storage: no prefetch vs prefetch vs a warm ``--cache-dir``.

    .venv/bin/python tools/bench_remote.py [--tokens 32768] [--repeat 3] [--out tools/results/bench_remote.json]

The store is teacher B (``tools/train_teacher.py``, V = 49,152, k = 64, compact) over the bundled
corpus, uploaded to moto's S3 server on loopback (started here, stopped by PID at the end). A
pass reads and decodes every shard in order with ``Store.load_shard`` (checksums on), from a fresh
``Store``; the median of ``--repeat`` passes is reported. Loopback has almost no latency, so the
gain of prefetching here is the overlap of fetching and hashing with decoding; over a real network,
where each request waits tens of milliseconds, that overlap matters more.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from common import DATA_TRAIN, ROOT, machine, print_table, write_json


def start_s3() -> subprocess.Popen:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"})
    for _ in range(300):
        try:
            urllib.request.urlopen(os.environ["AWS_ENDPOINT_URL"], timeout=1)
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("moto server did not start")


def timed_pass(url: str, prefetch: int = 0, cache_dir: str | None = None) -> float:
    import logitstore

    store = logitstore.open(url, cache_dir=cache_dir)
    shards = list(range(store.n_shards))
    t0 = time.perf_counter()
    if prefetch:
        store.prefetch(shards, depth=prefetch)
    for j in shards:
        store.load_shard(j)
    dt = time.perf_counter() - t0
    store.close()
    return dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "tools" / "results" / "bench_remote.json"))
    args = ap.parse_args()
    from train_teacher import teacher_b_dir

    from logitstore.dump import DumpConfig, dump

    teacher = teacher_b_dir()
    proc = start_s3()
    try:
        import boto3
        import fsspec

        boto3.client("s3").create_bucket(Bucket="bench")
        with tempfile.TemporaryDirectory(prefix="bench-remote-") as tmp:
            local = Path(tmp) / "store"
            dump(DumpConfig(teachers=(f"b={teacher}",), data=str(DATA_TRAIN), out=str(local), top_k=64, seq_len=256,
                            shard_sequences=16, max_tokens=args.tokens, device="cpu", progress=False))
            fsspec.filesystem("s3").put(str(local), "bench/store", recursive=True)
            remote = "s3://bench/store"
            cache = str(Path(tmp) / "cache")
            timed_pass(remote, cache_dir=cache)  # fills the cache
            setups = [("local disk", str(local), {}), ("S3, no prefetch", remote, {}), ("S3, prefetch 4", remote, {"prefetch": 4}),
                      ("S3, warm --cache-dir", remote, {"cache_dir": cache})]
            times = {name: [] for name, _, _ in setups}
            for _ in range(args.repeat):  # setups alternate, so drift in machine speed hits all alike
                for name, url, kw in setups:
                    times[name].append(timed_pass(url, **kw))
            n_bytes = sum(f.stat().st_size for f in local.rglob("*") if f.is_file())
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait()
    base = statistics.median(times["S3, no prefetch"])
    rows = [{"setup": name, "seconds": statistics.median(ts), "tokens_per_s": args.tokens / statistics.median(ts),
             "vs_no_prefetch": base / statistics.median(ts)} for name, ts in times.items()]
    print_table(rows, ["setup", "seconds", "tokens_per_s", "vs_no_prefetch"])
    write_json(Path(args.out), {"machine": machine(), "tokens": args.tokens, "store_bytes": n_bytes, "repeat": args.repeat,
                                "times": times, "rows": rows})


if __name__ == "__main__":
    main()
