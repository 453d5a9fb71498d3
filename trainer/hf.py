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
from collections.abc import Sequence

import numpy as np
import torch
from transformers import Trainer

import logitstore
from logitstore.distributions.fusion import MODES, normalize_weights
from logitstore.distributions.targets import build_targets
from logitstore.errors import ConfigError, LogitStoreError
from logitstore.format.hashing import sequence_hash
from logitstore.format.manifest import inputs_arrays

from .joins import hash_keys, hash_map, same_layout
from .losses import LOSSES, TAILS
from .student import DistillModule, check_document_separation

__all__ = ["TeacherTargets", "KDDataCollator", "KDLossMixin", "KDTrainer", "kd_loss_for_batch", "kd_sums"]

#: the teacher arrays the collator reads from a store row
TARGET_FIELDS = ("ids", "logprobs", "tail_mass")


# ---------------------------------------------------------------------------------------- targets
class TeacherTargets:
    """The teacher targets of one or more stores, found by a sequence's content hash.

    ``stores``: paths or fsspec URLs. Several stores must share the tokenizer fingerprint, the
    ``seq_len`` and the vocabulary, and hold the same sequences (as a multiset of hashes); they are
    joined by hash as :class:`trainer.data.DistillDataset` joins them (:func:`trainer.joins.hash_map`;
    stores of the same data and shards join by position), and the same model in two stores is
    refused. Teachers are every store's teachers in order (``teacher_names``; a name used by two
    stores is prefixed with its store's URL).

    The lookup table is the primary store's sequence index (``store.sequences()``, 20 bytes per
    sequence) sorted by hash: ``24`` bytes per sequence, searched with ``np.searchsorted``. A
    sequence that occurs several times (identical windows) maps to its first occurrence: the
    teachers' outputs for identical token ids are identical. ``cache_shards``: decoded shards kept
    per store; a shuffled ``Trainer`` touches shards in random order, so each row may decode a whole
    shard: keep it as large as memory allows, or feed rows in store order.
    """

    def __init__(self, stores: Sequence[str] | str, *, verify_checksums: bool = True, cache_shards: int = 8,
                 cache_dir: str | None = None):
        urls = [str(stores)] if isinstance(stores, (str, bytes)) or hasattr(stores, "__fspath__") else [str(s) for s in stores]
        if not urls:
            raise LogitStoreError("TeacherTargets: at least one store is required")
        self.urls = urls
        self._open_kwargs = dict(verify_checksums=verify_checksums, cache_shards=cache_shards, cache_dir=cache_dir)
        self._open()
        m0 = self.stores[0].manifest
        for url, s in zip(urls[1:], self.stores[1:]):
            m = s.manifest
            if m["tokenizer"]["fingerprint"] != m0["tokenizer"]["fingerprint"]:
                raise LogitStoreError(f"TeacherTargets: {url}: tokenizer fingerprint differs from {urls[0]}'s; stores must share a tokenizer")
            if m["seq_len"] != m0["seq_len"]:
                raise LogitStoreError(f"TeacherTargets: {url}: seq_len {m['seq_len']} differs from {urls[0]}'s {m0['seq_len']}")
            if m["tokenizer"]["vocab_size"] != m0["tokenizer"]["vocab_size"]:
                raise LogitStoreError(f"TeacherTargets: {url}: vocab_size differs from {urls[0]}'s")
            if ("doc_start" in inputs_arrays(m)) != ("doc_start" in inputs_arrays(m0)):
                raise LogitStoreError(f"TeacherTargets: {url}: {'records' if 'doc_start' in inputs_arrays(m) else 'does not record'} "
                                      f"document starts and {urls[0]} {'does not' if 'doc_start' in inputs_arrays(m) else 'does'}: "
                                      "its teacher saw other context; dump both with the same --doc-boundaries")
        #: the stores' vocabulary ``V`` (the student's may be larger), ``seq_len`` and tokenizer fingerprint
        self.vocab_size: int = int(m0["tokenizer"]["vocab_size"])
        self.seq_len: int = int(m0["seq_len"])
        self.fingerprint: str = m0["tokenizer"]["fingerprint"]
        #: the primary store records document starts: batches carry ``position_ids`` restarting per
        #: document (as ``DistillDataset``'s), so packed documents stay apart in the student too
        self.segmented: bool = "doc_start" in inputs_arrays(m0)
        #: (store index, teacher name) of every teacher, in fusion order
        self.teachers: list[tuple[int, str]] = [(si, n) for si, s in enumerate(self.stores) for n in s.teachers]
        self._refuse_repeated_teachers()
        names = [n for _, n in self.teachers]
        self.teacher_names: list[str] = [n if names.count(n) == 1 else f"{urls[si]}:{n}" for si, n in self.teachers]
        primary, self.lengths = self.stores[0].sequences()
        self._hashes = primary
        #: per secondary store: primary index -> its index (None: the same layout, joined by position)
        self._maps: list[np.ndarray | None] = [None]
        for url, s in zip(urls[1:], self.stores[1:]):
            if same_layout(self.stores[0], s):
                self._maps.append(None)
            else:
                self._maps.append(hash_map(primary, s.sequences()[0], np.zeros(len(primary), bool), url, urls[0]))
        keys = hash_keys(primary)
        self._order = np.argsort(keys, kind="stable")  # first occurrence of a repeated sequence first
        self._sorted = keys[self._order]

    def _open(self) -> None:
        self.stores = [logitstore.open(u, **self._open_kwargs) for u in self.urls]

    def __getstate__(self):  # DataLoader workers reopen the stores; file handles and decoded shards do not travel
        d = dict(self.__dict__)
        d.pop("stores", None)
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._open()

    def _refuse_repeated_teachers(self) -> None:
        from logitstore.format.manifest import teacher_identity

        seen: dict[str, tuple[int, str]] = {}
        for si, name in self.teachers:
            ident = teacher_identity(self.stores[si].teacher(name))
            key = repr((ident["weights"], ident["config_hash"]))
            if key in seen:
                sj, other = seen[key]
                raise LogitStoreError(f"TeacherTargets: {self.urls[si]}: teacher {name!r} is the same model as teacher {other!r} "
                                      f"of {self.urls[sj]} (same weights and config); give each teacher once")
            seen[key] = (si, name)

    def __len__(self) -> int:
        return len(self._hashes)

    @staticmethod
    def hash_of(input_ids) -> bytes:
        """The 16-byte content hash of one unpadded sequence ``input_ids`` [n], as the store computes it."""
        return sequence_hash(np.asarray(input_ids))

    def index_of(self, input_ids) -> int | None:
        """The primary store's index of the sequence ``input_ids`` [n] (unpadded), or ``None`` if no
        store sequence has its hash (a row longer than ``seq_len`` never has)."""
        ids = np.asarray(input_ids)
        if ids.ndim != 1 or len(ids) > self.seq_len or len(ids) == 0:
            return None
        return self._find(self.hash_of(ids))

    def _find(self, h: bytes) -> int | None:
        key = np.frombuffer(h, np.uint8).reshape(1, 16)
        k = hash_keys(key)[0]
        at = int(np.searchsorted(self._sorted, k))
        if at < len(self._sorted) and self._sorted[at] == k:
            return int(self._order[at])
        return None

    def row(self, i: int) -> dict:
        """Primary-store sequence ``i`` with every teacher's arrays: ``{"input_ids" [n], "seq_hash"
        bytes, "loss_mask" [n] bool or None (the store's: position ``t`` True when token ``t + 1`` is
        trained; None when the store records none, i.e. positions ``0 .. n-2``), "teachers" {name:
        {ids, logprobs [n, k]; tail_mass, gold_logprob, entropy [n]}}}`` with ``name`` as in
        :attr:`teacher_names`, and ``"position_ids"`` [n] (restarting at each document start in a
        store that records them; None from a reader that hands out none). Readers of format version 3
        hand out a ``loss_mask`` for every store (stored, or positions ``0 .. n-2``); teacher arrays
        are zeros at positions it does not train in a store of trained-only targets."""
        first = self.stores[0][int(i)]
        rows = {0: first}
        for si in range(1, len(self.stores)):
            j = int(i) if self._maps[si] is None else int(self._maps[si][int(i)])
            rows[si] = self.stores[si][j]
            if rows[si]["seq_hash"] != first["seq_hash"]:
                raise LogitStoreError(f"TeacherTargets: {self.urls[si]}: its sequence for {self.urls[0]}'s sequence {int(i)} "
                                      f"has another content hash; the stores do not hold the same data")
            theirs, mine = rows[si].get("loss_mask"), first.get("loss_mask")
            if theirs is not None and mine is not None and not np.all(np.asarray(theirs, bool) >= np.asarray(mine, bool)):
                raise LogitStoreError(f"TeacherTargets: {self.urls[si]}: holds no targets at positions {self.urls[0]}'s sequence "
                                      f"{int(i)} trains (its loss mask differs); dump both stores with the same --train-on")
        mask = first.get("loss_mask")
        pos = first.get("position_ids")
        return {"input_ids": first["input_ids"], "seq_hash": first["seq_hash"],
                "loss_mask": None if mask is None else np.asarray(mask, bool),
                "position_ids": None if pos is None else np.asarray(pos, np.int64),
                "teachers": {label: rows[si]["teachers"][name] for label, (si, name) in zip(self.teacher_names, self.teachers)}}

    def lookup(self, input_ids) -> dict[str, dict[str, np.ndarray]]:
        """Every teacher's arrays for the unpadded sequence ``input_ids`` [n]: ``{name: {"ids",
        "logprobs" [n, k], "tail_mass", "gold_logprob", "entropy" [n]}}`` in fusion order (position
        ``t``: the teacher's distribution of token ``t + 1``). Raises :class:`LogitStoreError` if the
        sequence is not in the store."""
        ids = np.asarray(input_ids)
        i = self.index_of(ids)
        if i is None:
            raise LogitStoreError(self._missing(ids))
        return self.row(i)["teachers"]

    def _missing(self, ids: np.ndarray, where: str = "TeacherTargets: the sequence") -> str:
        n = len(ids)
        if n > self.seq_len:
            return (f"{where} has {n} tokens, more than the store's seq_len {self.seq_len}, so it is none of the store's "
                    f"windows; build the dataset from the store's own input_ids")
        return (f"{where} ({n} tokens, content hash {self.hash_of(ids).hex()}) is not in {self.urls[0]}; the dataset was "
                f"probably tokenised differently from the dump (tokenizer, BOS/EOS, packing, truncation): build it from the "
                f"store's own input_ids")


# ---------------------------------------------------------------------------------------- collator
def _as_array(x, what: str, b: int) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim != 1 or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.bool_)):
        raise LogitStoreError(f"KDDataCollator: row {b} of the batch: {what} must be a 1-d list of integers, got shape "
                              f"{a.shape} dtype {a.dtype}")
    return a.astype(np.int64)


class KDDataCollator:
    """``Trainer(data_collator=KDDataCollator(targets, pad_token_id))``: features -> a KD batch.

    Each feature is a dict with ``input_ids`` [n] (list, numpy or tensor) and optionally
    ``attention_mask`` [n] (rows may come padded: the tokens where it is 1 are the sequence) and
    ``labels`` [n] in Hugging Face's unshifted convention (``labels[t]`` is the target of the logits at
    ``t - 1``; ``-100``: not trained). Without ``labels`` a row trains what the store trains: its
    ``loss_mask`` where the store has one, else positions ``0 .. n-2`` (as ``trainer fit``). Other
    keys are ignored.

    Returns (``B`` rows, ``L`` the longest row, rounded up to ``pad_to_multiple_of``, ``N = B * L``,
    ``M`` teachers, ``K`` the largest support in the batch):

    - ``input_ids`` [B, L] int64, right-padded with ``pad_token_id``; ``attention_mask`` [B, L] int64;
    - ``position_ids`` [B, L] int64, only from a store that records document starts (packed
      documents): positions restart at each document, so the student attends within it as the
      teacher did (:class:`trainer.student.DistillModule` passes them on); any ``position_ids`` in
      the features are ignored;
    - ``labels`` [B, L] int64, **shifted**: ``input_ids[b, t + 1]`` where position ``t`` is trained,
      else ``-100`` (never at the last token of a row or in padding), exactly as
      :meth:`trainer.data.DistillDataset.make_batch` builds them; ``shift_labels``: the same tensor
      (the name ``transformers.Trainer`` counts target positions from as given);
    - the fused-target inputs of :mod:`logitstore.distributions.fusion`, flattened over the ``N``
      positions, as ``make_batch`` builds them (:func:`logitstore.distributions.targets.build_targets`):
      ``support`` [N, K] int64, ``valid`` [N, K] bool, ``teacher_lp`` [M, N, K] float32,
      ``rest_lp`` [M, N] float32, ``n_out`` [N] float32. Padding positions are read as a store's
      padded window is (ids 0, log-probs 0, tail 0); they carry no loss (``labels`` -100).

    Errors (:class:`LogitStoreError`, one line naming the row's position in the batch): a row whose
    hash is not in the store (tokenised differently from the dump, or longer than ``seq_len``); a
    label at a trained position that is not the next input token; a trained position the store did
    not train (its ``loss_mask`` is False there).
    """

    def __init__(self, targets: TeacherTargets, pad_token_id: int, *, pad_to_multiple_of: int | None = None):
        if not isinstance(targets, TeacherTargets):
            raise ConfigError(f"KDDataCollator: targets must be a TeacherTargets, got {type(targets).__name__}")
        if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, (int, np.integer)) or pad_token_id < 0:
            raise ConfigError(f"KDDataCollator: pad_token_id must be a token id (an integer >= 0), got {pad_token_id!r}")
        if pad_to_multiple_of is not None and (not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
            raise ConfigError(f"KDDataCollator: pad_to_multiple_of must be a positive integer, got {pad_to_multiple_of!r}")
        self.targets = targets
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def _row(self, b: int, feature) -> tuple[np.ndarray, np.ndarray, dict]:
        """(input_ids [n], shifted labels [n], the store row) of batch row ``b``."""
        if not isinstance(feature, dict) or "input_ids" not in feature:
            raise LogitStoreError(f"KDDataCollator: row {b} of the batch: expected a dict with 'input_ids'")
        ids = _as_array(feature["input_ids"], "input_ids", b)
        lab = _as_array(feature["labels"], "labels", b) if feature.get("labels") is not None else None
        if feature.get("attention_mask") is not None:
            keep = _as_array(feature["attention_mask"], "attention_mask", b)
            if len(keep) != len(ids):
                raise LogitStoreError(f"KDDataCollator: row {b} of the batch: attention_mask has {len(keep)} entries, input_ids {len(ids)}")
            keep = keep.astype(bool)
            ids = ids[keep]
            lab = lab[keep] if lab is not None and len(lab) == len(keep) else lab
        if lab is not None and len(lab) != len(ids):
            raise LogitStoreError(f"KDDataCollator: row {b} of the batch: labels has {len(lab)} entries for {len(ids)} tokens")
        n = len(ids)
        i = self.targets.index_of(ids)
        if i is None:
            raise LogitStoreError(self.targets._missing(ids, f"KDDataCollator: row {b} of the batch"))
        row = self.targets.row(i)
        stored = row["loss_mask"]
        if stored is not None and len(stored) != n:
            raise LogitStoreError(f"KDDataCollator: row {b} of the batch: the store's loss_mask has {len(stored)} entries for {n} tokens")
        shifted = np.full(n, -100, np.int64)
        if lab is None:
            shifted[:-1] = ids[1:]
            if stored is not None:
                shifted[~stored] = -100
        else:
            shifted[:-1] = lab[1:]
            trained = shifted != -100
            bad = np.flatnonzero(trained[:-1] & (shifted[:-1] != ids[1:]))
            if len(bad):
                t = int(bad[0])
                raise LogitStoreError(f"KDDataCollator: row {b} of the batch: labels[{t + 1}] = {int(lab[t + 1])} is not the "
                                      f"input token {int(ids[t + 1])}; the store's targets are of the next input token, so "
                                      f"labels must be input_ids or -100")
            if stored is not None:
                off = np.flatnonzero(trained & ~stored)
                if len(off):
                    raise LogitStoreError(f"KDDataCollator: row {b} of the batch (store sequence {i}): labels train position "
                                          f"{int(off[0])} (the prediction of token {int(off[0]) + 1}), which the store's "
                                          f"loss_mask leaves out, so it holds no trained target there")
        return ids, shifted, row

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if not features:
            raise LogitStoreError("KDDataCollator: an empty batch")
        rows = [self._row(b, f) for b, f in enumerate(features)]
        B = len(rows)
        L = max(len(ids) for ids, _, _ in rows)
        if self.pad_to_multiple_of:
            L = -(-L // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = np.full((B, L), self.pad_token_id, np.int64)
        attention = np.zeros((B, L), np.int64)
        labels = np.full((B, L), -100, np.int64)
        positions = np.zeros((B, L), np.int64) if self.targets.segmented else None
        names = self.targets.teacher_names
        per_teacher = []
        for name in names:
            td0 = rows[0][2]["teachers"][name]
            k = td0["ids"].shape[1]
            per_teacher.append({"ids": np.zeros((B, L, k), td0["ids"].dtype), "logprobs": np.zeros((B, L, k), td0["logprobs"].dtype),
                                "tail_mass": np.zeros((B, L), td0["tail_mass"].dtype)})
        for b, (ids, shifted, row) in enumerate(rows):
            n = len(ids)
            input_ids[b, :n] = ids
            attention[b, :n] = 1
            labels[b, :n] = shifted
            if positions is not None:  # padding continues the last document's count, as in a padded store window
                p = row["position_ids"]
                positions[b, :n] = p
                positions[b, n:] = (int(p[-1]) + 1 if n else 0) + np.arange(L - n)
            for t, name in enumerate(names):
                td = row["teachers"][name]
                for key in TARGET_FIELDS:
                    per_teacher[t][key][b, :n] = td[key][:n]
        cached = [{k: v.reshape(B * L, *v.shape[2:]) for k, v in t.items()} for t in per_teacher]
        lab = torch.from_numpy(labels)
        batch = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention), "labels": lab,
                 "shift_labels": lab}
        if positions is not None:
            batch["position_ids"] = torch.from_numpy(positions)
        for k, v in build_targets(cached, self.targets.vocab_size).items():
            batch[k] = torch.from_numpy(v)
        return batch


# ---------------------------------------------------------------------------------------- the loss
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
