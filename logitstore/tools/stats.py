"""``logitstore stats``: how much of each teacher's distribution the stored top-k covers, and how
uncertain the teacher is, per position. This is what a team looks at before choosing ``k``.

For every real position (padding excluded) the stored entries are sorted by probability and their
cumulative mass at ``j = 1 .. k`` is taken; the result is the mean and the 10th/50th/90th
percentiles of that mass for each ``j``, the share of positions whose top-``j`` mass reaches 0.9,
the distribution of the tail mass, of the entropy, and how often the real next token is among the
top-``k`` (its gold log-prob is at least the smallest stored one). In compact stores the log-probs
are quantised (bound in FORMAT.md), so a top-``j`` mass can exceed 1 by that error.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from logitstore.errors import ConfigError
from logitstore.format.reader import Store

PERCENTILES = (10, 50, 90)


def store_stats(url: str, *, max_positions: int | None = None) -> dict:
    """Per-teacher coverage and entropy statistics of the store at ``url`` (checksums verified)."""
    store = Store(url)
    if store.task != "lm":
        raise ConfigError(f"{url}: a {store.task} store holds every class logit of each text; top-k coverage applies to "
                          "language-model stores only")
    out = {"url": url, "teachers": {}}
    for t in store.manifest["teachers"]:
        name, k = t["name"], t["k"]
        cum, tail, ent, gold_in = [], [], [], []
        seen = 0
        for j in range(store.n_shards):
            sh = store.load_shard(j, [name])
            td = sh["teachers"][name]
            real = np.arange(store.seq_len)[None, :] < sh["length"][:, None]
            valid = sh["loss_mask"] if store.index.trained_only else real  # a trained-only store: its stored positions
            lp = td["logprobs"][valid].astype(np.float64)  # [n, k]
            p = np.sort(np.exp(lp), axis=-1)[:, ::-1]
            cum.append(np.cumsum(p, axis=-1))
            tail.append(td["tail_mass"][valid])
            ent.append(td["entropy"][valid])
            # the last position of a window has no next token (gold 0): leave it out
            has_next = (np.arange(store.seq_len)[None, :] + 1 < sh["length"][:, None]) & valid
            g, lmin = td["gold_logprob"][has_next], td["logprobs"][has_next].min(axis=-1)
            gold_in.append(g >= lmin - 1e-3)
            seen += int(valid.sum())
            if max_positions is not None and seen >= max_positions:
                break
        c = np.concatenate(cum)
        tails, ents, gin = np.concatenate(tail), np.concatenate(ent), np.concatenate(gold_in)
        counts, edges = np.histogram(ents, bins=20)
        out["teachers"][name] = {
            "k": k, "positions": int(c.shape[0]),
            "mass_at_j": {"mean": c.mean(0).tolist(), **{f"p{q}": np.percentile(c, q, axis=0).tolist() for q in PERCENTILES}},
            "share_with_mass_ge_0.9_at_j": (c >= 0.9).mean(0).tolist(),
            "tail_mass": {"mean": float(tails.mean()), **{f"p{q}": float(np.percentile(tails, q)) for q in PERCENTILES}},
            "entropy": {"mean": float(ents.mean()), **{f"p{q}": float(np.percentile(ents, q)) for q in PERCENTILES},
                        "histogram": counts.tolist(), "bin_edges": edges.tolist()},
            "next_token_in_top_k": float(gin.mean()) if gin.size else None,
        }
    return out


def format_stats(d: dict) -> str:
    lines = [f"store {d['url']}"]
    for name, s in d["teachers"].items():
        k = s["k"]
        marks = sorted({j for j in (1, 2, 4, 8, 16, 32, 64, 128, 256, k) if j <= k})
        lines.append(f"teacher {name}: {s['positions']:,} positions, k = {k}")
        lines.append("  j      mean top-j mass   p10     p50     p90     share >= 0.9")
        for j in marks:
            m = s["mass_at_j"]
            lines.append(f"  {j:<6} {m['mean'][j - 1]:<17.3f} {m['p10'][j - 1]:<7.3f} {m['p50'][j - 1]:<7.3f} "
                         f"{m['p90'][j - 1]:<7.3f} {s['share_with_mass_ge_0.9_at_j'][j - 1]:.3f}")
        e, t = s["entropy"], s["tail_mass"]
        lines.append(f"  tail mass mean {t['mean']:.3f} (p10 {t['p10']:.3f}, p50 {t['p50']:.3f}, p90 {t['p90']:.3f})")
        lines.append(f"  entropy mean {e['mean']:.2f} nats (p10 {e['p10']:.2f}, p50 {e['p50']:.2f}, p90 {e['p90']:.2f})")
        if s["next_token_in_top_k"] is not None:
            lines.append(f"  next token among the top-{k}: {s['next_token_in_top_k']:.3f} of positions")
    return "\n".join(lines)


def plot_stats(d: dict, path: str | Path) -> Path:
    """Top-j mass coverage (mean and p10-p90 band) and the entropy histogram, one row per teacher."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(d["teachers"])
    fig, axes = plt.subplots(len(names), 2, figsize=(11, 3.6 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        s = d["teachers"][name]
        j = np.arange(1, s["k"] + 1)
        m = s["mass_at_j"]
        ax = axes[row, 0]
        ax.fill_between(j, m["p10"], m["p90"], alpha=0.25, label="p10-p90")
        ax.plot(j, m["mean"], label="mean")
        ax.plot(j, m["p50"], "--", label="median")
        ax.set(xscale="log", ylim=(0, 1), xlabel="j (top-j entries)", ylabel="probability mass", title=f"{name}: top-j mass")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        e = s["entropy"]
        edges = np.asarray(e["bin_edges"])
        axes[row, 1].bar(edges[:-1], e["histogram"], width=np.diff(edges), align="edge")
        axes[row, 1].set(xlabel="entropy (nats)", ylabel="positions", title=f"{name}: entropy per position")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
