"""Fused targets against a brute-force computation over the whole vocabulary."""

import numpy as np
import pytest
import torch

from logitstore.distributions.fusion import fuse, normalize_weights
from logitstore.distributions.targets import build_targets

V = 40


def make_teachers(rng, N, ks, sharp=2.0):
    """Random full teacher distributions and their top-k caches."""
    full, cached = [], []
    for k in ks:
        logits = rng.normal(size=(N, V)) * sharp
        lp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
        ids = np.argsort(-lp, axis=1)[:, :k]
        top = np.take_along_axis(lp, ids, 1)
        tail = np.clip(1 - np.exp(top).sum(1), 0, 1)
        full.append(lp)
        cached.append({"ids": ids, "logprobs": top.astype(np.float32), "tail_mass": tail.astype(np.float32)})
    return full, cached


def dense_from_cache(c, k):
    """The cached distribution read as documented: top-k entries, tail spread evenly."""
    N = c["ids"].shape[0]
    p = np.zeros((N, V))
    if k < V:
        p[:] = (c["tail_mass"].astype(np.float64) / (V - k))[:, None]
    np.put_along_axis(p, c["ids"], np.exp(c["logprobs"].astype(np.float64)), 1)
    return p


def brute_force(dense, temps, weights, mode):
    tempered = []
    for p, T in zip(dense, temps):
        with np.errstate(divide="ignore"):
            a = np.log(p) / T
        a -= np.logaddexp.reduce(a, axis=1, keepdims=True)
        tempered.append(a)
    if mode == "mean-probs":
        return sum(w * np.exp(a) for w, a in zip(weights, tempered))
    s = sum(w * a for w, a in zip(weights, tempered))
    return np.exp(s - np.logaddexp.reduce(s, axis=1, keepdims=True))


def run_fuse(cached, temps, weights, mode):
    b = {k: torch.from_numpy(v) for k, v in build_targets(cached, V).items()}
    t = fuse(b["teacher_lp"], b["rest_lp"], b["support"], b["valid"], b["n_out"], temperatures=temps, weights=weights, mode=mode)
    return b, t


@pytest.mark.parametrize("mode", ["mean-probs", "mean-logits"])
@pytest.mark.parametrize("temps", [[1.0, 1.0], [2.0, 0.5]])
def test_k_equal_vocab_equals_full_teachers(mode, temps):
    rng = np.random.default_rng(0)
    full, cached = make_teachers(rng, 25, [V, V])
    weights = normalize_weights([0.7, 0.3], 2)
    b, t = run_fuse(cached, temps, weights, mode)
    ref = brute_force([np.exp(f) for f in full], temps, weights, mode)
    got = np.zeros((25, V))
    np.put_along_axis(got, b["support"].numpy(), t.lp.exp().double().numpy(), 1)
    assert (b["n_out"] == 0).all() and (t.out_lp == float("-inf")).all()
    np.testing.assert_allclose(got, ref, atol=2e-6)


@pytest.mark.parametrize("mode", ["mean-probs", "mean-logits"])
@pytest.mark.parametrize("ks", [[5, 9], [3, 3, 12], [V, 4]])
def test_partial_topk_matches_brute_force_of_documented_reading(mode, ks):
    rng = np.random.default_rng(len(ks) * 10 + ks[0])
    _, cached = make_teachers(rng, 30, ks)
    temps = [1.5] * len(ks)
    weights = normalize_weights(list(rng.random(len(ks)) + 0.1), len(ks))
    b, t = run_fuse(cached, temps, weights, mode)
    ref = brute_force([dense_from_cache(c, k) for c, k in zip(cached, ks)], temps, weights, mode)
    sup, valid = b["support"].numpy(), b["valid"].numpy()
    for n in range(30):
        ids = sup[n][valid[n]]
        np.testing.assert_allclose(t.lp[n][valid[n]].exp().double().numpy(), ref[n, ids], atol=2e-6)
        off = np.setdiff1d(np.arange(V), ids)
        np.testing.assert_allclose(float(t.out_lp[n].exp()), ref[n, off].sum(), atol=2e-6)
    total = t.lp.exp().nan_to_num(0).sum(-1) + t.out_lp.exp()
    torch.testing.assert_close(total, torch.ones(30), atol=1e-5, rtol=0)


def test_union_support_is_exact():
    rng = np.random.default_rng(3)
    _, cached = make_teachers(rng, 12, [4, 6])
    b = build_targets(cached, V)
    for n in range(12):
        want = sorted(set(cached[0]["ids"][n]) | set(cached[1]["ids"][n]))
        assert b["support"][n][b["valid"][n]].tolist() == want
        assert b["n_out"][n] == V - len(want)


def test_order_of_teachers_does_not_matter():
    rng = np.random.default_rng(4)
    _, cached = make_teachers(rng, 10, [6, 9])
    for mode in ("mean-probs", "mean-logits"):
        _, a = run_fuse(cached, [1.0, 2.0], [0.25, 0.75], mode)
        _, b = run_fuse(cached[::-1], [2.0, 1.0], [0.75, 0.25], mode)
        torch.testing.assert_close(a.lp, b.lp, atol=1e-6, rtol=0)


@pytest.mark.parametrize("weights,msg", [([1.0], "1 weight"), ([1.0, -0.5], ">= 0"), ([0.0, 0.0], "sum to 0")])
def test_bad_weights(weights, msg):
    with pytest.raises(ValueError, match=msg):
        normalize_weights(weights, 2)
