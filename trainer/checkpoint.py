"""Checkpoints of a run and its final model.

``checkpoints/step-N/`` holds model, optimizer, scheduler and RNG state (``accelerate.save_state``,
or one ``torch.distributed.checkpoint`` shard per rank under FSDP) plus :class:`TrainState`; it is
written under a temporary name and renamed, and counts as complete only once ``trainer_state.json``
is in it (:func:`trainer.resume.latest_checkpoint`). ``final/`` is ``save_pretrained`` safetensors
(or plain safetensors for a bare module) with the tokenizer, in the chosen dtype.
"""

from __future__ import annotations

import json
import sys
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .resume import STATE
from .sharding import save_sharded


@dataclass
class TrainState:
    """Where a run is: optimizer steps, epoch, batches of the epoch consumed, tokens, seconds."""

    step: int = 0
    epoch: int = 0
    consumed: int = 0
    tokens: int = 0
    elapsed: float = 0.0
    history: dict = field(default_factory=dict)


def save_checkpoint(acc, ckpt_dir: Path, state: TrainState, keep: int, sharded: tuple | None = None) -> Path:
    """Model, optimizer, scheduler, RNG (accelerate) plus our state; complete only once renamed.
    ``sharded`` = (module, optimizer, scheduler) of an FSDP run: every rank writes its shards."""
    final = ckpt_dir / f"step-{state.step:08d}"
    tmp = ckpt_dir / f".tmp-step-{state.step:08d}"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    acc.wait_for_everyone()
    if sharded is not None:
        save_sharded(tmp, sharded[0], sharded[1])
        if acc.is_main_process:
            torch.save(sharded[2].state_dict(), tmp / "scheduler.pt")
    else:
        acc.save_state(str(tmp))
    acc.wait_for_everyone()
    if acc.is_main_process:
        (tmp / STATE).write_text(json.dumps(state.__dict__))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in sorted(p for p in ckpt_dir.glob("step-*") if (p / STATE).is_file())[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def save_final(student, path: Path, tokenizer, state_dict: dict | None = None, dtype: torch.dtype | None = None) -> None:
    """``state_dict``: the full weights, when ``student``'s own parameters are shards (FSDP).
    ``dtype``: the saved floating-point dtype (default: as trained); the config records it."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    sd = state_dict if state_dict is not None else student.state_dict()
    if dtype is not None:
        sd = cast_state_dict(sd, dtype)
    if hasattr(student, "save_pretrained"):
        student.save_pretrained(tmp, safe_serialization=True, state_dict=sd)
        config = tmp / "config.json"
        if dtype is not None and config.is_file():  # it records the trained weights' dtype; say what was saved
            d = json.loads(config.read_text())
            for key in [k for k in ("dtype", "torch_dtype") if k in d] or ["dtype"]:
                d[key] = str(dtype).removeprefix("torch.")
            config.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
    else:
        from safetensors.torch import save_file

        tmp.mkdir(parents=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(tmp / "model.safetensors"))
        config = getattr(student, "config", None)
        if isinstance(config, dict):  # a module of your own: what load_module needs to build it again
            (tmp / MODULE_JSON).write_text(json.dumps(module_record(student, dtype), indent=1))
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


#: written next to the weights of a student that is not a transformers model (see :func:`load_module`)
MODULE_JSON = "module.json"


def load_module(path: str | Path) -> torch.nn.Module:
    """A student of your own saved by ``trainer fit`` (``final/``): its class (``module:qualname``,
    importable) built with the keyword arguments of its ``config`` dict, then its safetensors
    weights loaded (strictly). A module without a ``config`` dict saves its weights only; rebuild it
    yourself and ``load_state_dict(safetensors.torch.load_file(path / "model.safetensors"))``."""
    import importlib
    import importlib.util

    from safetensors.torch import load_file

    from logitstore.errors import ConfigError

    path = Path(path)
    spec_file = path / MODULE_JSON
    if not spec_file.is_file():
        raise ConfigError(f"{path}: no {MODULE_JSON} (the module had no config dict); build it and load model.safetensors yourself")
    spec = json.loads(spec_file.read_text())
    mod, _, name = str(spec.get("class", "")).partition(":")
    try:
        try:
            cls = importlib.import_module(mod)
        except ImportError:
            if not spec.get("file") or not Path(spec["file"]).is_file():
                raise
            # a class of a script run as __main__: its file, imported under its own name (runs its top level)
            loader = importlib.util.spec_from_file_location(mod, spec["file"])
            cls = importlib.util.module_from_spec(loader)
            sys.modules.setdefault(mod, cls)
            loader.loader.exec_module(cls)
        for part in name.split("."):
            cls = getattr(cls, part)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{spec_file}: class {spec.get('class')!r} cannot be imported ({e})") from None
    model = cls(**spec.get("kwargs", {}))
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    if spec.get("dtype"):
        model.to(getattr(torch, spec["dtype"]))
    return model


def module_record(student: torch.nn.Module, dtype: torch.dtype | None = None) -> dict:
    """``module.json`` of a module of your own: its class as ``module:qualname`` (a class of a script
    run as ``__main__`` is named by the script's file name, with its path in ``file``), its
    ``config`` dict and the saved dtype. Raises ConfigError, before any training, for a class that
    cannot be imported again (defined inside a function) or a config that is not JSON."""
    from logitstore.errors import ConfigError

    cls = type(student)
    if "<locals>" in cls.__qualname__:
        raise ConfigError(f"--student {cls.__qualname__}: a class defined inside a function cannot be imported to load "
                          "final/ again; define it at module level")
    mod, rec = cls.__module__, {}
    if mod == "__main__":
        main_file = getattr(sys.modules.get("__main__"), "__file__", None)
        if main_file:
            mod, rec["file"] = Path(main_file).stem, str(Path(main_file).resolve())
    try:
        json.dumps(student.config)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--student {cls.__qualname__}: its config dict is not JSON ({e}); module.json needs plain "
                          "values (numbers, strings, lists, dicts)") from None
    rec.update({"class": f"{mod}:{cls.__qualname__}", "kwargs": student.config})
    if dtype is not None:
        rec["dtype"] = str(dtype).removeprefix("torch.")
    return rec


def cast_state_dict(sd: dict, dtype: torch.dtype) -> dict:
    """``sd`` with floating tensors in ``dtype``, copied to CPU one at a time (the device may still
    hold the optimizer), and tensors that share storage (tied embeddings) still shared, so they are
    saved once."""
    out, done = {}, {}
    for k, v in sd.items():
        if not v.is_floating_point():
            out[k] = v
            continue
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()))
        if key not in done:
            done[key] = v.detach().to("cpu", dtype)
        out[k] = done[key]
    return out
