"""The data side of the ``transformers.Trainer`` integration (:mod:`trainer.hf`): a store's teacher
targets found by content hash (:class:`TeacherTargets`) and the collator that joins them onto the
user's batches (:class:`KDDataCollator`). See :mod:`trainer.hf` for usage and conventions."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

import logitstore
from logitstore.distributions.targets import build_targets
from logitstore.errors import ConfigError, LogitStoreError
from logitstore.format.hashing import sequence_hash
from logitstore.format.manifest import inputs_arrays

from .joins import check_joinable, hash_keys, hash_map, refuse_repeated_teachers, same_layout


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
        check_joinable(urls, self.stores, "TeacherTargets: ")
        #: the stores' vocabulary ``V`` (the student's may be larger), ``seq_len`` and tokenizer fingerprint
        self.vocab_size: int = int(m0["tokenizer"]["vocab_size"])
        self.seq_len: int = int(m0["seq_len"])
        self.fingerprint: str = m0["tokenizer"]["fingerprint"]
        #: the primary store records document starts: batches carry ``position_ids`` restarting per
        #: document (as ``DistillDataset``'s), so packed documents stay apart in the student too
        self.segmented: bool = "doc_start" in inputs_arrays(m0)
        #: (store index, teacher name) of every teacher, in fusion order
        self.teachers: list[tuple[int, str]] = [(si, n) for si, s in enumerate(self.stores) for n in s.teachers]
        refuse_repeated_teachers(urls, self.stores, self.teachers, "TeacherTargets: ")
        if any("sampled" in self.stores[si].teacher(n) for si, n in self.teachers):
            raise ConfigError("TeacherTargets: stores with sampled targets (--targets sampled|both) train with trainer fit only")
        #: per teacher: it has absent entries (adaptive k)
        self.absent = ["top_p" in self.stores[si].teacher(n) for si, n in self.teachers]
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
        for c, flag in zip(cached, self.targets.absent):  # adaptive k: -inf entries are absent (FORMAT.md, "Version 4")
            c["absent"] = flag
        lab = torch.from_numpy(labels)
        batch = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention), "labels": lab,
                 "shift_labels": lab}
        if positions is not None:
            batch["position_ids"] = torch.from_numpy(positions)
        for k, v in build_targets(cached, self.targets.vocab_size).items():
            batch[k] = torch.from_numpy(v)
        return batch


# ---------------------------------------------------------------------------------------- the loss
