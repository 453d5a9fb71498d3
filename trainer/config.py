"""``FitConfig``: every setting of ``trainer fit``, from a YAML file, flags and ``key=value`` overrides."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from logitstore.errors import ConfigError

from logitstore.distributions.fusion import MODES, WEIGHTINGS
from .losses import LOSSES, TAILS
from .positions import parse_kd_positions

SCHEDULES = ("constant", "linear", "cosine", "exp", "step")
DTYPES = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class FitConfig:
    logits: tuple[str, ...] = ()
    #: required unless ``trainer.fit.fit`` is given a ``model``
    student: str = ""
    out: str = ""
    weights: tuple[float, ...] | None = None
    eval_logits: str | None = None
    # optimisation
    max_steps: int | None = None
    epochs: int = 1
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    # distillation
    alpha: float = 0.5
    temperature: float = 1.0
    temperature_schedule: str = "constant"
    temperature_final: float = 1.0
    temperature_gamma: float = 0.5
    #: the ``step`` schedule: the temperature is multiplied by ``temperature_gamma`` every this many steps
    temperature_every: int = 1000
    teacher_temperatures: tuple[float, ...] | None = None
    loss: str = "fkl"
    beta: float = 0.5
    tail: str = "bucket"
    fuse: str = "mean-probs"
    #: per-position teacher weights (logitstore/distributions/fusion.py): ``fixed``, ``entropy`` or
    #: ``gold``, with the softmax temperature ``tau`` of the stored entropy / gold log-prob
    fuse_weights: str = "fixed"
    fuse_weight_temperature: float = 1.0
    #: KD on a subset of positions (trainer/positions.py): ``all``, ``teacher-entropy:FRAC``, ``student-entropy:FRAC``
    kd_positions: str = "all"
    #: feature KD from stored hidden states (trainer/features.py): weight (0: off), ``mse`` or
    #: ``cosine``, and ``STUDENT_LAYER:TEACHER_LAYER`` pairs (``output_hidden_states`` indices)
    feature_weight: float = 0.0
    feature_loss: str = "mse"
    #: ``layer``: MSE between layer-normalised vectors (LLM hidden states have outlier dimensions), ``none``: raw
    feature_norm: str = "layer"
    feature_map: str | None = None
    #: relation KD (RKD) on one vector per sequence: distance and angle weights (0: off), one layer pair
    rkd_distance: float = 0.0
    rkd_angle: float = 0.0
    rkd_map: str | None = None
    #: online KD baseline: this teacher (path, hub id or .gguf) runs on every batch and its full
    #: distribution replaces the stores' targets (the stores then only supply the token windows)
    online_teacher: str | None = None
    # runtime
    device: str = "auto"
    #: autocast compute precision of forward and loss: ``no`` (the weights' dtype), ``bf16``, ``fp16``;
    #: ``auto``: bf16 on GPU, no on CPU
    precision: str = "auto"
    #: dtype of the trained (master) weights and AdamW state, whatever the checkpoint's dtype: ``fp32``
    #: (default: updates below half a bf16 ulp, ~6e-5 at |w| = 0.02, would otherwise vanish), or ``bf16`` /
    #: ``fp16`` to keep low-precision weights (half the memory, lossy updates)
    param_dtype: str = "fp32"
    #: dtype of the saved ``final/`` weights: ``checkpoint`` (the student checkpoint's own dtype; fp32 for a
    #: student built from a config), ``fp32``, ``bf16`` or ``fp16``
    save_dtype: str = "checkpoint"
    num_workers: int = 1
    shuffle_buffer: int = 1024
    #: batches of sequences of similar length (stores of unpadded rows: --no-pack, conversations);
    #: each stream sorted longest first in blocks of 50 batches (trainer/epochs.py)
    group_by_length: bool = False
    #: ``auto`` (the stores'), ``lm`` or ``classify`` (trainer/classify.py): refused if the stores hold another task
    task: str = "auto"
    chunk_positions: int = 1024
    log_every: int = 1
    eval_every: int = 0
    eval_batches: int | None = None
    #: also checkpoints at the end and when stopped by SIGINT/SIGTERM (trainer/interrupt.py)
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    resume: bool = False
    verify_checksums: bool = True
    #: read every shard before training and leave out those that fail their checksums (logged to
    #: RUN_DIR/skipped_shards.json) instead of stopping at the first damaged file
    skip_bad_shards: bool = False
    #: train while the stores are still being dumped: each epoch covers the shards committed when it
    #: starts; needs --max-steps (the length of an epoch is not known in advance)
    follow: bool = False
    #: seconds between looks for newly committed shards while there is nothing to train on (--follow)
    follow_poll: float = 30.0
    #: streams of the epoch order (logitstore.sampling); default ranks x workers of the first launch;
    #: a run resumes on any layout with ranks x workers <= streams
    streams: int | None = None
    #: local read-through cache of the stores' files (for remote stores), checked against their checksums
    cache_dir: str | None = None
    #: parts fetched ahead of decoding per data worker (0: off)
    prefetch: int = 4
    #: shard the student's parameters, gradients and optimizer state across ranks (PyTorch FSDP2,
    #: see trainer/sharding.py) instead of replicating them (DDP); for students that do not fit one device
    fsdp: bool = False
    trust_remote_code: bool = False
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for f in fields(self):  # YAML, key=value overrides and Python callers may pass any type
            object.__setattr__(self, f.name, _parse(f.name, getattr(self, f.name), f.type))
        if not self.logits:
            raise ConfigError("--logits: at least one store is required")
        if not self.out:
            raise ConfigError("--out: required (the run directory)")
        _check(self.loss in LOSSES, f"--loss: expected one of {', '.join(LOSSES)}, got {self.loss!r}")
        _check(self.tail in TAILS, f"--tail: expected one of {', '.join(TAILS)}, got {self.tail!r}")
        _check(self.fuse in MODES, f"--fuse: expected one of {', '.join(MODES)}, got {self.fuse!r}")
        _check(self.fuse_weights in WEIGHTINGS, f"--fuse-weights: expected one of {', '.join(WEIGHTINGS)}, got {self.fuse_weights!r}")
        _check(self.fuse_weight_temperature > 0, f"--fuse-weight-temperature: expected > 0, got {self.fuse_weight_temperature}")
        try:
            kind, _ = parse_kd_positions(self.kd_positions)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        _check(kind != "teacher-entropy" or not self.online_teacher,
               "--kd-positions teacher-entropy: uses the stores' entropy; not with --online-teacher (student-entropy works)")
        _check(self.fuse_weights == "fixed" or not self.online_teacher,
               "--fuse-weights: entropy and gold weights come from the stores; not with --online-teacher")
        _check(self.temperature_schedule in SCHEDULES, f"--temperature-schedule: expected one of {', '.join(SCHEDULES)}")
        _check(0.0 <= self.alpha <= 1.0, f"--alpha: expected a value in [0, 1], got {self.alpha}")
        _check(self.temperature > 0 and self.temperature_final > 0, "--temperature: must be > 0")
        _check(self.temperature_every >= 1, f"temperature_every: expected a positive integer, got {self.temperature_every}")
        _check(0.0 < self.beta < 1.0, f"--beta: expected 0 < beta < 1, got {self.beta}")
        _check(self.batch_size > 0, f"--batch-size: expected a positive integer, got {self.batch_size}")
        _check(self.grad_accum > 0, f"--grad-accum: expected a positive integer, got {self.grad_accum}")
        _check(self.lr > 0, f"--lr: expected a positive number, got {self.lr}")
        _check(self.epochs > 0, f"--epochs: expected a positive integer, got {self.epochs}")
        _check(self.max_steps is None or self.max_steps > 0, f"--max-steps: expected a positive integer, got {self.max_steps}")
        _check(self.num_workers >= 0, "--num-workers: expected >= 0")
        _check(self.prefetch >= 0, f"--prefetch: expected >= 0, got {self.prefetch}")
        _check(not (self.eval_every and not self.eval_logits), "--eval-every: needs --eval-logits (a held-out store to evaluate on)")
        _check(math.isfinite(self.grad_clip) and self.grad_clip >= 0, f"--grad-clip: expected a number >= 0 (0: off), got {self.grad_clip}")
        _check(0.0 <= self.min_lr_ratio <= 1.0, f"--min-lr-ratio: expected a value in [0, 1], got {self.min_lr_ratio}")
        _check(math.isfinite(self.weight_decay) and self.weight_decay >= 0, f"--weight-decay: expected a number >= 0, got {self.weight_decay}")
        _check(math.isfinite(self.lr), f"--lr: expected a finite number, got {self.lr}")
        _check(self.warmup_steps >= 0, f"--warmup-steps: expected >= 0, got {self.warmup_steps}")
        _check(self.log_every >= 1, f"--log-every: expected a positive integer, got {self.log_every}")
        _check(self.eval_every >= 0, f"--eval-every: expected >= 0 (0: only at the end), got {self.eval_every}")
        _check(self.eval_batches is None or self.eval_batches >= 1, f"--eval-batches: expected a positive integer, got {self.eval_batches}")
        _check(self.keep_checkpoints >= 0, f"--keep-checkpoints: expected >= 0 (0: keep all), got {self.keep_checkpoints}")
        _check(self.chunk_positions >= 1, f"--chunk-positions: expected a positive integer, got {self.chunk_positions}")
        _check(not self.follow or self.max_steps is not None, "--follow: needs --max-steps (a store still being written has no known length)")
        _check(self.follow_poll > 0, f"--follow-poll: expected a positive number of seconds, got {self.follow_poll}")
        _check(self.streams is None or self.streams >= 1, f"--streams: expected a positive integer, got {self.streams}")
        _check(self.shuffle_buffer >= 1, f"--shuffle-buffer: expected a positive integer, got {self.shuffle_buffer}")
        _check(self.task in ("auto", "lm", "classify"), f"--task: expected auto, lm or classify, got {self.task!r}")
        _check(self.checkpoint_every >= 0, f"--checkpoint-every: expected >= 0 (0: only at the end), got {self.checkpoint_every}")
        _check(self.precision in ("auto", "no", "bf16", "fp16"), f"--precision: expected auto, no, bf16 or fp16, got {self.precision!r}")
        _check(self.param_dtype in DTYPES, f"--param-dtype: expected one of {', '.join(DTYPES)}, got {self.param_dtype!r}")
        _check(not (self.param_dtype == "fp16" and self.precision == "fp16"),
               "--param-dtype fp16 with --precision fp16: the fp16 loss scaler cannot unscale fp16 gradients; "
               "use --param-dtype fp32 (default) or bf16")
        _check(self.save_dtype in ("checkpoint", *DTYPES),
               f"--save-dtype: expected checkpoint or one of {', '.join(DTYPES)}, got {self.save_dtype!r}")
        from .features import FEATURE_LOSSES, FEATURE_NORMS, parse_layer_map

        _check(self.feature_norm in FEATURE_NORMS, f"--feature-norm: expected one of {', '.join(FEATURE_NORMS)}, got {self.feature_norm!r}")
        _check(self.feature_loss in FEATURE_LOSSES, f"--feature-loss: expected one of {', '.join(FEATURE_LOSSES)}, got {self.feature_loss!r}")
        for name in ("feature_weight", "rkd_distance", "rkd_angle"):
            v = getattr(self, name)
            _check(math.isfinite(v) and v >= 0, f"--{name.replace('_', '-')}: expected a number >= 0 (0: off), got {v}")
        pairs = parse_layer_map(self.feature_map, "--feature-map")
        _check(not self.feature_weight or pairs, "--feature-weight: needs --feature-map STUDENT_LAYER:TEACHER_LAYER,...")
        _check(not pairs or self.feature_weight, "--feature-map: needs --feature-weight > 0")
        rkd = parse_layer_map(self.rkd_map, "--rkd-map")
        _check(len(rkd) <= 1, "--rkd-map: one STUDENT_LAYER:TEACHER_LAYER pair")
        _check(not (self.rkd_distance or self.rkd_angle) or rkd, "--rkd-distance/--rkd-angle: need --rkd-map STUDENT_LAYER:TEACHER_LAYER")
        _check(not rkd or self.rkd_distance or self.rkd_angle, "--rkd-map: needs --rkd-distance or --rkd-angle > 0")
        # relations are between the sequences of one micro-batch: with 2 the normalised distance is always 1
        # and there is no angle, so the terms would be 0
        _check(not (self.rkd_distance or self.rkd_angle) or self.batch_size >= 3,
               f"--rkd-distance/--rkd-angle: relate the sequences of a micro-batch; --batch-size {self.batch_size} is too few (at least 3)")
        _check(not (self.uses_hidden and self.online_teacher), "--feature-weight/--rkd-*: use stored hidden states; not with --online-teacher")
        _check(not (self.uses_hidden and self.fsdp), "--feature-weight/--rkd-*: not with --fsdp")
        if self.teacher_temperatures is not None:
            _check(all(t > 0 for t in self.teacher_temperatures), "--teacher-temperatures: must all be > 0")

    @property
    def uses_hidden(self) -> bool:
        """Feature or relation KD: batches carry the teachers' stored hidden states."""
        return bool(self.feature_weight or self.rkd_distance or self.rkd_angle)

    def to_dict(self) -> dict:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "FitConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"config: unknown keys {unknown} (known: {', '.join(sorted(known))})")
        return cls(**d)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse(name: str, value, annotation: str):
    """``value`` as the field's declared type (``annotation``, e.g. ``"float | None"``), or a
    :class:`ConfigError` naming the flag. Numbers may come as strings (PyYAML reads ``3e-4`` as
    one); lists as comma-separated strings."""
    kind = annotation.replace(" ", "").removesuffix("|None")
    if value is None:
        if annotation.replace(" ", "").endswith("|None"):
            return None
        raise ConfigError(f"{_flag(name)}: a value is required")
    if kind.startswith("tuple["):
        inner = kind[len("tuple["):].split(",")[0]
        if isinstance(value, str):  # "0.7,0.3" for numbers; a single string is one path or URL (they may hold commas)
            value = [x.strip() for x in value.split(",") if x.strip()] if inner != "str" else [value]
        items = value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{_flag(name)}: expected a list (or comma-separated values), got {value!r}")
        return tuple(_parse(name, x, inner) for x in items)
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{_flag(name)}: expected true or false, got {value!r}")
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{_flag(name)}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)  # exact for any size ("12345678901234567890")
            except ValueError:
                pass
        try:
            f = float(value)
        except ValueError:
            raise ConfigError(f"{_flag(name)}: expected an integer, got {value!r}") from None
        if not f.is_integer():
            raise ConfigError(f"{_flag(name)}: expected an integer, got {value!r}")
        return int(f)
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{_flag(name)}: expected a number, got {value!r}")
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{_flag(name)}: expected a number, got {value!r}") from None
    if kind == "str":
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{_flag(name)}: expected a string, got {value!r}")
        return str(value)
    if kind == "dict" and not isinstance(value, dict):
        raise ConfigError(f"{_flag(name)}: expected a mapping, got {value!r}")
    return value


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def parse_override(item: str) -> tuple[str, object]:
    """``key=value`` with the value parsed as YAML (so numbers, booleans and lists work)."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"unexpected argument {item!r}: settings after the flags are key=value; "
                          f"repeat --logits for several stores (--logits A --logits B)")
    return key.strip().replace("-", "_"), yaml.safe_load(value)


def load_config(path: str | None, overrides: dict) -> FitConfig:
    """Config file (YAML or JSON) updated with ``overrides`` (flags and ``key=value`` pairs)."""
    d: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config {path}: no such file")
        try:
            d = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"--config {path}: expected a mapping of settings")
    d.update({k: v for k, v in overrides.items() if v is not None})
    return FitConfig.from_dict(d)
