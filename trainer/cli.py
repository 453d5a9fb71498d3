"""The ``trainer`` command line: parse flags, build a ``FitConfig``, call :func:`trainer.fit.fit`.

Settings come from ``--config fit.yaml``, then flags, then trailing ``key=value`` overrides
(any ``FitConfig`` field, e.g. ``warmup_steps=100 teacher_temperatures=[1.0,2.0]``).
"""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer

from logitstore.errors import LogitStoreError

from .interrupt import Interrupted

def _help(name: str, text: str = "") -> str:
    """The option's help with ``FitConfig``'s default (options default to None so that --config and
    key=value overrides can fill them; the effective default is shown instead)."""
    from dataclasses import MISSING, fields

    from .config import FitConfig

    f = next(f for f in fields(FitConfig) if f.name == name)
    default = f.default if f.default is not MISSING else f.default_factory()
    return f"{text} (default: {default})".strip() if default not in (None, "", ()) else text


app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Distil students from logitstore caches; the teacher never runs here.")


@app.callback()
def _main() -> None:
    """Distil students from logitstore caches."""


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def fit(
    ctx: typer.Context,
    logits: Optional[list[str]] = typer.Option(None, "--logits", help="store path or URL; repeat for several stores"),
    student: Optional[str] = typer.Option(None, help=_help("student", "model directory, hub id, or model config (.json/.yaml) to train from scratch")),
    out: Optional[str] = typer.Option(None, help=_help("out", "run directory")),
    config: Optional[str] = typer.Option(None, "--config", help="YAML file with any of the settings"),
    weights: Optional[str] = typer.Option(None, help=_help("weights", "teacher weights, e.g. 0.7,0.3 (default: equal)")),
    eval_logits: Optional[str] = typer.Option(None, "--eval-logits", help=_help("eval_logits", "held-out store for evaluation")),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help=_help("max_steps")),
    epochs: Optional[int] = typer.Option(None, help=_help("epochs")),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help=_help("batch_size", "sequences per micro-batch per process")),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum", help=_help("grad_accum")),
    lr: Optional[float] = typer.Option(None, help=_help("lr")),
    seed: Optional[int] = typer.Option(None, help=_help("seed")),
    alpha: Optional[float] = typer.Option(None, help=_help("alpha", "loss = alpha * KD + (1 - alpha) * CE")),
    temperature: Optional[float] = typer.Option(None, help=_help("temperature")),
    temperature_schedule: Optional[str] = typer.Option(None, "--temperature-schedule", help=_help("temperature_schedule", "constant, linear, cosine, exp or step (temperature_gamma every temperature_every steps)")),
    loss: Optional[str] = typer.Option(None, help=_help("loss", "fkl, rkl or jsd")),
    beta: Optional[float] = typer.Option(None, help=_help("beta", "jsd mixture weight of the teacher")),
    tail: Optional[str] = typer.Option(None, help=_help("tail", "bucket or renorm")),
    fuse: Optional[str] = typer.Option(None, help=_help("fuse", "mean-probs or mean-logits")),
    fuse_weights: Optional[str] = typer.Option(None, "--fuse-weights", help=_help("fuse_weights", "per-position teacher weights: fixed, entropy (confident teachers count more) or gold (likelier real next token counts more)")),
    fuse_weight_temperature: Optional[float] = typer.Option(None, "--fuse-weight-temperature", help=_help("fuse_weight_temperature", "tau of the entropy / gold weights")),
    kd_positions: Optional[str] = typer.Option(None, "--kd-positions", help=_help("kd_positions", "all, teacher-entropy:FRAC or student-entropy:FRAC (KD on each batch's most uncertain FRAC; CE on all)")),
    feature_weight: Optional[float] = typer.Option(None, "--feature-weight", help=_help("feature_weight", "weight of the feature (hidden-state) loss; 0: off")),
    feature_loss: Optional[str] = typer.Option(None, "--feature-loss", help=_help("feature_loss", "mse or cosine")),
    feature_norm: Optional[str] = typer.Option(None, "--feature-norm", help=_help("feature_norm", "layer (MSE of layer-normalised vectors) or none")),
    feature_map: Optional[str] = typer.Option(None, "--feature-map", help=_help("feature_map", "STUDENT_LAYER:TEACHER_LAYER pairs, e.g. 2:4,4:8")),
    rkd_distance: Optional[float] = typer.Option(None, "--rkd-distance", help=_help("rkd_distance", "weight of the RKD distance loss; 0: off")),
    rkd_angle: Optional[float] = typer.Option(None, "--rkd-angle", help=_help("rkd_angle", "weight of the RKD angle loss; 0: off")),
    rkd_map: Optional[str] = typer.Option(None, "--rkd-map", help=_help("rkd_map", "STUDENT_LAYER:TEACHER_LAYER of the relation loss")),
    online_teacher: Optional[str] = typer.Option(None, "--online-teacher",
                                                 help="baseline: run this teacher on every batch (full-vocabulary KD) instead of the cached targets"),
    device: Optional[str] = typer.Option(None, help=_help("device", "auto, cpu or cuda")),
    precision: Optional[str] = typer.Option(None, help=_help("precision", "autocast compute precision: auto, no, bf16 or fp16")),
    param_dtype: Optional[str] = typer.Option(None, "--param-dtype", help=_help("param_dtype", "dtype of the trained weights: fp32 (default), bf16 or fp16")),
    save_dtype: Optional[str] = typer.Option(None, "--save-dtype", help=_help("save_dtype", "dtype of final/: checkpoint (default), fp32, bf16 or fp16")),
    num_workers: Optional[int] = typer.Option(None, "--num-workers", help=_help("num_workers")),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help=_help("eval_every")),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", help=_help("checkpoint_every")),
    resume: bool = typer.Option(False, "--resume", help="continue from the latest checkpoint in --out"),
    skip_bad_shards: bool = typer.Option(False, "--skip-bad-shards",
                                         help="leave out shards that fail their checksums (logged) instead of stopping"),
    cache_dir: Optional[str] = typer.Option(None, "--cache-dir", help=_help("cache_dir", "local read-through cache of remote stores' files")),
    prefetch: Optional[int] = typer.Option(None, "--prefetch", help=_help("prefetch", "store parts fetched ahead per data worker (0: off)")),
    follow: bool = typer.Option(False, "--follow", help="train while the stores are still written (each epoch: the shards committed so far)"),
    streams: Optional[int] = typer.Option(None, "--streams", help=_help("streams", "streams of the epoch order (default: ranks x workers)")),
    task: Optional[str] = typer.Option(None, "--task", help=_help("task", "auto (the stores'), lm or classify (class logits per text)")),
    group_by_length: bool = typer.Option(False, "--group-by-length", help="batch sequences of similar length (little padding "
                                                                          "for stores of unpacked rows or conversations)"),
    fsdp: bool = typer.Option(False, "--fsdp", help="shard the student across ranks (FSDP) instead of replicating it (DDP)"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Train a student from cached teacher targets."""
    from .config import load_config, parse_override
    from .fit import fit as run_fit

    try:
        overrides = dict(parse_override(a) for a in ctx.args)  # KEY=VALUE; anything else is refused with the reason
        flags = dict(logits=logits or None, student=student, out=out, weights=weights, eval_logits=eval_logits, max_steps=max_steps,
                     epochs=epochs, batch_size=batch_size, grad_accum=grad_accum, lr=lr, seed=seed, alpha=alpha, temperature=temperature,
                     temperature_schedule=temperature_schedule, loss=loss, beta=beta, tail=tail, fuse=fuse, fuse_weights=fuse_weights,
                     fuse_weight_temperature=fuse_weight_temperature, kd_positions=kd_positions, online_teacher=online_teacher, device=device,
                     precision=precision, param_dtype=param_dtype, save_dtype=save_dtype, num_workers=num_workers, eval_every=eval_every, checkpoint_every=checkpoint_every,
                     cache_dir=cache_dir, prefetch=prefetch, streams=streams, task=task, feature_weight=feature_weight,
                     feature_loss=feature_loss, feature_norm=feature_norm, feature_map=feature_map, rkd_distance=rkd_distance, rkd_angle=rkd_angle, rkd_map=rkd_map)
        switches = dict(resume=resume, skip_bad_shards=skip_bad_shards, group_by_length=group_by_length, fsdp=fsdp, follow=follow)
        flags.update({k: True for k, on in switches.items() if on})  # off: the config file's (or the default) stands
        if quiet:
            flags["progress"] = False
        cfg = load_config(config, {**{k: v for k, v in flags.items() if v is not None}, **overrides})
        result = run_fit(cfg)
    except LogitStoreError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    except Interrupted as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(e.exit_code)
    if result.get("eval") and not quiet:
        typer.echo(json.dumps({"steps": result["steps"], "tokens": result["tokens"], "eval": result["eval"]}))


def main() -> None:
    app(prog_name="trainer")


if __name__ == "__main__":
    sys.exit(main())
