"""Helpers shared by the store tests."""

from __future__ import annotations

import numpy as np
import torch

from logitstore.capture.corpus import pack
from logitstore.capture.documents import load_texts
from logitstore.capture.teacher import TeacherSpec


def reference_outputs(teacher_dir, corpus, seq_len: int, max_tokens=None):
    """Full-vocab float64 log-probs of a teacher on the same windows a dump makes: [N, L, V]."""
    spec = TeacherSpec.parse(str(teacher_dir))
    tok = spec.load_tokenizer()
    packed = pack(tok, load_texts(str(corpus)), seq_len, max_tokens=max_tokens)
    model = spec.load_model(torch.device("cpu"), torch.float32)
    vocab = len(tok)
    with torch.inference_mode():
        ids = torch.from_numpy(packed.input_ids.astype(np.int64))
        mask = torch.from_numpy(np.arange(seq_len)[None] < packed.lengths[:, None]).long()
        logits = model(input_ids=ids, attention_mask=mask).logits[..., :vocab].double()
    return packed, torch.log_softmax(logits, -1).numpy()


def store_arrays(store, teacher):
    """All sequences of one teacher, decoded, stacked: dict of [N, L, ...] arrays."""
    shards = [store.load_shard(j, [teacher]) for j in range(store.n_shards)]
    out = {k: np.concatenate([s["teachers"][teacher][k] for s in shards]) for k in shards[0]["teachers"][teacher]}
    out["input_ids"] = np.concatenate([s["input_ids"] for s in shards])
    out["length"] = np.concatenate([s["length"] for s in shards])
    return out


def tiny_student(path, tokenizer):
    """``path`` (a .json model config): the 2-layer, 32-wide Llama student the trainer tests fit."""
    import json

    path.write_text(json.dumps({"model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
                                "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
                                "max_position_embeddings": 64, "tie_word_embeddings": False}))
    return path
