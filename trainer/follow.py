"""Training while the stores are still being dumped (``trainer fit --follow``).

Each epoch covers the shards committed when it starts (:meth:`~trainer.data.DistillDataset.set_epoch`
refreshes the stores); before the first one, :func:`wait_for_shards` waits until there is at least one
committed shard. It gives up, with the reason, when there is nothing to train on and no dump is
running (a writer's lock that is no longer live, see :mod:`logitstore.storage.lock`).
"""

from __future__ import annotations

import sys
import time

from logitstore.errors import LogitStoreError
from logitstore.storage.lock import lock_is_live, read_lock


def wait_for_shards(train, poll: float, verbose: bool) -> None:
    """In follow mode, block until every store of ``train`` has at least one committed shard."""
    while train.follow and train.refresh() == 0:
        idle = [u for u, s in zip(train.urls, train.stores) if s.n_shards == 0 and not _writer_running(s)]
        if idle:
            raise LogitStoreError(f"--follow: {idle[0]} has no committed shard and no dump is writing it")
        if verbose:
            print(f"--follow: waiting for the first committed shard of {', '.join(train.urls)} "
                  f"(looking again in {poll:g} s)", file=sys.stderr, flush=True)
        time.sleep(poll)


def _writer_running(store) -> bool:
    if store.complete:
        return False
    rec = read_lock(store.fs)
    return rec is not None and lock_is_live(rec)
