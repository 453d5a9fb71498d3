"""Every model family's chunked LM head equals the model's own forward, for the teacher and the student.

Each family is a tiny random model with its special output transform set to a non-trivial value
(Granite ``logits_scaling`` = 4, Cohere ``logit_scale`` = 0.25, Gemma 2/3 soft-cap 5 with logits large
enough to reach it), compared with ``log_softmax(model(input_ids).logits)``."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from logitstore.capture import lm_head
from logitstore.capture.teacher import TeacherRunner
from trainer.student import DistillModule
from trainer.losses import kd_ce_loss

V = 96
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=2, max_position_embeddings=128, head_dim=16, tie_word_embeddings=False,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
EXTRA = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "gemma2": dict(final_logit_softcapping=5.0),
    "gemma3_text": dict(final_logit_softcapping=5.0, sliding_window=8),
    "granite": dict(logits_scaling=4.0),
    "granitemoe": dict(logits_scaling=4.0, num_local_experts=4, num_experts_per_tok=2),
    "cohere": dict(logit_scale=0.25),
    "cohere2": dict(logit_scale=0.25, sliding_window=8),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=2, n_positions=128),
}
REQUIRED = ["llama", "qwen2", "qwen3", "mistral", "gemma2", "granite", "cohere", "gpt2", "phi3"]
FAMILIES = REQUIRED + [f for f in lm_head.FAMILIES if f not in REQUIRED]
UNLISTED = "opt"  # a causal LM family that is not on the allow-list: served by its own forward


def build(model_type: str, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"{model_type}: not in the installed transformers")
    kw = {**COMMON, **EXTRA.get(model_type, {})}
    if model_type == "gpt2":
        kw = {k: v for k, v in kw.items() if k not in ("hidden_size", "num_hidden_layers", "num_attention_heads")}
    if model_type == "opt":
        kw = {**kw, "ffn_dim": 64, "word_embed_proj_dim": 32}
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kw)).eval()
    with torch.no_grad():  # logits of ~10-20: big enough to reach Gemma's soft-cap and to make scales matter
        model.get_output_embeddings().weight.mul_(40.0)
    return model


def inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, V, size=(3, 17))
    lengths = np.array([17, 9, 1])
    return ids, lengths


def reference(model, ids, lengths):
    """float64 log-probs [B, L, V] of the model's own forward."""
    mask = torch.from_numpy(np.arange(ids.shape[1])[None] < lengths[:, None]).long()
    with torch.inference_mode():
        logits = model(input_ids=torch.from_numpy(ids), attention_mask=mask).logits
    return torch.log_softmax(logits[..., :V].double(), -1).numpy()


def assert_matches_forward(out, lp, ids, lengths, atol=1e-4):
    for b, n in enumerate(lengths):
        ref = lp[b, :n]
        got_ids = out["ids"][b, :n]
        np.testing.assert_allclose(out["logprobs"][b, :n], np.take_along_axis(ref, got_ids, -1), atol=atol)
        np.testing.assert_allclose(out["logprobs"][b, :n], -np.sort(-ref, -1)[:, : got_ids.shape[1]], atol=atol)
        np.testing.assert_allclose(out["tail_mass"][b, :n], 1 - np.exp(np.take_along_axis(ref, got_ids, -1)).sum(-1), atol=atol)
        np.testing.assert_allclose(out["entropy"][b, :n], -(np.exp(ref) * ref).sum(-1), atol=atol)
        gold = np.take_along_axis(ref[:-1], ids[b, 1:n, None], -1)[:, 0]
        np.testing.assert_allclose(out["gold_logprob"][b, : n - 1], gold, atol=atol)
        assert out["gold_logprob"][b, n - 1] == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_teacher_equals_the_models_own_forward(family):
    model = build(family)
    assert lm_head.head_for(model) is not None, f"{family} is on the allow-list"
    ids, lengths = inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the runtime check must agree with the allow-list
        runner = TeacherRunner(model, V, k=8, chunk_positions=7)
        out = runner.run(ids, lengths)
    assert runner.lm_head_path == "chunked"
    assert_matches_forward(out, reference(model, ids, lengths), ids, lengths)


def student_losses(module_or_logits, batch, **kw):
    args = dict(temperature=2.0, teacher_temperatures=[2.0], weights=[1.0], fuse_mode="mean-probs", loss="fkl",
                tail="bucket", beta=0.5, chunk_positions=5, vocab_size=V)
    return module_or_logits(batch, **{**args, **kw})


@pytest.mark.parametrize("family", FAMILIES + [UNLISTED])
def test_student_losses_equal_those_from_the_models_own_logits(family):
    model = build(family, seed=1)
    module = DistillModule(model)
    assert bool(module.fused_head) == (family != UNLISTED)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, V, (2, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = torch.where(mask[:, 1:].bool(), ids[:, 1:], torch.full_like(ids[:, 1:], -100))
    t_logits = torch.randn(2, 11, V, generator=g) * 3
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "teacher_logits": t_logits}
    ce, kd, n = student_losses(module, batch)
    logits = model(input_ids=ids, attention_mask=mask).logits.reshape(22, -1)
    ce_ref, kd_ref, n_ref = kd_ce_loss(logits, labels.reshape(-1), None, temperature=2.0, loss="fkl", chunk_positions=5,
                                       vocab_size=V, teacher_logits=t_logits.reshape(22, -1))
    assert int(n) == int(n_ref)
    torch.testing.assert_close(ce, ce_ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(kd, kd_ref, atol=1e-4, rtol=1e-5)
    ce.backward()  # the fused path is differentiable
    assert model.get_output_embeddings().weight.grad is not None


def test_unlisted_family_uses_the_models_forward():
    model = build(UNLISTED)
    assert lm_head.head_for(model) is None
    ids, lengths = inputs(1)
    runner = TeacherRunner(model, V, k=8, chunk_positions=20)  # 20 positions: one 17-token sequence per forward
    out = runner.run(ids, lengths)
    assert runner.lm_head_path == "forward"
    assert_matches_forward(out, reference(model, ids, lengths), ids, lengths)


def test_runtime_check_falls_back_when_the_chunked_head_is_wrong(monkeypatch):
    """A family entry that no longer matches its forward (here Granite without its scaling) is
    caught on the first batch: one warning, then the model's own forward."""
    monkeypatch.setitem(lm_head.FAMILIES, "granite", ("GraniteForCausalLM", "none"))
    model = build("granite")
    ids, lengths = inputs(2)
    runner = TeacherRunner(model, V, k=8)
    with pytest.warns(RuntimeWarning, match="differs from the model's own forward"):
        out = runner.run(ids, lengths)
    assert runner.lm_head_path == "forward"
    assert_matches_forward(out, reference(model, ids, lengths), ids, lengths)


def test_dump_of_a_granite_teacher_stores_its_own_distribution(tmp_path, tokenizer, corpus):
    """The real path: ``dump`` of a saved Granite teacher, lossless, against its own forward."""
    import logitstore
    from logitstore.dump import DumpConfig, dump
    from transformers import GraniteConfig, GraniteForCausalLM

    from helpers import reference_outputs, store_arrays

    torch.manual_seed(0)
    cfg = GraniteConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128, logits_scaling=4.0,
                        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=False)
    model = GraniteForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    tdir = tmp_path / "granite"
    model.save_pretrained(tdir)
    tokenizer.save_pretrained(tdir)
    out = tmp_path / "store"
    k = 8
    dump(DumpConfig(teachers=(f"g={tdir}",), data=str(corpus), out=str(out), top_k=k, seq_len=24, encoding="lossless",
                    max_tokens=120, progress=False))
    packed, lp = reference_outputs(tdir, corpus, 24, max_tokens=120)
    got = store_arrays(logitstore.open(str(out)), "g")
    valid = np.arange(24)[None] < packed.lengths[:, None]
    ref_top = -np.sort(-lp, -1)[..., :k]
    np.testing.assert_allclose(got["logprobs"][valid], ref_top[valid], atol=1e-4)
    np.testing.assert_allclose(got["entropy"][valid], -(np.exp(lp) * lp).sum(-1)[valid], atol=1e-4)
