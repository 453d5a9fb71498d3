"""Vocabulary-parallel top-k statistics against the statistics of the full row (one device)."""

from __future__ import annotations

import pytest
import torch

from logitstore.capture.teacher import topk_stats
from logitstore.capture.vocab_parallel import combine, partial_stats


def _split_stats(logits, T, k, vocab, nxt):
    """Rows split as torch.chunk splits a Shard(0) weight (uneven last shard), one partial per rank."""
    pieces = torch.chunk(logits, T, dim=1)
    offsets = [0]
    for p in pieces[:-1]:
        offsets.append(offsets[-1] + p.shape[1])
    parts = [partial_stats(p, o, k, vocab, nxt) for p, o in zip(pieces, offsets)]
    stacked = {key: torch.stack([p[key] for p in parts]) for key in parts[0]}
    return combine(stacked, k, nxt)


@pytest.mark.parametrize("T,vocab,pad,k", [(2, 1000, 0, 64), (4, 130, 22, 30), (3, 151_936 // 64, 128 // 64, 16),
                                           (8, 50, 14, 50), (5, 997, 3, 1)])
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_sharded_statistics_equal_the_full_rows(T, vocab, pad, k, scale):
    g = torch.Generator().manual_seed(T * 1000 + vocab + k)
    N = 300
    logits = torch.randn(N, vocab + pad, generator=g) * scale
    logits[:, vocab:] = 1e4  # padded rows must be ignored whatever they hold
    logits[5, : vocab // 2] = float("-inf")  # masked logits
    nxt = torch.randint(0, vocab, (N,), generator=g)
    nxt[::7] = -1
    ref = topk_stats(logits, k, vocab, nxt)
    got = _split_stats(logits, T, k, vocab, nxt)
    torch.testing.assert_close(got["logprobs"], ref["logprobs"], atol=2e-5, rtol=0)
    finite = ref["logprobs"] > -1e3  # entries at the floor (masked logits) tie, in any order
    assert torch.equal(got["ids"][finite], ref["ids"][finite])
    for key in ("tail_mass", "gold_logprob", "entropy"):
        torch.testing.assert_close(got[key], ref[key], atol=5e-5, rtol=1e-5, msg=key)


def test_a_confident_row_keeps_a_tiny_tail_without_cancellation():
    """Top-1 carries all but ~1e-30 of the mass: the tail is summed, not 1 - sum(top-k)."""
    V, k = 600, 4
    logits = torch.zeros(2, V)
    logits[:, 7] = 80.0
    ref = topk_stats(logits, k, V)
    got = _split_stats(logits, 3, k, V, None)
    assert float(ref["tail_mass"][0]) > 0
    torch.testing.assert_close(got["tail_mass"], ref["tail_mass"], rtol=1e-4, atol=0)


def test_rows_with_fewer_finite_logits_than_k_keep_distinct_ids():
    """A rank with fewer real columns than k pads its candidates; the pads are never chosen."""
    V, k = 33, 9
    logits = torch.full((40, V), float("-inf"))
    logits[:, 0], logits[:, 31] = 1.0, 2.0
    got = _split_stats(logits, 8, k, V, None)  # chunks of 5, the last rank holds 3 real rows
    for row in got["ids"]:
        assert len(set(row.tolist())) == k
    assert set(got["ids"][0, :2].tolist()) == {0, 31}


def test_tail_stays_exact_at_large_logit_magnitudes():
    g = torch.Generator().manual_seed(5)
    for offset in (100.0, 3000.0):
        logits = torch.randn(64, 4000, generator=g) * 3 + offset
        ref64 = torch.softmax(logits.double(), -1)
        got = _split_stats(logits, 8, 16, 4000, None)
        top = ref64.gather(-1, got["ids"])
        tail = 1 - top.sum(-1)
        torch.testing.assert_close(got["tail_mass"].double(), tail, atol=1e-6, rtol=1e-5)
