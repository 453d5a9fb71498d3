"""A Qwen-shaped vocabulary: 151,936 tokens in an output layer of 152,064 rows (padded), k = 64,
through dump, verify and fit. Past Megatron's 131,072 and past 16-bit ids."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import logitstore
from logitstore.capture.dump import DumpConfig, dump
from logitstore.tools.verify import verify

TOKENS, ROWS = 151_936, 152_064


def _tokenizer():
    """Byte-level BPE with no merges (every byte a token) and filler tokens up to 151,936 ids, so
    a random teacher puts mass on ids far past 65,535."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab["<|endoftext|>"] = len(vocab)
    for i in range(len(vocab), TOKENS):
        vocab[f"<f{i}>"] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def qwen_shaped(tmp_path_factory, corpus):
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("vocab152k")
    tok = _tokenizer()
    assert len(tok) == TOKENS
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=ROWS, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=64, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.bos_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
        model.lm_head.weight[TOKENS:] = 0.0
        model.lm_head.bias = None
    teacher = root / "teacher"
    model.save_pretrained(teacher)
    tok.save_pretrained(teacher)
    store = root / "store"
    dump(DumpConfig(teachers=(f"q={teacher}",), data=str(corpus), out=str(store), top_k=64, seq_len=32, max_tokens=256,
                    shard_sequences=4, progress=False, device="cpu"))
    return {"root": root, "teacher": teacher, "store": store, "model": model, "tok": tok}


def test_dump_matches_the_models_own_forward(qwen_shaped):
    s = logitstore.open(str(qwen_shaped["store"]))
    assert s.manifest["tokenizer"]["vocab_size"] == TOKENS and s.teacher("q")["model_vocab_size"] == ROWS
    model = qwen_shaped["model"].eval()
    row = s[1]
    L = len(row["input_ids"])
    with torch.no_grad():
        logits = model(torch.from_numpy(row["input_ids"][None].astype(np.int64))).logits[0, :, :TOKENS].double()
    ref = torch.log_softmax(logits, -1)
    t = row["teachers"]["q"]
    ids = torch.from_numpy(t["ids"][:L].astype(np.int64))
    assert int(ids.max()) > 65_535 and int(ids.max()) < TOKENS
    top = torch.topk(ref, 64, dim=-1)
    same = [set(a.tolist()) == set(b.tolist()) for a, b in zip(ids, top.indices)]  # compact: entries in id-rank order
    assert np.mean(same) > 0.95, np.mean(same)
    # compact encoding, 7 bits: each log-prob within half a step of its position's grid
    step = (t["logprobs"][:L].max(-1) - t["logprobs"][:L].min(-1)) / 127
    err = np.abs(t["logprobs"][:L] - ref.gather(-1, ids).numpy())
    assert (err <= step[:, None] / 2 + 1.0 / 64 + 1e-4).all(), err.max()
    tail = 1.0 - torch.exp(ref.gather(-1, ids)).sum(-1)
    np.testing.assert_allclose(t["tail_mass"][:L], tail.numpy(), atol=2e-3)


def test_verify_passes(qwen_shaped):
    assert verify(str(qwen_shaped["store"])) == []


def test_fit_trains_on_it(qwen_shaped):
    from trainer.config import FitConfig
    from trainer.fit import fit

    student = qwen_shaped["root"] / "student.json"
    student.write_text(json.dumps({"model_type": "llama", "vocab_size": TOKENS, "hidden_size": 16, "intermediate_size": 32,
                                   "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
                                   "max_position_embeddings": 64, "tie_word_embeddings": False}))
    run = qwen_shaped["root"] / "run"
    fit(FitConfig(logits=(str(qwen_shaped["store"]),), student=str(student), out=str(run), max_steps=3, batch_size=2,
                  progress=False))
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if not r.get("eval")]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and r["kd_loss"] > 0 for r in train)
