"""Computing a causal LM's logits from its final hidden states, a chunk of positions at a time.

Both the dump (teacher) and ``trainer fit`` (student) avoid ``[B, L, V]`` logits by running the
model's body once and applying the output layer to a chunk of positions at a time. That is only
correct if it reproduces exactly what the model's own ``forward`` does after its body, and model
families differ there: Granite divides the logits by ``config.logits_scaling``, Cohere multiplies
them by ``logit_scale``, Gemma 2/3 apply a tanh soft-cap, most others apply nothing.

Decision: an explicit **allow-list**, :data:`FAMILIES`, maps a ``model_type`` to the exact
``transformers`` class whose ``forward`` was read (in the installed ``modeling_<family>.py``) and is
known to be ``transform(lm_head(base_model(...).last_hidden_state))`` with ``last_hidden_state``
already after the final norm, and to that transform. :func:`head_for` returns a :class:`ChunkedHead`
for a model on the list (matched by ``model_type`` *and* class, so remote code or a subclass with
its own ``forward`` is not matched) and ``None`` for anything else; callers then use the model's
own ``forward`` (``model(input_ids, attention_mask).logits``), a few sequences at a time so memory
stays bounded. Nothing is guessed from config attributes, so an unknown family is slower but never
silently different. ``tests/test_model_families.py`` checks every listed family against its own
``forward`` for the teacher and the student.

The teacher additionally proves the chunked path at load time (:func:`check_against_forward`,
called by :class:`logitstore.capture.teacher.TeacherRunner` on its first batch): it compares the chunked
log-probs with the model's own forward on up to 64 positions and falls back to the forward, with a
one-line warning, if they differ beyond rounding (a ``transformers`` release that changed a family's
``forward`` is caught there). The student is not checked at run time: a freshly initialised
student has near-zero logits, where a wrong scale or soft-cap is invisible, and under FSDP the
model is not runnable when the loss module is built; it relies on the allow-list and its tests.

Precision (``fp32=True``, used by the teacher): the output layer runs in float32 whatever the
model's dtype, so a bf16/fp16 teacher's logits are not rounded to 8 (bf16) mantissa bits before the
statistics. On CUDA with bf16/fp16 weights this is one GEMM with bf16/fp16 inputs and float32
accumulation and output (``torch.mm(..., out_dtype=torch.float32)``; products of such inputs are
exact in float32); elsewhere the chunk and the weight are upcast to float32. The student
(``fp32=False``) computes the head exactly as its ``forward`` does, in its own or the autocast dtype.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
import torch

#: ``model_type`` -> (class name of the ``*ForCausalLM``, transform after ``lm_head``):
#: ``"none"``; ``"divide:logits_scaling"`` (``logits / config.logits_scaling``);
#: ``"multiply:logit_scale"`` (``logits * model.logit_scale``, set from ``config.logit_scale``);
#: ``"softcap:final_logit_softcapping"`` (``tanh(logits / c) * c`` when ``config.final_logit_softcapping``
#: is not None). Read from transformers 5.x ``modeling_<family>.py``.
FAMILIES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaForCausalLM", "none"),
    "mistral": ("MistralForCausalLM", "none"),
    "ministral": ("MinistralForCausalLM", "none"),
    "mixtral": ("MixtralForCausalLM", "none"),
    "qwen2": ("Qwen2ForCausalLM", "none"),
    "qwen2_moe": ("Qwen2MoeForCausalLM", "none"),
    "qwen3": ("Qwen3ForCausalLM", "none"),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "none"),
    "gemma": ("GemmaForCausalLM", "none"),
    "gemma2": ("Gemma2ForCausalLM", "softcap:final_logit_softcapping"),
    "gemma3_text": ("Gemma3ForCausalLM", "softcap:final_logit_softcapping"),
    "granite": ("GraniteForCausalLM", "divide:logits_scaling"),
    "granitemoe": ("GraniteMoeForCausalLM", "divide:logits_scaling"),
    "cohere": ("CohereForCausalLM", "multiply:logit_scale"),
    "cohere2": ("Cohere2ForCausalLM", "multiply:logit_scale"),
    "gpt2": ("GPT2LMHeadModel", "none"),
    "gpt_neox": ("GPTNeoXForCausalLM", "none"),
    "phi": ("PhiForCausalLM", "none"),
    "phi3": ("Phi3ForCausalLM", "none"),
    "olmo": ("OlmoForCausalLM", "none"),
    "olmo2": ("Olmo2ForCausalLM", "none"),
    "stablelm": ("StableLmForCausalLM", "none"),
    "starcoder2": ("Starcoder2ForCausalLM", "none"),
    "smollm3": ("SmolLM3ForCausalLM", "none"),
}


@dataclass
class ChunkedHead:
    """``hidden(input_ids, attention_mask)`` -> final hidden states [B, L, H]; ``self(h)`` -> logits."""

    model: torch.nn.Module
    transform: str
    fp32: bool = False

    def __post_init__(self) -> None:
        self.head = self.model.get_output_embeddings()
        self._out_dtype_mm = True  # torch.mm(..., out_dtype=float32): CUDA only; turned off if it fails

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
               position_ids: torch.Tensor | None = None, capture=None):
        """``position_ids`` [B, L] restarting per document: attention stays inside each (see
        :func:`model_inputs`). ``capture`` (a :class:`logitstore.capture.hidden.HiddenCapture`, or
        anything with ``arg`` and ``pick``): also the requested layers' hidden states from the same
        forward, returned as ``(final [B, L, H], layers [B, L, n, H])``."""
        def run(ids, mask, pos):
            extra = {"output_hidden_states": capture.arg} if capture is not None else {}
            out = self.model.base_model(input_ids=ids, **model_inputs(mask, pos), **no_cache(self.model), **extra)
            return out.last_hidden_state if capture is None else (out.last_hidden_state, capture.pick(out.hidden_states))

        return packed_call(self.model, run, input_ids, attention_mask, position_ids)

    @contextmanager
    def loaded(self):
        """The output layer's weights on its device for the duration: with an accelerate device map
        that offloaded it (to CPU or disk), its hook brings them in once per batch, not per chunk."""
        hook = getattr(self.head, "_hf_hook", None)
        if hook is None or not getattr(hook, "offload", False):
            yield
            return
        hook.pre_forward(self.head)
        try:
            yield
        finally:
            hook.post_forward(self.head, None)

    def full_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the whole output layer (for the load-time check)."""
        with self.loaded():
            return self(hidden)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self._linear_fp32(hidden) if self.fp32 else self.head(hidden)
        kind, _, attr = self.transform.partition(":")
        if kind == "divide":
            logits = logits / getattr(self.model.config, attr)
        elif kind == "multiply":
            logits = logits * getattr(self.model, attr)
        elif kind == "softcap":
            cap = getattr(self.model.config, attr, None)
            if cap is not None:
                logits = torch.tanh(logits / cap) * cap
        return logits

    def _weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.head.weight, getattr(self.head, "bias", None)

    def _linear_fp32(self, hidden: torch.Tensor) -> torch.Tensor:
        w, b = self._weights()
        shape = hidden.shape
        h = hidden.reshape(-1, shape[-1]).to(w.device)  # a device map may end the body on another device
        out = None
        if w.dtype in (torch.bfloat16, torch.float16) and w.is_cuda and self._out_dtype_mm:
            try:
                out = torch.mm(h.to(w.dtype), w.t(), out_dtype=torch.float32)
            except (RuntimeError, TypeError):
                self._out_dtype_mm = False
        if out is None:
            out = h.float() @ w.float().t()
        if b is not None:
            out = out + b.float()
        return out.reshape(*shape[:-1], out.shape[-1])


def model_class(model: torch.nn.Module) -> type:
    """The model's class, seen through FSDP2's wrapper class (``FSDP<Class>(FSDPModule, <Class>)``,
    which adds no ``forward`` of its own)."""
    cls = type(model)
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return cls
    if issubclass(cls, FSDPModule) and cls.__name__.startswith("FSDP") and len(cls.__bases__) == 2 and cls.__bases__[0] is FSDPModule:
        return cls.__bases__[1]
    return cls


def head_for(model: torch.nn.Module, *, fp32: bool = False) -> ChunkedHead | None:
    """The chunked output layer of ``model`` if its family is on :data:`FAMILIES`, else ``None``."""
    cfg = getattr(model, "config", None)
    entry = FAMILIES.get(getattr(cfg, "model_type", None))
    if entry is None:
        return None
    cls = model_class(model)
    if cls.__name__ != entry[0] or not cls.__module__.startswith("transformers.models."):
        return None
    base = getattr(model, "base_model", None)
    if base is None or base is model or not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        return None
    return ChunkedHead(model, entry[1], fp32=fp32)


def no_cache(model: torch.nn.Module) -> dict:
    """``use_cache=False`` for a model that has a KV cache: one forward over a window needs none,
    and building it costs memory (layers x 2 x [B, heads, L, head_dim])."""
    if hasattr(getattr(model, "config", None), "use_cache"):
        return {"use_cache": False}
    import inspect  # a wrapper without a config (a module of your own around a transformers model)

    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if any(p.name == "use_cache" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params) else {}


def model_inputs(attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None) -> dict:
    """The mask arguments of a forward over windows. Without ``position_ids``: the padding mask.
    With ``position_ids`` that restart at each packed document: those and no mask, from which
    transformers (>= 4.56, ``masking_utils.find_packed_sequence_indices``) builds a causal mask
    that keeps every document to itself for the eager, SDPA and flex kernels, provided no KV cache
    is passed (:func:`no_cache`; with one it builds a plain causal mask). Flash attention takes the
    boundaries from the positions for a single row only, hence :func:`packed_call`. Right padding
    needs no mask under causal attention (no real token attends to a later one)."""
    if position_ids is None:
        return {"attention_mask": attention_mask}
    return {"position_ids": position_ids}


def forward_logits(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   position_ids: torch.Tensor | None = None, capture=None):
    """The model's own logits ``[B, L, V]`` (what every caller compares with); with ``capture`` (see
    :meth:`ChunkedHead.hidden`) ``(logits, layers [B, L, n, H])`` from the same forward."""
    def run(ids, mask, pos):
        extra = {"output_hidden_states": capture.arg} if capture is not None else {}
        out = model(input_ids=ids, **model_inputs(mask, pos), **no_cache(model), **extra)
        logits = out.logits if hasattr(out, "logits") else out
        return logits if capture is None else (logits, capture.pick(getattr(out, "hidden_states", None)))

    return packed_call(model, run, input_ids, attention_mask, position_ids)


def uses_flash_attention(model: torch.nn.Module) -> bool:
    """Whether ``model`` runs a flash-attention kernel (``attn_implementation="flash_attention_2"``,
    ``"flash_attention_3"``, a kernels-hub flash kernel)."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return isinstance(impl, str) and "flash" in impl


def packed_call(model: torch.nn.Module, run, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                position_ids: torch.Tensor | None, flatten: bool | None = None) -> torch.Tensor:
    """``run(input_ids, attention_mask, position_ids)`` -> ``[B, L, ...]``, keeping packed documents
    apart on every attention kernel. transformers' flash-attention path separates documents by their
    positions only for a batch of one row (``_is_packed_sequence``); with more rows it would attend
    across documents. So for flash kernels (``flatten``, default :func:`uses_flash_attention`) the
    rows' real tokens are concatenated into one row ``[1, N]`` (every window starts a document at
    position 0, so rows stay apart too), run, and scattered back, zeros at padding."""
    flatten = uses_flash_attention(model) if flatten is None else flatten
    if position_ids is None or input_ids.shape[0] == 1 or not flatten:
        return run(input_ids, attention_mask, position_ids)
    keep = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    got = run(input_ids[keep][None], None, position_ids[keep][None])  # [1, N, ...] (or a tuple of them)

    def scatter(out):
        full = out.new_zeros((*input_ids.shape, *out.shape[2:]))
        full[keep] = out[0]
        return full

    return tuple(scatter(o) for o in got) if isinstance(got, tuple) else scatter(got)


def check_against_forward(head: ChunkedHead, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                          vocab_size: int) -> float | None:
    """Max |difference| of log-probs, chunked path vs the model's own forward, on ``input_ids``
    [1, n] (a few positions). Returns None if within rounding, else the difference (nats).

    Tolerance: 1e-3 nats plus, for a bf16/fp16 model whose own forward rounds its logits to that
    dtype, 4x the bound that rounding puts on log-probs (``2 * max|logit| * 2^-(mantissa bits + 1)``)."""
    ref = forward_logits(head.model, input_ids, attention_mask)[..., :vocab_size].float()
    mine = head.full_logits(head.hidden(input_ids, attention_mask))[..., :vocab_size].float().to(ref.device)
    d = float((torch.log_softmax(ref, -1) - torch.log_softmax(mine, -1)).abs().max())
    dtype = head._weights()[0].dtype
    eps = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}.get(dtype, 0.0)
    tol = 1e-3 + 4 * (2 * eps * float(ref.abs().max()))
    return None if d <= tol else d

