"""``trainer fit``: distil a student from cached teacher targets.

:func:`fit` reads top to bottom as the steps of a run (:class:`Run`): build the data (the stores
as a ``DistillDataset``, teacher weights, an evaluation store matched by teacher), build the student
(its dtype, checks, the loss module, FSDP), build AdamW with warm-up + cosine LR and hand them to
``accelerate`` (device placement, DDP under ``torchrun``, autocast), resume or start the run
directory, train, then evaluate and save. Each optimizer step takes ``grad_accum`` batches, counts
their target positions across ranks, and back-propagates ``alpha * KD + (1 - alpha) * CE``
normalised by that global count, so the loss is exactly the mean over all target positions of the
step whatever the number of ranks or micro-batches. Metrics go to ``RUN_DIR/metrics.jsonl`` (and
TensorBoard), checkpoints to ``RUN_DIR/checkpoints/step-N`` (:mod:`trainer.checkpoint`), the final
model to ``RUN_DIR/final`` with its tokenizer, and the training curves to ``RUN_DIR/curves.png``.
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from contextlib import nullcontext
from itertools import islice
from pathlib import Path

import torch
import yaml

from logitstore.capture.lm_head import forward_logits
from logitstore.errors import ConfigError, LogitStoreError
from logitstore.format.manifest import store_id
from logitstore.progress import quiet_libraries

from .checkpoint import TrainState, module_record, save_checkpoint, save_final
from .config import FitConfig
from .data import DistillDataset, match_teachers
from .classify import ClassifyDataset, ClassifyModule, check_classifier_student, evaluate_classify, load_classifier_student
from .evaluation import all_sum, evaluate
from .features import build_feature_kd, save_projections
from .follow import wait_for_shards
from .positions import parse_kd_positions
from .sampled import refuse_biased
from logitstore.distributions.fusion import normalize_weights
from .interrupt import Interrupted, StopRequests
from .loader import epoch_batches, make_loader, worker_message
from .metrics import MetricsLog
from .resume import STATE, check_resume, has_progress, latest_checkpoint, planned_total, saved_store_ids
from .schedules import lr_factor, temperature_at
from .sharding import full_state_dict, gradient_sync, load_sharded, shard_module
from .student import (DTYPES, DistillModule, adopt_special_ids, cast_parameters, check_document_separation,
                      check_student_tokenizer, find_tokenizer, load_online_teacher, load_student, output_vocab, parameter_dtype)

__all__ = ["fit", "evaluate", "MetricsLog", "Run", "TrainState"]


def fit(config: FitConfig, *, model: torch.nn.Module | None = None, tokenizer=None) -> dict:
    """Train ``config.student`` (or ``model``: any module mapping token ids to logits) from the
    stores in ``config.logits``. Returns the final metrics and paths."""
    run = Run(config, model)          # settings checked, accelerator, seed
    run.build_data()                  # training and evaluation streams, teacher weights
    run.build_student(model)          # dtype, tokenizer and vocabulary checks, loss module, FSDP
    run.build_optimizer()             # AdamW, warm-up + cosine LR, accelerate.prepare
    run.resume_or_start()             # the run directory: a checkpoint to continue, or a fresh start
    with StopRequests() as stop:      # SIGINT/SIGTERM: finish the step, checkpoint, exit (trainer/interrupt.py)
        run.train_steps(stop)
    return run.finish(tokenizer)      # final evaluation, checkpoint, final/ model, curves


class Run:
    """What the steps of one ``fit`` share; each method is one step of :func:`fit`."""

    def __init__(self, cfg: FitConfig, model: torch.nn.Module | None):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        if model is None and not cfg.student:
            raise ConfigError("--student: required (a model directory, hub id, or a model config .json/.yaml)")
        if not cfg.progress:
            quiet_libraries()
        self.cfg = cfg
        self.cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
        if cfg.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"--device {cfg.device}: CUDA is not available on this machine")
        self.precision = cfg.precision if cfg.precision != "auto" else ("no" if self.cpu else "bf16")
        if self.cpu and self.precision == "fp16":  # accelerate would run it as fp32: no fp16 autocast, no loss scaler on CPU
            raise ConfigError("--precision fp16: needs a CUDA device (on CPU it would silently train in fp32); use bf16 or no")
        # The LR schedule is a function of the optimizer step, stepped once per step on every rank. By
        # default accelerate's scheduler wrapper steps it once per *process* per step (it assumes the
        # schedule was written for a single process's batch size), which would run warm-up and decay
        # world_size times too fast here, where --batch-size is per rank and the schedule counts steps.
        self.acc = Accelerator(cpu=self.cpu, mixed_precision=self.precision, step_scheduler_with_optimizer=False)
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.out = Path(cfg.out)
        self.ckpt_dir = self.out / "checkpoints"
        set_seed(cfg.seed)

    # ---------------------------------------------------------------- data
    def build_data(self) -> None:
        cfg, rank, world = self.cfg, self.rank, self.world
        self.task = task_of_stores(cfg)  # lm (next-token targets) or classify (class logits per text: trainer/classify.py)
        Dataset = ClassifyDataset if self.task == "classify" else DistillDataset
        self.train = Dataset(list(cfg.logits), batch_size=cfg.batch_size, seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer,
                                    rank=rank, world_size=world, num_workers=cfg.num_workers, verify_checksums=cfg.verify_checksums,
                                    with_targets=(cfg.alpha > 0 and not cfg.online_teacher) or cfg.uses_hidden,
                                    skip_bad_shards=cfg.skip_bad_shards,
                                    cache_dir=cfg.cache_dir, prefetch=cfg.prefetch, n_streams=cfg.streams, follow=cfg.follow,
                                    group_by_length=cfg.group_by_length)
        wait_for_shards(self.train, cfg.follow_poll, rank == 0)  # --follow: at least one committed shard
        for b in self.train.skipped:
            print(f"warning: skipping {b['store']}/{b['path']} ({b['sequences']} sequences): {b['error']}", file=sys.stderr)
        self.M = len(self.train.teachers)
        try:
            self.weights = normalize_weights(cfg.weights, self.M)
        except ValueError as e:
            raise ConfigError(f"{e} (teachers: {', '.join(self.train.teacher_names)})") from None
        refuse_biased(cfg, getattr(self.train, "sampled", []), self.train.teacher_names)  # trainer/sampled.py
        # per-position teacher weights (LM stores only: refused for classify below)
        self.fuse_kwargs = {} if self.task == "classify" else dict(fuse_weights=cfg.fuse_weights, fuse_tau=cfg.fuse_weight_temperature,
                                                                   kd_positions=parse_kd_positions(cfg.kd_positions))
        if cfg.teacher_temperatures is not None and len(cfg.teacher_temperatures) != self.M:
            raise ConfigError(f"--teacher-temperatures: {len(cfg.teacher_temperatures)} value(s) for {self.M} teacher(s)")
        self.evalset, self.eval_weights = None, None
        if cfg.eval_logits:
            self.evalset = Dataset([cfg.eval_logits], batch_size=cfg.batch_size, shuffle=False, rank=rank, world_size=world,
                                          verify_checksums=cfg.verify_checksums, cache_dir=cfg.cache_dir, prefetch=cfg.prefetch)
            if self.evalset.stores[0].manifest["tokenizer"]["fingerprint"] != self.train.stores[0].manifest["tokenizer"]["fingerprint"]:
                raise ConfigError(f"--eval-logits {cfg.eval_logits}: tokenizer differs from the training stores'")
            self.eval_weights = match_teachers(self.train, self.evalset, self.weights, cfg.eval_logits)

    # ---------------------------------------------------------------- student
    def build_student(self, model: torch.nn.Module | None) -> None:
        cfg, train = self.cfg, self.train
        if self.task == "classify" and (cfg.online_teacher or cfg.fsdp or cfg.fuse_weights != "fixed" or cfg.kd_positions != "all"):
            raise ConfigError("--online-teacher/--fsdp/--fuse-weights/--kd-positions: not for classify stores (their teachers ran already; "
                              "students are small; there is no per-token entropy)")
        m0 = train.stores[0].manifest
        student = model if model is not None else (
            load_classifier_student(cfg.student, m0["num_labels"], m0["label_names"], trust_remote_code=cfg.trust_remote_code)
            if self.task == "classify" else load_student(cfg.student, trust_remote_code=cfg.trust_remote_code))
        if model is not None and not hasattr(model, "save_pretrained") and isinstance(getattr(model, "config", None), dict):
            module_record(model)  # a class and config that final/module.json can rebuild, checked before training
        if model is None:
            check_student_tokenizer(cfg.student, train)
            if Path(cfg.student).suffix in (".json", ".yaml", ".yml"):  # a fresh model: the store's special tokens
                adopt_special_ids(student, train.stores[0].manifest["tokenizer"])
        # master weights in --param-dtype (fp32 by default, whatever the checkpoint holds); --precision
        # only sets the autocast compute dtype; final/ is saved in --save-dtype (default: the checkpoint's)
        source_dtype = getattr(student, "checkpoint_dtype", None) or parameter_dtype(student)
        self.save_dtype = source_dtype if cfg.save_dtype == "checkpoint" else DTYPES[cfg.save_dtype]
        cast_parameters(student, DTYPES[cfg.param_dtype])
        why = check_document_separation(student, train.vocab_size, cfg.seed) if train.segmented else None  # packed documents
        if why is not None and self.rank == 0:
            warnings.warn(f"--logits {cfg.logits[0]}: its windows pack several documents and {why}; the student then sees "
                          "context the teacher did not (dump with --no-pack to avoid it)", RuntimeWarning, stacklevel=2)
        sv = output_vocab(student) if self.task == "lm" else None
        if sv is not None and sv < train.vocab_size:
            raise ConfigError(f"--student {cfg.student}: output vocabulary {sv} is smaller than the store's {train.vocab_size}")
        self.online = (load_online_teacher(cfg.online_teacher, train, self.acc.device, cfg.trust_remote_code)
                       if cfg.online_teacher and cfg.alpha > 0 else None)
        if self.task == "classify":
            check_classifier_student(student, train.vocab_size, train.seq_len, cfg.student or type(student).__name__)
            if getattr(getattr(student, "config", None), "pad_token_id", 0) is None:  # a decoder without one: the store's
                student.config.pad_token_id = m0["tokenizer"]["pad_token_id"]
        self.module = ClassifyModule(student, m0.get("num_labels")) if self.task == "classify" else DistillModule(student)
        if cfg.uses_hidden:  # feature / relation KD: learned projections trained (and saved) with the student
            self.module.features, pooling = build_feature_kd(cfg, student, train, self.weights, self.task)
            if self.task == "classify":
                self.module.pooling = pooling
            self.module.features.to(DTYPES[cfg.param_dtype])
        if cfg.fsdp:
            if self.world < 2:
                raise ConfigError("--fsdp: shards the student across processes; launch with torchrun --nproc-per-node N (N >= 2)")
            compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
            self.module = shard_module(self.module, self.acc.device, compute)  # before the optimizer: it must see the shards

    # ---------------------------------------------------------------- optimizer
    def build_optimizer(self) -> None:
        cfg = self.cfg
        decay = [p for p in self.module.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.module.parameters() if p.requires_grad and p.ndim < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
        steps_per_epoch = math.ceil(self.train.batches_per_epoch() / cfg.grad_accum)
        self.total = cfg.max_steps or cfg.epochs * steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,  # self.total: a resume may restore it
                                                           lambda s: lr_factor(s, self.total, cfg.warmup_steps, cfg.min_lr_ratio))
        if not cfg.fsdp:  # DDP (under torchrun), device placement
            self.module, self.optimizer, self.scheduler = self.acc.prepare(self.module, self.optimizer, self.scheduler)

    # ---------------------------------------------------------------- run directory
    def resume_or_start(self) -> None:
        cfg, out, rank = self.cfg, self.out, self.rank
        self.state = TrainState()
        store_ids = [store_id(s.manifest) for s in self.train.stores]
        latest = latest_checkpoint(self.ckpt_dir)
        resuming = cfg.resume and latest is not None
        if cfg.resume and latest is None and rank == 0:
            print(f"--resume: no checkpoint under {self.ckpt_dir} yet; starting at step 0", file=sys.stderr)
        if not cfg.resume and has_progress(out):
            raise ConfigError(f"--out {out}: already holds a run with a checkpoint or final model; pass --resume to continue "
                              f"it or choose another --out")
        if resuming:
            saved = TrainState(**json.loads((latest / STATE).read_text()))
            for change in check_resume(out, cfg, store_ids, saved_store_ids(saved.history)):
                if rank == 0:
                    print(f"--resume: {change}", file=sys.stderr)
            if cfg.fsdp:
                load_sharded(latest, self.module, self.optimizer)
                self.scheduler.load_state_dict(torch.load(latest / "scheduler.pt", weights_only=True))  # no unpickling of objects
            else:
                self.acc.load_state(str(latest))
            self.state = saved
            self.train.load_state_dict(saved.history["dataset"])
            self.total = planned_total(saved.history, cfg, self.train)
            set_schedule_step(self.scheduler, saved.step)
        self.state.history["stores"], self.state.history["total"] = store_ids, self.total
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            if self.train.skipped:
                (out / "skipped_shards.json").write_text(json.dumps(self.train.skipped, indent=1))
        self.log = MetricsLog(out, rank == 0, keep_until=self.state.step if resuming else 0)

    # ---------------------------------------------------------------- training
    def train_steps(self, stop: StopRequests) -> None:
        """Optimizer steps until ``total``, epoch after epoch; a stop request ends it after a step,
        with a checkpoint of that step (:class:`Interrupted`)."""
        cfg, state, train = self.cfg, self.state, self.train
        self.bar = _progress(self.total, state.step, enabled=cfg.progress and self.rank == 0)
        self.t_start = time.perf_counter() - state.elapsed
        while state.step < self.total:
            if state.consumed == 0:
                train.set_epoch(state.epoch)
            with epoch_batches(make_loader(train, cfg.num_workers, not self.cpu, seed=cfg.seed + state.epoch)) as it:
                while state.step < self.total:
                    t0 = time.perf_counter()
                    try:
                        micro = list(islice(it, cfg.grad_accum))
                    except LogitStoreError as e:  # from a DataLoader worker: keep the original one-line message
                        raise type(e)(worker_message(e) + " (or pass --skip-bad-shards to leave damaged shards out)") from None
                    if not micro:
                        break  # the epoch's batches are exhausted
                    train.consumed += len(micro)
                    state.consumed = train.consumed
                    self.after_step(self.step(micro, data_wait=time.perf_counter() - t0), stop)
                else:
                    return
            state.epoch += 1
            state.consumed = train.consumed = 0
            if cfg.max_steps is None and state.epoch >= cfg.epochs:
                return

    def step(self, micro: list[dict], data_wait: float) -> dict:
        """One optimizer step over the micro-batches ``micro``; returns its metrics row."""
        cfg, state, acc, module = self.cfg, self.state, self.acc, self.module
        T = temperature_at(state.step, self.total, cfg.temperature_schedule, cfg.temperature, cfg.temperature_final,
                           cfg.temperature_gamma, cfg.temperature_every)
        temps = list(cfg.teacher_temperatures) if cfg.teacher_temperatures else [T] * self.M
        kd_args = dict(weights=self.weights, fuse_mode=cfg.fuse, loss=cfg.loss, tail=cfg.tail, beta=cfg.beta, **self.fuse_kwargs,
                       chunk_positions=cfg.chunk_positions, vocab_size=self.train.vocab_size, with_kd=cfg.alpha > 0)
        n_global = all_sum(acc, sum(int((mb["labels"] != -100).sum()) for mb in micro))
        sums = torch.zeros(6, dtype=torch.float64)  # loss, kd, ce, feature, rkd distance, rkd angle
        module.train()
        for i, mb in enumerate(micro):
            mb = {k: v.to(acc.device, non_blocking=True) for k, v in mb.items()}
            if self.online is not None:
                with torch.no_grad():  # not inference_mode: the logits feed the (student's) graph
                    mb["teacher_logits"] = forward_logits(self.online, mb["input_ids"], mb["attention_mask"], mb.get("position_ids"))
            last = i == len(micro) - 1
            if cfg.fsdp:  # not wrapped by accelerate, so its autocast is applied here
                sync, cast = gradient_sync(module, last), acc.autocast()
            else:
                sync, cast = (nullcontext() if last else acc.no_sync(module)), nullcontext()
            with sync, cast:
                ce, kd, _, *rest = module(mb, temperature=T, teacher_temperatures=temps, with_aux=cfg.uses_hidden, **kd_args)
                aux = rest[0] if rest else {}  # feature / relation terms (trainer/features.py), weighted sums
                loss = cfg.alpha * kd + (1 - cfg.alpha) * ce + sum(aux.values())
                acc.backward(loss * self.world / max(n_global, 1))  # DDP and FSDP average over ranks
            extra = [float(aux[k].detach()) if aux else 0.0 for k in ("feature", "rkd_distance", "rkd_angle")]
            sums += torch.tensor([float(loss.detach()), float(kd.detach()), float(ce.detach()), *extra], dtype=torch.float64)
        grad_norm = _clip(acc, module, cfg) if cfg.grad_clip > 0 else None
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses (get_last_lr after step() is the next one's)
        if n_global:  # a step of only filler rows (the end of an uneven epoch) leaves the weights and moments alone
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        totals = all_sum(acc, sums) / max(n_global, 1)
        state.step += 1
        state.tokens += all_sum(acc, sum(int(mb["attention_mask"].sum()) for mb in micro))
        state.elapsed = time.perf_counter() - self.t_start
        hidden = ({"feature_loss": float(totals[3]), "rkd_distance_loss": float(totals[4]), "rkd_angle_loss": float(totals[5])}
                  if cfg.uses_hidden else {})  # weighted, as they enter the loss
        return {"step": state.step, "epoch": state.epoch, "loss": float(totals[0]), "kd_loss": float(totals[1]),
                "ce_loss": float(totals[2]), **hidden, "lr": lr, "temperature": T, "tokens": state.tokens,
                "grad_norm": float(grad_norm) if grad_norm is not None else None, "data_wait_s": data_wait,
                "tokens_per_s": state.tokens / state.elapsed if state.elapsed else None}

    def after_step(self, row: dict, stop: StopRequests) -> None:
        """Log, evaluate and checkpoint on their cadences; stop (every rank at this step) if asked."""
        cfg, state = self.cfg, self.state
        if state.step % cfg.log_every == 0 or state.step == self.total:
            self.log.write(row)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
        if self.evalset is not None and cfg.eval_every and state.step % cfg.eval_every == 0:
            self.log.write({"eval": True, "step": state.step, **self.evaluate()})
        saved_now = bool(cfg.checkpoint_every) and state.step % cfg.checkpoint_every == 0
        if saved_now:
            self.checkpoint()
        signum = _stop_signal(self.acc, stop)
        if signum:
            path = self.ckpt_dir / f"step-{state.step:08d}" if saved_now else self.checkpoint()
            self.bar.close()
            self.log.close()
            raise Interrupted(state.step, signum, str(path))

    def checkpoint(self) -> Path:
        self.state.history["dataset"] = self.train.state_dict()
        return save_checkpoint(self.acc, self.ckpt_dir, self.state, self.cfg.keep_checkpoints,
                               (self.module, self.optimizer, self.scheduler) if self.cfg.fsdp else None)

    def evaluate(self) -> dict:
        fn = evaluate_classify if self.task == "classify" else evaluate
        return fn(self.acc, self.module, self.evalset, self.cfg, self.eval_weights)

    # ---------------------------------------------------------------- the end
    def finish(self, tokenizer) -> dict:
        cfg, state, acc = self.cfg, self.state, self.acc
        self.bar.close()
        final_eval = self.evaluate() if self.evalset is not None else None
        if final_eval is not None and not (cfg.eval_every and state.step % cfg.eval_every == 0):
            self.log.write({"eval": True, "step": state.step, **final_eval})
        self.checkpoint()
        weights_sd = None
        if cfg.fsdp:
            weights_sd = full_state_dict(self.module)  # collective: every rank gathers, rank 0 saves
            weights_sd = {k.removeprefix("student."): v for k, v in weights_sd.items()}
        result = {"steps": state.step, "tokens": state.tokens, "seconds": state.elapsed, "eval": final_eval, "run_dir": str(self.out)}
        if self.rank == 0:
            final = self.out / "final"
            inner = acc.unwrap_model(self.module)
            save_final(inner.student, final, tokenizer or find_tokenizer(cfg.student, self.train), weights_sd, dtype=self.save_dtype)
            if inner.features is not None:
                save_projections(inner.features, final)
            self.log.close()
            from .plots import plot_curves

            plot_curves(self.out / "metrics.jsonl", self.out / "curves.png")
            result["final"] = str(final)
            (self.out / "result.json").write_text(json.dumps(result, indent=1))
        acc.wait_for_everyone()
        acc.end_training()
        return result


def task_of_stores(cfg: FitConfig) -> str:
    """The task of the training stores (their first's; the dataset checks the others), against ``--task``."""
    import logitstore

    task = logitstore.open(cfg.logits[0], cache_dir=cfg.cache_dir, follow=cfg.follow).task if cfg.logits else "lm"
    if cfg.task not in ("auto", task):
        raise ConfigError(f"--task {cfg.task}: {cfg.logits[0]} is a {task} store")
    return task


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


def _stop_signal(acc, stop: StopRequests) -> int:
    """The signal that asked this run to stop on any rank (0: none), agreed by all ranks."""
    local = stop.signum or 0
    if acc.num_processes == 1:
        return local
    t = torch.tensor([local], dtype=torch.int64, device=acc.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t)


def _clip(acc, module, cfg: FitConfig) -> float:
    """Clip the global gradient norm; return it (before clipping)."""
    if not cfg.fsdp:
        return float(acc.clip_grad_norm_(module.parameters(), cfg.grad_clip))
    norm = torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.grad_clip)  # a DTensor over the shards
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="fit", unit="step", disable=not enabled, dynamic_ncols=True)
