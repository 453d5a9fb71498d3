"""The writer's commit protocol, shared by ``dump`` and the tools that derive stores.

A store is written in three stages, each visible to a reader only when it is whole:

1. ``plan.json`` (:func:`check_or_write_plan`): the manifest's header, written before any data, so a
   re-run with different settings into the same directory is refused rather than mixed in;
2. parts (:class:`~logitstore.format.writer.PartWriter`): each written under a temporary name and
   committed by its ``commit.json``;
3. ``manifest.json`` (:func:`build_manifest`): assembled from every part's commit record and
   written last; its presence is what makes the directory a store (see FORMAT.md).
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from logitstore.version import __version__
from logitstore.errors import ConfigError, FormatError, LogitStoreError
from logitstore.format import layout
from logitstore.format.backends import get_backend
from logitstore.format.hashing import SEQ_HASH_BYTES
from logitstore.format.index_files import write_index
from logitstore.format.manifest import MODEL_FIELDS, PLAN, dumps, validate_manifest, written_version
from logitstore.storage.fsio import StoreFS
from logitstore.storage.lock import LOCK

#: rows of a chunk hold about this many tokens (``chunk_rows = CHUNK_TOKENS // seq_len``)
CHUNK_TOKENS = 1 << 15


def check_or_write_plan(fs: StoreFS, plan: dict, out: str) -> bool:
    """Refuse to mix settings in one store; return True if the store was already started."""
    if fs.exists(PLAN):
        try:
            old = json.loads(fs.read(PLAN))
        except ValueError:
            raise FormatError(f"{out}/{PLAN}: not valid JSON; remove the store or choose another --out") from None
        if isinstance(old, dict):  # a plan written before "bos" existed holds no BOS
            old, plan = {"bos": False, **old}, {"bos": False, **plan}
        if old != plan:
            diff = plan_differences(old, plan)
            hint = f" (it was dumped with --bos {'always' if old.get('bos') else 'never'})" if old.get("bos") != plan.get("bos") else ""
            enc = old.get("encoding") if isinstance(old.get("encoding"), dict) else {}
            if enc.get("name") == "compact" and enc != plan.get("encoding"):  # e.g. a store begun before the companded default
                hint += (f" (it was dumped with --codebook {enc.get('codebook', 'uniform')} "
                         f"--value-bits {enc.get('value_bits', 7)})")
            shown = "; ".join(diff[:3]) + (f"; and {len(diff) - 3} more" if len(diff) > 3 else "")
            raise ConfigError(f"--out {out}: holds a store made with different settings ({shown}){hint}; "
                              f"choose another --out or remove it")
        return True
    refuse_foreign(fs, out)
    fs.write_atomic(PLAN, dumps(plan))
    return False


def refuse_foreign(fs: StoreFS, out: str) -> None:
    """Refuse an ``--out`` that holds something other than a (started) store."""
    if not fs.exists(PLAN) and fs.exists() and [n for n in fs.ls("") if n != LOCK]:
        raise ConfigError(f"--out {out}: exists, is not empty and is not a logitstore store; choose another --out")


def plan_differences(old, new, where: str = "") -> list[str]:
    """What differs between two plans, as ``path: old -> new`` (``teachers[0].k: 8 -> 16``)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += plan_differences(old.get(key), new.get(key), f"{where}.{key}" if where else str(key))
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in plan_differences(a, b, f"{where}[{i}]")]
    if old == new:
        return []

    def short(v) -> str:
        r = json.dumps(v) if not isinstance(v, str) else v
        return r if len(r) <= 40 else r[:16] + "..." + r[-8:]

    if isinstance(old, list) and isinstance(new, list):
        return [f"{where}: {len(old)} -> {len(new)} entries"]
    return [f"{where}: {short(old)} -> {short(new)}"]


def read_commits(fs: StoreFS, n_shards: int, parts: list[str], out: str | None = None) -> list[dict]:
    """The commit records of every part of shards ``0 .. n_shards - 1``, as ``[{part: record}]``,
    read on 16 threads (an object store answers each request in tens of milliseconds); a missing
    part fails naming it."""
    rels = [layout.commit_path(j, p) for j in range(n_shards) for p in parts]

    def get(rel: str) -> dict | None:
        if not fs.exists(rel):
            return None
        rec = json.loads(fs.read(rel))
        if isinstance(rec.get("sequences"), dict):  # numpy at once: 20 bytes per sequence, not hex and int lists
            seq = rec["sequences"]
            rec["sequences"] = (np.frombuffer(bytes.fromhex(seq["seq_hash"]), np.uint8).reshape(-1, SEQ_HASH_BYTES),
                                np.asarray(seq["length"], np.uint32))
        return rec

    with ThreadPoolExecutor(16) as pool:
        recs = list(pool.map(get, rels))
    for rel, rec in zip(rels, recs):
        if rec is None:
            raise LogitStoreError(f"{out or fs.url}: part {rel.removesuffix('.commit.json')} was never committed (a writer is unfinished)")
    return [dict(zip(parts, recs[j * len(parts):(j + 1) * len(parts)])) for j in range(n_shards)]


def inputs_sequences(backend, files: dict[str, bytes], n: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """``(seq_hash [n, 16], length [n])`` decoded from an inputs part's files with ``backend``."""
    got = backend.decode_part(files, {"seq_hash": (np.dtype(np.uint8), (n, SEQ_HASH_BYTES)),
                                      "length": (np.dtype(np.uint32), (n,))}, where)
    return got["seq_hash"], got["length"]


def shard_sequences(fs: StoreFS, backend: str, shard: int, rec: dict) -> tuple[np.ndarray, np.ndarray]:
    """``(seq_hash [n, 16], length [n])`` of a shard, from its inputs commit record, or, for a record
    written before records held them, from the part itself."""
    if isinstance(rec.get("sequences"), tuple):  # converted by read_commits
        return rec["sequences"]
    base = layout.part_dir(shard, layout.INPUTS)
    files = {rel: fs.read(f"{base}/{rel}", size=meta["bytes"]) for rel, meta in rec["files"].items()}
    return inputs_sequences(get_backend(backend), files, rec["n_sequences"], base)


def finish_manifest(fs: StoreFS, header: dict, shards: list[dict], seqs: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    """Write the index files of ``shards`` and return the validated version-2 manifest (not yet
    written: the caller writes it last). ``header``: every manifest field but the shard table."""
    h = np.concatenate([s[0] for s in seqs]) if seqs else np.zeros((0, SEQ_HASH_BYTES), np.uint8)
    lengths = np.concatenate([s[1] for s in seqs]) if seqs else np.zeros(0, np.uint32)
    total = sum(m["bytes"] for s in shards for p in s["parts"].values() for m in p["files"].values())
    manifest = {**{k: v for k, v in header.items() if k != "shards"}, "format_version": written_version(header), "total_bytes": total}
    manifest.update(write_index(fs, header, shards, h, lengths))
    return validate_manifest(manifest)


def build_manifest(fs: StoreFS, plan: dict, n_shards: int, settings: dict | None = None) -> dict:
    """Collect every part's commit record into the index files and the manifest (returned, not yet
    written); fail if any part is missing. ``settings``: what made the store (a dump's config),
    recorded as the manifest's ``dump``."""
    parts = [layout.INPUTS] + [t["part"] for t in plan["teachers"]]
    agg = {t["part"]: {"n_positions": 0, "sum_tail_mass": 0.0, "sum_entropy": 0.0, "forward_seconds": 0.0, "wall_seconds": 0.0}
           for t in plan["teachers"]}
    model_info: dict = {}
    shards, seqs = [], []
    for j, recs in enumerate(read_commits(fs, n_shards, parts)):
        inp = recs[layout.INPUTS]
        for part in parts[1:]:
            st = recs[part]["stats"]
            for key in agg[part]:
                agg[part][key] += st[key]
            model_info[part] = {k: st[k] for k in MODEL_FIELDS}
        shards.append({"start": inp["start"], "n_sequences": inp["n_sequences"], "n_tokens": inp["n_tokens"],
                       "parts": {p: {"files": recs[p]["files"]} for p in parts}})
        seqs.append(shard_sequences(fs, plan["backend"], j, inp))
    teachers = []
    for t in plan["teachers"]:
        a = agg[t["part"]]
        npos = max(a["n_positions"], 1)
        teachers.append({**t, **model_info.get(t["part"], {}),
                         "stats": {"mean_topk_mass": 1.0 - a["sum_tail_mass"] / npos, "mean_entropy": a["sum_entropy"] / npos},
                         "timings": {"forward_seconds": a["forward_seconds"], "wall_seconds": a["wall_seconds"],
                                     "tokens_per_second": a["n_positions"] / a["wall_seconds"] if a["wall_seconds"] else None}})
    header = {
        **{k: v for k, v in plan.items() if k != "teachers"},
        "created_by": f"logitstore {__version__}",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "teachers": teachers,
        "dump": {k: v for k, v in (settings or {}).items() if k not in ("teachers", "out", "progress")},
    }
    return finish_manifest(fs, header, shards, seqs)


def summarize(manifest: dict, part_bytes: dict[str, int]) -> dict:
    """Per-store and per-teacher sizes from a manifest and the bytes of each part
    (:meth:`~logitstore.format.index.ShardIndex.part_bytes`)."""
    tokens = max(manifest["n_tokens"], 1)
    return {
        "sequences": manifest["n_sequences"], "tokens": manifest["n_tokens"],
        "total_bytes": sum(part_bytes.values()), "bytes_per_token": sum(part_bytes.values()) / tokens,
        "inputs_bytes_per_token": part_bytes.get(layout.INPUTS, 0) / tokens,
        "teachers": {t["name"]: {"k": t["k"], "bytes_per_token": part_bytes.get(t["part"], 0) / tokens, **t["stats"]}
                     for t in manifest["teachers"]},
    }
