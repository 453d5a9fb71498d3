"""``logitstore info``: what a store holds, from its manifest alone."""

from __future__ import annotations

from .dump import summarize
from .manifest import store_id
from .reader import Store


def info(url: str) -> dict:
    store = Store(url)
    m = store.manifest
    s = summarize(m)
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
        "shards": len(m["shards"]),
        **{k: s[k] for k in ("sequences", "tokens", "total_bytes", "bytes_per_token", "inputs_bytes_per_token")},
        "teachers": [
            {"name": t["name"], "source": t["source"], "k": t["k"], "dtype": t["dtype"],
             "bytes_per_token": s["teachers"][t["name"]]["bytes_per_token"],
             "mean_topk_mass": t["stats"]["mean_topk_mass"], "mean_entropy": t["stats"]["mean_entropy"],
             "forward_seconds": t["timings"]["forward_seconds"]}
            for t in m["teachers"]
        ],
    }


def format_info(d: dict) -> str:
    lines = [
        f"store        {d['url']}",
        f"id           {d['id']}",
        f"format       v{d['format_version']}, {d['backend']}, encoding {d['encoding']['name']}"
        + (f" ({d['encoding']['value_bits']}-bit values)" if "value_bits" in d["encoding"] else ""),
        f"tokenizer    {d['tokenizer']['fingerprint'][:16]}, vocab {d['tokenizer']['vocab_size']:,}",
        f"data         {d['sequences']:,} sequences x {d['seq_len']} ({'packed' if d['packed'] else 'per document'}), "
        f"{d['tokens']:,} tokens, {d['shards']} shard(s)",
        f"size         {d['total_bytes'] / 1e6:.2f} MB, {d['bytes_per_token']:.1f} B/token "
        f"(inputs {d['inputs_bytes_per_token']:.1f})",
        "teachers",
    ]
    for t in d["teachers"]:
        lines.append(f"  {t['name']:<20} k={t['k']:<4} {t['bytes_per_token']:6.1f} B/token  top-k mass {t['mean_topk_mass']:.3f}  "
                     f"entropy {t['mean_entropy']:.2f} nats  dtype {t['dtype']}  source {t['source']}")
    return "\n".join(lines)
