"""Sparse KD losses against dense references: values and gradients."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from logitstore.distributions.fusion import SparseTarget, fuse
from trainer.losses import divergence, kd_ce_loss
from logitstore.distributions.targets import build_targets

V, N = 30, 23


def teacher_cache(seed, k):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(N, V)) * 2.5
    lp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    ids = np.argsort(-lp, axis=1)[:, :k]
    top = np.take_along_axis(lp, ids, 1)
    return lp, {"ids": ids, "logprobs": top.astype(np.float32), "tail_mass": np.clip(1 - np.exp(top).sum(1), 0, 1).astype(np.float32)}


def sparse_target(cached, T=1.0):
    b = {k: torch.from_numpy(v) for k, v in build_targets(cached, V).items()}
    return fuse(b["teacher_lp"], b["rest_lp"], b["support"], b["valid"], b["n_out"], temperatures=[T] * len(cached),
                weights=[1.0 / len(cached)] * len(cached))


def dense_div(s_lp, t_lp, loss, beta=0.5):
    if loss == "fkl":
        return F.kl_div(s_lp, t_lp, log_target=True, reduction="none").sum(-1)
    if loss == "rkl":
        return F.kl_div(t_lp, s_lp, log_target=True, reduction="none").sum(-1)
    m = torch.logsumexp(torch.stack([t_lp + math.log(beta), s_lp + math.log(1 - beta)]), 0)
    return beta * F.kl_div(m, t_lp, log_target=True, reduction="none").sum(-1) + \
        (1 - beta) * F.kl_div(m, s_lp, log_target=True, reduction="none").sum(-1)


@pytest.mark.parametrize("loss", ["fkl", "rkl", "jsd"])
@pytest.mark.parametrize("tail", ["bucket", "renorm"])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_k_equal_vocab_equals_dense_loss_and_gradient(loss, tail, T):
    full, cached = teacher_cache(1, V)
    target = sparse_target([cached], T)
    torch.manual_seed(0)
    z = torch.randn(N, V, dtype=torch.float64) * 2
    labels = torch.randint(0, V, (N,))
    labels[-2:] = -100
    z1 = z.clone().requires_grad_(True)
    ce, kd, n = kd_ce_loss(z1, labels, target, temperature=T, loss=loss, tail=tail, chunk_positions=7)
    (kd / n).backward()
    z2 = z.clone().requires_grad_(True)
    t_lp = torch.log_softmax(torch.from_numpy(full) / T, -1)
    d = dense_div(torch.log_softmax(z2 / T, -1), t_lp, loss) * T**2
    ref = d[labels != -100].mean()
    ref.backward()
    torch.testing.assert_close(kd / n, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z1.grad, z2.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ce / n, F.cross_entropy(z, labels, ignore_index=-100), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("loss", ["fkl", "rkl", "jsd"])
def test_bucket_equals_explicit_k_plus_one_outcomes(loss):
    _, cached = teacher_cache(2, 6)
    target = sparse_target([cached])
    torch.manual_seed(1)
    z = torch.randn(N, V, dtype=torch.float64)
    s_lp = torch.log_softmax(z, -1)
    got = divergence(s_lp, target, loss=loss, tail="bucket")
    for n in range(N):
        ids = target.support[n][target.valid[n]]
        s = s_lp[n, ids].exp()
        s_full = torch.cat([s, (1 - s.sum()).reshape(1)])
        t_full = torch.cat([target.lp[n][target.valid[n]].exp().double(), target.out_lp[n].exp().double().reshape(1)])
        ref = dense_div(s_full.log()[None], t_full.log()[None], loss)[0]
        torch.testing.assert_close(got[n], ref, atol=1e-6, rtol=1e-5)


def test_renorm_drops_the_tail():
    _, cached = teacher_cache(3, 5)
    target = sparse_target([cached])
    s_lp = torch.log_softmax(torch.randn(N, V, dtype=torch.float64), -1)
    got = divergence(s_lp, target, loss="fkl", tail="renorm")
    for n in range(N):
        ids = target.support[n][target.valid[n]]
        s = torch.log_softmax(s_lp[n, ids], -1)
        t = torch.log_softmax(target.lp[n][target.valid[n]].double(), -1)
        torch.testing.assert_close(got[n], (t.exp() * (t - s)).sum(), atol=1e-7, rtol=1e-6)


def test_chunked_equals_plain_and_head_path_equals_logits_path():
    _, c1 = teacher_cache(4, 8)
    _, c2 = teacher_cache(5, 8)
    target = sparse_target([c1, c2], T=1.5)
    torch.manual_seed(2)
    H = 12
    head = torch.nn.Linear(H, V, bias=False).double()
    h = torch.randn(N, H, dtype=torch.float64)
    labels = torch.randint(0, V, (N,))
    results = []
    for chunk, use_head in ((N, False), (5, False), (4, True), (1, True)):
        h1 = h.clone().requires_grad_(True)
        head.zero_grad()
        x = h1 if use_head else head(h1)
        ce, kd, n = kd_ce_loss(x, labels, target, head=head if use_head else None, temperature=1.5, chunk_positions=chunk)
        (0.3 * ce / n + 0.7 * kd / n).backward()
        results.append((ce.detach(), kd.detach(), h1.grad.clone(), head.weight.grad.clone()))
    for r in results[1:]:
        for a, b in zip(results[0], r):
            torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_ce_only_path():
    z = torch.randn(N, V)
    labels = torch.randint(0, V, (N,))
    ce, kd, n = kd_ce_loss(z, labels, None, chunk_positions=4)
    assert kd == 0 and n == N
    torch.testing.assert_close(ce / n, F.cross_entropy(z, labels))


@pytest.mark.parametrize("loss", ["fkl", "rkl", "jsd"])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_online_teacher_logits_equal_dense_reference_and_sparse_at_k_equal_vocab(loss, T):
    """Online KD (full teacher logits) equals the dense F.kl_div reference, and equals the cached
    path when the cache holds the whole vocabulary."""
    rng = np.random.default_rng(3)
    t_logits = torch.from_numpy(rng.normal(size=(N, V)) * 2.5)
    torch.manual_seed(1)
    z = torch.randn(N, V, dtype=torch.float64) * 2
    labels = torch.randint(0, V, (N,))
    labels[:3] = -100
    z1 = z.clone().requires_grad_(True)
    ce, kd, n = kd_ce_loss(z1, labels, None, teacher_logits=t_logits, temperature=T, loss=loss, chunk_positions=5)
    (kd / n).backward()
    z2 = z.clone().requires_grad_(True)
    ref = (dense_div(torch.log_softmax(z2 / T, -1), torch.log_softmax(t_logits / T, -1), loss) * T**2)[labels != -100].mean()
    ref.backward()
    torch.testing.assert_close(kd / n, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(z1.grad, z2.grad, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(ce / n, F.cross_entropy(z, labels, ignore_index=-100), atol=1e-6, rtol=1e-6)
    lp = (t_logits - torch.logsumexp(t_logits, -1, keepdim=True)).numpy()
    ids = np.argsort(-lp, axis=1)
    cached = {"ids": ids, "logprobs": np.take_along_axis(lp, ids, 1).astype(np.float32), "tail_mass": np.zeros(N, np.float32)}
    _, kd_sparse, _ = kd_ce_loss(z, labels, sparse_target([cached], T), temperature=T, loss=loss, chunk_positions=5)
    torch.testing.assert_close(kd_sparse, kd.detach(), atol=1e-4, rtol=1e-5)
