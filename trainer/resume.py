"""What ``--resume`` may change, and how a run directory is (re)started.

A run is resumed only with the settings that shaped its trajectory: the LR schedule depends on
``max_steps``/``epochs``, the data order on ``seed`` and ``batch_size``, the loss on ``alpha``,
temperatures and weights, and so on. Resuming with any of those changed would silently train
something that neither the old nor the new ``config.yaml`` describes, so it is refused with every
difference named. Settings that only change how the run executes (workers, prefetch, caches,
logging, checkpoint cadence, evaluation, the final save dtype, the device, the loss's chunk size,
which only bounds memory) may change; they are
applied and listed, and ``config.yaml`` is rewritten to say what runs now. Stores are compared by
their content-derived id, not by URL, so a store may move (a local copy of an S3 store) but not
change.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import yaml

from logitstore.errors import ConfigError

from .config import FitConfig

#: settings that may differ on --resume (they do not change what is trained; ``num_workers`` changes
#: which sequences share a step, as each loader worker reads its own streams, never which sequences an
#: epoch holds: the data order resumes exactly once per sequence; see ``planned_total`` for the length)
RUNTIME = frozenset({"logits", "eval_logits", "device", "num_workers", "prefetch", "cache_dir", "progress", "log_every",
                     "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints", "resume", "verify_checksums",
                     "skip_bad_shards", "trust_remote_code", "save_dtype", "chunk_positions"})


def setting_changes(saved: dict, cfg: FitConfig) -> tuple[list[str], list[str]]:
    """``(trajectory changes, runtime changes)`` between a run's ``config.yaml`` and ``cfg``, each as
    ``"key: old -> new"``. Keys missing from an older ``config.yaml`` count as their defaults."""
    fields = {f.name: f for f in dataclasses.fields(FitConfig)}
    hard, soft = [], []
    for key, new in cfg.to_dict().items():
        if key in ("out", "resume"):
            continue
        f = fields[key]
        old = saved[key] if key in saved else (f.default if f.default is not dataclasses.MISSING else f.default_factory())
        if isinstance(old, tuple):
            old = list(old)
        if old != new:
            (soft if key in RUNTIME else hard).append(f"{key}: {old!r} -> {new!r}")
    return hard, soft


def check_resume(out: Path, cfg: FitConfig, store_ids: list[str], saved_ids: list[str] | None) -> list[str]:
    """Refuse a resume whose settings or stores differ from the run's; return the runtime changes."""
    path = out / "config.yaml"
    saved = yaml.safe_load(path.read_text()) if path.is_file() else {}
    hard, soft = setting_changes(saved or {}, cfg)
    if hard:
        raise ConfigError(f"--resume: {path} was run with other settings ({'; '.join(hard)}); they change the trajectory, so "
                          f"resume with the run's settings, or start a new run (e.g. --student {out / 'final'} --out NEW)")
    if saved_ids is not None and list(saved_ids) != list(store_ids):
        raise ConfigError(f"--resume: the stores differ from the run's (ids {saved_ids} then, {store_ids} now); resume with the "
                          f"same stores (they may have moved, not changed)")
    return soft


#: a checkpoint directory is complete once it holds this file (written last, then renamed into place)
STATE = "trainer_state.json"


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    done = sorted(p for p in ckpt_dir.glob("step-*") if (p / STATE).is_file())
    return done[-1] if done else None


def has_progress(out: Path) -> bool:
    """Whether ``out`` holds anything a new run would destroy: a checkpoint or a final model. A run
    that died before its first checkpoint leaves only logs, and a new run may start over there."""
    return latest_checkpoint(out / "checkpoints") is not None or (out / "final").exists()


def saved_store_ids(state_history: dict) -> list[str] | None:
    ids = state_history.get("stores")
    return list(ids) if isinstance(ids, list) else None


def planned_total(history: dict, cfg: FitConfig, train) -> int:
    """The run's length in optimizer steps, as the checkpoint planned it. A resume on another layout
    (ranks, workers) reads every remaining sequence exactly once, but with ``--epochs`` its epochs
    may hold another number of steps; the schedule would then change length mid-run, so that is
    refused (``--max-steps`` fixes the length whatever the layout)."""
    now = cfg.max_steps or cfg.epochs * math.ceil(train.batches_per_epoch() / cfg.grad_accum)
    planned = history.get("total", now)
    if planned != now and cfg.max_steps is None:
        raise ConfigError(f"--resume: with {train.world_size} process(es) x {max(1, train.num_workers)} loader worker(s) "
                          f"--epochs {cfg.epochs} is {now} steps, the run was planned as {planned}; resume with the "
                          f"layout of the checkpoint, or give --max-steps")
    return planned if cfg.max_steps is None else now
