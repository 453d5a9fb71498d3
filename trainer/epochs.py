"""The epoch order of a :class:`~trainer.data.DistillDataset`: its plan, each worker's batches, and
the state that resumes it exactly (on the same layout batch for batch; on another number of ranks,
workers or batch size through the per-stream positions of :mod:`logitstore.sampling`).

A mixin: it reads the dataset's ``stores``, ``seed``, ``shuffle``, ``shuffle_buffer``, ``n_streams``,
``layout``, ``rank``, ``epoch``, ``consumed``, ``_pos``, ``_limit`` and ``_excluded``.
"""

from __future__ import annotations

import numpy as np

from logitstore.errors import ConfigError, LogitStoreError
from logitstore.sampling import EpochPlan, Layout

#: version of the order a checkpoint's ``dataset`` state describes (absent: the order before streams)
ORDER_VERSION = 2
#: length grouping (``--group-by-length``): each stream is sorted in blocks of this many batches
GROUP_BATCHES = 50


class EpochOrder:
    def plan(self, epoch: int) -> EpochPlan:
        """The epoch's plan over the primary store's shards (same on every rank and worker)."""
        ix = self.stores[0].index
        grouping = getattr(self, "group_lengths", None)
        return EpochPlan(ix.sizes[:self._limit], seed=self.seed, epoch=epoch, shuffle=self.shuffle, mix=self.shuffle_buffer if self.shuffle else 1,
                         n_streams=self.n_streams, excluded=getattr(self, "_excluded", None),
                         lengths=grouping, group=GROUP_BATCHES * self.batch_size if grouping is not None else 0)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Every sequence of an epoch (without skipped shards) in canonical order: element ``p`` of
        stream ``c`` at key ``p * n_streams + c``. Builds the whole order: for tests and small stores."""
        plan = self.plan(epoch)
        streams = [plan.stream(c) for c in range(plan.n_streams)]
        keys = np.concatenate([np.arange(len(s)) * plan.n_streams + c for c, s in enumerate(streams)]) if streams else np.zeros(0)
        flat = np.concatenate(streams) if streams else np.zeros(0, np.int64)
        return flat[np.argsort(keys, kind="stable")]

    def check_streams(self, where: str = "--streams") -> None:
        """Every (rank, worker) slot reads the same number of streams: ``n_streams`` must be a
        multiple of ranks x workers (otherwise slots with fewer streams run dry early and whole steps
        hold only fillers)."""
        slots = self.layout.n_slots
        if self.n_streams < slots or self.n_streams % slots:
            fix = (f"resume with ranks x workers dividing {self.n_streams}" if where.startswith("--resume")
                   else f"use a multiple of {slots}")
            raise ConfigError(f"{where}: {self.n_streams} streams cannot be split evenly over {self.world_size} process(es) x "
                              f"{self.layout.num_workers} loader worker(s); {fix}")

    def _segment(self, plan: EpochPlan) -> tuple[int, int]:
        """``(batches of the segment, first batch still to come)`` for this rank."""
        return plan.n_steps(self.layout, self._pos), self.consumed

    def worker_batches(self, epoch: int, worker: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The batches DataLoader worker ``worker`` yields, in order, from ``consumed`` on: worker ``w``
        serves slot ``(w + consumed) % num_workers``, so batch ``i`` of the resumed segment is the
        uninterrupted run's batch ``consumed + i``."""
        plan = self.plan(epoch)
        nw = self.layout.num_workers
        total, consumed = self._segment(plan)
        slot = (worker + consumed) % nw
        idx, wts = plan.slot_batches(self.layout, self.rank, slot, self._pos)
        first = max(0, -(-(consumed - slot) // nw))
        keep = [b for b in range(first, len(idx)) if b * nw + slot < total]
        return [idx[b] for b in keep], [wts[b] for b in keep]

    def rank_batches(self, epoch: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """This rank's batches (sequence indices) and weights (0 marks filler), in the order the
        training loop receives them (from ``consumed`` on)."""
        nw = self.layout.num_workers
        per = [self.worker_batches(epoch, w) for w in range(nw)]
        total, consumed = self._segment(self.plan(epoch))
        order = [(i % nw, i // nw) for i in range(total - consumed)]
        return [per[w][0][b] for w, b in order], [per[w][1][b] for w, b in order]

    def batches_per_epoch(self) -> int:
        return self.plan(0).n_steps(self.layout)

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        return {"order": ORDER_VERSION, "epoch": self.epoch, "consumed": self.consumed, "seed": self.seed,
                "world_size": self.world_size, "num_workers": self.num_workers, "batch_size": self.batch_size, "n": self.n,
                "n_streams": self.n_streams, "pos": None if self._pos is None else [int(x) for x in self._pos],
                "shards": self._limit}

    def load_state_dict(self, d: dict) -> None:
        """Continue where a checkpoint stopped. On the same layout the segment goes on batch for batch;
        on another one (``world_size``, ``num_workers``, ``batch_size``) the checkpoint's per-stream
        positions carry over, so every sequence of the epoch is still read exactly once."""
        if self.follow and d.get("shards") is not None:  # the prefix of shards the checkpoint's epoch was using
            self._require_shards(d["shards"])
            self._limit = d["shards"]
            self._check_and_join()
        for key in ("seed", "n"):
            if d[key] != getattr(self, key):
                raise LogitStoreError(f"--resume: checkpoint was made with {key}={d[key]}, now {getattr(self, key)}; exact resume needs the same value")
        if d.get("order") != ORDER_VERSION:
            if d["consumed"]:
                raise LogitStoreError("--resume: the checkpoint stopped mid-epoch in the data order of an older version; "
                                      "resume from a checkpoint taken at an epoch boundary")
            self.epoch, self.consumed, self._pos = d["epoch"], 0, None
            return
        if self._streams_given and d["n_streams"] != self.n_streams:
            raise LogitStoreError(f"--resume: checkpoint was made with n_streams={d['n_streams']}, now {self.n_streams}")
        self.n_streams = d["n_streams"]
        self.epoch = d["epoch"]
        pos = None if d["pos"] is None else np.asarray(d["pos"], np.int64)
        old = Layout(d["world_size"], d["num_workers"], d["batch_size"])
        if old == self.layout:
            self._pos, self.consumed = pos, d["consumed"]
            return
        try:
            self.check_streams("--resume: the checkpoint's data order")
        except ConfigError as e:
            raise LogitStoreError(str(e)) from None
        self._pos, self.consumed = self.plan(self.epoch).advance(old, d["consumed"], pos), 0

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` at its beginning (in follow mode over every shard committed by now)."""
        if self.follow:
            self.refresh()
        self.epoch, self.consumed, self._pos = epoch, 0, None
