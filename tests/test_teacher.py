import numpy as np
import pytest
import torch

from logitstore.capture.teacher import TeacherRunner, TeacherSpec, topk_stats


def brute_force(logits: torch.Tensor, k: int, vocab: int, nxt: torch.Tensor):
    lp = torch.log_softmax(logits[:, :vocab].double(), -1)
    top, ids = lp.topk(k, -1)
    p = lp.exp()
    tail = 1 - top.exp().sum(-1)
    ent = -(p * lp).sum(-1)
    gold = torch.where(nxt >= 0, lp.gather(-1, nxt.clamp(min=0)[:, None])[:, 0], torch.zeros((), dtype=lp.dtype))
    return ids, top, tail, ent, gold


@pytest.mark.parametrize("k", [1, 5, 50])
def test_topk_stats_match_brute_force(k):
    g = torch.Generator().manual_seed(k)
    logits = torch.randn(37, 53, generator=g) * 4
    nxt = torch.randint(0, 50, (37,), generator=g)
    nxt[-3:] = -1
    st = topk_stats(logits, k, 50, nxt)  # columns 50..52 are padded vocabulary
    ids, top, tail, ent, gold = brute_force(logits, k, 50, nxt)
    assert int(st["ids"].max()) < 50
    torch.testing.assert_close(st["logprobs"].double(), top, atol=1e-5, rtol=0)
    assert torch.equal(torch.sort(st["ids"], -1).values, torch.sort(ids, -1).values)
    torch.testing.assert_close(st["tail_mass"].double(), tail.clamp(min=0), atol=1e-6, rtol=0)
    torch.testing.assert_close(st["entropy"].double(), ent, atol=1e-5, rtol=0)
    torch.testing.assert_close(st["gold_logprob"].double(), gold, atol=1e-5, rtol=0)
    assert (st["gold_logprob"][-3:] == 0).all()


def test_tail_is_exactly_zero_at_k_equal_vocab():
    logits = torch.randn(9, 20, generator=torch.Generator().manual_seed(3))
    st = topk_stats(logits, 20, 20)
    assert (st["tail_mass"] == 0).all()
    torch.testing.assert_close(st["logprobs"].exp().sum(-1), torch.ones(9), atol=1e-5, rtol=0)


def test_tiny_tail_has_no_cancellation_error():
    logits = torch.zeros(1, 100)
    logits[0, 0] = 30.0  # p(others) ~ 99 * e^-30 ~ 9e-12
    st = topk_stats(logits, 1, 100)
    expected = 99 * np.exp(-30.0) / (1 + 99 * np.exp(-30.0))
    assert abs(float(st["tail_mass"][0]) - expected) / expected < 1e-3


def test_nan_logits_are_reported():
    logits = torch.randn(4, 10)
    logits[2, 3] = float("nan")
    with pytest.raises(Exception, match="non-finite logits at position 2"):
        topk_stats(logits, 3, 10)


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_runner_matches_full_forward(which, llama_dir, gpt2_dir, tokenizer):
    path = llama_dir if which == "llama" else gpt2_dir
    spec = TeacherSpec.parse(str(path))
    model = spec.load_model(torch.device("cpu"), torch.float32)
    vocab = len(tokenizer)
    runner = TeacherRunner(model, vocab, k=11, chunk_positions=7)  # chunks that do not divide B*L
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, size=(3, 20))
    lengths = np.array([20, 13, 1])
    out = runner.run(ids, lengths)
    with torch.inference_mode():
        mask = torch.from_numpy(np.arange(20)[None] < lengths[:, None]).long()
        logits = model(input_ids=torch.from_numpy(ids), attention_mask=mask).logits
    for b in range(3):
        n = lengths[b]
        nxt = torch.full((20,), -1)
        nxt[: n - 1] = torch.from_numpy(ids[b, 1:n])
        bids, top, tail, ent, gold = brute_force(logits[b], 11, vocab, nxt)
        np.testing.assert_allclose(out["logprobs"][b, :n], top[:n].numpy(), atol=2e-4)
        np.testing.assert_allclose(out["tail_mass"][b, :n], tail[:n].numpy(), atol=1e-5)
        np.testing.assert_allclose(out["entropy"][b, :n], ent[:n].numpy(), atol=2e-4)
        np.testing.assert_allclose(out["gold_logprob"][b, :n], gold[:n].numpy(), atol=2e-4)
        assert out["gold_logprob"][b, n - 1] == 0
        assert (out["logprobs"][b, n:] == 0).all() and (out["ids"][b, n:] == 0).all()
    assert out["ids"].max() < vocab  # padded rows of the llama head are never chosen


def test_masked_minus_inf_logits_are_handled():
    logits = torch.randn(6, 30, generator=torch.Generator().manual_seed(5))
    logits[:, 20:] = float("-inf")  # a model that masks tokens
    st = topk_stats(logits, 25, 30)
    ids, top, tail, ent, gold = brute_force(logits[:, :20], 20, 20, torch.full((6,), -1))
    torch.testing.assert_close(st["entropy"].double(), ent, atol=1e-5, rtol=0)
    assert (st["logprobs"][:, 20:] == -1.0e4).all() and (st["tail_mass"] == 0).all()


def test_bf16_teacher_keeps_float32_buffers_and_matches_plain_from_pretrained(llama_dir, tokenizer):
    """``load_model`` loads in the dtype and only moves the device: RoPE's ``inv_freq`` stays float32
    (``.to(dtype=bf16)`` would round it), and the statistics are those of a plain
    ``from_pretrained(dtype=bf16)`` model with its output layer computed in float32."""
    from transformers import AutoModelForCausalLM

    model = TeacherSpec.parse(str(llama_dir)).load_model(torch.device("cpu"), torch.bfloat16)
    plain = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16).eval()
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert {n: b.dtype for n, b in model.named_buffers()} == {n: b.dtype for n, b in plain.named_buffers()}
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    vocab = len(tokenizer)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, vocab, size=(2, 24))
    lengths = np.array([24, 10])
    out = TeacherRunner(model, vocab, k=11).run(ids, lengths)
    mask = torch.from_numpy(np.arange(24)[None] < lengths[:, None]).long()
    with torch.inference_mode():
        t = torch.from_numpy(ids)
        hidden = plain.model(input_ids=t, attention_mask=mask).last_hidden_state
        fp32_head = hidden.float() @ plain.lm_head.weight.float().t()  # the reference: fp32 head on bf16 hidden states
        bf16_logits = plain(input_ids=t, attention_mask=mask).logits  # the model's own bf16 forward
    for b in range(2):
        n = lengths[b]
        nxt = torch.full((24,), -1)
        nxt[: n - 1] = torch.from_numpy(ids[b, 1:n])
        _, top, tail, ent, gold = brute_force(fp32_head[b], 11, vocab, nxt)
        np.testing.assert_allclose(out["logprobs"][b, :n], top[:n].numpy(), atol=1e-4)
        np.testing.assert_allclose(out["entropy"][b, :n], ent[:n].numpy(), atol=1e-4)
        np.testing.assert_allclose(out["gold_logprob"][b, :n], gold[:n].numpy(), atol=1e-4)
        np.testing.assert_allclose(out["tail_mass"][b, :n], tail[:n].numpy(), atol=1e-5)
        # the bf16 forward's own log-probs differ only by the rounding of its logits to bf16
        _, top16, *_ = brute_force(bf16_logits[b].float(), 11, vocab, nxt)
        bound = 2 * float(bf16_logits[b].float().abs().max()) * 2.0 ** -8
        assert np.abs(out["logprobs"][b, :n] - top16[:n].numpy()).max() <= bound
