"""Distilling from a logitstore cache with ``transformers.Trainer`` (or TRL's ``SFTTrainer``).

Three pieces, usable together or apart (TRL is not needed to import this module):

- :class:`TeacherTargets` opens one or more stores (one or several teachers) and finds a sequence's
  teacher targets by the per-sequence content hash (blake2b-128 of its token ids as little-endian
  uint32, :func:`logitstore.format.hashing.sequence_hash`), the same key ``trainer fit`` joins
  stores by;
- :class:`KDDataCollator` (``Trainer(data_collator=...)``) pads the user's tokenised rows, looks up
  each row's targets and builds the batch ``trainer fit`` trains on: ``input_ids``,
  ``attention_mask``, **shifted** ``labels`` and the sparse target fields of
  :mod:`logitstore.distributions.fusion`;
- :class:`KDTrainer` (a ``transformers.Trainer``) computes ``alpha * KD + (1 - alpha) * CE`` with
  logitstore's own chunked sparse loss (:class:`trainer.student.DistillModule`: fusion of the
  teachers, then :func:`trainer.losses.kd_ce_loss`, KD multiplied by ``T**2``), normalised by the
  number of target positions of the whole optimizer step (all gradient-accumulation micro-batches,
  all ranks), i.e. exactly ``trainer fit``'s per-step loss. :class:`KDLossMixin` is the same loss for
  any ``Trainer`` subclass, and :func:`kd_loss_for_batch` for a loop of your own.

Usage::

    import datasets, logitstore
    from transformers import AutoModelForCausalLM, TrainingArguments
    from trainer.hf import KDDataCollator, KDTrainer, TeacherTargets

    targets = TeacherTargets(["cache/"])                       # or several stores: one per teacher
    store = logitstore.open("cache/")
    # the rows must be the store's own windows (its input_ids), not a re-tokenisation of the corpus
    ds = datasets.Dataset.from_dict({"input_ids": [store[i]["input_ids"].tolist() for i in range(len(store))]})
    collator = KDDataCollator(targets, pad_token_id=0)
    trainer = KDTrainer(model=AutoModelForCausalLM.from_pretrained("student/"), train_dataset=ds,
                        data_collator=collator, kd_alpha=0.5, temperature=1.0, kd_loss="fkl",
                        args=TrainingArguments("runs/hf", per_device_train_batch_size=8,
                                               gradient_accumulation_steps=4, max_steps=1000))
    trainer.train()                                            # logs loss, kd_loss and ce_loss

TRL's ``SFTTrainer`` (a ``Trainer`` subclass) takes the same loss through the mixin::

    from trl import SFTConfig, SFTTrainer
    from trainer.hf import KDLossMixin

    class KDSFTTrainer(KDLossMixin, SFTTrainer):  # the mixin first: its compute_loss wins
        pass

    trainer = KDSFTTrainer(model=model, train_dataset=ds, data_collator=collator, kd_alpha=0.5,
                           args=SFTConfig("runs/sft", remove_unused_columns=False, packing=False,
                                          max_length=None, dataset_kwargs={"skip_prepare_dataset": True}))

For SFTTrainer pass the collator explicitly (its own collator does not build the targets),
``remove_unused_columns=False`` (keep the dataset's columns for the collator), and a dataset that is
already the store's windows, with SFT's own preparation skipped: any re-tokenisation, truncation,
packing or added EOS/BOS changes the token ids, so the row's hash is not in the store and the
collator stops with an error naming the row. Checked by hand with TRL 1.16.0 (not a dependency, not
in the test suite): the settings above train, and with ``bf16=False`` the step loss equals
:func:`kd_loss_for_batch`'s to 1e-7; note that ``SFTConfig`` defaults to ``bf16=True`` (autocast,
also on CPU) and ``gradient_checkpointing=True``. TRL's
``compute_loss_func`` receives only the model's outputs and the labels, not the batch, so it cannot
see the teacher targets; use the mixin (or :func:`kd_loss_for_batch` in a loop of your own).

Conventions of the returned batch (``B`` rows, ``L`` = longest row, or rounded up to
``pad_to_multiple_of``, ``N = B * L`` positions): ``labels[b, t]`` is the *next* token
``input_ids[b, t + 1]`` where position ``t`` is trained, else ``-100`` (as in ``trainer fit``'s
batches, and unlike Hugging Face's unshifted ``labels``, which its models shift). The same tensor is
also returned as ``shift_labels``, the name under which ``transformers.Trainer`` counts target
positions as given (``num_items_in_batch``). Only :class:`KDTrainer` / :func:`kd_loss_for_batch`
read this batch; do not feed it to a model's own loss (``model(**batch)``), which would shift the
labels a second time.

Normalisation under ``Trainer`` (checked against transformers 5.24's ``trainer.py``): the Trainer
counts ``num_items_in_batch`` over the micro-batches of one optimizer step (``shift_labels`` as
given; all ranks when ``average_tokens_across_devices``, the default) only if the model "accepts
loss kwargs" or a ``compute_loss_func`` is set, and divides the returned loss by
``gradient_accumulation_steps`` unless ``loss_is_scaled_for_ga`` says it is already normalised.
:class:`KDLossMixin` sets ``model_accepts_loss_kwargs = True`` (used only for that count: its
``compute_loss`` never passes kwargs to the model) and ``loss_is_scaled_for_ga = True``, and divides
the summed loss by ``num_items_in_batch`` (times the number of processes when tokens are averaged
across devices, as DDP averages gradients), so the loss of a step is its mean over target
positions, as in ``trainer fit``. Without ``num_items_in_batch`` (a call of your own) it divides by
the batch's own count.

Differences from ``trainer fit``: the temperature is constant (no schedule); one process per device
(``torchrun``/accelerate; ``nn.DataParallel`` over several GPUs in one process is not supported).
Under DDP/FSDP/DeepSpeed the loss runs *through* the wrapped model's ``forward`` (the student's
``forward`` is replaced by the loss for that one call), so the wrappers' hooks see it. Tested in
one process and under ``torchrun`` with 2 CPU processes (DDP, gloo: the same loss and step as one
process with the whole batch); FSDP and DeepSpeed were not tested.
"""

from __future__ import annotations

import contextlib
import math

import torch
from transformers import Trainer

from logitstore.distributions.fusion import MODES, normalize_weights
from logitstore.errors import ConfigError

from .hf_data import KDDataCollator, TeacherTargets
from .losses import LOSSES, TAILS
from .student import DistillModule, check_document_separation

__all__ = ["TeacherTargets", "KDDataCollator", "KDLossMixin", "KDTrainer", "kd_loss_for_batch", "kd_sums"]

def _check_loss_settings(kd_alpha, temperature, kd_loss, tail, fuse, beta, chunk_positions) -> None:
    if not (isinstance(kd_alpha, (int, float)) and 0.0 <= kd_alpha <= 1.0):
        raise ConfigError(f"kd_alpha: expected a value in [0, 1], got {kd_alpha!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"temperature: expected a number > 0, got {temperature!r}")
    if kd_loss not in LOSSES:
        raise ConfigError(f"kd_loss: expected one of {', '.join(LOSSES)}, got {kd_loss!r}")
    if tail not in TAILS:
        raise ConfigError(f"tail: expected one of {', '.join(TAILS)}, got {tail!r}")
    if fuse not in MODES:
        raise ConfigError(f"fuse: expected one of {', '.join(MODES)}, got {fuse!r}")
    if not (isinstance(beta, (int, float)) and 0.0 < beta < 1.0):
        raise ConfigError(f"beta: expected 0 < beta < 1, got {beta!r}")
    if isinstance(chunk_positions, bool) or not isinstance(chunk_positions, int) or chunk_positions < 1:
        raise ConfigError(f"chunk_positions: expected a positive integer, got {chunk_positions!r}")


def _weights(teacher_weights, n_teachers: int) -> list[float]:
    try:
        return normalize_weights(teacher_weights, n_teachers)
    except ValueError as e:
        raise ConfigError(str(e).replace("--weights", "teacher_weights")) from None


def kd_sums(model: torch.nn.Module, batch: dict, *, vocab_size: int, kd_alpha: float = 0.5, temperature: float = 1.0,
            kd_loss: str = "fkl", tail: str = "bucket", fuse: str = "mean-probs", teacher_weights=None,
            teacher_temperatures=None, beta: float = 0.5, chunk_positions: int = 1024):
    """``(ce_sum, kd_sum, n)``: summed CE and KD (times ``T**2``) over the target positions of
    ``batch`` (a :class:`KDDataCollator` batch on the model's device) and their count ``n``, from
    :class:`trainer.student.DistillModule` (fusion, then the chunked :func:`trainer.losses.kd_ce_loss`;
    ``[B, L, V]`` logits are never formed for the families of :mod:`logitstore.capture.lm_head`).
    ``model``: the (unwrapped) student, mapping ``input_ids`` [B, L] to logits. ``vocab_size``: the
    stores' vocabulary (logit columns beyond it get no probability). ``teacher_temperatures``: per
    teacher (default: ``temperature`` for each). With ``kd_alpha == 0`` no KD is computed."""
    M = int(batch["teacher_lp"].shape[0]) if "teacher_lp" in batch else 1
    temps = [float(t) for t in teacher_temperatures] if teacher_temperatures is not None else [float(temperature)] * M
    if len(temps) != M:
        raise ConfigError(f"teacher_temperatures: {len(temps)} value(s) for {M} teacher(s)")
    if kd_alpha > 0 and "teacher_lp" not in batch:
        raise ConfigError("kd_sums: the batch has no teacher targets (build it with KDDataCollator)")
    return DistillModule(model)(batch, temperature=float(temperature), teacher_temperatures=temps,
                                weights=_weights(teacher_weights, M), fuse_mode=fuse, loss=kd_loss, tail=tail, beta=beta,
                                chunk_positions=chunk_positions, vocab_size=int(vocab_size), with_kd=kd_alpha > 0)


def kd_loss_for_batch(model: torch.nn.Module, batch: dict, *, vocab_size: int, kd_alpha: float = 0.5, temperature: float = 1.0,
                      kd_loss: str = "fkl", tail: str = "bucket", fuse: str = "mean-probs", teacher_weights=None,
                      teacher_temperatures=None, beta: float = 0.5, chunk_positions: int = 1024, num_items: int | None = None):
    """``(loss, {"kd": ..., "ce": ..., "n": ...})`` for a loop of your own: ``loss = (kd_alpha * KD_sum
    + (1 - kd_alpha) * CE_sum) / num_items`` (a 0-d tensor with gradients), ``num_items`` defaulting to
    the batch's own count of target positions (pass the optimizer step's total to accumulate
    gradients over several batches as ``trainer fit`` does: then the step's gradient is that of its
    mean). The dict holds the KD and CE terms normalised the same way (detached) and the batch's
    count ``n``. Arguments as in :func:`kd_sums`; bad settings raise :class:`ConfigError`."""
    _check_loss_settings(kd_alpha, temperature, kd_loss, tail, fuse, beta, chunk_positions)
    ce, kd, n = kd_sums(model, batch, vocab_size=vocab_size, kd_alpha=kd_alpha, temperature=temperature, kd_loss=kd_loss,
                        tail=tail, fuse=fuse, teacher_weights=teacher_weights, teacher_temperatures=teacher_temperatures,
                        beta=beta, chunk_positions=chunk_positions)
    denom = max(float(num_items if num_items is not None else int(n)), 1.0)
    loss = (kd_alpha * kd + (1 - kd_alpha) * ce) / denom
    return loss, {"kd": kd.detach() / denom, "ce": ce.detach() / denom, "n": int(n)}


@contextlib.contextmanager
def _forward_once(student: torch.nn.Module, fn):
    """Replace ``student.forward`` by ``fn`` for one call through its wrappers (DDP, FSDP, DeepSpeed
    call ``module(...)``, which runs their hooks and then ``forward``); ``fn`` runs with the original
    ``forward`` back in place (so a student off the chunked-head list can call itself)."""
    had = "forward" in student.__dict__
    old = student.__dict__.get("forward")

    def restore():
        if had:
            student.forward = old
        else:
            student.__dict__.pop("forward", None)

    def once(*args, **kwargs):
        restore()
        return fn(*args, **kwargs)

    student.forward = once
    try:
        yield
    finally:
        restore()


class KDLossMixin:
    """``compute_loss`` of ``alpha * KD + (1 - alpha) * CE`` over a :class:`KDDataCollator` batch,
    for any ``transformers.Trainer`` subclass (put it first: ``class T(KDLossMixin, SFTTrainer)``).

    Keyword arguments (the rest go to the Trainer): ``kd_alpha`` (weight of KD, in [0, 1]),
    ``temperature`` (student and, unless ``teacher_temperatures``, teachers; KD is multiplied by
    ``T**2``), ``kd_loss`` (``fkl``, ``rkl``, ``jsd`` with ``beta``), ``tail`` (``bucket``,
    ``renorm``), ``fuse`` (``mean-probs``, ``mean-logits``), ``teacher_weights`` (normalised; default
    equal), ``chunk_positions`` (positions per LM-head chunk), and ``targets`` (a
    :class:`TeacherTargets`; taken from ``data_collator`` when that is a :class:`KDDataCollator`).
    Logs ``kd_loss`` and ``ce_loss`` (normalised like ``loss``) beside ``loss``.
    """

    def __init__(self, *args, kd_alpha: float = 0.5, temperature: float = 1.0, kd_loss: str = "fkl", tail: str = "bucket",
                 fuse: str = "mean-probs", teacher_weights=None, teacher_temperatures=None, beta: float = 0.5,
                 chunk_positions: int = 1024, targets: TeacherTargets | None = None, **kwargs):
        _check_loss_settings(kd_alpha, temperature, kd_loss, tail, fuse, beta, chunk_positions)
        collator = kwargs.get("data_collator")
        if targets is None and isinstance(collator, KDDataCollator):
            targets = collator.targets
        if not isinstance(targets, TeacherTargets):
            raise ConfigError("KDTrainer: pass data_collator=KDDataCollator(...) or targets=TeacherTargets(...) (the "
                              "stores' teachers and vocabulary)")
        M = len(targets.teachers)
        if teacher_temperatures is not None:
            teacher_temperatures = [float(t) for t in teacher_temperatures]
            if len(teacher_temperatures) != M or not all(t > 0 for t in teacher_temperatures):
                raise ConfigError(f"teacher_temperatures: expected {M} value(s) > 0 (teachers: {', '.join(targets.teacher_names)}), "
                                  f"got {teacher_temperatures}")
        try:
            weights = normalize_weights(teacher_weights, M)
        except ValueError as e:
            raise ConfigError(f"{str(e).replace('--weights', 'teacher_weights')} (teachers: {', '.join(targets.teacher_names)})") from None
        super().__init__(*args, **kwargs)
        if targets.segmented:  # packed documents: the student must keep them apart, as the teacher did
            why = check_document_separation(self.model, targets.vocab_size)
            if why is not None:
                raise ConfigError(f"KDTrainer: the stores pack several documents per window and {why}; the student would "
                                  "see context its teacher did not (use a transformers model, or dump with --no-pack)")
        self.kd_targets = targets
        self.kd_settings = dict(vocab_size=targets.vocab_size, kd_alpha=float(kd_alpha), temperature=float(temperature),
                                kd_loss=kd_loss, tail=tail, fuse=fuse, teacher_weights=weights,
                                teacher_temperatures=teacher_temperatures, beta=float(beta), chunk_positions=chunk_positions)
        # Trainer counts num_items_in_batch (over the step's micro-batches and ranks) only for models that
        # "accept loss kwargs"; compute_loss below never passes kwargs to the model, so this only turns the count on.
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True  # compute_loss divides by the step's count: Trainer must not divide again
        self._kd_logged = {"kd": 0.0, "ce": 0.0, "steps": set()}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """``(alpha * KD_sum + (1 - alpha) * CE_sum) / count`` for the batch ``inputs``: ``count`` is
        ``num_items_in_batch`` (the optimizer step's target positions, from Trainer) or else the
        batch's own. Times the number of processes when Trainer averages tokens across devices (DDP
        averages the gradients), as transformers' own ``compute_loss`` does."""
        student = self.accelerator.unwrap_model(model)
        s = self.kd_settings
        out = {}

        def loss_forward(batch):
            with self.accelerator.autocast():
                return kd_sums(student, batch, **s)

        if model is student:
            ce, kd, n = loss_forward(inputs)
        else:  # through the wrappers (DDP/FSDP hooks), with the loss as the student's forward for this call
            with _forward_once(student, loss_forward):
                ce, kd, n = model(inputs)
        denom = num_items_in_batch if num_items_in_batch is not None else n
        if torch.is_tensor(denom):
            denom = denom.to(ce.device).float().clamp(min=1)
        else:
            denom = max(float(denom), 1.0)
        scale = 1.0
        if num_items_in_batch is not None and getattr(self.args, "average_tokens_across_devices", False):
            scale = float(self.accelerator.num_processes)
        a = s["kd_alpha"]
        loss = (a * kd + (1 - a) * ce) * scale / denom
        if model.training:
            self._kd_logged["kd"] = self._kd_logged["kd"] + (kd.detach() * scale / denom)
            self._kd_logged["ce"] = self._kd_logged["ce"] + (ce.detach() * scale / denom)
            self._kd_logged["steps"].add(self.state.global_step)  # the micro-batches of one step share it
        if return_outputs:
            out = {"loss": loss}
            return loss, out
        return loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        """Adds ``kd_loss`` and ``ce_loss`` (means over the steps since the last log) to training logs."""
        acc = self._kd_logged
        steps = len(acc["steps"])
        if "loss" in logs and steps > 0 and torch.is_tensor(acc["kd"]):
            v = torch.stack([acc["kd"], acc["ce"]]).float()
            if self.accelerator.num_processes > 1:
                v = self.accelerator.gather(v[None]).mean(0)
            logs["kd_loss"] = float(v[0]) / steps
            logs["ce_loss"] = float(v[1]) / steps
            self._kd_logged = {"kd": 0.0, "ce": 0.0, "steps": set()}
        super().log(logs, *args, **kwargs)


class KDTrainer(KDLossMixin, Trainer):
    """``transformers.Trainer`` that distils from a logitstore cache (:class:`KDLossMixin`).

    ``KDTrainer(model=student, args=TrainingArguments(...), train_dataset=ds,
    data_collator=KDDataCollator(targets, pad_token_id), kd_alpha=0.5, temperature=1.0,
    kd_loss="fkl", tail="bucket", fuse="mean-probs", teacher_weights=None, chunk_positions=1024)``.
    The loss of a step is ``trainer fit``'s: the mean over its target positions of
    ``alpha * T**2 * KD + (1 - alpha) * CE``."""
