"""Evaluation: one student forward per batch, the LM head applied chunk_positions rows at a time,
and metrics equal to a brute-force computation from the student's own full logits."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import logitstore
from logitstore.dump import DumpConfig, dump
from trainer.config import FitConfig
from trainer.data import DistillDataset
from trainer.fit import evaluate
from trainer.student import DistillModule


@pytest.fixture(scope="module")
def store(tmp_path_factory, llama_dir, gpt2_dir, corpus):
    out = tmp_path_factory.mktemp("eval") / "store"
    dump(DumpConfig(teachers=(f"a={llama_dir}", f"b={gpt2_dir}"), data=str(corpus), out=str(out), top_k=8, seq_len=32,
                    max_tokens=700, shard_sequences=8, progress=False))
    return out


def test_evaluate_is_one_chunked_pass_and_matches_brute_force(store, tokenizer):
    from accelerate import Accelerator
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    student = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))
    module = DistillModule(student)
    assert module.fused_head
    chunk = 16
    cfg = FitConfig(logits=(str(store),), student="unused", out="unused", chunk_positions=chunk, batch_size=4)
    evalset = DistillDataset([str(store)], batch_size=4, shuffle=False)
    rows, calls = [], {"base": 0}
    student.get_output_embeddings().register_forward_hook(lambda m, i, o: rows.append(i[0].shape[:-1].numel()))
    student.model.register_forward_hook(lambda m, i, o: calls.__setitem__("base", calls["base"] + 1))
    acc = Accelerator(cpu=True)
    res = evaluate(acc, module, evalset, cfg, [0.5, 0.5])
    n_batches = evalset.batches_per_epoch()
    assert calls["base"] == n_batches, "one student forward per batch"
    assert max(rows) <= chunk, f"the LM head saw {max(rows)} rows at once (chunk_positions={chunk})"

    # brute force: the student's own forward on every sequence of the store
    s = logitstore.open(str(store))
    ce_sum = agree_a = n = 0.0
    for i in range(len(s)):
        item = s[i]
        ids = torch.as_tensor(np.asarray(item["input_ids"], dtype=np.int64))[None]
        L = ids.shape[1]
        with torch.no_grad():
            logits = student(input_ids=ids[:, :L]).logits[0, : L - 1, : evalset.vocab_size]
        gold = ids[0, 1:L]
        ce_sum += float(F.cross_entropy(logits, gold, reduction="sum"))
        t = item["teachers"]["a"]
        top_a = np.asarray(t["ids"])[np.arange(L - 1), np.asarray(t["logprobs"])[: L - 1].argmax(-1)]
        agree_a += float((logits.argmax(-1).numpy() == top_a).sum())
        n += L - 1
    assert res["positions"] == n
    assert res["ce"] == pytest.approx(ce_sum / n, rel=1e-5)
    assert res["ppl"] == pytest.approx(math.exp(ce_sum / n), rel=1e-4)
    assert res["top1_agreement"]["a"] == pytest.approx(agree_a / n, abs=1e-9)
