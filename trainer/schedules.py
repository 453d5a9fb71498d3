"""Learning-rate and temperature schedules (functions of the optimizer step)."""

from __future__ import annotations

import math


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def temperature_at(step: int, total: int, schedule: str, t0: float, t_final: float, gamma: float, every: int = 1000) -> float:
    """``constant``: t0; ``linear``/``cosine``: from t0 to t_final over ``total`` steps;
    ``exp``: ``t0 * gamma ** (step / total)`` (smooth exponential decay); ``step``:
    ``t0 * gamma ** (step // every)`` (a factor ``gamma`` every ``every`` steps, e.g.
    ``T = 3.0 * 0.9 ** (step // 1000)``), never below ``t_final`` when that is below ``t0`` (so a
    long run cannot drive the temperature, and the KD term, to nothing)."""
    frac = min(1.0, step / max(1, total))
    if schedule == "step":
        t = t0 * gamma ** (step // max(1, every))
        return max(t, t_final) if t_final < t0 else t
    if schedule == "constant":
        return t0
    if schedule == "linear":
        return t0 + (t_final - t0) * frac
    if schedule == "cosine":
        return t_final + (t0 - t_final) * 0.5 * (1 + math.cos(math.pi * frac))
    if schedule == "exp":
        return t0 * gamma**frac
    raise ValueError(f"unknown temperature schedule {schedule!r}")
