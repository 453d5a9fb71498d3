"""``trainer fit``: distil a student from cached teacher targets.

The loop, top to bottom: open the stores (``DistillDataset``), load the student, build AdamW with
warm-up + cosine LR, hand model/optimizer/scheduler to ``accelerate`` (device placement, DDP under
``torchrun``, autocast), optionally resume, then for every optimizer step: take ``grad_accum``
batches, count their target positions across ranks, and back-propagate
``alpha * KD + (1 - alpha) * CE`` normalised by that global count, so the loss is exactly the mean
over all target positions of the step whatever the number of ranks or micro-batches. Metrics go to
``RUN_DIR/metrics.jsonl`` (and TensorBoard), checkpoints to ``RUN_DIR/checkpoints/step-N`` (written
under a temporary name and renamed), the final model to ``RUN_DIR/final`` (``save_pretrained``,
safetensors) with its tokenizer, and the training curves to ``RUN_DIR/curves.png``.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import torch
import yaml
from torch.utils.data import DataLoader

from logitstore.errors import ConfigError, LogitStoreError
from logitstore.manifest import store_id

from .config import FitConfig
from .data import DistillDataset
from .fusion import normalize_weights
from .interrupt import Interrupted, StopRequests, ignore_in_worker
from .resume import STATE, check_resume, has_progress, latest_checkpoint, saved_store_ids
from .schedules import lr_factor, temperature_at
from .sharding import full_state_dict, gradient_sync, load_sharded, save_sharded, shard_module
from .student import DTYPES, DistillModule, adopt_special_ids, cast_parameters, load_student, output_vocab, parameter_dtype



@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    consumed: int = 0
    tokens: int = 0
    elapsed: float = 0.0
    history: dict = field(default_factory=dict)


def fit(config: FitConfig, *, model: torch.nn.Module | None = None, tokenizer=None) -> dict:
    """Train ``config.student`` (or ``model``: any module mapping token ids to logits) from the
    stores in ``config.logits``. Returns the final metrics and paths."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    cfg = config
    if model is None and not cfg.student:
        raise ConfigError("--student: required (a model directory, hub id, or a model config .json/.yaml)")
    if not cfg.progress:
        _quiet_libraries()
    cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {cfg.device}: CUDA is not available on this machine")
    precision = cfg.precision if cfg.precision != "auto" else ("no" if cpu else "bf16")
    # The LR schedule is a function of the optimizer step, stepped once per step on every rank. By
    # default accelerate's scheduler wrapper steps it once per *process* per step (it assumes the
    # schedule was written for a single process's batch size), which would run warm-up and decay
    # world_size times too fast here, where --batch-size is per rank and the schedule counts steps.
    acc = Accelerator(cpu=cpu, mixed_precision=precision, step_scheduler_with_optimizer=False)
    rank, world = acc.process_index, acc.num_processes
    out = Path(cfg.out)
    set_seed(cfg.seed)

    # ---------------------------------------------------------------- data
    train = DistillDataset(list(cfg.logits), batch_size=cfg.batch_size, seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer,
                           rank=rank, world_size=world, num_workers=cfg.num_workers, verify_checksums=cfg.verify_checksums,
                           with_targets=cfg.alpha > 0 and not cfg.online_teacher, skip_bad_shards=cfg.skip_bad_shards,
                           cache_dir=cfg.cache_dir, prefetch=cfg.prefetch)
    for b in train.skipped:
        print(f"warning: skipping {b['store']}/{b['path']} ({b['sequences']} sequences): {b['error']}", file=sys.stderr)
    M = len(train.teachers)
    try:
        weights = normalize_weights(cfg.weights, M)
    except ValueError as e:
        raise ConfigError(f"{e} (teachers: {', '.join(train.teacher_names)})") from None
    if cfg.teacher_temperatures is not None and len(cfg.teacher_temperatures) != M:
        raise ConfigError(f"--teacher-temperatures: {len(cfg.teacher_temperatures)} value(s) for {M} teacher(s)")
    evalset, eval_weights = None, None
    if cfg.eval_logits:
        evalset = DistillDataset([cfg.eval_logits], batch_size=cfg.batch_size, shuffle=False, rank=rank, world_size=world,
                                 verify_checksums=cfg.verify_checksums, cache_dir=cfg.cache_dir, prefetch=cfg.prefetch)
        if evalset.stores[0].manifest["tokenizer"]["fingerprint"] != train.stores[0].manifest["tokenizer"]["fingerprint"]:
            raise ConfigError(f"--eval-logits {cfg.eval_logits}: tokenizer differs from the training stores'")
        eval_weights = match_teachers(train, evalset, weights, cfg.eval_logits)

    # ---------------------------------------------------------------- student
    student = model if model is not None else load_student(cfg.student, trust_remote_code=cfg.trust_remote_code)
    if model is None:
        check_student_tokenizer(cfg.student, train)
        if Path(cfg.student).suffix in (".json", ".yaml", ".yml"):  # a fresh model: the store's special tokens
            adopt_special_ids(student, train.stores[0].manifest["tokenizer"])
    # master weights in --param-dtype (fp32 by default, whatever the checkpoint holds); --precision
    # only sets the autocast compute dtype; final/ is saved in --save-dtype (default: the checkpoint's)
    source_dtype = getattr(student, "checkpoint_dtype", None) or parameter_dtype(student)
    save_dtype = source_dtype if cfg.save_dtype == "checkpoint" else DTYPES[cfg.save_dtype]
    cast_parameters(student, DTYPES[cfg.param_dtype])
    sv = output_vocab(student)
    if sv is not None and sv < train.vocab_size:
        raise ConfigError(f"--student {cfg.student}: output vocabulary {sv} is smaller than the store's {train.vocab_size}")
    online = _online_teacher(cfg, train, acc.device) if cfg.online_teacher and cfg.alpha > 0 else None
    module = DistillModule(student)
    if cfg.fsdp:
        if world < 2:
            raise ConfigError("--fsdp: shards the student across processes; launch with torchrun --nproc-per-node N (N >= 2)")
        compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        module = shard_module(module, acc.device, compute)  # before the optimizer: it must see the sharded parameters
    decay = [p for p in module.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in module.parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=cfg.lr)
    steps_per_epoch = math.ceil(train.batches_per_epoch() / cfg.grad_accum)
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, cfg.warmup_steps, cfg.min_lr_ratio))
    if not cfg.fsdp:  # DDP (under torchrun), device placement
        module, optimizer, scheduler = acc.prepare(module, optimizer, scheduler)

    state = TrainState()
    ckpt_dir = out / "checkpoints"
    store_ids = [store_id(s.manifest) for s in train.stores]
    latest = latest_checkpoint(ckpt_dir)
    resuming = cfg.resume and latest is not None
    if cfg.resume and latest is None and rank == 0:
        print(f"--resume: no checkpoint under {ckpt_dir} yet; starting at step 0", file=sys.stderr)
    if not cfg.resume and has_progress(out):
        raise ConfigError(f"--out {out}: already holds a run with a checkpoint or final model; pass --resume to continue it "
                          f"or choose another --out")
    if resuming:
        saved = TrainState(**json.loads((latest / STATE).read_text()))
        for change in check_resume(out, cfg, store_ids, saved_store_ids(saved.history)):
            if rank == 0:
                print(f"--resume: {change}", file=sys.stderr)
        if cfg.fsdp:
            load_sharded(latest, module, optimizer)
            scheduler.load_state_dict(torch.load(latest / "scheduler.pt", weights_only=True))  # no unpickling of objects
        else:
            acc.load_state(str(latest))
        state = saved
        train.load_state_dict(state.history["dataset"])
        set_schedule_step(scheduler, state.step)
    state.history["stores"] = store_ids
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        if train.skipped:
            (out / "skipped_shards.json").write_text(json.dumps(train.skipped, indent=1))
    log = MetricsLog(out, rank == 0, keep_until=state.step if resuming else 0)

    kd_args = dict(weights=weights, fuse_mode=cfg.fuse, loss=cfg.loss, tail=cfg.tail, beta=cfg.beta,
                   chunk_positions=cfg.chunk_positions, vocab_size=train.vocab_size, with_kd=cfg.alpha > 0)
    with StopRequests() as stop:  # SIGINT/SIGTERM: finish the step, checkpoint, exit (trainer/interrupt.py)
        bar = _progress(total, state.step, enabled=cfg.progress and rank == 0)
        t_start = time.perf_counter() - state.elapsed
        done = state.step >= total
        while not done:
            if state.consumed == 0:
                train.set_epoch(state.epoch)
            it = iter(_loader(train, cfg.num_workers, not cpu, seed=cfg.seed + state.epoch))
            while state.step < total:
                t0 = time.perf_counter()
                try:
                    micro = list(islice(it, cfg.grad_accum))
                except LogitStoreError as e:  # from a DataLoader worker: keep the original one-line message
                    raise type(e)(_worker_message(e) + " (or pass --skip-bad-shards to leave damaged shards out)") from None
                t_data = time.perf_counter() - t0
                if not micro:
                    break
                train.consumed += len(micro)
                state.consumed = train.consumed
                T = temperature_at(state.step, total, cfg.temperature_schedule, cfg.temperature, cfg.temperature_final, cfg.temperature_gamma)
                temps = list(cfg.teacher_temperatures) if cfg.teacher_temperatures else [T] * M
                n_local = sum(int((mb["labels"] != -100).sum()) for mb in micro)
                n_global = _all_sum(acc, n_local)
                sums = torch.zeros(3, dtype=torch.float64)
                module.train()
                for i, mb in enumerate(micro):
                    mb = {k: v.to(acc.device, non_blocking=True) for k, v in mb.items()}
                    if online is not None:
                        with torch.no_grad():  # not inference_mode: the logits feed the (student's) graph
                            mb["teacher_logits"] = online(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits
                    last = i == len(micro) - 1
                    if cfg.fsdp:  # not wrapped by accelerate, so its autocast is applied here
                        sync, cast = gradient_sync(module, last), acc.autocast()
                    else:
                        sync, cast = (nullcontext() if last else acc.no_sync(module)), nullcontext()
                    with sync, cast:
                        ce, kd, _ = module(mb, temperature=T, teacher_temperatures=temps, **kd_args)
                        loss = cfg.alpha * kd + (1 - cfg.alpha) * ce
                        acc.backward(loss * world / max(n_global, 1))  # DDP and FSDP average over ranks
                    sums += torch.tensor([float(loss.detach()), float(kd.detach()), float(ce.detach())], dtype=torch.float64)
                grad_norm = _clip(acc, module, cfg) if cfg.grad_clip > 0 else None
                lr = optimizer.param_groups[0]["lr"]  # the rate this step uses (get_last_lr after step() is the next one's)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                totals = _all_sum(acc, sums) / max(n_global, 1)
                tokens = _all_sum(acc, sum(int(mb["attention_mask"].sum()) for mb in micro))
                state.step += 1
                state.tokens += tokens
                state.elapsed = time.perf_counter() - t_start
                row = {"step": state.step, "epoch": state.epoch, "loss": float(totals[0]), "kd_loss": float(totals[1]),
                       "ce_loss": float(totals[2]), "lr": lr, "temperature": T, "tokens": state.tokens,
                       "grad_norm": float(grad_norm) if grad_norm is not None else None, "data_wait_s": t_data,
                       "tokens_per_s": state.tokens / state.elapsed if state.elapsed else None}
                if state.step % cfg.log_every == 0 or state.step == total:
                    log.write(row)
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
                if evalset is not None and cfg.eval_every and state.step % cfg.eval_every == 0:
                    log.write({"eval": True, "step": state.step, **evaluate(acc, module, evalset, cfg, eval_weights)})
                saved_now = bool(cfg.checkpoint_every) and state.step % cfg.checkpoint_every == 0
                if saved_now:
                    state.history["dataset"] = train.state_dict()
                    save_checkpoint(acc, ckpt_dir, state, cfg.keep_checkpoints, (module, optimizer, scheduler) if cfg.fsdp else None)
                signum = _stop_signal(acc, stop)  # every rank stops after the same step
                if signum:
                    state.history["dataset"] = train.state_dict()
                    path = ckpt_dir / f"step-{state.step:08d}" if saved_now else \
                        save_checkpoint(acc, ckpt_dir, state, cfg.keep_checkpoints, (module, optimizer, scheduler) if cfg.fsdp else None)
                    bar.close()
                    log.close()
                    raise Interrupted(state.step, signum, str(path))
            else:
                done = True
                continue
            # the epoch's batches are exhausted
            state.epoch += 1
            state.consumed = train.consumed = 0
            if cfg.max_steps is None and state.epoch >= cfg.epochs:
                done = True
    bar.close()
    final_eval = evaluate(acc, module, evalset, cfg, eval_weights) if evalset is not None else None
    if final_eval is not None and not (cfg.eval_every and state.step % cfg.eval_every == 0):
        log.write({"eval": True, "step": state.step, **final_eval})
    state.history["dataset"] = train.state_dict()
    save_checkpoint(acc, ckpt_dir, state, cfg.keep_checkpoints, (module, optimizer, scheduler) if cfg.fsdp else None)
    if cfg.fsdp:
        weights_sd = full_state_dict(module)  # collective: every rank gathers, rank 0 saves
        weights_sd = {k.removeprefix("student."): v for k, v in weights_sd.items()}
    else:
        weights_sd = None
    result = {"steps": state.step, "tokens": state.tokens, "seconds": state.elapsed, "eval": final_eval, "run_dir": str(out)}
    if rank == 0:
        final = out / "final"
        save_final(acc.unwrap_model(module).student, final, tokenizer or find_tokenizer(cfg, train), weights_sd, dtype=save_dtype)
        log.close()
        from .plots import plot_curves

        plot_curves(out / "metrics.jsonl", out / "curves.png")
        result["final"] = str(final)
        (out / "result.json").write_text(json.dumps(result, indent=1))
    acc.wait_for_everyone()
    acc.end_training()
    return result


def _online_teacher(cfg: FitConfig, train: DistillDataset, device: torch.device) -> torch.nn.Module:
    """The ``--online-teacher`` model (float32 on CPU, bf16 on GPU), after checking its tokenizer
    against the stores'."""
    from logitstore.hashing import tokenizer_fingerprint
    from logitstore.teacher import TeacherSpec

    spec = TeacherSpec.parse(cfg.online_teacher, trust_remote_code=cfg.trust_remote_code)
    if tokenizer_fingerprint(spec.load_tokenizer()) != train.stores[0].manifest["tokenizer"]["fingerprint"]:
        raise ConfigError(f"--online-teacher {cfg.online_teacher}: its tokenizer differs from the stores'")
    model = spec.load_model(device, torch.float32 if device.type == "cpu" else torch.bfloat16)
    model.requires_grad_(False)
    return model


def set_schedule_step(scheduler, step: int) -> None:
    """Put the LR schedule at optimizer step ``step``. The schedule is a function of the step, so
    this holds whatever a checkpoint's scheduler state says: checkpoints of multi-process runs made
    before the schedule was stepped once per step record ``world_size`` times the step count."""
    inner = getattr(scheduler, "scheduler", scheduler)  # accelerate's wrapper holds the LambdaLR
    inner.last_epoch = step
    lrs = [base * fn(step) for base, fn in zip(inner.base_lrs, inner.lr_lambdas)]
    for group, lr in zip(inner.optimizer.param_groups, lrs):
        group["lr"] = lr
    inner._last_lr = lrs


def _worker_message(e: Exception) -> str:
    """The original message of an error re-raised by a DataLoader worker (the last traceback line)."""
    text = str(e)
    if "Original Traceback" not in text:
        return text
    last = [ln for ln in text.strip().splitlines() if ln.strip()][-1]
    return last.split(": ", 1)[1] if ": " in last and last.split(": ", 1)[0].endswith("Error") else last


def _loader(ds, workers: int, pin: bool, seed: int = 0) -> DataLoader:
    """A loader with its own generator: by default ``iter(DataLoader)`` draws the workers' base seed
    from the global torch RNG, which would shift dropout masks after a resume (the checkpoint
    restores the RNG at a step, not at the start of the epoch's iterator)."""
    return DataLoader(ds, batch_size=None, num_workers=workers, pin_memory=pin, prefetch_factor=4 if workers else None,
                      generator=torch.Generator().manual_seed(seed), worker_init_fn=ignore_in_worker if workers else None)


def _stop_signal(acc, stop: StopRequests) -> int:
    """The signal that asked this run to stop on any rank (0: none), agreed by all ranks."""
    local = stop.signum or 0
    if acc.num_processes == 1:
        return local
    t = torch.tensor([local], dtype=torch.int64, device=acc.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t)


def _quiet_libraries() -> None:
    """``-q``: no loading/writing bars or advisory warnings from transformers and accelerate (such
    as "Removed shared tensor ..." on every checkpoint of a tied student); errors still show."""
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("accelerate").setLevel(logging.ERROR)


def _clip(acc, module, cfg: FitConfig) -> float:
    """Clip the global gradient norm; return it (before clipping)."""
    if not cfg.fsdp:
        return float(acc.clip_grad_norm_(module.parameters(), cfg.grad_clip))
    norm = torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.grad_clip)  # a DTensor over the shards
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def _all_sum(acc, x):
    """Sum a number or a CPU tensor over all ranks (no-op on one process)."""
    if acc.num_processes == 1:
        return x
    t = torch.as_tensor(x, dtype=torch.float64).to(acc.device)
    t = acc.reduce(t, reduction="sum").cpu()
    return t if isinstance(x, torch.Tensor) else (int(t) if isinstance(x, int) else float(t))


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="fit", unit="step", disable=not enabled, dynamic_ncols=True)


@torch.no_grad()
def evaluate(acc, module, evalset: DistillDataset, cfg: FitConfig, weights: list[float]) -> dict:
    """Validation CE / perplexity, KL(fused teachers || student) at T = 1, and top-1 agreement of the
    student with each teacher and with the fused target, over the whole held-out store. ``weights``:
    one per teacher of ``evalset``, in its order (see :func:`match_teachers`)."""
    from .fusion import fuse

    inner = acc.unwrap_model(module)
    inner.eval()
    M = len(evalset.teachers)
    w = weights  # per eval teacher, matched to the training teachers by identity (match_teachers)
    sums = torch.zeros(3 + M + 1, dtype=torch.float64)  # ce, kd, n, agree_m..., agree_fused
    for i, batch in enumerate(_loader(evalset, 0, False)):
        if cfg.eval_batches is not None and i >= cfg.eval_batches:
            break
        batch = {k: v.to(acc.device) for k, v in batch.items()}
        with acc.autocast():
            # one forward; the LM head, the losses and the top-1 ids run chunk_positions at a time
            ce, kd, n, pred = inner(batch, temperature=1.0, teacher_temperatures=[1.0] * M, weights=w, fuse_mode=cfg.fuse, loss="fkl",
                                    tail="bucket", beta=0.5, chunk_positions=cfg.chunk_positions, vocab_size=evalset.vocab_size,
                                    return_argmax=True)
        keep = batch["labels"].reshape(-1) != -100
        sup = batch["support"]
        agree = []
        for m in range(M):
            top = sup.gather(-1, batch["teacher_lp"][m].argmax(-1, keepdim=True))[:, 0]
            agree.append(float(((top == pred) & keep).sum()))
        target = fuse(batch["teacher_lp"], batch["rest_lp"], sup, batch["valid"], batch["n_out"], temperatures=[1.0] * M, weights=w,
                      mode=cfg.fuse)
        fused_top = sup.gather(-1, target.lp.argmax(-1, keepdim=True))[:, 0]
        agree.append(float(((fused_top == pred) & keep).sum()))
        sums += torch.tensor([float(ce), float(kd), float(n), *agree], dtype=torch.float64)
    sums = _all_sum(acc, sums)
    n = max(float(sums[2]), 1.0)
    ce = float(sums[0]) / n
    res = {"ce": ce, "ppl": math.exp(min(ce, 50.0)), "kl": float(sums[1]) / n, "positions": int(sums[2]),
           "top1_agreement": {name: float(sums[3 + m]) / n for m, name in enumerate(evalset.teacher_names)}}
    res["top1_agreement"]["fused"] = float(sums[3 + M]) / n
    return res


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


def match_teachers(train: DistillDataset, evalset: DistillDataset, weights: list[float], url: str) -> list[float]:
    """The training weights re-ordered for ``evalset``'s teachers, matched by identity (weights,
    config and dtype, not by name or position): the eval store must hold the same teachers."""
    from logitstore.manifest import teacher_identity

    def ident(ds, si, name):
        return json.dumps({k: v for k, v in teacher_identity(ds.stores[si].teacher(name)).items() if k != "k"}, sort_keys=True)

    train_ids = [ident(train, si, n) for si, n in train.teachers]
    out = []
    for (si, name) in evalset.teachers:
        key = ident(evalset, si, name)
        if key not in train_ids:
            raise ConfigError(f"--eval-logits {url}: teacher {name!r} is none of the training teachers "
                              f"({', '.join(train.teacher_names)}); evaluate on a store of the same teachers")
        out.append(weights[train_ids.index(key)])
    if len(out) != len(train_ids):
        missing = [train.teacher_names[i] for i, k in enumerate(train_ids) if k not in {ident(evalset, si, n) for si, n in evalset.teachers}]
        raise ConfigError(f"--eval-logits {url}: lacks training teacher(s) {', '.join(missing)}; evaluate on a store of the same teachers")
    return out


def check_student_tokenizer(spec: str, train: DistillDataset) -> None:
    """A student that ships a tokenizer must use the stores' (the same ids for the same text)."""
    from transformers import AutoTokenizer

    from logitstore.hashing import tokenizer_fingerprint

    p = Path(spec)
    if not (p.is_dir() and any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))):
        return
    try:
        tok = AutoTokenizer.from_pretrained(str(p))
    except (OSError, ValueError) as e:
        raise ConfigError(f"--student {spec}: cannot load its tokenizer ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if tokenizer_fingerprint(tok) != train.stores[0].manifest["tokenizer"]["fingerprint"]:
        raise ConfigError(f"--student {spec}: its tokenizer differs from the stores' (the teachers'); a student must read "
                          f"the same token ids the targets are over")


def find_tokenizer(cfg: FitConfig, train: DistillDataset):
    """The student's own tokenizer if it has one, else the first teacher's (checked against the store)."""
    from transformers import AutoTokenizer

    from logitstore.hashing import tokenizer_fingerprint

    want = train.stores[0].manifest["tokenizer"]["fingerprint"]
    candidates = [cfg.student] + [t["source"] for s in train.stores for t in s.manifest["teachers"]]
    for c in candidates:
        if not Path(c).is_dir():
            continue
        try:
            tok = AutoTokenizer.from_pretrained(c)
        except (OSError, ValueError):
            continue
        if tokenizer_fingerprint(tok) == want:
            return tok
    return None


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
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


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
