"""Writing a store made from other stores (``merge``, ``fuse``, ``convert``).

The same commit protocol as ``dump``: a ``plan.json`` first (the new manifest's header plus what
was derived from what), every part written under a temporary name and committed, the manifest
last. A crashed run re-run with the same arguments skips committed parts; different arguments
into the same ``--out`` are refused.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Callable


from logitstore.version import __version__
from logitstore.format import layout
from logitstore.format.commit import CHUNK_TOKENS, check_or_write_plan, finish_manifest, inputs_sequences, read_commits, refuse_foreign, shard_sequences
from logitstore.errors import ConfigError
from logitstore.storage.fsio import StoreFS
from logitstore.storage.lock import store_lock
from logitstore.format.manifest import MANIFEST, PLAN, dumps, store_id, written_version
from logitstore.progress import progress_bar
from logitstore.format.writer import BackgroundWriter, PartWriter, sequences_record

#: fields of a manifest that describe how and when it was made, not what it holds
VOLATILE = ("created_by", "created_at", "total_bytes", "shards", "n_shards", "index", "dump", "format_version")


@dataclass(frozen=True)
class ShardJob:
    """One shard of the new store: where its sequences start and how to produce its parts.

    ``produce(part)`` returns ``(kind, payload, stats)``: ``kind`` ``"arrays"`` with ``{name: array}``
    to encode with the new store's backend, or ``"files"`` with ``{rel: bytes}`` already encoded (and
    checked); ``stats`` (or None) are a teacher part's sums ``n_positions``, ``sum_tail_mass`` and
    ``sum_entropy``, kept in its commit record and turned into the teacher's ``stats``."""

    start: int
    n_sequences: int
    n_tokens: int
    produce: Callable[[str], tuple[str, dict, dict | None]]


def check_out(out: str, sources: list[str]) -> StoreFS:
    fs = StoreFS(out)
    norm = out.rstrip("/")
    if any(s.rstrip("/") == norm for s in sources):
        raise ConfigError(f"--out {out}: is also an input store; choose another --out")
    if fs.exists(MANIFEST) and not fs.exists(PLAN):
        raise ConfigError(f"--out {out}: holds a complete store already; choose another --out or remove it")
    return fs


def write_derived(out: str, header: dict, jobs: list[ShardJob], *, progress: bool = True, desc: str = "write") -> dict:
    """Write the store whose manifest is ``header`` + shards produced by ``jobs``; return the manifest.

    ``header`` holds every manifest field except ``shards``, ``total_bytes`` and ``created_*``; its
    ``teachers`` entries name the parts to produce. Holds the store's lock (:mod:`logitstore.storage.lock`)
    while it writes."""
    fs = StoreFS(out)
    refuse_foreign(fs, out)
    with store_lock(fs, out, desc):
        return _write_derived(fs, out, header, jobs, progress=progress, desc=desc)


def _write_derived(fs: StoreFS, out: str, header: dict, jobs: list[ShardJob], *, progress: bool, desc: str) -> dict:
    plan = {k: v for k, v in header.items() if k not in VOLATILE}
    plan["format_version"] = written_version(plan)
    plan["teachers"] = [{k: v for k, v in t.items() if k not in ("stats", "timings")} for t in header["teachers"]]
    if check_or_write_plan(fs, plan, out) and fs.exists(MANIFEST):
        return json.loads(fs.read(MANIFEST))  # already complete
    parts = [layout.INPUTS] + [t["part"] for t in header["teachers"]]
    pw = PartWriter(fs, header["backend"], chunk_rows=max(1, CHUNK_TOKENS // header["seq_len"]))
    bg = BackgroundWriter(depth=2)
    try:
        with progress_bar(sum(j.n_tokens for j in jobs), desc, enabled=progress) as bar:
            for i, job in enumerate(jobs):
                pw.clean_debris(i)
                for part in parts:
                    rec = pw.committed(i, part)
                    if rec is None:
                        kind, payload, stats = job.produce(part)
                        extra = {"stats": stats} if stats else {}
                        if part == layout.INPUTS:  # what a reader following this store needs (FORMAT.md, commit records)
                            extra = {"start": job.start, "n_sequences": job.n_sequences, "n_tokens": job.n_tokens}
                        bg.submit(lambda i=i, part=part, kind=kind, payload=payload, extra=extra: _write(pw, i, part, kind, payload, extra))
                bar.update(job.n_tokens)
        bg.close()
    except BaseException:
        bg.abort()
        raise
    shards, seqs = [], []
    sums: dict[str, list[float]] = {}
    for i, (job, recs) in enumerate(zip(jobs, read_commits(fs, len(jobs), parts, out))):
        for part in parts:
            if "stats" in recs[part]:
                acc = sums.setdefault(part, [0.0, 0.0, 0.0])
                for n, key in enumerate(("n_positions", "sum_tail_mass", "sum_entropy")):
                    acc[n] += recs[part]["stats"][key]
        shards.append({"start": job.start, "n_sequences": job.n_sequences, "n_tokens": job.n_tokens,
                       "parts": {p: {"files": recs[p]["files"]} for p in parts}})
        seqs.append(shard_sequences(fs, header["backend"], i, {**recs[layout.INPUTS], "n_sequences": job.n_sequences}))
    teachers = []
    for t in header["teachers"]:
        if t["part"] in sums:
            npos, tail, ent = sums[t["part"]]
            t = {**t, "stats": {"mean_topk_mass": 1.0 - tail / max(npos, 1), "mean_entropy": ent / max(npos, 1)}}
        teachers.append(t)
    manifest = finish_manifest(fs, {**header, "teachers": teachers, "created_by": f"logitstore {__version__}",
                                    "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, shards, seqs)
    fs.write_atomic(MANIFEST, dumps(manifest))
    return manifest


def _write(pw: PartWriter, shard: int, part: str, kind: str, payload: dict, extra: dict) -> None:
    if kind == "files":
        if part == layout.INPUTS:  # copied files: their hashes and lengths go into the commit record too
            h, lengths = inputs_sequences(pw.backend, payload, extra["n_sequences"], layout.part_dir(shard, part))
            extra = {**extra, "sequences": sequences_record(h, lengths)}
        pw.write_files(shard, part, payload, extra)
    else:
        pw.write(shard, part, payload, extra)


def header_of(manifest: dict) -> dict:
    """A manifest without the fields that ``write_derived`` fills in."""
    return {k: v for k, v in manifest.items() if k not in VOLATILE}


def source_ref(url: str, manifest: dict) -> dict:
    """How a derived store names one of its inputs."""
    return {"url": url, "id": store_id(manifest), "n_tokens": manifest["n_tokens"]}


