"""KD losses at the extremes users reach: confident students (off-support mass down to 1e-12) and
teachers whose stored tail is exactly 0. Loss and gradient must stay finite for every loss, tail
mode and fusion mode, and agree with a float64 reference where float32 can resolve the value."""

import math

import numpy as np
import pytest
import torch

from logitstore.distributions.fusion import fuse
from trainer.losses import divergence, kd_ce_loss
from logitstore.distributions.targets import build_targets
try:
    from logitstore.distributions.targets import TAIL_FLOOR
except ImportError:  # before the floor existed
    TAIL_FLOOR = 1e-10

V, K, N = 40, 5, 32


def cached_teacher(seed, k=K, tail_zero=False):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(N, V)) * 2.0
    lp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    ids = np.argsort(-lp, axis=1)[:, :k]
    top = np.take_along_axis(lp, ids, 1)
    tail = np.clip(1 - np.exp(top).sum(1), 0, 1)
    if tail_zero:  # what a float16 tail below 3e-8, or a float32 underflow, decodes to
        tail[:] = 0.0
    return {"ids": ids, "logprobs": top.astype(np.float32), "tail_mass": tail.astype(np.float32)}


def target_of(cached, mode="mean-probs", T=1.0, weights=None):
    b = {k: torch.from_numpy(v) for k, v in build_targets(cached, V).items()}
    M = len(cached)
    return fuse(b["teacher_lp"], b["rest_lp"], b["support"], b["valid"], b["n_out"], temperatures=[T] * M,
                weights=weights or [1.0 / M] * M, mode=mode)


def confident_gathered(off_mass: float, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """A confident student's log-probs at the K support ids [N, K]: the first id holds
    ``1 - off_mass - rest``, the other ids share ``rest`` (tiny), so the support's log-mass is
    ``log(1 - off_mass)``: within float32 rounding of 0 for ``off_mass`` below ~6e-8."""
    g = torch.Generator().manual_seed(seed)
    rest = torch.rand(N, K - 1, generator=g, dtype=torch.float64) * 1e-14
    top = torch.log1p(-(off_mass + rest.sum(-1, keepdim=True)))
    return torch.cat([top, rest.log()], -1).to(dtype)


@pytest.mark.parametrize("loss", ["fkl", "rkl", "jsd"])
def test_gradients_finite_for_confident_students(loss):
    """Off-support mass from 1e-12 to 1e-2: the gradient is finite everywhere and the value agrees
    with float64 wherever float32 can resolve the off-support mass."""
    target = target_of([cached_teacher(0)])
    for i, off in enumerate(np.logspace(-12, -2, 41)):
        g = confident_gathered(float(off), seed=i).requires_grad_(True)
        kd = divergence(None, target, loss=loss, tail="bucket", gathered=g).sum()
        kd.backward()
        assert torch.isfinite(kd), (loss, off, kd)
        assert torch.isfinite(g.grad).all(), (loss, off, "non-finite gradient")
        if off >= 1e-5:
            kd64 = divergence(None, target, loss=loss, tail="bucket", gathered=confident_gathered(float(off), torch.float64, seed=i))
            assert float(kd.detach()) == pytest.approx(float(kd64.sum()), rel=1e-3, abs=1e-5), (loss, off)


@pytest.mark.parametrize("loss", ["fkl", "rkl", "jsd"])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_kd_ce_loss_exact_for_peaked_students(loss, T):
    """End to end through the chunked loss, students putting 1 - 1e-12 .. 1 - 1e-2 on one id: loss
    and gradient finite and equal to float64's (the off-support mass is summed directly, not taken
    as 1 - the support's mass, which float32 cannot resolve below ~6e-8)."""
    target = target_of([cached_teacher(0)])
    labels = target.support[:, 0].clone()
    for off in np.logspace(-12, -2, 11):
        z64 = torch.full((N, V), math.log(off / (V - 1)), dtype=torch.float64)
        z64[torch.arange(N), labels] = math.log1p(-off)
        got = []
        for z in (z64.float().requires_grad_(True), z64.clone().requires_grad_(True)):
            ce, kd, n = kd_ce_loss(z, labels, target, loss=loss, temperature=T, tail="bucket", chunk_positions=8)
            (0.5 * kd / n + 0.5 * ce / n).backward()
            got.append((kd.detach().double(), z.grad.double()))
        (kd32, g32), (kd64, g64) = got
        assert torch.isfinite(kd32) and torch.isfinite(g32).all(), (loss, off)
        assert float(kd32) == pytest.approx(float(kd64), rel=1e-4, abs=1e-6), (loss, T, off)
        torch.testing.assert_close(g32, g64, atol=1e-6, rtol=1e-3)


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_gradients_finite_when_all_mass_is_on_the_support(T):
    """The student's support mass rounds to exactly 1 in float32 (log1mexp at 0)."""
    target = target_of([cached_teacher(1)])
    z = torch.full((N, V), -200.0)
    z.scatter_(1, target.support, 0.0)
    z.requires_grad_(True)
    labels = target.support[:, 0].clone()
    for loss in ("fkl", "rkl", "jsd"):
        z.grad = None
        _, kd, n = kd_ce_loss(z, labels, target, loss=loss, temperature=T, chunk_positions=4)
        (kd / n).backward()
        assert torch.isfinite(kd) and torch.isfinite(z.grad).all(), (loss, T)


@pytest.mark.parametrize("loss", ["fkl", "rkl", "jsd"])
@pytest.mark.parametrize("tail", ["bucket", "renorm"])
@pytest.mark.parametrize("mode", ["mean-probs", "mean-logits"])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_zero_stored_tail_gives_finite_loss_and_gradient(loss, tail, mode, T):
    teachers = [cached_teacher(2, tail_zero=True), cached_teacher(3, k=7)]
    for cached in (teachers[:1], teachers):
        target = target_of(cached, mode=mode, T=T)
        assert torch.isfinite(target.out_lp).all() and torch.isfinite(target.lp[target.valid]).all()
        torch.manual_seed(4)
        z = (torch.randn(N, V) * 3).requires_grad_(True)
        labels = torch.randint(0, V, (N,))
        ce, kd, n = kd_ce_loss(z, labels, target, loss=loss, tail=tail, temperature=T, chunk_positions=4)
        (kd / n + ce / n).backward()
        assert torch.isfinite(kd), (loss, tail, mode, T, len(cached))
        assert torch.isfinite(z.grad).all(), (loss, tail, mode, T, len(cached))


def test_zero_tail_is_read_as_the_documented_floor():
    cached = cached_teacher(5, tail_zero=True)
    b = build_targets([cached], V)
    want = math.log(TAIL_FLOOR) - math.log(V - K)
    np.testing.assert_allclose(b["rest_lp"][0], want, rtol=1e-6)
    # tails above the floor are read as they are
    cached = cached_teacher(5)
    b = build_targets([cached], V)
    np.testing.assert_allclose(b["rest_lp"][0], np.log(cached["tail_mass"].astype(np.float64)) - math.log(V - K), rtol=1e-6)
    # k = V: no tail at all, nothing to floor
    b = build_targets([cached_teacher(5, k=V)], V)
    assert np.isneginf(b["rest_lp"]).all() and (b["n_out"] == 0).all()


def test_off_support_logmass_gradient_equals_autograd_of_the_masked_logsumexp():
    from trainer.losses import off_support_logmass

    torch.manual_seed(0)
    lp = torch.log_softmax(torch.randn(N, V, dtype=torch.float64) * 3, -1).requires_grad_(True)
    target = target_of([cached_teacher(6), cached_teacher(7, k=9)])  # padded union support
    out = off_support_logmass(lp, target.support, target.valid)
    idx = torch.where(target.valid, target.support, target.support[:, :1])
    ref = torch.logsumexp(lp.scatter(-1, idx, float("-inf")), -1)
    torch.testing.assert_close(out, ref)
    w = torch.randn(N, dtype=torch.float64)
    (g,) = torch.autograd.grad((out * w).sum(), lp)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), lp)
    torch.testing.assert_close(g, g_ref)
    assert torch.autograd.gradcheck(lambda x: off_support_logmass(x, target.support, target.valid), (lp,))
