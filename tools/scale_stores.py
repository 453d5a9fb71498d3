"""Synthetic LM-like stores and the probes of ``tools/bench_scale.py``, run as subprocesses so that
the same script writes and reads a store with the current code (format version 2) or with the
previous code (commit d886d25, format version 1) on ``PYTHONPATH``:

    python tools/scale_stores.py MODE 'JSON ARGS'      # prints one JSON line (the result) last

Data (the same for both versions: generated in blocks of ``GEN_TOKENS`` tokens, each from
``default_rng([seed, block])``, independent of the shard size):

- input ids: Zipf(1.2) frequency ranks over V = 49,152, mapped to ids by a fixed permutation;
- per position a teacher with a Zipf-like softmax ``p_i ~ i^-a`` over the whole vocabulary, ``a``
  uniform in [1.15, 2.8] per position (mean top-8 mass ~0.85, mean entropy ~2.2 nats, computed
  exactly over V), log-probs jittered down by |N(0, 0.05)| and re-sorted; the top-k ids are
  distinct frequency ranks ``r0 + cumsum(gaps)`` (``r0`` ~ Zipf(1.3), gaps 1 + Zipf(1.6));
  ``tail_mass = 1 - sum(p_topk)``; ``gold_logprob`` is the log-prob of a token drawn from the
  top-k + tail distribution.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time

import numpy as np

V = 49152
GEN_TOKENS = 1 << 17
A_LO, A_HI = 1.2, 2.9


class Synth:
    """Deterministic synthetic sequences ``[a, b)`` of a store of ``n_tokens`` tokens."""

    def __init__(self, n_tokens: int, seq_len: int, k: int, seed: int = 0):
        self.L, self.k, self.seed = seq_len, k, seed
        self.n_seq = math.ceil(n_tokens / seq_len)
        self.last_len = n_tokens - (self.n_seq - 1) * seq_len
        self.block = max(1, GEN_TOKENS // seq_len)
        self.perm = np.random.default_rng([seed, 977]).permutation(V)
        logi = np.log(np.arange(1, V + 1, dtype=np.float64))
        self.grid = np.linspace(A_LO, A_HI, 166)
        w = np.exp(-self.grid[:, None] * logi[None, :])
        z = w.sum(1)
        self.log_z = np.log(z)
        self.ent = ((w / z[:, None]) * (self.grid[:, None] * logi[None, :] + self.log_z[:, None])).sum(1)
        self.logk = logi[:k]
        self._cached: tuple[int, dict] | None = None

    def lengths(self, a: int, b: int) -> np.ndarray:
        out = np.full(b - a, self.L, np.uint32)
        if b == self.n_seq:
            out[-1] = self.last_len
        return out

    def _block(self, blk: int) -> dict:
        if self._cached and self._cached[0] == blk:
            return self._cached[1]
        rng = np.random.default_rng([self.seed, blk])
        n = min(self.block, self.n_seq - blk * self.block)
        L, k = self.L, self.k
        inp = self.perm[(rng.zipf(1.2, (n, L)) - 1) % V].astype(np.uint16)
        r0 = (rng.zipf(1.3, (n, L, 1)) - 1) % (V // 2)
        gaps = 1 + (rng.zipf(1.6, (n, L, k - 1)) - 1) % (V // (2 * k))
        ranks = np.concatenate([r0, r0 + np.cumsum(gaps, -1)], -1)
        a = rng.uniform(A_LO, A_HI, (n, L))
        lp = -a[..., None] * self.logk - np.interp(a, self.grid, self.log_z)[..., None]
        lp = -np.sort(-(lp - np.abs(rng.normal(0, 0.05, lp.shape))), -1)
        p = np.exp(lp)
        tail = np.clip(1.0 - p.sum(-1), 0.0, 1.0)
        cum = np.cumsum(p, -1)
        pick = (rng.random((n, L))[..., None] > cum).sum(-1)
        gold = np.where(pick < k, np.take_along_axis(lp, np.minimum(pick, k - 1)[..., None], -1)[..., 0],
                        np.log(np.maximum(tail, 1e-30) / (V - k)))
        d = {"input_ids": inp, "ids": self.perm[ranks].astype(np.int64), "logprobs": lp.astype(np.float32),
             "tail_mass": tail.astype(np.float32), "gold_logprob": gold.astype(np.float32),
             "entropy": np.interp(a, self.grid, self.ent).astype(np.float32)}
        self._cached = (blk, d)
        return d

    def rows(self, a: int, b: int) -> dict:
        """Inputs and teacher outputs of sequences ``[a, b)``; padding positions are zeros."""
        parts = []
        for blk in range(a // self.block, (b - 1) // self.block + 1):
            lo = blk * self.block
            d = self._block(blk)
            parts.append({n: v[max(a, lo) - lo:min(b, lo + self.block) - lo] for n, v in d.items()})
        out = {n: np.concatenate([p[n] for p in parts]) if len(parts) > 1 else parts[0][n].copy() for n in parts[0]}
        lens = self.lengths(a, b)
        pad = np.arange(self.L)[None, :] >= lens[:, None]
        for n, v in out.items():
            v[pad] = 0
        out["length"] = lens
        return out


# ---------------------------------------------------------------------------------- writing
def _plan(cfg: dict, S: int, n_seq: int) -> dict:
    from logitstore.format.codec import Encoding
    from logitstore.format.manifest import FORMAT_NAME

    fp = "synthetic-zipf-v%d" % V
    return {"format": FORMAT_NAME, "format_version": 2, "backend": "zarr", "encoding": Encoding("compact").to_dict(),
            "seq_len": cfg["seq_len"], "packed": True, "bos": False, "shard_sequences": S,
            "n_sequences": n_seq, "n_tokens": cfg["tokens"],
            "tokenizer": {"fingerprint": fp, "vocab_size": V, "eos_token_id": 0, "pad_token_id": 0},
            "data": {"fingerprint": f"synthetic-seed{cfg['seed']}-{cfg['tokens']}-{cfg['seq_len']}", "source": {"path": "synthetic"},
                     "max_tokens": None},
            "teachers": [{"name": "zipf", "source": "synthetic", "revision": None, "weights_hash": None,
                          "tokenizer_fingerprint": fp, "dtype": "fp32", "k": cfg["k"], "part": "t0"}]}


def write(cfg: dict) -> dict:
    """Write shards ``rank, rank + world, ...`` of a store (``cfg``: out, tokens, seq_len,
    shard_seqs, k, seed, rank, world); rank 0 writes the plan first, ``finish`` the manifest."""
    from logitstore.format.codec import Encoding
    from logitstore.format.commit import CHUNK_TOKENS, check_or_write_plan
    from logitstore.format.hashing import sequence_hashes
    from logitstore.format.writer import PartWriter, encode_teacher_part
    from logitstore.storage.fsio import StoreFS

    syn = Synth(cfg["tokens"], cfg["seq_len"], cfg["k"], cfg["seed"])
    S, L = cfg["shard_seqs"], cfg["seq_len"]
    n_shards = math.ceil(syn.n_seq / S)
    fs = StoreFS(cfg["out"])
    check_or_write_plan(fs, _plan(cfg, S, syn.n_seq), cfg["out"])
    pw = PartWriter(fs, "zarr", chunk_rows=max(1, CHUNK_TOKENS // L))
    enc = Encoding("compact")
    t0 = last = time.perf_counter()
    done = 0
    mine = list(range(cfg.get("rank", 0), n_shards, cfg.get("world", 1)))
    for i, j in enumerate(mine):
        ts = time.perf_counter()
        a, b = j * S, min(syn.n_seq, (j + 1) * S)
        d = syn.rows(a, b)
        ids, lens = d["input_ids"], d["length"]
        pw.write(j, "inputs", {"input_ids": ids, "length": lens, "seq_hash": sequence_hashes(ids, lens)},
                 {"start": a, "n_sequences": b - a, "n_tokens": int(lens.sum())})
        valid = np.arange(L)[None, :] < lens[:, None]
        stats = {"n_positions": int(valid.sum()), "sum_tail_mass": float(d["tail_mass"][valid].sum(dtype=np.float64)),
                 "sum_entropy": float(d["entropy"][valid].sum(dtype=np.float64)), "forward_seconds": 0.0,
                 "wall_seconds": time.perf_counter() - ts, "config_hash": None, "model_type": "synthetic-zipf",
                 "model_vocab_size": V, "n_parameters": 0}
        pw.write(j, "t0", encode_teacher_part(enc, V, d), {"stats": stats})
        done += int(lens.sum())
        now = time.perf_counter()
        if now - last > 15 or i == len(mine) - 1:
            last = now
            print(f"  {cfg['tag']}: {i + 1}/{len(mine)} shards, {done / (now - t0):,.0f} tokens/s", file=sys.stderr, flush=True)
    return {"tokens": done, "seconds": time.perf_counter() - t0, "n_shards": n_shards}


def finish(cfg: dict) -> dict:
    from logitstore.format.commit import build_manifest
    from logitstore.format.manifest import MANIFEST, dumps
    from logitstore.storage.fsio import StoreFS

    syn_n = math.ceil(cfg["tokens"] / cfg["seq_len"])
    fs = StoreFS(cfg["out"])
    t0 = time.perf_counter()
    plan = json.loads(fs.read("plan.json"))
    manifest = build_manifest(fs, plan, math.ceil(syn_n / cfg["shard_seqs"]), {"synthetic": True})
    fs.write_atomic(MANIFEST, dumps(manifest))
    return {"manifest_seconds": time.perf_counter() - t0}


def write_pool(cfg: dict) -> dict:
    """A store of one-sequence shards: every inputs part is its own sequence, encoded and committed by
    the real writer; the teacher parts are ``cfg["pool"]`` distinct encoded parts (real codec and
    backend) reused round-robin, committed by the real ``PartWriter.write_files``: encoding a tiny
    zarr part costs 7-20 ms of fixed overhead, too slow for 10^5 teacher parts here."""
    from logitstore.format import writer
    from logitstore.format.codec import Encoding
    from logitstore.format.commit import CHUNK_TOKENS, check_or_write_plan
    from logitstore.format.hashing import sequence_hashes
    from logitstore.storage.fsio import StoreFS

    L, P = cfg["seq_len"], cfg["pool"]
    n_shards = math.ceil(cfg["tokens"] / L)
    syn = Synth(cfg["tokens"], L, cfg["k"], cfg["seed"])
    fs = StoreFS(cfg["out"])
    check_or_write_plan(fs, _plan(cfg, 1, n_shards), cfg["out"])
    pw = writer.PartWriter(fs, "zarr", chunk_rows=max(1, CHUNK_TOKENS // L))
    enc, pool = Encoding("compact"), {}
    t0 = last = time.perf_counter()
    mine = list(range(cfg.get("rank", 0), n_shards, cfg.get("world", 1)))
    for i, j in enumerate(mine):
        d = syn.rows(j, j + 1)
        pw.write(j, "inputs", {"input_ids": d["input_ids"], "length": d["length"], "seq_hash": sequence_hashes(d["input_ids"], d["length"])},
                 {"start": j, "n_sequences": 1, "n_tokens": int(d["length"].sum())})
        p = j % P
        if p not in pool:
            stats = {"n_positions": L, "sum_tail_mass": float(d["tail_mass"].sum(dtype=np.float64)),
                     "sum_entropy": float(d["entropy"].sum(dtype=np.float64)), "forward_seconds": 0.0, "wall_seconds": 0.0,
                     "config_hash": None, "model_type": "synthetic-zipf", "model_vocab_size": V, "n_parameters": 0}
            pool[p] = (pw.backend.encode_part(writer.encode_teacher_part(enc, V, d), pw.chunk_rows), stats)
        pw.write_files(j, "t0", pool[p][0], {"stats": pool[p][1]})
        now = time.perf_counter()
        if now - last > 15 or i == len(mine) - 1:
            last = now
            print(f"  {cfg['tag']}: {i + 1}/{len(mine)} shards, {(i + 1) * L / (now - t0):,.0f} tokens/s", file=sys.stderr, flush=True)
    return {"tokens": len(mine) * L, "seconds": time.perf_counter() - t0, "n_shards": n_shards}


# ---------------------------------------------------------------------------------- probes
def _rss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _count_reads() -> dict:
    """Bytes returned by every ``StoreFS.read``, per path inside the store (all threads)."""
    from logitstore.storage.fsio import StoreFS

    reads: dict[str, int] = {}
    orig = StoreFS.read

    def read(self, rel, *a, **kw):
        data = orig(self, rel, *a, **kw)
        reads[rel] = reads.get(rel, 0) + len(data)
        return data

    StoreFS.read = read
    return reads


def imports(cfg: dict) -> dict:
    """Baseline: the interpreter and the modules a reader (``trainer``: a training reader) imports."""
    import logitstore  # noqa: F401
    import logitstore.format.reader  # noqa: F401
    import logitstore.format.backends.arrow_backend  # noqa: F401  (pyarrow: v2 index files)
    import logitstore.format.backends.zarr_backend  # noqa: F401
    if cfg.get("trainer"):
        import trainer.data  # noqa: F401
    if cfg.get("pandas"):  # what pyarrow imports on its first numpy conversion (reading an index file)
        import pandas  # noqa: F401
    return {"rss_kb": _rss_kb()}


def _fixed_imports() -> float:
    """Seconds spent importing what the reader would import lazily before the measured step. The
    reader's Parquet path no longer imports pandas (it maps Arrow buffers to numpy itself), so
    there is nothing to import: 0. Kept so the JSON keeps its field."""
    return 0.0


def _measured(cfg: dict, step) -> dict:
    """Run ``step()`` -> dict; add its RSS growth (peak after - peak before, same process) and,
    with ``cfg["trace"]``, the peak of Python and numpy allocations during it (tracemalloc)."""
    out = {"pandas_import_s": _fixed_imports(), "rss_before_kb": _rss_kb()}
    if cfg.get("trace"):
        import tracemalloc

        tracemalloc.start()
        got = step()
        out["traced_peak_bytes"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    else:
        got = step()
    out.update(got, rss_kb=_rss_kb())
    out["rss_delta_kb"] = out["rss_kb"] - out["rss_before_kb"]
    return out


def open_store(cfg: dict) -> dict:
    imports({})
    import logitstore

    reads = _count_reads()

    def step() -> dict:
        t0 = time.perf_counter()
        store = logitstore.open(cfg["url"])
        t_open = time.perf_counter() - t0
        n = len(store)
        t1 = time.perf_counter()
        shards = len(store.index)
        return {"open_s": t_open, "index_s": time.perf_counter() - t1, "n_sequences": n, "n_shards": shards}

    out = _measured(cfg, step)
    return {**out, "manifest_bytes": reads.get("manifest.json", 0), "index_bytes": sum(v for k, v in reads.items() if k.startswith("index/")),
            "bytes_read": sum(reads.values()), "logitstore": __import__("logitstore").__file__}


def startup(cfg: dict) -> dict:
    imports({"trainer": True})
    from trainer.data import DistillDataset

    reads = _count_reads()

    def step() -> dict:
        t0 = time.perf_counter()
        ds = DistillDataset([cfg["url"]], batch_size=8, rank=0, world_size=cfg["world"])
        t1 = time.perf_counter()
        steps = ds.batches_per_epoch()  # what a trainer asks next: plans the epoch (the index, if not read yet)
        return {"startup_s": t1 - t0, "plan_s": time.perf_counter() - t1, "n_sequences": ds.n, "steps": steps}

    return {**_measured(cfg, step), "bytes_read": sum(reads.values())}


def _shard_bytes(store) -> np.ndarray:
    """Bytes of all parts of each shard (what a decode of the shard fetches)."""
    parts = ["inputs"] + [t["part"] for t in store.manifest["teachers"]]
    return np.array([sum(m["bytes"] for p in parts for m in store.index.files(j, p).values()) for j in range(store.n_shards)], np.int64)


def _summary(per_rank: list[dict], pb: np.ndarray) -> dict:
    dec = [sum(r.values()) for r in per_rank]
    fetched = [sum(n * int(pb[j]) for j, n in r.items()) for r in per_rank]
    return {"decodes_mean": float(np.mean(dec)), "decodes_max": int(max(dec)), "bytes_mean": float(np.mean(fetched)),
            "bytes_max": int(max(fetched)), "max_decodes_one_shard": int(max(max(r.values(), default=0) for r in per_rank))}


class _Counting:
    """Stands in for a store in the real ``ShardCache``: counts decodes, decodes nothing."""

    def __init__(self, index):
        self.index = index

    def decode_shard(self, j, teachers=None):
        return {}

    load_shard = decode_shard


def plan_v2(ds) -> dict:
    """Decodes per shard of this rank (all workers), from the plan through the real ShardCache."""
    from trainer.shard_cache import ShardCache

    ix, counts, touched = ds.stores[0].index, {}, 0
    for w in range(max(1, ds.num_workers)):
        idx, _ = ds.worker_batches(ds.epoch, w)
        rows = np.concatenate(idx) if idx else np.zeros(0, np.int64)
        cache = ShardCache(_Counting(ix), rows, ["zipf"])  # the primary store's cache, as DistillDataset builds it
        for i in rows.tolist():
            cache.row(i)
        ds.peak_resident = max(getattr(ds, "peak_resident", 0), cache.max_shards)
        touched += len(np.unique(ix.shards_of(rows)))
        for j, n in cache.decodes.items():
            counts[j] = counts.get(j, 0) + n
    assert sum(counts.values()) == touched, "ShardCache decoded a shard twice in one worker"
    return counts


def lru_v1(ds, size: int = 4) -> dict:
    """The old reader's LRU of ``size`` decoded shards over this rank's rows (``rank_batches``)."""
    from collections import OrderedDict

    batches, _ = ds.rank_batches(ds.epoch)
    rows = np.concatenate(batches) if batches else np.zeros(0, np.int64)
    lru, counts = OrderedDict(), {}
    for j in ds.stores[0].index.shards_of(rows).tolist():
        if j in lru:
            lru.move_to_end(j)
            continue
        counts[j] = counts.get(j, 0) + 1
        lru[j] = True
        while len(lru) > size:
            lru.popitem(last=False)
    return counts


def decodes(cfg: dict) -> dict:
    """Per layout ``(W, nw)``: decodes and bytes fetched per rank per epoch, mean and max over the W
    ranks (v2: a dataset per rank, counted from its plan; v1: one dataset whose ``rank`` is set to
    each rank in turn, since the old constructor reads every inputs part)."""
    imports({"trainer": True})
    from trainer.data import DistillDataset

    v2, url, out = cfg["version"] == 2, cfg["url"], {"layouts": []}
    for W, nw in cfg["layouts"]:
        t0, ds, per_rank, resident = time.perf_counter(), None, [], 0
        for r in range(W):
            if v2 or ds is None:
                ds = DistillDataset([url], batch_size=8, rank=r, world_size=W, num_workers=nw)
            ds.rank = r
            per_rank.append(plan_v2(ds) if v2 else lru_v1(ds))
            resident = max(resident, getattr(ds, "peak_resident", 4))
        pb = _shard_bytes(ds.stores[0])
        out["layouts"].append({"world": W, "workers": nw, **_summary(per_rank, pb), "store_bytes": int(pb.sum()),
                               "shard_bytes_max": int(pb.max()), "n_shards": len(pb), "seconds": time.perf_counter() - t0,
                               "decoded_at_once_max": resident,
                               # rank 0's decodes per shard, for stores small enough to list them (the JSON stays small)
                               "rank0": {str(j): n for j, n in sorted(per_rank[0].items())} if len(per_rank[0]) <= 1000 else None})
    if cfg.get("verify"):
        out["verify"] = verify(cfg, v2)
    out["rss_kb"] = _rss_kb()
    return out


def verify(cfg: dict, v2: bool) -> dict:
    """Iterate rank 0 of W = 8 (one worker, in-process) for real and compare its decodes and bytes
    read with the simulation."""
    from trainer.data import DistillDataset

    ds = DistillDataset([cfg["url"]], batch_size=8, rank=0, world_size=8, num_workers=1)
    sim = plan_v2(ds) if v2 else lru_v1(ds)
    store, real = ds.stores[0], {}
    if not v2:
        orig = store.load_shard

        def load_shard(shard, teachers=None):
            if (shard, tuple(store.teachers if teachers is None else teachers)) not in store._cache:
                real[shard] = real.get(shard, 0) + 1
            return orig(shard, teachers)

        store.load_shard = load_shard
    reads = _count_reads()
    t0 = time.perf_counter()
    n_batches = len(list(ds))
    seconds = time.perf_counter() - t0
    if v2:
        real = {j: n for (si, j), n in ds.decodes.items()}
    pb = _shard_bytes(store)
    sim_bytes = sum(n * int(pb[j]) for j, n in sim.items())
    real_bytes = sum(v for k, v in reads.items() if k.startswith("shards/"))
    assert real == sim, f"decodes differ: real {real} vs simulated {sim}"
    assert real_bytes == sim_bytes, f"bytes read differ: real {real_bytes} vs simulated {sim_bytes}"
    return {"batches": n_batches, "seconds": seconds, "decodes": sum(real.values()), "shards": len(real), "bytes": real_bytes,
            "agree": True}


if __name__ == "__main__":
    result = globals()[sys.argv[1]](json.loads(sys.argv[2]))
    print(json.dumps(result))
