"""Store format version 1 (previous code, commit d886d25) against version 2 (this tree) at scale:
what opening a store and starting a training reader cost, what each rank fetches and decodes per
epoch, how many objects a store has, and an extrapolation to 10^10 and 10^11 tokens.

    .venv/bin/python tools/bench_scale.py [--quick] [--sizes 1e6,1e7,1e8] [--k 8] [--keep]

Stores are synthetic but LM-like (``tools/scale_stores.py``: Zipf token ids over V = 49,152,
Zipf-softmax teachers, mean top-8 mass ~0.84), written by the real codec and writer of each
version from the same seeds: seq_len 2048, one teacher of top-k ``--k``, each version's default
shard size (v1: 2^18 tokens = 128 sequences, v2: 2^19 = 256). Plus a store of ``--small-shards``
one-sequence shards (seq_len 64; v2 whole, v1 as a 1,000-shard sample: a v1 manifest of 10^5 shards
exceeds the 256 MiB readers accept, so its size is extrapolated) and a 10^6-token k = 64 store for
the bytes per token of the extrapolation. Every measurement runs in a fresh subprocess (the old
code with ``PYTHONPATH`` = an archive of d886d25); peak RSS is ``ru_maxrss`` at its end, the
baseline the same process with only the imports (interpreter, numpy, zarr, pyarrow; + torch and
``trainer`` for the training reader). Reading per rank is simulated from each version's plan in
one process per store (v2: the real ``ShardCache`` over ``worker_batches``; v1: the old reader's
4-shard LRU over ``rank_batches``) and checked against a real in-process iteration of rank 0 of 8.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import ROOT, print_table, write_json

OLD = "d886d25"
SCALE = str(Path(__file__).with_name("scale_stores.py"))
MiB = 1 << 20
SHARD_TOKENS = {1: 1 << 18, 2: 1 << 19}
V1_SAMPLE_SHARDS = 1000


NOTES = [
    "small-shard store: every inputs part is its own sequence, written by the real writer; the teacher parts are 1,000 distinct "
    "parts encoded by the real codec and zarr backend, reused round-robin and committed by the real PartWriter.write_files "
    "(encoding one tiny zarr part costs 7-20 ms of fixed zarr overhead, a sync round trip per array); all indexed by build_manifest",
    "the v1 small-shard store is a 1,000-shard sample (100 distinct teacher parts); its full-size manifest is extrapolated",
    "RSS: 'open/start-up RSS' is the peak of a fresh process; '+base' is over the same process with only the imports; 'delta' is "
    "the growth during the measured step in that process (the reader imports nothing lazily: no pandas); "
    "'heap' is the tracemalloc peak of the step (Python and numpy; pyarrow's pool is not traced)",
    "open+index s excludes module imports ('+pandas s': none is imported any more); start-up "
    "is DistillDataset(...) alone, '+plan s' the batches_per_epoch() after it; start-up RSS and B/seq cover both",
    "v1 reading: each rank reads every shard (old rank_batches); the 256-sequence shuffle buffer spreads a rank's rows over more "
    "shards than the 4-shard LRU holds, so small W re-decodes shards many times",
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Runner:
    """Runs ``scale_stores.py MODE ARGS`` under the code of format version 1 or 2."""

    def __init__(self, work: Path):
        self.work = work
        old = work / "oldcode"
        old.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", OLD], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        self.retries: list[dict] = []
        self.env = {1: {**os.environ, "PYTHONPATH": str(old)}, 2: {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}}

    def spawn(self, version: int, mode: str, args: dict) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, SCALE, mode, json.dumps(args)], env=self.env[version], cwd=self.work,
                                stdout=subprocess.PIPE, text=True)

    @staticmethod
    def result(p: subprocess.Popen) -> dict:
        out, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"{p.args[2]} {p.args[3]} failed ({p.returncode})")
        return json.loads(out.strip().splitlines()[-1])

    def __call__(self, code: int, mode: str, **args) -> dict:
        """A probe; run again (twice at most) if it was killed by a signal, and say so."""
        for attempt in range(3):
            p = self.spawn(code, mode, args)
            out, _ = p.communicate()
            if p.returncode >= 0 or attempt == 2:
                break
            log(f"  {mode} (v{code}) died of signal {-p.returncode}; running it again")
            self.retries.append({"mode": mode, "code": code, "signal": -p.returncode})
        if p.returncode:
            raise SystemExit(f"{mode} {json.dumps(args)} failed ({p.returncode})")
        return json.loads(out.strip().splitlines()[-1])

    def parallel(self, jobs: list[tuple[int, str, dict]]) -> list[dict]:
        procs = [self.spawn(*j) for j in jobs]
        return [self.result(p) for p in procs]


def store_specs(args) -> list[dict]:
    specs = [{"name": f"{n:g}".replace("e+0", "e").replace("e+", "e"), "tokens": int(n),
              "seq_len": 2048, "k": args.k, "kind": "std"} for n in args.sizes]
    if args.small_shards:
        specs.append({"name": f"{args.small_shards:.0e}".replace("e+0", "e") + " shards", "tokens": 64 * args.small_shards,
                      "seq_len": 64, "k": args.k, "kind": "small"})
    specs.append({"name": "1e6 k=64", "tokens": 10**6, "seq_len": 2048, "k": 64, "kind": "k64"})
    return specs


def write_stores(run: Runner, specs: list[dict], work: Path) -> None:
    """Write every store, v1 and v2 side by side (two processes on two cores)."""
    for s in specs:
        base = {"tokens": s["tokens"], "seq_len": s["seq_len"], "k": s["k"], "seed": 0}
        s["url"] = {v: str(work / f"{s['name'].replace(' ', '_').replace('=', '')}-v{v}") for v in (1, 2)}
        t0, saved = time.perf_counter(), work / f"{Path(s['url'][2]).name}.write.json"
        if saved.exists() and all(Path(u, "manifest.json").exists() for u in s["url"].values()):  # --work of a --keep run
            s.update(json.loads(saved.read_text(), object_hook=lambda d: {int(k) if k.isdigit() else k: v for k, v in d.items()}))
            log(f"reusing {s['name']} from {work}")
            continue
        if s["kind"] == "small":
            pool = min(1000, s["tokens"] // 64)
            v1 = {**base, "tokens": 64 * min(V1_SAMPLE_SHARDS, s["tokens"] // 64), "shard_seqs": 1, "pool": 100}
            v2 = {**base, "shard_seqs": 1, "pool": pool}
            jobs = [(1, "write_pool", {**v1, "out": s["url"][1], "tag": f"{s['name']} v1 sample"})]
            jobs += [(2, "write_pool", {**v2, "out": s["url"][2], "rank": r, "world": 2, "tag": f"{s['name']} v2 rank {r}"}) for r in (0, 1)]
            s["sample_tokens_v1"] = v1["tokens"]
        else:
            v1 = {**base, "shard_seqs": SHARD_TOKENS[1] // s["seq_len"]}
            v2 = {**base, "shard_seqs": SHARD_TOKENS[2] // s["seq_len"]}
            jobs = [(v, "write", {**c, "out": s["url"][v], "tag": f"{s['name']} v{v}"}) for v, c in ((1, v1), (2, v2))]
        log(f"writing {s['name']} ({s['tokens']:,} tokens, k = {s['k']})")
        got = run.parallel(jobs)
        fin = run.parallel([(1, "finish", {**v1, "out": s["url"][1]}), (2, "finish", {**v2, "out": s["url"][2]})])
        s["write"] = {1: {**got[0], **fin[0]}, 2: {**got[-1], "seconds": max(g["seconds"] for g in got[1:]), **fin[1]}}
        s["write"][2]["tokens"] = s["tokens"]
        saved.write_text(json.dumps({k: s[k] for k in ("write", "sample_tokens_v1") if k in s}))
        log(f"  done in {time.perf_counter() - t0:.0f} s")


def tree_stats(url: str, tokens: int) -> dict:
    """Files under the store directory (data, commit records, plan, manifest, index files)."""
    files = sum(len(names) for _, _, names in os.walk(url))
    m = json.loads(Path(url, "manifest.json").read_bytes())
    idx = {k: v["bytes"] for k, v in m.get("index", {}).get("files", {}).items()}
    return {"files": files, "per_1e9_tokens": files / tokens * 1e9, "total_bytes": m["total_bytes"],
            "bytes_per_token": m["total_bytes"] / tokens, "n_shards": m.get("n_shards", len(m.get("shards", []))),
            "manifest_bytes": Path(url, "manifest.json").stat().st_size, "index_files": idx,
            "mean_topk_mass": m["teachers"][0]["stats"]["mean_topk_mass"]}


def measure(run: Runner, s: dict, base: dict, verify: set) -> None:
    """Open, start-up and per-rank reading of both versions of one store."""
    s["res"] = {}
    for v in (1, 2):
        tokens = s.get("sample_tokens_v1", s["tokens"]) if v == 1 else s["tokens"]
        r = {"store": tree_stats(s["url"][v], tokens), "write": s["write"][v]}
        r["open"] = run(v, "open_store", url=s["url"][v])
        r["open"]["traced_peak_bytes"] = run(v, "open_store", url=s["url"][v], trace=True)["traced_peak_bytes"]
        want = str(run.work / "oldcode") if v == 1 else str(ROOT)
        assert r["open"]["logitstore"].startswith(want), f"v{v} ran {r['open']['logitstore']}, expected code under {want}"
        r["open"]["rss_over_kb"] = r["open"]["rss_kb"] - base[v]["reader"]
        if s["kind"] == "k64" or (v == 1 and s["kind"] == "small"):
            s["res"][v] = r
            continue
        su = r["startup"] = run(v, "startup", url=s["url"][v], world=8)
        su["traced_peak_bytes"] = run(v, "startup", url=s["url"][v], world=8, trace=True)["traced_peak_bytes"]
        su["rss_over_kb"] = su["rss_kb"] - base[v]["trainer"]
        su["delta_bytes_per_seq"] = su["rss_delta_kb"] * 1024 / su["n_sequences"]
        su["heap_bytes_per_seq"] = su["traced_peak_bytes"] / su["n_sequences"]
        layouts = [[1, 1], [8, 1], [64, 1]] + ([[8, 4]] if v == 2 else [])
        r["reading"] = run(v, "decodes", url=s["url"][v], version=v, layouts=layouts, verify=(s["name"], v) in verify)
        if "verify" in r["reading"]:
            log(f"  verified {s['name']} v{v}: a real iteration of rank 0 of 8 decoded and read what the simulation says: "
                f"{r['reading']['verify']}")
        s["res"][v] = r
    log(f"measured {s['name']}")


def fit(x, y) -> tuple[float, float]:
    """Least-squares ``y = a + b x`` (through the origin with one point)."""
    if len(x) < 2:
        return 0.0, float(y[0]) / float(x[0])
    b, a = np.polyfit(np.asarray(x, float), np.asarray(y, float), 1)
    return float(a), float(b)


def extrapolate(specs: list[dict], W: int = 64) -> dict:
    """Models fitted on the measured stores, evaluated at 10^10 and 10^11 tokens (seq_len 2048)."""
    std = [s for s in specs if s["kind"] == "std"]
    k64 = next(s for s in specs if s["kind"] == "k64")["res"]
    small = next((s for s in specs if s["kind"] == "small"), None)
    big = max(std, key=lambda s: s["tokens"])
    col = lambda v, f: [f(s["res"][v]) for s in std]  # noqa: E731
    m1 = fit(col(1, lambda r: r["store"]["n_shards"]), col(1, lambda r: r["store"]["manifest_bytes"]))
    ix2 = fit(col(2, lambda r: r["store"]["n_shards"]), col(2, lambda r: r["open"]["index_bytes"]))
    sq2 = fit([s["tokens"] / 2048 for s in std], col(2, lambda r: r["store"]["index_files"]["sequences.parquet"]))
    nseq = [s["res"][2]["startup"]["n_sequences"] for s in std]
    delta = {v: fit(nseq, col(v, lambda r: r["startup"]["rss_delta_kb"] * 1024)) for v in (1, 2)}
    # peak RSS = fixed part (mean over the stores of peak - slope x sequences) + slope of the growth x sequences
    rss = {v: (float(np.mean([p - delta[v][1] * n for p, n in zip(col(v, lambda r: r["startup"]["rss_kb"] * 1024), nseq)])), delta[v][1])
           for v in (1, 2)}
    files = {v: fit(col(v, lambda r: r["store"]["n_shards"]), col(v, lambda r: r["store"]["files"])) for v in (1, 2)}
    lay = lambda v: next(x for x in big["res"][v]["reading"]["layouts"] if x["world"] == W and x["workers"] == 1)  # noqa: E731
    rho1 = lay(1)["decodes_mean"] / lay(1)["n_shards"]
    bpt64 = k64[2]["store"]["bytes_per_token"]
    models = {
        "manifest_v1": f"{m1[0]:.0f} + {m1[1]:.0f} B x shards (shards = N / 2^18; fit over the v1 stores)",
        "manifest_v2": f"constant {max(col(2, lambda r: r['store']['manifest_bytes']))} B (largest measured)",
        "index_first_use_v2": f"{ix2[0]:.0f} + {ix2[1]:.1f} B x shards (shards.parquet + files.parquet; shards = N / 2^19)",
        "sequences_index_v2": f"{sq2[0]:.0f} + {sq2[1]:.2f} B x sequences (read only to join stores of different data)",
        "v1_opens": "manifest_v1 <= 256 MiB",
        "startup_rss": {v: f"peak RSS {rss[v][0] / 1e6:.1f} MB + {rss[v][1]:.1f} B x sequences (fit over the seq_len-2048 stores, "
                           f"W = 8 rank 0: slope of the RSS growth during construction, fixed part = mean of peak - slope x sequences)" for v in (1, 2)},
        "fetched_W64_v1": f"every rank decodes every shard {rho1:.2f} times on average (measured at {big['name']}): {W * rho1:.1f} x store / W",
        "fetched_W64_v2": "a rank's stream is N/W tokens of the shard-shuffled list: mean 1 + W x 2^19 / N, max <= 1 + 2 W x 2^19 / N (x store / W)",
        "store_bytes_k64": f"{bpt64:.1f} B/token (measured v2 store, 10^6 tokens, k = 64)",
        "objects": {v: f"{files[v][0]:.0f} + {files[v][1]:.2f} x shards" for v in (1, 2)},
    }
    rows = []
    for N in (10**10, 10**11):
        s1, s2, nseq = -(-N // SHARD_TOKENS[1]), -(-N // SHARD_TOKENS[2]), N // 2048
        man1 = m1[0] + m1[1] * s1
        x = W * SHARD_TOKENS[2] / N
        store = N * bpt64
        for v in (1, 2):
            opens = v == 2 or man1 <= 256 * MiB
            fetched = W * rho1 if v == 1 else 1 + x
            rows.append({"tokens": f"{N:.0e}", "ver": f"v{v}", "shards": s1 if v == 1 else s2,
                         "manifest MB": (man1 if v == 1 else max(col(2, lambda r: r["store"]["manifest_bytes"]))) / 1e6,
                         "opens": "yes" if opens else "cannot open", "index MB (1st use)": None if v == 1 else (ix2[0] + ix2[1] * s2) / 1e6,
                         "start-up RSS MB": (rss[v][0] + rss[v][1] * nseq) / 1e6 if opens else None,
                         "fetched/rank x(store/W) mean": fetched if opens else None, "max": (fetched if v == 1 else 1 + 2 * x) if opens else None,
                         "k=64 store TB": store / 1e12, "k=64 fetched/rank GB": (fetched * store / W / 1e9) if opens else None,
                         "k=64 target GB": (1.1 * store / W + SHARD_TOKENS[2] * bpt64) / 1e9,
                         "objects": files[v][0] + files[v][1] * (s1 if v == 1 else s2)})
    out = {"rows": rows, "models": models, "fits": {"manifest_v1": m1, "index_v2": ix2, "sequences_v2": sq2, "startup_rss": rss, "startup_delta": delta,
                                                    "objects": files, "rho_v1": rho1, "bytes_per_token_k64": bpt64}}
    if small:
        smp = small["res"][1]["store"]
        out["small_v1_manifest_bytes"] = m1[0] + (smp["manifest_bytes"] - m1[0]) / smp["n_shards"] * small["tokens"] / 64
    return out


def reading_rows(specs: list[dict]) -> list[dict]:
    rows = []
    for s in specs:
        for v in (1, 2):
            for x in s["res"][v].get("reading", {}).get("layouts", []):
                W, unit = x["world"], x["store_bytes"] / x["world"]
                rows.append({"store": s["name"], "ver": f"v{v}", "W": W, "nw": x["workers"], "shards": x["n_shards"],
                             "decodes/rank mean": x["decodes_mean"], "max": x["decodes_max"], "max of 1 shard": x["max_decodes_one_shard"],
                             "fetched MB mean": x["bytes_mean"] / 1e6, "fetched MB max": x["bytes_max"] / 1e6,
                             "x(store/W) mean": x["bytes_mean"] / unit, "max ": x["bytes_max"] / unit,
                             "target x(store/W)": 1.1 + x["shard_bytes_max"] / unit, "sim s": x["seconds"]})
    return rows


def open_rows(specs: list[dict]) -> list[dict]:
    rows = []
    for s in specs:
        for v in (1, 2):
            r = s["res"][v]
            st, op, su = r["store"], r["open"], r.get("startup", {})
            sample = v == 1 and s["kind"] == "small"
            rows.append({"store": s["name"] + (f" (v1 sample {st['n_shards']:,} shards)" if sample else ""), "ver": f"v{v}",
                         "tokens": s.get("sample_tokens_v1", s["tokens"]) if v == 1 else s["tokens"], "shards": st["n_shards"],
                         "B/token": st["bytes_per_token"], "write tok/s": r["write"]["tokens"] / r["write"]["seconds"],
                         "manifest B": st["manifest_bytes"], "index B 1st use": op["index_bytes"] if v == 2 else None,
                         "open+index s": op["open_s"] + op["index_s"], "+pandas s": op["pandas_import_s"] or None,
                         "open RSS MiB": op["rss_kb"] / 1024, "+base": op["rss_over_kb"] / 1024, "open delta MiB": op["rss_delta_kb"] / 1024,
                         "start-up s": su.get("startup_s"), "+plan s": su.get("plan_s"), "start-up RSS MiB": su["rss_kb"] / 1024 if su else None,
                         "+base ": su["rss_over_kb"] / 1024 if su else None, "delta B/seq": su.get("delta_bytes_per_seq"),
                         "heap B/seq": su.get("heap_bytes_per_seq"),
                         "start-up read MB": su["bytes_read"] / 1e6 if su else None, "files/1e9 tok": st["per_1e9_tokens"]})
    return rows


def targets(specs: list[dict], ext: dict, base: dict) -> list[dict]:
    out = []

    def add(name: str, ok, detail: str, info: bool = False) -> None:
        out.append({"target": name, "pass": bool(ok), "info": info, "detail": detail})

    for s in specs:
        r = s["res"][2]
        if s["kind"] == "small":
            op = r["open"]
            t = op["open_s"] + op["index_s"] + op["pandas_import_s"]
            add(f"v2 open <= 1 s ({s['name']})", t <= 1, f"{t:.3f} s: manifest {op['open_s']:.4f} s + index {op['index_s']:.3f} s "
                f"+ the pandas import pyarrow makes on the first index read {op['pandas_import_s']:.3f} s")
            add(f"v2 open <= 100 MB peak RSS ({s['name']})", op["rss_kb"] * 1024 <= 100e6,
                f"{op['rss_kb'] * 1024 / 1e6:.1f} MB peak = {base[2]['reader'] * 1024 / 1e6:.1f} MB imports + "
                f"{(op['rss_before_kb'] - base[2]['reader']) * 1024 / 1e6:.1f} MB pandas + {op['rss_delta_kb'] * 1024 / 1e6:.1f} MB open "
                f"(heap peak {op['traced_peak_bytes'] / 1e6:.1f} MB)")
            add(f"v2 open <= 100 MB RSS over the imports baseline ({s['name']})", op["rss_over_kb"] * 1024 <= 100e6,
                f"{op['rss_over_kb'] * 1024 / 1e6:.1f} MB", info=True)
        if "startup" in r:
            su = r["startup"]
            add(f"v2 start-up <= 32 B/sequence ({s['name']}, all of the growth / sequences)", su["delta_bytes_per_seq"] <= 32,
                f"RSS grew {su['rss_delta_kb'] / 1024:.1f} MiB = {su['delta_bytes_per_seq']:.1f} B/seq over {su['n_sequences']:,} sequences "
                f"(Python/numpy heap peak {su['heap_bytes_per_seq']:.1f} B/seq; {su['rss_over_kb'] / 1024:.1f} MiB over the bare imports)", info=True)
        for x in r.get("reading", {}).get("layouts", []):
            bound = 1.1 * x["store_bytes"] / x["world"] + x["shard_bytes_max"]
            where = f"{s['name']}, W={x['world']}, nw={x['workers']}"
            add(f"v2 fetched/rank/epoch <= 1.1 store/W + 1 shard ({where})", x["bytes_max"] <= bound,
                f"max {x['bytes_max'] / 1e6:.2f} MB, mean {x['bytes_mean'] / 1e6:.2f} MB, bound {bound / 1e6:.2f} MB", info=x["workers"] > 1)
            add(f"v2 each shard decoded at most once per rank per epoch ({where})", x["max_decodes_one_shard"] <= 1,
                f"most decodes of one shard by one rank: {x['max_decodes_one_shard']}", info=x["workers"] > 1)
    (a, slope), big = ext["fits"]["startup_delta"][2], max((s for s in specs if s["kind"] == "std"), key=lambda s: s["tokens"])
    add("v2 start-up <= 32 B RSS/sequence over baseline (marginal: slope of RSS growth over the seq_len-2048 stores)", slope <= 32,
        f"{slope:.1f} B/seq (+ {a / 1e6:.1f} MB fixed: pyarrow's first Parquet read)")
    heap = big["res"][2]["startup"]["heap_bytes_per_seq"]
    add(f"v2 start-up <= 32 B/sequence of Python/numpy heap (tracemalloc peak, {big['name']})", heap <= 32, f"{heap:.1f} B/seq")
    for row in ext["rows"]:
        if row["ver"] == "v2":
            add(f"v2 k=64 fetched/rank/epoch (model max, W=64) <= 1.1 store/W + 1 shard at {row['tokens']} tokens",
                row["max"] * row["k=64 store TB"] * 1e12 / 64 <= row["k=64 target GB"] * 1e9,
                f"{row['max'] * row['k=64 store TB'] * 1e3 / 64:.1f} GB <= {row['k=64 target GB']:.1f} GB")
    return out


def machine() -> dict:
    cpu = platform.processor()
    if not cpu and Path("/proc/cpuinfo").exists():
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")), "")
    return {"processor": platform.processor(), "cpu": cpu or platform.machine(), "cores": os.cpu_count(),
            "ram_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, "python": platform.python_version()}


def report(specs: list[dict], ext: dict, tgts: list[dict], base: dict) -> None:
    print("\nOpening a store and starting a training reader (W = 8, rank 0; fresh process each; RSS in MiB, '+base' = over the imports baseline)")
    print_table(open_rows(specs))
    print("\nReading per rank per epoch (batch 8; v2: plan + real ShardCache, v1: old rank_batches + 4-shard LRU)")
    print_table(reading_rows(specs))
    print("\nExtrapolation (seq_len 2048, one teacher, each version's default shard size, W = 64)")
    print_table(ext["rows"])
    print("models:")
    for k, m in ext["models"].items():
        print(f"  {k}: {m}")
    if "small_v1_manifest_bytes" in ext:
        print(f"  v1 manifest of the small-shard store (extrapolated from its sample): {ext['small_v1_manifest_bytes'] / 1e6:,.0f} MB "
              f"-> {'cannot open' if ext['small_v1_manifest_bytes'] > 256 * MiB else 'opens'} (cap 256 MiB)")
    print(f"baselines (KiB): {base}")
    for n in NOTES:
        print(f"note: {n}")
    print()
    for t in tgts:
        print(f"{'INFO' if t['info'] else 'PASS' if t['pass'] else 'FAIL'}{'(' + ('pass' if t['pass'] else 'fail') + ')' if t['info'] else ''}"
              f"  {t['target']}: {t['detail']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="10^6 and 10^7 tokens and 10^4 small shards (a few minutes)")
    ap.add_argument("--sizes", help="comma-separated token counts of the seq_len-2048 stores (default 1e6,1e7,1e8)")
    ap.add_argument("--k", type=int, default=8, help="top-k of the synthetic teacher (default 8)")
    ap.add_argument("--small-shards", type=int, help="shards of the one-sequence-per-shard store (default 10^5, quick 10^4; 0: none)")
    ap.add_argument("--keep", action="store_true", help="keep the stores (default: deleted at the end)")
    ap.add_argument("--work", help="directory for the stores (default: a new temporary directory)")
    ap.add_argument("--out", default=str(ROOT / "tools" / "results" / ("bench_scale.json")))
    args = ap.parse_args()
    args.sizes = [int(float(x)) for x in (args.sizes or ("1e6,1e7" if args.quick else "1e6,1e7,1e8")).split(",")]
    if args.small_shards is None:
        args.small_shards = 10**4 if args.quick else 10**5
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_scale-"))
    t0 = time.perf_counter()
    try:
        run = Runner(work)
        specs = store_specs(args)
        write_stores(run, specs, work)
        base = {v: {"reader": run(v, "imports")["rss_kb"], "trainer": run(v, "imports", trainer=True)["rss_kb"],
                    "reader+pandas": run(v, "imports", pandas=True)["rss_kb"]} for v in (1, 2)}
        std = sorted((s for s in specs if s["kind"] == "std"), key=lambda s: s["tokens"])
        verify = {(s["name"], 2) for s in std if s["tokens"] <= 10**7} | ({(std[0]["name"], 1)} if std else set())
        for s in specs:
            measure(run, s, base, verify)
        ext = extrapolate(specs)
        tgts = targets(specs, ext, base)
        report(specs, ext, tgts, base)
        write_json(Path(args.out), {
            "machine": machine(), "args": vars(args), "notes": NOTES, "old_code": OLD, "seconds": time.perf_counter() - t0, "baseline_rss_kb": base, "probe_retries": run.retries,
            "stores": [{k: v for k, v in s.items() if k not in ("url", "write")} for s in specs],
            "open_rows": open_rows(specs), "reading_rows": reading_rows(specs), "extrapolation": ext, "targets": tgts})
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    log(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
