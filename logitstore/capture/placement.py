"""Where a teacher's weights live: one device, an accelerate device map, or a tensor-parallel group.

Three ways, each an engine that exists (nothing here moves a weight itself):

- **one device** (default): ``from_pretrained(dtype=...)`` then ``.to(device)``.
- **device map** (``--device-map auto|balanced|balanced_low_0|sequential|MAP.json``, ``--max-memory``,
  ``--offload-folder``): accelerate's big-model placement through ``from_pretrained(device_map=...)``:
  layers spread over the GPUs the process may use, then CPU RAM, then disk, as ``max_memory``
  allows. Under ``torchrun`` with several processes per node, process ``LOCAL_RANK`` of
  ``LOCAL_WORLD_SIZE`` uses GPUs ``[LOCAL_RANK * g, (LOCAL_RANK + 1) * g)`` with
  ``g = visible GPUs // LOCAL_WORLD_SIZE`` (:func:`gpus_for_process`), so e.g. 2 processes on an
  8-GPU node each place a copy of the teacher on 4 GPUs. Layers run one after another: a device
  map holds a model larger than one GPU, it does not make it faster.
- **tensor parallel** (``--tp T`` under ``torchrun``, world ``W = dp x T``): transformers' own
  tensor-parallel plan (``DistributedConfig(tp_size=T, dp_replicate_size=dp)``): every layer is
  split over the T consecutive ranks of a group, the ``dp = W / T`` groups each run one copy of
  the teacher over their own shards, and the group's first rank writes
  (:class:`Parallel`). The output layer stays split by vocabulary rows and the statistics are
  combined across the group (:mod:`logitstore.capture.vocab_parallel`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from logitstore.errors import ConfigError

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


@dataclass(frozen=True)
class Parallel:
    """This process's place in ``W = dp x tp`` ranks: groups of ``tp`` consecutive ranks run one
    copy of the teacher; group ``g`` owns shards ``g, g + dp, ...``; the group's first rank writes."""

    rank: int = 0
    world_size: int = 1
    tp: int = 1

    def __post_init__(self) -> None:
        if self.tp < 1:
            raise ConfigError(f"--tp: expected a positive integer, got {self.tp}")
        if self.world_size % self.tp:
            raise ConfigError(f"--tp {self.tp}: the number of processes ({self.world_size}) is not a multiple of it; "
                              f"start {self.tp} x (data-parallel copies) processes with torchrun")

    @property
    def dp(self) -> int:
        return self.world_size // self.tp

    @property
    def group(self) -> int:
        return self.rank // self.tp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def writer(self) -> bool:
        return self.tp_rank == 0

    def shards(self, n_shards: int) -> list[int]:
        return list(range(self.group, n_shards, self.dp))


def parse_max_memory(raw: str | None) -> dict | None:
    """``--max-memory 0=70GiB,1=70GiB,cpu=200GiB`` -> ``{0: "70GiB", 1: "70GiB", "cpu": "200GiB"}``
    (accelerate's ``max_memory``; keys are GPU indices, ``cpu`` or ``disk``)."""
    if raw is None or raw == "":
        return None
    out: dict = {}
    for item in raw.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep or not key or not value:
            raise ConfigError(f"--max-memory: expected DEVICE=SIZE[,DEVICE=SIZE...] such as 0=70GiB,cpu=200GiB, got {raw!r}")
        key = key.strip()
        if key.isdigit():
            out[int(key)] = value.strip()
        elif key in ("cpu", "disk", "mps"):
            out[key] = value.strip()
        else:
            raise ConfigError(f"--max-memory: device {key!r} is not a GPU index, cpu or disk (in {raw!r})")
        if not _is_size(value.strip()):
            raise ConfigError(f"--max-memory {key}={value}: expected a size such as 70GiB, 500MB or a number of bytes")
    return out


def _is_size(v: str) -> bool:
    from accelerate.utils import convert_file_size_to_int

    try:
        return convert_file_size_to_int(v) > 0
    except (ValueError, TypeError):
        return False


def parse_device_map(raw: str | None) -> str | dict | None:
    """``--device-map``: one of accelerate's strategies, or a JSON file ``{module name: device}``
    (devices: a GPU index, ``cpu`` or ``disk``)."""
    if raw is None or raw == "":
        return None
    if raw in DEVICE_MAPS:
        return raw
    p = Path(raw)
    if not p.is_file():
        raise ConfigError(f"--device-map: expected {', '.join(DEVICE_MAPS)} or a JSON file of module -> device, got {raw!r}")
    try:
        m = json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"--device-map {raw}: not valid JSON ({e})") from None
    if not isinstance(m, dict) or not m or not all(isinstance(k, str) for k in m):
        raise ConfigError(f"--device-map {raw}: expected an object of module name -> device")
    for k, v in m.items():
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= 0) and v not in ("cpu", "disk", "mps") and \
                not (isinstance(v, str) and v.startswith("cuda")):
            raise ConfigError(f"--device-map {raw}: module {k!r} -> {v!r}; expected a GPU index, cuda:N, cpu or disk")
    return m


def gpus_for_process(n_gpus: int, local_rank: int, local_world_size: int) -> list[int]:
    """The GPUs process ``local_rank`` of ``local_world_size`` on a node places its teacher on."""
    if local_world_size <= 1:
        return list(range(n_gpus))
    per = n_gpus // local_world_size
    if per == 0:
        raise ConfigError(f"--device-map: {local_world_size} processes on this node share {n_gpus} GPU(s); "
                          "start at most one process per GPU (or one per node for a teacher spread over all of them)")
    return list(range(local_rank * per, (local_rank + 1) * per))


def device_map_kwargs(device_map, max_memory: dict | None, offload_folder: str | None, local_rank: int,
                      local_world_size: int) -> dict:
    """``from_pretrained`` arguments for a device map (see the module docstring)."""
    kw: dict = {"device_map": device_map}
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if isinstance(device_map, str) and local_world_size > 1 and n_gpus:
        mine = gpus_for_process(n_gpus, local_rank, local_world_size)
        from accelerate.utils import get_max_memory

        avail = get_max_memory()
        base = dict(max_memory) if max_memory else {}
        max_memory = {g: base.get(g, avail[g]) for g in mine}
        for key in ("cpu", "disk"):
            if key in base:
                max_memory[key] = base[key]
        if "cpu" not in max_memory:  # the node's RAM is shared by its processes
            max_memory["cpu"] = int(avail["cpu"] // local_world_size)
    if max_memory:
        kw["max_memory"] = max_memory
    if offload_folder:
        if local_world_size > 1:  # processes of a node must not write each other's offloaded weights
            offload_folder = os.path.join(offload_folder, f"local-rank-{local_rank}")
        os.makedirs(offload_folder, exist_ok=True)
        kw["offload_folder"] = offload_folder
    return kw


def tp_kwargs(par: Parallel) -> dict:
    """``from_pretrained`` arguments for transformers' tensor parallelism over ``par.tp`` ranks."""
    try:
        from transformers.distributed import DistributedConfig
    except ImportError:
        raise ConfigError("--tp: this transformers has no transformers.distributed.DistributedConfig; "
                          "tensor parallelism here needs a transformers 5 release that has it") from None
    import inspect

    params = inspect.signature(DistributedConfig).parameters
    if par.dp > 1 and "dp_replicate_size" not in params:
        raise ConfigError(f"--tp {par.tp} with {par.dp} copies: this transformers' DistributedConfig has no "
                          "dp_replicate_size; run one tensor-parallel group (WORLD_SIZE = --tp) per dump")
    cfg = {"tp_size": par.tp, **({"dp_replicate_size": par.dp} if par.dp > 1 else {})}
    return {"distributed_config": DistributedConfig(**cfg)}


def output_device(model) -> torch.device:
    """The device the output layer computes on (where the statistics run)."""
    head = model.get_output_embeddings()
    hook = getattr(head, "_hf_hook", None)
    dev = getattr(hook, "execution_device", None)
    if dev is not None:
        return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
    w = head.weight
    if hasattr(w, "to_local"):
        w = w.to_local()
    if w.device.type == "meta":
        return torch.device("cpu")
    return w.device
