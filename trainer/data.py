"""Streaming teacher targets out of one or more stores into training batches.

``DistillDataset`` is a ``torch.utils.data.IterableDataset`` that yields whole batches (use it with
``DataLoader(ds, batch_size=None, num_workers=W)``). Decoding and alignment of the teachers' top-k
sets run in the workers; the training step receives padded tensors ready for the loss.

Several stores are joined **by the per-sequence content hash** (never by position): the first store
is the primary, every other store must hold exactly the same sequences (as a multiset of hashes),
the same tokenizer fingerprint and the same ``seq_len``; otherwise construction fails with a clear
error before any training. Stores over the same data and shards join by position without reading
anything (:mod:`trainer.joins`); each batch checks that the joined rows' hashes agree.

Order and partition of an epoch: :class:`logitstore.sampling.EpochPlan` (a pure function of
``seed``, ``epoch`` and ``n_streams``). The shuffled shards are cut into ``n_streams`` streams, each
mixed by a bounded-displacement shuffle of ``shuffle_buffer`` sequences; each (rank, loader worker)
reads only its own streams, so it fetches and decodes only the shards that hold its sequences,
each once per epoch (:mod:`trainer.shard_cache`), and a rank reads about ``1 / world_size`` of the
store. ``n_streams`` defaults to ``world_size * max(1, num_workers)`` and is kept in checkpoints: a
run resumes exactly on any layout with ``world_size * num_workers <= n_streams`` (the checkpoint
records, per stream, how far it was read). With one worker per rank and ``n_streams`` a multiple of
the world size, the sequences of every optimizer step do not depend on the number of ranks (N
ranks equal one process with an N times larger batch).
Batch ``i`` of a rank comes from worker ``i % num_workers``, exactly the order in which ``DataLoader``
returns them, and every rank yields the same number of batches (DDP needs equal steps): rows a
rank lacks are fillers whose ``weight`` is 0 and whose labels are ignored, so each sequence counts
exactly once per epoch, and trailing steps that would hold only fillers are dropped.
With ``skip_bad_shards`` every shard is read once at construction, and the sequences of shards that
fail their checksums or decoding (in any store) are left out of every epoch and listed in
``skipped``; by default a damaged shard stops training with an error naming the file.
Each worker knows its batches in advance, so it fetches the files of the shards they need ``prefetch``
parts ahead of decoding (useful on object storage); ``cache_dir`` keeps fetched files in a local
read-through cache checked against the manifest's checksums (see :mod:`logitstore.storage.cache`).
"""

from __future__ import annotations

import json

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

import logitstore
from logitstore.distributions.targets import build_targets
from logitstore.errors import ConfigError, FormatError, LogitStoreError
from logitstore.format.manifest import inputs_arrays
from logitstore.sampling import Layout

from .epochs import EpochOrder
from .joins import check_joinable, hash_map, refuse_repeated_teachers, same_layout
from .shard_cache import ShardCache

class DistillDataset(EpochOrder, IterableDataset):
    #: the stores' task (logitstore.format.manifest.TASKS); trainer.classify.ClassifyDataset reads "classify"
    TASK = "lm"

    def __init__(self, stores: list[str], *, batch_size: int, seed: int = 0, shuffle: bool = True, shuffle_buffer: int = 256,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, verify_checksums: bool = True,
                 with_targets: bool = True, cache_shards: int = 4, skip_bad_shards: bool = False,
                 cache_dir: str | None = None, prefetch: int = 4, n_streams: int | None = None, follow: bool = False,
                 group_by_length: bool = False):
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
        self.follow = follow
        self.group_by_length = group_by_length
        self.hidden: list[tuple[int, int]] = []  # (teacher, layer) of stored hidden states batches carry
        self.hidden_dims: dict[int, int] = {}
        if follow and group_by_length:
            raise ConfigError("--group-by-length: cannot be combined with --follow (the lengths of shards not yet written are unknown)")
        if follow and skip_bad_shards:
            raise ConfigError("--follow: cannot be combined with --skip-bad-shards (it reads every shard before training)")
        self._limit: int | None = None  # shards of the primary store in use (follow: the committed prefix)
        self._streams_given = n_streams is not None
        self.n_streams = n_streams if n_streams is not None else world_size * max(1, num_workers)
        self.epoch = 0
        self.consumed = 0  # batches of this segment the training loop has taken (set by the loop)
        self._pos: np.ndarray | None = None  # per-stream position where this segment started (None: epoch start)
        #: decodes per (store, shard) in the last in-process iteration (benchmarks and tests)
        self.decodes: dict[tuple[int, int], int] = {}
        self._open()
        self.layout = Layout(world_size, num_workers, batch_size)
        self.check_streams()
        #: shards left out because they failed their checksums or decoding (``skip_bad_shards``)
        self.skipped: list[dict] = self._find_bad_shards() if skip_bad_shards else []
        self._check_and_join()

    # ------------------------------------------------------------------ stores
    def _open(self) -> None:
        self.stores = [logitstore.open(u, verify_checksums=self.verify_checksums, cache_shards=self.cache_shards,
                                       cache_dir=self.cache_dir, follow=self.follow) for u in self.urls]
        if self.follow and self._limit is not None:
            self._require_shards(self._limit)

    def _require_shards(self, limit: int) -> None:
        """Follow mode: the stores hold at least ``limit`` committed shards (a resumed or re-opened
        epoch uses the prefix it started with)."""
        for url, s in zip(self.urls, self.stores):
            if s.n_shards < limit:
                s.refresh()
            if s.n_shards < limit:
                raise LogitStoreError(f"--logits {url}: holds {s.n_shards} committed shards, the run was using {limit}")

    def refresh(self) -> int:
        """Follow mode: take in the shards committed since the last call (for the next epoch);
        return the number of sequences now in use."""
        for s in self.stores:
            s.refresh()
        self._limit = min(s.n_shards for s in self.stores)
        self._check_and_join()
        return self.n

    def __getstate__(self):  # workers reopen the stores; open file handles and caches do not travel
        d = dict(self.__dict__)
        d.pop("stores", None)
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._open()

    def _find_bad_shards(self) -> list[dict]:
        """Read every shard of every store once (checksums on) and list those that fail."""
        bad = []
        for si, store in enumerate(self.stores):
            for j in range(store.n_shards):
                try:
                    store.decode_shard(j, hidden=True)
                except FormatError as e:
                    try:
                        store.decode_shard(j, [])
                        inputs_ok = True
                    except FormatError:
                        inputs_ok = False
                    if si > 0 and not inputs_ok and store.format_version == 1:
                        raise LogitStoreError(f"--skip-bad-shards: {self.urls[si]}: shard {j} has damaged inputs, so its sequences "
                                              f"cannot be aligned with {self.urls[0]} ({e})") from None
                    entry = store.index.shard_entry(j)
                    bad.append({"store": self.urls[si], "shard": j, "path": entry["path"], "sequences": entry["n_sequences"],
                                "inputs_ok": inputs_ok, "error": str(e)})
        return bad

    def _check_and_join(self) -> None:
        first = self.stores[0]
        m0 = first.manifest
        for url, s in zip(self.urls, self.stores):
            if s.task != self.TASK:
                raise LogitStoreError(f"--logits {url}: a {s.task} store; expected {self.TASK} stores like {self.urls[0]}"
                                      if url != self.urls[0] else f"--logits {url}: a {s.task} store; this reads {self.TASK} stores")
        check_joinable(self.urls, self.stores, "--logits ")
        self.vocab_size = m0["tokenizer"]["vocab_size"]
        self.seq_len = m0["seq_len"]
        #: the primary store records document starts: batches carry ``position_ids`` restarting per document
        self.segmented = "doc_start" in inputs_arrays(m0)
        self.teachers: list[tuple[int, str]] = [(si, name) for si, s in enumerate(self.stores) for name in s.teachers]
        #: per teacher, its ``sampled`` manifest entry (--targets sampled|both) or None
        self.sampled = [self.stores[si].teacher(name).get("sampled") for si, name in self.teachers]
        #: per teacher: its -inf entries are absent ones (adaptive k or sampled targets; FORMAT.md, "Version 4")
        self.absent = [s is not None or "top_p" in self.stores[si].teacher(name) for s, (si, name) in zip(self.sampled, self.teachers)]
        refuse_repeated_teachers(self.urls, self.stores, self.teachers, "--logits ")
        names = [n for _, n in self.teachers]
        self.teacher_names = [n if names.count(n) == 1 else f"{self.urls[si]}:{n}" for si, n in self.teachers]
        if self.follow:
            self._limit = min(s.n_shards for s in self.stores) if self._limit is None else self._limit
            for url, s in zip(self.urls[1:], self.stores[1:]):
                if not same_layout(first, s, self._limit):
                    raise LogitStoreError(f"--follow: {url} holds other data or shards than {self.urls[0]}; stores followed "
                                          f"while written must be dumps of the same data with the same --shard-sequences")
        self.n = len(first) if self._limit is None else int(first.index.sizes[:self._limit].sum())
        self._maps: list[np.ndarray | None] = [None]
        unreadable = {b["shard"] for b in self.skipped if b["store"] == self.urls[0] and not b["inputs_ok"]}
        primary = None
        for url, s in zip(self.urls[1:], self.stores[1:]):
            if self._limit is None and len(s) != self.n:
                raise LogitStoreError(f"--logits {url}: holds {len(s)} sequences, {self.urls[0]} holds {self.n}; stores must cover the same sequences")
            if self._limit is not None or same_layout(first, s):  # follow: the same layout over the prefix, checked above
                self._maps.append(None)  # same data, same order: joined by position (batches check the hashes)
                continue
            if primary is None:
                primary, unknown = self._sequences(0, unreadable)
            other, _ = self._sequences(len(self._maps), {b["shard"] for b in self.skipped if b["store"] == url and not b["inputs_ok"]})
            self._maps.append(hash_map(primary, other, unknown, url, self.urls[0]))
        self._excluded = self._excluded_indices()
        #: per-sequence lengths for --group-by-length (20 bytes per sequence from the sequence index)
        self.group_lengths = self.stores[0].sequences()[1] if self.group_by_length else None

    def _sequences(self, si: int, unreadable: set[int]) -> tuple[np.ndarray, np.ndarray]:
        """Hashes [n, 16] of store ``si`` and which are unknown [n] bool: from its sequence index, or,
        in a version-1 store, from its inputs parts (those in ``unreadable`` skipped)."""
        store = self.stores[si]
        unknown = np.zeros(len(store), bool)
        if store.format_version >= 2 or not unreadable:
            return store.sequences()[0], unknown
        hashes = []
        for j in range(store.n_shards):
            n = int(store.index.sizes[j])
            if j in unreadable:
                hashes.append(np.zeros((n, 16), np.uint8))
                unknown[store.index.starts[j]:store.index.starts[j] + n] = True
            else:
                hashes.append(store.read_part(j, "inputs")["seq_hash"])
        return (np.concatenate(hashes) if hashes else np.zeros((0, 16), np.uint8)), unknown

    def _excluded_indices(self) -> np.ndarray:
        """Primary-store indices of every sequence that lives in a skipped shard of any store."""
        if not self.skipped:
            return np.zeros(0, np.int64)
        out = []
        for b in self.skipped:
            si = self.urls.index(b["store"])
            e = self.stores[si].index.shard_entry(b["shard"])
            lo, hi = e["start"], e["start"] + e["n_sequences"]
            if si == 0 or self._maps[si] is None:
                out.append(np.arange(lo, hi))
            else:
                out.append(np.flatnonzero((self._maps[si] >= lo) & (self._maps[si] < hi)))
        return np.unique(np.concatenate(out)).astype(np.int64)

    @property
    def n_tokens(self) -> int:
        return int(self.stores[0].manifest["n_tokens"])

    # ------------------------------------------------------------------ iteration
    def __iter__(self):
        info = get_worker_info()
        wid, W = (info.id, info.num_workers) if info is not None else (0, 1)
        if W != max(1, self.num_workers):
            raise RuntimeError(f"DistillDataset was built for num_workers={self.num_workers}, DataLoader uses {W}")
        idx, wts = self.worker_batches(self.epoch, wid)
        flat = np.concatenate(idx) if idx else np.zeros(0, np.int64)
        caches: list[ShardCache] = []
        for si, store in enumerate(self.stores):
            used = si == 0 or self.with_targets
            rows = flat[:0] if not used else flat if self._maps[si] is None else self._maps[si][flat]
            names = [n for s2, n in self.teachers if s2 == si] if self.with_targets else []
            # the primary's plan bounds memory; a secondary in the same order needs as many, in another order it re-decodes
            cap = None if si == 0 or self._maps[si] is None else max(self.cache_shards, caches[0].max_shards)
            caches.append(ShardCache(store, rows, names, max_shards=cap, hidden=self._hidden_layers()))
        self._start_prefetch(idx)
        try:
            for b, w in zip(idx, wts):
                yield self.make_batch(b, w, caches)
        finally:
            self.decodes = {(si, j): n for si, c in enumerate(caches) for j, n in c.decodes.items()}
            for store in self.stores:
                store.close()

    def _start_prefetch(self, batches: list[np.ndarray]) -> None:
        """Have each store fetch, ahead of decoding, the parts of the shards these batches will read,
        in the order they are first needed."""
        if self.prefetch <= 0 or not batches:
            return
        flat = np.concatenate(batches)
        for si, store in enumerate(self.stores):
            if si and not self.with_targets:
                continue  # only the primary's inputs are read
            idx = flat if self._maps[si] is None else self._maps[si][flat]
            shards = store.index.shards_of(idx)
            _, first = np.unique(shards, return_index=True)
            order = shards[np.sort(first)].tolist()
            names = [n for s2, n in self.teachers if s2 == si] if self.with_targets else []
            store.prefetch(order, names, depth=self.prefetch)

    def _row(self, si: int, i: int, caches: list[ShardCache] | None):
        idx = int(self._maps[si][i]) if self._maps[si] is not None else i
        if caches is not None:
            return caches[si].row(idx)
        j, r = self.stores[si].index.locate(idx)
        return self.stores[si].load_shard(j, None if self.with_targets else [], self._hidden_layers()), r

    def _hidden_layers(self) -> list[int] | bool:
        """The stored layers batches carry (decoded with the shard), else False (none decoded)."""
        return sorted({layer for _, layer in self.hidden}) or False

    def make_batch(self, indices: np.ndarray, weights: np.ndarray, caches: list[ShardCache] | None = None) -> dict:
        """The padded batch of primary-store sequences ``indices`` [B] with ``weights`` [B] (0: filler),
        ``[B, L]`` with ``L`` its longest sequence (padding past it is never computed).
        ``caches``: the iterating worker's decoded shards; without, the stores' own LRU is used."""
        rows0 = [self._row(0, int(i), caches) for i in indices]
        B, L = len(indices), max([int(sh["length"][r]) for sh, r in rows0], default=1)
        input_ids = np.zeros((B, L), np.int64)
        lengths = np.zeros(B, np.int64)
        trained = np.zeros((B, L), bool)
        positions = np.zeros((B, L), np.int64) if self.segmented else None
        # entropy and gold log-prob: per-position fusion weights (--fuse-weights, logitstore/distributions/fusion.py)
        per_teacher = [{"ids": [], "logprobs": [], "tail_mass": [], "entropy": [], "gold_logprob": [],
                        **({"counts": [], "log_z": []} if s else {})} for s in self.sampled]
        hidden = {(m, layer): np.zeros((B, L, self.hidden_dims[m]), np.float32) for m, layer in self.hidden}
        for b, i in enumerate(indices):
            sh, r = rows0[b]
            lengths[b] = sh["length"][r]
            input_ids[b] = sh["input_ids"][r, :L]
            trained[b] = sh["loss_mask"][r, :L]
            if positions is not None:
                positions[b] = sh["position_ids"][r, :L]
            if not self.with_targets:
                continue
            rows = {0: (sh, r)}
            for si in range(1, len(self.stores)):
                rows[si] = self._row(si, int(i), caches)
                if bytes(rows[si][0]["seq_hash"][rows[si][1]]) != bytes(sh["seq_hash"][r]):
                    raise LogitStoreError(f"--logits {self.urls[si]}: its sequence for {self.urls[0]}'s sequence {int(i)} has "
                                          f"another content hash; the stores do not hold the same data")
                if not np.all(rows[si][0]["loss_mask"][rows[si][1], :L] >= trained[b]):
                    raise LogitStoreError(f"--logits {self.urls[si]}: holds no targets at positions {self.urls[0]}'s sequence "
                                          f"{int(i)} trains (its loss mask differs); dump both stores with the same --train-on")
            for t, (si, name) in enumerate(self.teachers):
                tsh, tr = rows[si]
                td = tsh["teachers"][name]
                for key in per_teacher[t]:
                    per_teacher[t][key].append(td[key][tr, :L])
            for m, layer in self.hidden:  # feature / relation KD (trainer/features.py)
                tsh, tr = rows[self.teachers[m][0]]
                hidden[m, layer][b] = tsh["teachers"][self.teachers[m][1]][f"hidden_{layer}"][tr, :L]
        pos = np.arange(L)[None, :]
        labels = np.full((B, L), -100, np.int64)
        labels[:, :-1] = input_ids[:, 1:]
        labels[pos + 1 >= lengths[:, None]] = -100  # no next token inside the window
        labels[~trained] = -100  # the store's loss mask: CE and KD only where it trains (and its targets exist)
        labels[np.asarray(weights) == 0] = -100  # filler rows contribute nothing
        batch = {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy((pos < lengths[:, None]).astype(np.int64)),
            "labels": torch.from_numpy(labels),
            "index": torch.from_numpy(np.asarray(indices, np.int64)),
            "weight": torch.from_numpy(np.asarray(weights, np.float32)),
        }
        if positions is not None:  # packed documents: positions restart per document, attention stays inside it
            batch["position_ids"] = torch.from_numpy(positions)
        if self.with_targets:
            cached = []
            for t in per_teacher:
                stacked = {k: np.stack(v) for k, v in t.items()}  # [B, L(, k)]
                cached.append({k: v.reshape(B * L, *v.shape[2:]) for k, v in stacked.items()})
            for c, s, absent in zip(cached, self.sampled, self.absent):  # targets.py reads these
                c["absent"] = absent
                if s:  # sampled targets: the estimator's weights
                    c["proposal_temperature"] = s["proposal_temperature"]
            for k, v in build_targets(cached, self.vocab_size).items():
                batch[k] = torch.from_numpy(v)
            for key in ("entropy", "gold_logprob"):  # [M, B * L]
                batch[f"teacher_{key}"] = torch.from_numpy(np.stack([c[key].astype(np.float32) for c in cached]))
        for (m, layer), v in hidden.items():
            batch[f"hidden_{m}_{layer}"] = torch.from_numpy(v)  # [B, L, dim]
        return batch

    def request_hidden(self, keys: list[tuple[int, int]], dims: dict[int, int]) -> None:
        """Batches also carry ``hidden_{m}_{layer}`` (teacher ``m``'s stored hidden states at
        ``layer``, float32, [B, L, dim] or [B, dim] for classify stores); ``dims`` {m: dim}.
        Needs ``with_targets`` (the teacher parts are read)."""
        if keys and not self.with_targets:
            raise ConfigError("hidden states: the dataset was built without teacher targets")
        self.hidden, self.hidden_dims = list(keys), dict(dims)


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
