"""Streaming teacher targets out of one or more stores into training batches.

``DistillDataset`` is a ``torch.utils.data.IterableDataset`` that yields whole batches (use it with
``DataLoader(ds, batch_size=None, num_workers=W)``). Decoding and alignment of the teachers' top-k
sets run in the workers; the training step receives padded tensors ready for the loss.

Several stores are joined **by the per-sequence content hash** (never by position): the first store
is the primary, every other store must hold exactly the same sequences (as a multiset of hashes),
the same tokenizer fingerprint and the same ``seq_len``; otherwise construction fails with a clear
error before any training.

Order and partition of an epoch (all deterministic in ``seed`` and ``epoch``):
1. shards are visited in a seeded random order and the rows of each shard are permuted;
2. a shuffle buffer of ``shuffle_buffer`` sequences mixes neighbouring shards;
3. the order is cut into global batches of ``world_size * batch_size``; rank ``r`` takes slice ``r``
   of each, so the sequences of every step do not depend on the number of ranks (a run on N ranks
   equals one process with an N times larger batch, up to float rounding). The price: every rank
   reads every shard (a shard is decoded once per rank and worker that needs rows of it);
4. batch ``i`` of a rank goes to worker ``(i - consumed) % num_workers``, which is exactly the order
   in which ``DataLoader`` returns them.
With ``skip_bad_shards`` every shard is read once at construction, and the sequences of shards that
fail their checksums or decoding (in any store) are left out of every epoch and listed in
``skipped``; by default a damaged shard stops training with an error naming the file.
Every rank yields the same number of full batches (DDP needs equal steps): the last global batch is
filled with repeated sequences whose ``weight`` is 0 and whose labels are ignored, so each sequence
counts exactly once per epoch. ``state_dict()`` records the epoch and how many batches the
training loop has consumed; after ``load_state_dict`` each worker skips exactly its consumed batches
(computed without decoding them), so a resumed epoch continues with the very next batch.
Each worker knows its batches in advance, so it fetches the files of the shards they need ``prefetch``
parts ahead of decoding (useful on object storage); ``cache_dir`` keeps fetched files in a local
read-through cache checked against the manifest's checksums (see :mod:`logitstore.storage.cache`).
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

import logitstore
from logitstore.errors import ConfigError, LogitStoreError

from logitstore.distributions.targets import build_targets


class DistillDataset(IterableDataset):
    def __init__(self, stores: list[str], *, batch_size: int, seed: int = 0, shuffle: bool = True, shuffle_buffer: int = 256,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, verify_checksums: bool = True,
                 with_targets: bool = True, cache_shards: int = 4, skip_bad_shards: bool = False,
                 cache_dir: str | None = None, prefetch: int = 4):
        if batch_size < 1:
            raise LogitStoreError(f"--batch-size: expected a positive integer, got {batch_size}")
        self.urls = [str(s) for s in stores]
        if not self.urls:
            raise LogitStoreError("--logits: at least one store is required")
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.rank, self.world_size = rank, world_size
        self.num_workers = num_workers
        self.verify_checksums = verify_checksums
        self.with_targets = with_targets
        self.cache_shards = cache_shards
        self.cache_dir = cache_dir
        self.prefetch = prefetch
        self.epoch = 0
        self.consumed = 0  # batches of this epoch the training loop has taken (set by the loop)
        self._open()
        #: shards left out because they failed their checksums or decoding (``skip_bad_shards``)
        self.skipped: list[dict] = self._find_bad_shards() if skip_bad_shards else []
        self._check_and_join()

    # ------------------------------------------------------------------ stores
    def _open(self) -> None:
        self.stores = [logitstore.open(u, verify_checksums=self.verify_checksums, cache_shards=self.cache_shards,
                                       cache_dir=self.cache_dir) for u in self.urls]

    def __getstate__(self):  # workers reopen the stores; open file handles and caches do not travel
        d = dict(self.__dict__)
        d.pop("stores", None)
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._open()

    def _find_bad_shards(self) -> list[dict]:
        """Read every shard of every store once (checksums on) and list those that fail."""
        from logitstore.errors import FormatError

        bad = []
        for si, store in enumerate(self.stores):
            for j in range(store.n_shards):
                try:
                    store.load_shard(j)
                except FormatError as e:
                    try:
                        store.load_shard(j, [])
                        inputs_ok = True
                    except FormatError:
                        inputs_ok = False
                    if si > 0 and not inputs_ok:
                        raise LogitStoreError(f"--skip-bad-shards: {self.urls[si]}: shard {j} has damaged inputs, so its sequences "
                                              f"cannot be aligned with {self.urls[0]} ({e})") from None
                    entry = store.manifest["shards"][j]
                    bad.append({"store": self.urls[si], "shard": j, "path": entry["path"], "sequences": entry["n_sequences"],
                                "inputs_ok": inputs_ok, "error": str(e)})
        return bad

    def _check_and_join(self) -> None:
        first = self.stores[0]
        m0 = first.manifest
        for url, s in zip(self.urls[1:], self.stores[1:]):
            m = s.manifest
            if m["tokenizer"]["fingerprint"] != m0["tokenizer"]["fingerprint"]:
                raise LogitStoreError(f"--logits {url}: tokenizer fingerprint differs from {self.urls[0]}'s; stores must share a tokenizer")
            if m["seq_len"] != m0["seq_len"]:
                raise LogitStoreError(f"--logits {url}: seq_len {m['seq_len']} differs from {self.urls[0]}'s {m0['seq_len']}")
            if m["tokenizer"]["vocab_size"] != m0["tokenizer"]["vocab_size"]:
                raise LogitStoreError(f"--logits {url}: vocab_size differs from {self.urls[0]}'s")
        self.vocab_size = m0["tokenizer"]["vocab_size"]
        self.seq_len = m0["seq_len"]
        self.teachers: list[tuple[int, str]] = [(si, name) for si, s in enumerate(self.stores) for name in s.teachers]
        self._refuse_repeated_teachers()
        names = [n for _, n in self.teachers]
        self.teacher_names = [n if names.count(n) == 1 else f"{self.urls[si]}:{n}" for si, n in self.teachers]
        unreadable = {b["shard"] for b in self.skipped if b["store"] == self.urls[0] and not b["inputs_ok"]}
        inputs = [self._inputs(s, unreadable if si == 0 else set()) for si, s in enumerate(self.stores)]
        hashes = [h for h, _ in inputs]
        self.n = len(hashes[0])
        unknown = np.zeros(self.n, dtype=bool)
        for j in unreadable:
            e = m0["shards"][j]
            unknown[e["start"] : e["start"] + e["n_sequences"]] = True
        self._maps: list[np.ndarray | None] = [None]
        for url, h in zip(self.urls[1:], hashes[1:]):
            if len(h) != self.n:
                raise LogitStoreError(f"--logits {url}: holds {len(h)} sequences, {self.urls[0]} holds {self.n}; stores must cover the same sequences")
            if np.array_equal(h, hashes[0]):
                self._maps.append(None)  # same order: no indirection
                continue
            where: dict[bytes, list[int]] = {}
            for i, x in enumerate(h):
                where.setdefault(x.tobytes(), []).append(i)
            mapping = np.full(self.n, -1, dtype=np.int64)
            for i, x in enumerate(hashes[0]):
                if unknown[i]:
                    continue  # in a skipped shard whose hashes could not be read
                lst = where.get(x.tobytes())
                if not lst:
                    raise LogitStoreError(f"--logits {url}: does not contain sequence {i} of {self.urls[0]} (content hash {x.tobytes().hex()}); stores must cover the same sequences")
                mapping[i] = lst.pop(0)
            self._maps.append(mapping)
        self._lengths = inputs[0][1]
        self._excluded = self._excluded_indices()

    def _refuse_repeated_teachers(self) -> None:
        """The same model (weights and config, whatever its name, k or dtype) in two stores would be
        fused as two teachers and get twice its weight."""
        from logitstore.format.manifest import teacher_identity

        seen: dict[str, tuple[int, str]] = {}
        for si, name in self.teachers:
            ident = teacher_identity(self.stores[si].teacher(name))
            key = repr((ident["weights"], ident["config_hash"]))
            if key in seen:
                sj, other = seen[key]
                raise LogitStoreError(f"--logits {self.urls[si]}: teacher {name!r} is the same model as teacher {other!r} of "
                                      f"{self.urls[sj]} (same weights and config); give each teacher once")
            seen[key] = (si, name)

    def _excluded_indices(self) -> np.ndarray:
        """Primary-store indices of every sequence that lives in a skipped shard of any store."""
        if not self.skipped:
            return np.zeros(0, np.int64)
        out = []
        for b in self.skipped:
            si = self.urls.index(b["store"])
            e = self.stores[si].manifest["shards"][b["shard"]]
            lo, hi = e["start"], e["start"] + e["n_sequences"]
            if si == 0 or self._maps[si] is None:
                out.append(np.arange(lo, hi))
            else:
                out.append(np.flatnonzero((self._maps[si] >= lo) & (self._maps[si] < hi)))
        return np.unique(np.concatenate(out)).astype(np.int64)

    @staticmethod
    def _inputs(store, unreadable: set[int] = frozenset()) -> tuple[np.ndarray, np.ndarray]:
        """All sequence hashes [n, 16] and lengths [n] of a store, reading each inputs part once
        (zeros for the shards in ``unreadable``, which are skipped)."""
        hashes, lengths = [], []
        for j in range(store.n_shards):
            if j in unreadable:
                n = store.manifest["shards"][j]["n_sequences"]
                hashes.append(np.zeros((n, 16), np.uint8))
                lengths.append(np.zeros(n, np.uint32))
                continue
            p = store.load_shard(j, [])
            hashes.append(p["seq_hash"])
            lengths.append(p["length"])
        if not hashes:
            return np.zeros((0, 16), np.uint8), np.zeros(0, np.uint32)
        return np.concatenate(hashes), np.concatenate(lengths)

    @property
    def n_tokens(self) -> int:
        return int(self._lengths.sum())

    # ------------------------------------------------------------------ plan
    def epoch_order(self, epoch: int) -> np.ndarray:
        """Global sequence order of an epoch (same on every rank), without skipped shards."""
        order = self._epoch_order(epoch)
        return order[~np.isin(order, self._excluded)] if self._excluded.size else order

    def _epoch_order(self, epoch: int) -> np.ndarray:
        s0 = self.stores[0]
        entries = s0.manifest["shards"]
        if not self.shuffle:
            return np.arange(self.n, dtype=np.int64)
        rng = np.random.default_rng([self.seed, epoch])
        order = np.concatenate([e["start"] + rng.permutation(e["n_sequences"]) for e in (entries[j] for j in rng.permutation(len(entries)))]) if entries else np.zeros(0, np.int64)
        # shuffle buffer, simulated on indices: keep a buffer, emit a random element, refill
        buf_size = self.shuffle_buffer
        out = np.empty_like(order)
        buf = list(order[:buf_size])
        nxt = buf_size
        for i in range(len(order)):
            j = int(rng.integers(len(buf)))
            out[i] = buf[j]
            if nxt < len(order):
                buf[j] = order[nxt]
                nxt += 1
            else:
                buf[j] = buf[-1]
                buf.pop()
        return out

    def rank_batches(self, epoch: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """This rank's batches (sequence indices) and their weights (0 marks filler).

        The epoch order is cut into global batches of ``world_size * batch_size`` sequences and rank
        ``r`` takes slice ``r`` of each, so every step trains on the same sequences whatever the
        number of ranks (a run on N ranks matches one process with an N times larger batch). The
        last global batch is filled up with weight-0 repeats."""
        order = self.epoch_order(epoch)
        gb = self.world_size * self.batch_size
        n_steps = math.ceil(len(order) / gb) if len(order) else 0
        pad = n_steps * gb - len(order)
        weights = np.concatenate([np.ones(len(order), np.float32), np.zeros(pad, np.float32)])
        order = np.concatenate([order, np.resize(order, pad)]) if pad else order
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        batches = [order[i * gb + lo:i * gb + hi] for i in range(n_steps)]
        wts = [weights[i * gb + lo:i * gb + hi] for i in range(n_steps)]
        return batches, wts

    def batches_per_epoch(self) -> int:
        return len(self.rank_batches(0)[0])

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed, "world_size": self.world_size,
                "num_workers": self.num_workers, "batch_size": self.batch_size, "n": self.n}

    def load_state_dict(self, d: dict) -> None:
        for key in ("seed", "world_size", "batch_size", "n"):  # not num_workers: batches do not depend on it
            if d[key] != getattr(self, key):
                raise LogitStoreError(f"--resume: checkpoint was made with {key}={d[key]}, now {getattr(self, key)}; exact resume needs the same value")
        self.epoch, self.consumed = d["epoch"], d["consumed"]

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.consumed = epoch, 0

    # ------------------------------------------------------------------ iteration
    def __iter__(self):
        info = get_worker_info()
        wid, W = (info.id, info.num_workers) if info is not None else (0, 1)
        if W != max(1, self.num_workers):
            raise RuntimeError(f"DistillDataset was built for num_workers={self.num_workers}, DataLoader uses {W}")
        batches, wts = self.rank_batches(self.epoch)
        # DataLoader takes batches from workers round-robin starting at worker 0, so the batches still
        # to come (from ``consumed`` on, after a resume) are dealt out from worker 0 as well
        mine = range(self.consumed + wid, len(batches), W)
        self._start_prefetch([batches[i] for i in mine])
        try:
            for i in mine:
                yield self.make_batch(batches[i], wts[i])
        finally:
            for store in self.stores:
                store.close()

    def _start_prefetch(self, batches: list[np.ndarray]) -> None:
        """Have each store fetch, ahead of decoding, the parts of the shards these batches will read,
        in the order they are first needed."""
        if self.prefetch <= 0 or not batches:
            return
        flat = np.concatenate(batches)
        for si, store in enumerate(self.stores):
            idx = flat if self._maps[si] is None else self._maps[si][flat]
            shards = store.index.shards_of(idx)
            _, first = np.unique(shards, return_index=True)
            order = shards[np.sort(first)].tolist()
            names = [n for s2, n in self.teachers if s2 == si] if self.with_targets else []
            store.prefetch(order, names, depth=self.prefetch)

    def _row(self, si: int, i: int):
        idx = int(self._maps[si][i]) if self._maps[si] is not None else i
        j, r = self.stores[si].index.locate(idx)
        return self.stores[si].load_shard(j, None if self.with_targets else []), r

    def make_batch(self, indices: np.ndarray, weights: np.ndarray) -> dict:
        B, L = len(indices), self.seq_len
        input_ids = np.zeros((B, L), np.int64)
        lengths = np.zeros(B, np.int64)
        per_teacher = [{"ids": [], "logprobs": [], "tail_mass": []} for _ in self.teachers]
        for b, i in enumerate(indices):
            sh, r = self._row(0, int(i))
            lengths[b] = sh["length"][r]
            input_ids[b] = sh["input_ids"][r]
            if not self.with_targets:
                continue
            for t, (si, name) in enumerate(self.teachers):
                tsh, tr = (sh, r) if si == 0 else self._row(si, int(i))
                td = tsh["teachers"][name]
                for key in per_teacher[t]:
                    per_teacher[t][key].append(td[key][tr])
        pos = np.arange(L)[None, :]
        labels = np.full((B, L), -100, np.int64)
        labels[:, :-1] = input_ids[:, 1:]
        labels[pos + 1 >= lengths[:, None]] = -100  # no next token inside the window
        labels[weights == 0] = -100  # filler rows contribute nothing
        batch = {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy((pos < lengths[:, None]).astype(np.int64)),
            "labels": torch.from_numpy(labels),
            "index": torch.from_numpy(np.asarray(indices, np.int64)),
            "weight": torch.from_numpy(np.asarray(weights, np.float32)),
        }
        if self.with_targets:
            cached = []
            for t in per_teacher:
                stacked = {k: np.stack(v) for k, v in t.items()}  # [B, L(, k)]
                cached.append({k: v.reshape(B * L, *v.shape[2:]) for k, v in stacked.items()})
            for k, v in build_targets(cached, self.vocab_size).items():
                batch[k] = torch.from_numpy(v)
        return batch


def match_teachers(train: "DistillDataset", evalset: "DistillDataset", weights: list[float], url: str) -> list[float]:
    """The training weights re-ordered for ``evalset``'s teachers, matched by identity (weights,
    config and dtype, not by name or position): the eval store must hold the same teachers."""
    from logitstore.format.manifest import teacher_identity

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
