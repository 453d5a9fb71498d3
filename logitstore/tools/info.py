"""``logitstore info``: what a store holds, from its manifest and shard index."""

from __future__ import annotations

import posixpath

from logitstore.format.commit import summarize
from logitstore.format.manifest import store_id
from logitstore.format.reader import Store


def info(url: str) -> dict:
    store = Store(url)
    m = store.manifest
    s = summarize(m, store.index.part_bytes())
    return {
        "url": url,
        "id": store_id(m),
        "format_version": m["format_version"],
        "backend": m["backend"],
        "encoding": m["encoding"],
        "seq_len": m["seq_len"],
        "packed": m["packed"],
        "tokenizer": m["tokenizer"],
        "data": m["data"],
        "shards": store.n_shards,
        "derived": m.get("derived"),
        **{k: s[k] for k in ("sequences", "tokens", "total_bytes", "bytes_per_token", "inputs_bytes_per_token")},
        "teachers": [
            {"name": t["name"], "source": t["source"], "k": t["k"], "dtype": t["dtype"],
             "bytes_per_token": s["teachers"][t["name"]]["bytes_per_token"],
             "mean_topk_mass": t["stats"]["mean_topk_mass"], "mean_entropy": t["stats"]["mean_entropy"],
             "forward_seconds": t.get("timings", {}).get("forward_seconds")}
            for t in m["teachers"]
        ],
    }


def format_info(d: dict) -> str:
    lines = [
        f"store        {d['url']}",
        f"id           {d['id']}",
        f"format       v{d['format_version']}, {d['backend']}, encoding {d['encoding']['name']}"
        + (f" ({d['encoding']['value_bits']}-bit {d['encoding'].get('codebook', 'uniform')} values)"
           if "value_bits" in d["encoding"] else ""),
        f"tokenizer    {d['tokenizer']['fingerprint'][:16]}, vocab {d['tokenizer']['vocab_size']:,}",
        f"data         {d['sequences']:,} sequences x {d['seq_len']} ({'packed' if d['packed'] else 'per document'}), "
        f"{d['tokens']:,} tokens, {d['shards']} shard(s)",
        f"size         {d['total_bytes'] / 1e6:.2f} MB, {d['bytes_per_token']:.1f} B/token "
        f"(inputs {d['inputs_bytes_per_token']:.1f})",
    ]
    if d.get("derived"):
        srcs = d["derived"]["sources"]
        names = ", ".join(f"{r['id']} ({r['url']})" for r in srcs)
        lines.append(f"derived      {d['derived']['op']} of {names}")
    lines.append("teachers")
    for t in d["teachers"]:
        lines.append(f"  {t['name']:<20} k={t['k']:<4} {t['bytes_per_token']:6.1f} B/token  top-k mass {t['mean_topk_mass']:.3f}  "
                     f"entropy {t['mean_entropy']:.2f} nats  dtype {t['dtype']}  source {t['source']}")
    return "\n".join(lines)


def list_stores(url: str, max_depth: int = 4) -> list[dict]:
    """Every store under ``url`` (a directory or fsspec prefix, searched ``max_depth`` levels deep):
    one row each with its id, teachers, tokens, k and size, or the error that keeps it from opening.
    A store that was started but has no manifest yet (a dump, merge, fuse or convert that is still
    running, crashed or was interrupted) is listed with ``"unfinished": true`` and
    ``"in_progress"``: whether a live writer holds its lock (:mod:`logitstore.storage.lock`)."""
    import json

    from logitstore.errors import LogitStoreError
    from logitstore.storage.fsio import StoreFS
    from logitstore.storage.lock import describe, lock_is_live, read_lock
    from logitstore.format.manifest import MANIFEST, PLAN

    fs = StoreFS(url)
    if not fs.exists():
        raise LogitStoreError(f"{url}: no such directory or prefix")
    base = fs.root.rstrip("/")
    by_dir: dict[str, set[str]] = {}
    for p in fs.fs.find(base, maxdepth=max_depth + 1):
        head, _, name = p.rpartition("/")
        if name in (MANIFEST, PLAN):
            by_dir.setdefault(posixpath.relpath(head, base) if head != base else "", set()).add(name)
    rows = []
    for rel in sorted(by_dir):
        rel = "" if rel == "." else rel
        where = f"{url.rstrip('/')}/{rel}" if rel else url
        if MANIFEST not in by_dir[rel]:
            sub = StoreFS(where)
            lock = read_lock(sub)
            live = lock is not None and lock_is_live(lock)
            row = {"url": where, "unfinished": True, "in_progress": live}
            if live:
                row["writer"] = describe(lock)
            try:
                plan = json.loads(sub.read(PLAN))
                row.update(teachers=[t["name"] for t in plan["teachers"]], tokens=plan["n_tokens"],
                           k=sorted({t["k"] for t in plan["teachers"]}))
            except Exception:  # a plan we cannot read: the row still says the store is unfinished
                pass
            rows.append(row)
            continue
        try:
            d = info(where)
        except LogitStoreError as e:
            rows.append({"url": where, "error": str(e)})
            continue
        rows.append({"url": where, "id": d["id"], "teachers": [t["name"] for t in d["teachers"]], "tokens": d["tokens"],
                     "k": sorted({t["k"] for t in d["teachers"]}), "bytes": d["total_bytes"]})
    return rows


def format_list(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(f"{r['url']}  UNREADABLE: {r['error']}")
        elif r.get("unfinished"):
            what = f"  teachers={','.join(r['teachers'])}  tokens={r['tokens']:,}" if "teachers" in r else ""
            state = (f"UNFINISHED, in progress ({r['writer']})" if r["in_progress"]
                     else "UNFINISHED (no writer running: re-run the same command to resume)")
            lines.append(f"{r['url']}  {state}{what}")
        else:
            k = ",".join(str(x) for x in r["k"])
            lines.append(f"{r['url']}  {r['id']}  teachers={','.join(r['teachers'])}  tokens={r['tokens']:,}  k={k}  "
                         f"size={r['bytes'] / 1e6:.2f} MB")
    return "\n".join(lines) if lines else "no stores found"
