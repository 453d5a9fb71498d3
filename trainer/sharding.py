"""FSDP for students that do not fit one device (``trainer fit --fsdp`` under ``torchrun``).

PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``) shards every transformer block (the
classes a ``transformers`` model lists in ``_no_split_modules``) and then the whole
``DistillModule``, so each rank holds ``1/N`` of the parameters, gradients and AdamW state, and a
block's full weights exist only while it runs (``reshard_after_forward``). It runs on CUDA (NCCL)
and on CPU (gloo), so it is tested here on 2 CPU processes. ``accelerate`` still provides the
process group, autocast (applied around the forward by the loop) and reductions; it does not wrap
the model (it turns its FSDP plugin into DDP on CPU), and checkpoints of a sharded run are written
with ``torch.distributed.checkpoint`` (one file per rank) instead of ``accelerate.save_state``.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch


def shard_module(module: torch.nn.Module, device: torch.device, compute_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Apply ``fully_shard`` to each transformer block of ``module.student`` and to ``module``.

    Memory: the module stays where it was loaded (CPU) until ``fully_shard`` moves each block to
    ``device`` and shards it, so a device holds one block's full parameters plus its shards, never
    the whole float32 model. ``compute_dtype`` (the autocast dtype, or None): parameters are
    all-gathered in it (half the traffic of the float32 master weights) and gradients reduced in
    float32 (``MixedPrecisionPolicy``)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if device.type == "cuda":
        torch.cuda.set_device(device)
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) if compute_dtype is not None else None
    kw = {"mp_policy": mp} if mp is not None else {}
    block_names = set(getattr(module.student, "_no_split_modules", None) or [])
    blocks = [m for m in module.student.modules() if type(m).__name__ in block_names]
    for b in blocks:
        fully_shard(b, **kw)
    fully_shard(module, **kw)  # the rest (embeddings, head, final norm); evaluation goes through forward() too
    for mod in module.modules():  # buffers FSDP did not move (it moves those of the modules it manages)
        for name, buf in list(mod._buffers.items()):
            if buf is not None and buf.device != device:
                mod._buffers[name] = buf.to(device)
    return module


@contextmanager
def gradient_sync(module: torch.nn.Module, enabled: bool):
    """Skip the reduce-scatter of gradients on all but the last micro-batch of a step."""
    module.set_requires_gradient_sync(enabled)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def full_state_dict(module: torch.nn.Module) -> dict:
    """The unsharded state dict on CPU (collective: every rank must call it; all get it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded(path: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Model and optimizer shards of every rank under ``path`` (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(module, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path / "sharded"))


def load_sharded(path: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(module, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path / "sharded"))
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
