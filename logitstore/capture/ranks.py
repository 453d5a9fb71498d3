"""Running under ``torchrun``: the rank layout from its environment and a process group for it.

``torchrun --nproc-per-node N [--nnodes M ...] -m logitstore dump ...`` starts ``N * M`` processes
with ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set. Each process of a dump works on its own
shards (``rank, rank + W, ...``); the process group is used only for barriers, so gloo is enough
and no tensor ever crosses it. On CUDA machines each process takes device ``cuda:LOCAL_RANK``.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch

from logitstore.errors import ConfigError, LogitStoreError


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    #: processes on this node (torchrun's LOCAL_WORLD_SIZE)
    local_world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}: expected an integer, got {raw!r}") from None


def ranks_from_env() -> Ranks:
    """The layout ``torchrun`` describes in the environment (one process when it is absent)."""
    world = _env_int("WORLD_SIZE", 1)
    r = Ranks(_env_int("RANK", 0), world, _env_int("LOCAL_RANK", 0), _env_int("LOCAL_WORLD_SIZE", world))
    if r.world_size < 1 or not 0 <= r.rank < r.world_size:
        raise ConfigError(f"environment: RANK={r.rank} is not in [0, WORLD_SIZE={r.world_size})")
    return r


def rank_device(device: str, ranks: Ranks) -> str:
    """``auto``/``cuda`` become ``cuda:LOCAL_RANK`` when several processes share a node's GPUs."""
    if ranks.distributed and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{ranks.local_rank}"
    return device


@contextmanager
def process_group(ranks: Ranks, timeout_minutes: float = 120.0, backend: str = "gloo"):
    """Initialise the default process group for ``ranks`` (if not already) and tear it down after.

    ``backend``: gloo for barriers and small objects; ``cpu:gloo,cuda:nccl`` when a tensor-parallel
    teacher's collectives run on GPUs. The timeout bounds how long a rank waits at a barrier for a
    slower one; a dump's ranks can finish their shards far apart, so it is long."""
    import torch.distributed as dist

    owned = ranks.distributed and dist.is_available() and not dist.is_initialized()
    if owned:
        dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))
    try:
        yield
    finally:
        if owned:
            dist.destroy_process_group()


def barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        import torch.distributed as dist

        dist.barrier()


def share_from_rank0(ranks: Ranks, compute):
    """``compute()`` (which returns plain Python data) run on rank 0 only, its result broadcast to
    every rank. If it fails on rank 0 with a :class:`LogitStoreError`, every rank raises the same
    one-line error instead of waiting for a result that never comes."""
    if not ranks.distributed:
        return compute()
    import torch.distributed as dist

    box: list = [None]
    error = None
    if ranks.is_main:
        try:
            box = [("ok", compute())]
        except LogitStoreError as e:
            error = e
            box = [("error", type(e).__name__, str(e))]
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    if box[0][0] == "error":
        cls = ConfigError if box[0][1] == "ConfigError" else LogitStoreError
        raise cls(box[0][2])
    return box[0][1]


def share_from_group(par, groups: list | None, fn):
    """``fn()`` on the writer of this rank's tensor-parallel group (``par``: a
    :class:`~logitstore.capture.placement.Parallel`), the same value on every rank of it."""
    if groups is None:
        return fn()
    import torch.distributed as dist

    box = [fn() if par.writer else None]
    dist.broadcast_object_list(box, src=par.group * par.tp, group=groups[par.group])
    return box[0]


def tp_groups(ranks: Ranks, par) -> list | None:
    """One gloo process group per tensor-parallel group, for the writer's decisions (every rank
    creates all of them, in the same order, as torch.distributed requires); None without TP."""
    if par.tp == 1:
        return None
    import torch.distributed as dist

    return [dist.new_group(list(range(g * par.tp, (g + 1) * par.tp)), backend="gloo") for g in range(par.dp)]


def any_rank_has_work(n: int) -> bool:
    """Whether ``n > 0`` on any rank of the default process group (a collective: every rank calls it)."""
    import torch.distributed as dist

    t = torch.tensor([n], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
