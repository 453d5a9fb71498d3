"""Top-k statistics of an output layer split by vocabulary rows over a tensor-parallel group.

With tensor parallelism the output layer's weight ``[V, H]`` is split by rows: rank ``r`` of the
group holds rows ``[o_r, o_r + V_r)`` and computes only its logits ``x_r`` ``[N, V_r]``. The full
``[N, V]`` logits are never gathered (at V = 152k, 1,024 positions are 620 MB in float32); each rank
reduces its slice to a few ``[N, k]`` and ``[N]`` tensors (:func:`partial_stats`), those are
all-gathered (``T x N x (3k + 5)`` floats), and :func:`combine` gives exactly what
:func:`logitstore.capture.teacher.topk_stats` gives on the full row:

- ``lse = logsumexp_r lse_r``; with ``w_r = exp(lse_r - lse)`` the share of the mass on rank r
  (in float64, from each rank's maximum and ``log_s_r = lse_r - max_r``);
- top-k: the k largest of the ``T * k`` local candidates (every global top-k entry is in its rank's
  local top-k), log-probs ``x - lse``;
- tail: rank r contributes ``c_r`` of the top-k; its mass outside them is summed on the rank for
  every possible ``c_r`` (the mass outside its local top-k plus the local top entries from
  ``c_r`` on, a sum of non-negative terms: no ``1 - sum`` cancellation), and the tail is
  ``sum_r w_r * outside_r[c_r]``;
- entropy: ``sum_r w_r * (H_r - log w_r)`` with ``H_r`` the entropy of rank r's own softmax;
- gold log-prob: ``x[next] - lse``, the logit coming from the rank that holds ``next``.

Rows at or past the tokenizer's vocabulary (a padded output layer) are left out on the rank that
holds them, as on one device.
"""

from __future__ import annotations

import torch

from logitstore.capture.lm_head import ChunkedHead, head_for
from logitstore.errors import LogitStoreError

#: log-probs below this (``-inf`` from masked logits) are stored as this value, here and in ``topk_stats``
LOGPROB_FLOOR = -1.0e4
KEYS = ("values", "ids", "max_x", "log_s", "entropy", "outside", "gold_x", "has_gold")


def partial_stats(x_local: torch.Tensor, offset: int, k: int, vocab_size: int,
                  next_ids: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """One rank's reduction of its logits ``x_local`` [N, V_r] (columns ``offset ..``).

    Returns ``values``/``ids`` [N, k] (local top-k logits, global ids; ``-inf``/0 where the rank has
    fewer than k real columns), ``max_x`` and ``log_s`` [N] (its log-normaliser is ``max_x +
    log_s``, kept apart so that no precision is lost at large logits), ``entropy`` (of its own
    softmax), ``gold_x``, ``has_gold`` [N] and ``outside`` [N, k + 1] (its mass, under its own
    softmax, outside its top-c entries, for c = 0..k)."""
    N = x_local.shape[0]
    dev = x_local.device
    real = max(0, min(x_local.shape[1], vocab_size - offset))
    values = torch.full((N, k), float("-inf"), device=dev)
    ids = torch.zeros((N, k), dtype=torch.int64, device=dev)
    outside = torch.zeros((N, k + 1), device=dev)
    max_x = torch.full((N,), float("-inf"), device=dev)
    log_s = torch.zeros((N,), device=dev)
    entropy = torch.zeros((N,), device=dev)
    gold_x = torch.zeros((N,), device=dev)
    has_gold = torch.zeros((N,), device=dev)
    if real:
        x = x_local[:, :real].float()
        kk = min(k, real)
        top_x, top_i = torch.topk(x, kk, dim=-1, sorted=True)
        dead = top_x[:, 0] == float("-inf")  # every logit of the row on this rank is masked
        zero = torch.zeros((), device=dev)
        m = torch.where(dead, zero, top_x[:, 0])
        shifted = x - m[:, None]  # <= 0: the moments below keep their precision at any logit scale
        p = torch.softmax(torch.where(dead[:, None], zero, shifted), dim=-1)
        p_top = p.gather(-1, top_i)
        log_s = -torch.log(p_top[:, 0])  # p(top-1) >= 1/V_r: no underflow
        mean_shift = torch.bmm(p[:, None, :], shifted[:, :, None])[:, 0, 0]
        if not torch.isfinite(mean_shift).all():  # -inf logits: 0 * -inf
            mean_shift = torch.where(p > 0, p * shifted, zero).sum(-1)
        entropy = log_s - mean_shift
        p.scatter_(-1, top_i, 0.0)
        rest = p.sum(-1)
        suffix = torch.flip(torch.cumsum(torch.flip(p_top, [1]), 1), [1])  # [N, kk]: sum of p_top[j:]
        outside[:, :kk] = suffix + rest[:, None]
        outside[:, kk:] = rest[:, None]
        # a real column always beats a placeholder: masked (-inf) logits become the most negative
        # finite float (their log-prob is floored either way), placeholders stay -inf
        values[:, :kk] = top_x.clamp(min=torch.finfo(torch.float32).min)
        ids[:, :kk] = top_i + offset
        max_x = torch.where(dead, float("-inf"), top_x[:, 0])
        if dead.any():
            log_s = torch.where(dead, 0.0, log_s)
            entropy = torch.where(dead, 0.0, entropy)
            outside[dead] = 0.0
        if next_ids is not None:
            local = next_ids - offset
            mine = (next_ids >= 0) & (local >= 0) & (local < real)
            gold_x = torch.where(mine, x.gather(-1, local.clamp(0, real - 1)[:, None])[:, 0], gold_x)
            has_gold = mine.float()
    return {"values": values, "ids": ids, "max_x": max_x, "log_s": log_s, "entropy": entropy, "outside": outside,
            "gold_x": gold_x, "has_gold": has_gold}


def combine(parts: dict[str, torch.Tensor], k: int, next_ids: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The statistics of the full row from every rank's :func:`partial_stats`, stacked on a new
    first dimension ``[T, ...]``. Same keys, shapes and conventions as ``topk_stats``.

    The ranks' shares ``w_r`` and the log-normaliser are combined in float64 (``[T, N]``, cheap)
    from the exact float32 maxima and the small ``log_s_r``: in float32 ``exp(lse_r - lse)`` would
    carry the rounding of ``lse`` (~1e-4 at logits of 3,000) into the tail and entropy."""
    T, N, _ = parts["values"].shape
    mx = parts["max_x"].double()
    top = mx.max(dim=0).values  # [N]
    if not torch.isfinite(top).all():
        bad = int(torch.nonzero(~torch.isfinite(top))[0, 0])
        raise LogitStoreError(f"teacher produced non-finite logits at position {bad} (fp16 overflow? try --dtype bf16 or fp32)")
    a = (mx - top[None]) + parts["log_s"].double()  # lse_r - max, -inf for a rank without real columns
    ls = torch.logsumexp(a, dim=0)
    lse = top + ls  # [N], float64
    if not torch.isfinite(lse).all():
        bad = int(torch.nonzero(~torch.isfinite(lse))[0, 0])
        raise LogitStoreError(f"teacher produced non-finite logits at position {bad} (fp16 overflow? try --dtype bf16 or fp32)")
    log_w = a - ls[None]
    w = torch.exp(log_w)  # [T, N]; 0 for a rank without real columns
    cand = parts["values"].permute(1, 0, 2).reshape(N, T * k)
    top_v, sel = torch.topk(cand, k, dim=-1, sorted=True)
    ids = parts["ids"].permute(1, 0, 2).reshape(N, T * k).gather(-1, sel)
    counts = torch.zeros((N, T), dtype=torch.int64, device=cand.device)
    counts.scatter_add_(1, sel // k, torch.ones_like(sel))
    outside = parts["outside"].gather(-1, counts.t()[:, :, None])[:, :, 0].double()  # [T, N]
    tail = (w * outside).sum(0).float().clamp_(0.0, 1.0)
    # H = sum_r w_r (H_r - log w_r): terms of a few nats, so the rounding of sum_r w_r = 1 is not
    # multiplied by the logits' magnitude as in lse - sum_r w_r E_r[x]
    zero = torch.zeros((), device=lse.device, dtype=torch.float64)
    entropy = torch.where(w > 0, w * (parts["entropy"].double() - log_w), zero).sum(0).float().clamp_(min=0.0)
    if next_ids is None:
        gold = torch.zeros((N,), device=lse.device)
    else:
        x_gold = torch.where(parts["has_gold"] > 0, parts["gold_x"].double(), zero).sum(0)
        gold = torch.where(next_ids >= 0, x_gold - lse, zero).float()
    logprobs = (top_v.double() - lse[:, None]).float().clamp_(min=LOGPROB_FLOOR)
    return {"ids": ids, "logprobs": logprobs, "tail_mass": tail, "gold_logprob": gold, "entropy": entropy}


def gather_partials(part: dict[str, torch.Tensor], group) -> dict[str, torch.Tensor]:
    """All-gather one rank's :func:`partial_stats` over ``group``: ``[T, ...]`` per key, in group-rank order."""
    import torch.distributed as dist

    T = dist.get_world_size(group)
    out = {}
    for key in KEYS:
        t = part[key].contiguous()
        bufs = [torch.empty_like(t) for _ in range(T)]
        dist.all_gather(bufs, t, group=group)
        out[key] = torch.stack(bufs)
    return out


class ShardedHead(ChunkedHead):
    """A :class:`ChunkedHead` whose output layer is a DTensor split by rows over the ``tp`` dimension
    of its mesh (transformers' ``colwise`` plan for ``lm_head``): ``self(h)`` gives this rank's
    logits ``[.., V_r]``, columns ``offset .. offset + V_r`` of the full row."""

    def __post_init__(self) -> None:
        import torch.distributed as dist

        super().__post_init__()
        w = self.head.weight
        mesh, dim = w.device_mesh, tp_dim(w)
        self.group = mesh.get_group(dim)
        self.local_w = w.to_local()
        b = getattr(self.head, "bias", None)
        self.local_b = b.to_local() if b is not None and hasattr(b, "to_local") else b
        rows = [torch.zeros((), dtype=torch.int64, device=self.local_w.device) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(rows, torch.tensor(self.local_w.shape[0], device=self.local_w.device), group=self.group)
        me = dist.get_rank(self.group)
        self.offset = int(sum(int(r) for r in rows[:me]))
        self.rows = [int(r) for r in rows]

    def _weights(self):
        return self.local_w, self.local_b

    def full_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The whole row, gathered (only for the load-time check on a few positions)."""
        import torch.distributed as dist

        local = self(hidden)
        width = max(self.rows)  # gloo gathers equal shapes only: pad to the widest slice, cut after
        padded = torch.zeros(*local.shape[:-1], width, dtype=local.dtype, device=local.device)
        padded[..., : local.shape[-1]] = local
        bufs = [torch.empty_like(padded) for _ in self.rows]
        dist.all_gather(bufs, padded, group=self.group)
        return torch.cat([b[..., :r] for b, r in zip(bufs, self.rows)], dim=-1)

    def stats(self, hidden: torch.Tensor, k: int, vocab_size: int, next_ids: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """``topk_stats`` of the full rows of ``hidden`` [N, H], computed from this rank's slice."""
        part = partial_stats(self(hidden), self.offset, k, vocab_size, next_ids)
        return combine(gather_partials(part, self.group), k, next_ids)


def tp_dim(weight) -> int | None:
    """The mesh dimension over which a DTensor weight is split by rows (``Shard(0)``) and that is
    named ``tp`` (or the only one), or None."""
    from torch.distributed.tensor import Shard

    mesh = weight.device_mesh
    names = mesh.mesh_dim_names or ()
    dims = [names.index("tp")] if "tp" in names else ([0] if mesh.ndim == 1 else [])
    for d in dims:
        pl = weight.placements[d]
        if isinstance(pl, Shard) and type(pl) is Shard and pl.dim == 0:
            return d
    return None


def sharded_head_for(model, *, fp32: bool = True) -> ShardedHead | None:
    """A :class:`ShardedHead` for a model on the chunked-head allow-list whose output layer is
    split by rows over its tensor-parallel mesh; None otherwise (the caller then uses the model's
    own forward, whose logits transformers gathers)."""
    base = head_for(model, fp32=fp32)
    w = model.get_output_embeddings().weight if base is not None else None
    if w is None or not hasattr(w, "device_mesh") or tp_dim(w) is None:
        return None
    return ShardedHead(model, base.transform, fp32=fp32)
