"""The student: loading, vocabulary checks, and the module that computes the loss inside forward.

Putting the chunked loss inside ``forward`` keeps ``DistributedDataParallel`` exact (everything that
needs gradients runs in the wrapped forward) and, for Hugging Face causal LMs, lets the loss apply
the LM head chunk by chunk to the final hidden states, so ``[B, L, V]`` logits never exist.
"""

from __future__ import annotations

from pathlib import Path

import torch

from logitstore.errors import ConfigError, LogitStoreError

from .fusion import fuse
from .losses import kd_ce_loss


def load_student(spec: str, *, trust_remote_code: bool = False) -> torch.nn.Module:
    """A directory or hub id (``from_pretrained``), or a model config file (.json/.yaml: a fresh model)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    p = Path(spec)
    if p.suffix in (".json", ".yaml", ".yml") and p.is_file():
        import yaml

        d = yaml.safe_load(p.read_text())
        if not isinstance(d, dict) or "model_type" not in d:
            raise ConfigError(f"--student {spec}: a model config needs a 'model_type' (e.g. llama)")
        d = dict(d)
        cfg = AutoConfig.for_model(d.pop("model_type"), **d)
        return AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)
    if (spec.startswith((".", "/", "~")) or spec.count("/") > 1) and not p.exists():
        raise LogitStoreError(f"--student {spec}: no such file or directory")
    try:
        return AutoModelForCausalLM.from_pretrained(spec, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises OSError/ValueError/... for unusable sources
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise LogitStoreError(f"--student {spec}: cannot load ({type(e).__name__}: {first})") from e


def output_vocab(model: torch.nn.Module) -> int | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return int(head.weight.shape[0]) if head is not None else None


class DistillModule(torch.nn.Module):
    """Wraps a student; ``forward(batch, ...)`` returns ``(ce_sum, kd_sum, n_positions)``.

    ``batch`` holds ``input_ids``/``attention_mask``/``labels`` [B, L] and, for KD, either the target
    fields of :mod:`trainer.fusion` flattened over ``B * L`` positions or (online KD)
    ``teacher_logits`` [B, L, V].
    """

    def __init__(self, student: torch.nn.Module):
        super().__init__()
        self.student = student
        cfg = getattr(student, "config", None)
        head = student.get_output_embeddings() if hasattr(student, "get_output_embeddings") else None
        special = cfg is not None and (getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None))
        self.fused_head = head is not None and hasattr(student, "base_model") and student.base_model is not student and not special

    def logits(self, input_ids, attention_mask):
        out = self.student(input_ids=input_ids, attention_mask=attention_mask)
        return out.logits if hasattr(out, "logits") else out

    def forward(self, batch: dict, *, temperature: float, teacher_temperatures: list[float], weights: list[float], fuse_mode: str,
                loss: str, tail: str, beta: float, chunk_positions: int, vocab_size: int, with_kd: bool = True):
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        B, L = ids.shape
        if self.fused_head:
            x = self.student.base_model(input_ids=ids, attention_mask=mask).last_hidden_state.reshape(B * L, -1)
            head = self.student.get_output_embeddings()
        else:
            x = self.logits(ids, mask).reshape(B * L, -1)
            head = None
        target, t_logits = None, batch.get("teacher_logits")
        if t_logits is not None:  # online KD: [B, L, V_teacher] from a teacher run on this batch
            t_logits = t_logits.reshape(B * L, -1)[:, :vocab_size]
        elif with_kd:
            target = fuse(batch["teacher_lp"], batch["rest_lp"], batch["support"], batch["valid"], batch["n_out"],
                          temperatures=teacher_temperatures, weights=weights, mode=fuse_mode)
        return kd_ce_loss(x, labels.reshape(-1), target, head=head, temperature=temperature, loss=loss, tail=tail, beta=beta,
                          chunk_positions=chunk_positions, vocab_size=vocab_size, teacher_logits=t_logits)
