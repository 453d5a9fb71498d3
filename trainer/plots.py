"""Training curves as a PNG (matplotlib, headless)."""

from __future__ import annotations

import json
from pathlib import Path


def plot_curves(metrics: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line.strip()]
    train = [r for r in rows if not r.get("eval")]
    evals = [r for r in rows if r.get("eval")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    steps = [r["step"] for r in train]
    for key in ("loss", "kd_loss", "ce_loss"):
        axes[0].plot(steps, [r[key] for r in train], label=key)
    axes[0].set(title="training loss", xlabel="step")
    axes[0].legend()
    if evals:
        axes[1].plot([r["step"] for r in evals], [r["ce"] for r in evals], "o-", label="val CE")
        axes[1].plot([r["step"] for r in evals], [r["kl"] for r in evals], "s-", label="val KL to teachers")
        axes[1].legend()
    axes[1].set(title="validation", xlabel="step")
    axes[2].plot(steps, [r["lr"] for r in train], label="lr")
    ax2 = axes[2].twinx()
    ax2.plot(steps, [r["temperature"] for r in train], "r--", label="temperature")
    axes[2].set(title="lr and temperature", xlabel="step")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
