"""The run's metrics: ``metrics.jsonl`` and TensorBoard scalars."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    """``metrics.jsonl`` (one object per optimizer step, eval rows marked ``"eval": true``) and
    TensorBoard scalars, written by rank 0. On resume, rows after the checkpoint are dropped."""

    def __init__(self, out: Path, enabled: bool, keep_until: int | None):
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        path = out / "metrics.jsonl"
        if keep_until is not None and path.exists():
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= keep_until))
        self.f = open(path, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tb"))
        except ImportError:  # tensorboard is optional; metrics.jsonl always exists
            self.tb = None

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()
        if self.tb is not None:
            prefix = "eval/" if row.get("eval") else "train/"
            for k, v in row.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self.tb.add_scalar(prefix + k, v, row["step"])
                elif isinstance(v, dict):
                    for kk, vv in v.items():
                        self.tb.add_scalar(f"{prefix}{k}/{kk}", vv, row["step"])

    def close(self) -> None:
        if self.enabled:
            self.f.close()
            if self.tb is not None:
                self.tb.close()
