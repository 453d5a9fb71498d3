"""Exact checks of small functions whose silent changes the broader tests let through (found by
mutation testing, ``tools/mutation.py``): schedules, what ``--resume`` may change, the schedule
reset of a resumed run, the cross-rank sums, and exact values of losses, fusion, targets and the
stream. Each test runs in milliseconds, so every mutant can run them."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from trainer.schedules import lr_factor, temperature_at


# ---------------------------------------------------------------------------------- schedules
def test_lr_factor_exact_values():
    m = 0.1
    assert lr_factor(0, 14, 4, m) == 0.25
    assert lr_factor(3, 14, 4, m) == 1.0
    assert lr_factor(4, 14, 4, m) == 1.0  # warm-up over: progress 0 of the cosine
    assert lr_factor(9, 14, 4, m) == pytest.approx(m + (1 - m) * 0.5)  # half way
    assert lr_factor(6, 14, 4, m) == pytest.approx(m + (1 - m) * 0.5 * (1 + math.cos(math.pi * 0.2)))
    assert lr_factor(14, 14, 4, m) == pytest.approx(m)
    assert lr_factor(30, 14, 4, m) == pytest.approx(m)  # stays at the floor after the end
    assert lr_factor(5, 4, 4, m) == pytest.approx(m)  # total == warmup: no room for a decay
    assert lr_factor(0, 10, 0, 0.0) == 1.0 and lr_factor(5, 10, 0, 0.0) == pytest.approx(0.5)


def test_temperature_at_exact_values():
    assert temperature_at(5, 10, "linear", 4.0, 1.0, 0.5) == pytest.approx(2.5)
    assert temperature_at(20, 10, "linear", 4.0, 1.0, 0.5) == pytest.approx(1.0)  # clamped at the end
    assert temperature_at(20, 10, "cosine", 4.0, 1.0, 0.5) == pytest.approx(1.0)
    assert temperature_at(20, 10, "exp", 4.0, 1.0, 0.5) == pytest.approx(2.0)
    assert temperature_at(1, 1, "linear", 4.0, 1.0, 0.5) == pytest.approx(1.0)  # total 1: done after one step
    assert temperature_at(1, 0, "linear", 4.0, 1.0, 0.5) == pytest.approx(1.0)
    assert temperature_at(5, 10, "cosine", 4.0, 1.0, 0.5) == pytest.approx(2.5)
    assert temperature_at(5, 10, "exp", 4.0, 1.0, 0.25) == pytest.approx(2.0)
    assert temperature_at(5, 10, "constant", 4.0, 1.0, 0.25) == 4.0
    with pytest.raises(ValueError, match="unknown temperature schedule 'bogus'"):
        temperature_at(5, 10, "bogus", 4.0, 1.0, 0.25)


# ---------------------------------------------------------------------------------- --resume
def _cfg(**kw):
    from trainer.config import FitConfig

    return FitConfig(logits=("s",), out="run", **kw)


def test_setting_changes_splits_trajectory_and_runtime_settings():
    from trainer.resume import setting_changes

    saved = _cfg().to_dict()
    assert setting_changes(saved, _cfg()) == ([], [])
    hard, soft = setting_changes(saved, _cfg(lr=1e-3, num_workers=3, resume=True))
    assert hard == ["lr: 0.0003 -> 0.001"]
    assert soft == ["num_workers: 1 -> 3"]  # `resume` itself is never a change
    # `out` may differ (the run directory moved); tuples in the saved file read as lists
    assert setting_changes({**saved, "out": "elsewhere", "logits": ("s",)}, _cfg()) == ([], [])
    # keys missing from an older config.yaml count as their defaults, default_factory included
    old = {k: v for k, v in saved.items() if k not in ("alpha", "extra", "prefetch")}
    assert setting_changes(old, _cfg()) == ([], [])
    hard, soft = setting_changes(old, _cfg(alpha=0.25, extra={"a": 1}, prefetch=0))
    assert hard == ["alpha: 0.5 -> 0.25", "extra: {} -> {'a': 1}"] and soft == ["prefetch: 4 -> 0"]


# ---------------------------------------------------------------------------------- fit helpers
def _scheduler(total=10, warmup=2, base=0.5):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))], lr=base)
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 2 * base})
    fn = lambda s: lr_factor(s, total, warmup, 0.1)  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(opt, [fn, fn]), fn


@pytest.mark.parametrize("wrapped", [False, True])
def test_set_schedule_step_puts_every_group_at_the_step(wrapped):
    from trainer.fit import set_schedule_step

    sched, fn = _scheduler()
    target = SimpleNamespace(scheduler=sched) if wrapped else sched
    set_schedule_step(target, 6)
    assert sched.last_epoch == 6
    want = [0.5 * fn(6), 1.0 * fn(6)]
    assert [g["lr"] for g in sched.optimizer.param_groups] == pytest.approx(want)
    assert sched.get_last_lr() == pytest.approx(want)
    sched.optimizer.step()
    sched.step()  # continues from there
    assert [g["lr"] for g in sched.optimizer.param_groups] == pytest.approx([0.5 * fn(7), 1.0 * fn(7)])


class _Acc:
    def __init__(self, n):
        self.num_processes, self.device, self.seen = n, torch.device("cpu"), []

    def reduce(self, t, reduction):
        self.seen.append((t.dtype, reduction))
        return t * self.num_processes


def test_all_sum_types_and_values():
    from trainer.evaluation import all_sum as _all_sum

    one = _Acc(1)
    x = torch.tensor([1.5])
    assert _all_sum(one, x) is x and _all_sum(one, 3) == 3 and not one.seen
    acc = _Acc(3)
    got = _all_sum(acc, 7)
    assert got == 21 and type(got) is int
    got = _all_sum(acc, 0.5)
    assert got == 1.5 and type(got) is float
    got = _all_sum(acc, torch.tensor([1.0, 2.0]))
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float64 and got.tolist() == [3.0, 6.0]
    assert acc.seen == [(torch.float64, "sum")] * 3


# ---------------------------------------------------------------------------------- losses
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log1mexp_at_and_near_zero_is_finite_with_the_documented_cap(dtype):
    from trainer.losses import _log1mexp

    x = torch.tensor([0.0, -1e-40, -1e-20, -math.log(2), -0.5, -1.0, -30.0], dtype=dtype, requires_grad=True)
    y = _log1mexp(x)
    cap = 1e-30 if dtype == torch.float64 else 1e-12
    assert torch.isfinite(y).all()
    assert y[0].item() == pytest.approx(math.log(cap), rel=1e-6)  # x capped just below 0
    ref = torch.tensor([math.log(-math.expm1(-0.5)), math.log1p(-math.exp(-1.0)), math.log1p(-math.exp(-30.0))], dtype=torch.float64)
    torch.testing.assert_close(y[4:].double(), ref, rtol=1e-6, atol=0)
    assert y[3].item() == pytest.approx(math.log(0.5), rel=1e-6)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_ce_only_path_ignores_minus_100_and_drops_padded_vocab_rows():
    from trainer.losses import kd_ce_loss

    torch.manual_seed(0)
    x = torch.randn(6, 12, dtype=torch.float64)
    x[:, 10:] = 50.0  # padded rows with huge logits: must take no probability
    labels = torch.tensor([1, -100, 3, 9, -100, 0])
    ce, kd, n = kd_ce_loss(x, labels, None, vocab_size=10)[:3]
    keep = labels != -100
    want = torch.nn.functional.cross_entropy(x[keep, :10], labels[keep], reduction="sum")
    torch.testing.assert_close(ce, want)
    assert float(kd) == 0.0
    ce16 = kd_ce_loss(x.to(torch.bfloat16), labels, None, vocab_size=10)[0]  # low precision: computed in float32
    assert ce16.dtype == torch.float32 and abs(float(ce16) - float(want)) < 0.1


def test_off_support_gradient_is_zero_on_rows_with_nothing_off_the_support():
    from trainer.losses import off_support_logmass

    lp = torch.log_softmax(torch.randn(2, 4, dtype=torch.float64), -1).requires_grad_()
    support = torch.tensor([[0, 1, 2, 3], [0, 1, 0, 0]])
    valid = torch.tensor([[True, True, True, True], [True, True, False, False]])
    out = off_support_logmass(lp, support, valid)
    assert out[0].item() == -math.inf
    assert out[1].item() == pytest.approx(torch.logsumexp(lp[1, 2:], 0).item())
    out[1].backward()
    assert torch.isfinite(lp.grad).all() and (lp.grad[0] == 0).all() and (lp.grad[1, :2] == 0).all()
    torch.testing.assert_close(lp.grad[1, 2:], torch.softmax(lp[1, 2:].detach(), 0))


def test_kd_ce_loss_argmax_is_per_position():
    from trainer.losses import kd_ce_loss

    x = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 1.0]])
    got = kd_ce_loss(x, torch.tensor([1, 0]), None, return_argmax=True)
    assert got[-1].tolist() == [1, 0]


def test_check_values_refuses_each_field_out_of_range():
    import numpy as np

    from logitstore.format.codec import check_values
    from logitstore.errors import FormatError

    ok = {"tail_mass": np.array([0.0, 0.5], np.float32), "gold_logprob": np.array([0.0, -2.0], np.float32),
          "entropy": np.array([0.0, 1.5], np.float32)}
    check_values(np.array([[-1.0, -3.0]], np.float32), ok)
    for name, bad in (("gold_logprob", 0.5), ("tail_mass", 1.2), ("tail_mass", -0.1), ("entropy", -0.5), ("gold_logprob", np.nan)):
        arrays = {k: v.copy() for k, v in ok.items()}
        arrays[name][1] = bad
        with pytest.raises(FormatError, match=name):
            check_values(None, arrays)
    with pytest.raises(FormatError, match="logprobs"):
        check_values(np.array([[0.5, -1.0]], np.float32), ok)


def test_float16_tail_bound_is_the_documented_one():
    import numpy as np

    from logitstore.format.codec import Encoding, tail_error_bound

    enc = Encoding.from_dict({"name": "compact", "value_bits": 7})  # a first-version store: float16 tails
    assert enc.tail != "log"
    b = tail_error_bound(np.array([1e-7, 2.0**-14, 0.5]), enc)
    np.testing.assert_array_equal(b, [2.0**-25, 2.0**-11 * 2.0**-14, 2.0**-11 * 0.5])


@pytest.mark.parametrize("mode", ["mean-probs", "mean-logits"])
def test_fusion_with_exactly_one_token_off_the_support(mode):
    """n_out = 1 (the union covers all but one id): the bucket is that one token; equals brute force."""
    from logitstore.distributions.fusion import fuse
    from logitstore.distributions.targets import build_targets
    from test_fusion import V, brute_force, dense_from_cache, make_teachers

    rng = np.random.default_rng(3)
    full, cached = make_teachers(rng, 6, [V - 1, V - 1])
    # the second teacher keeps its own values on the first one's ids, so both leave out the same id
    lp1 = full[1]
    cached[1]["ids"] = cached[0]["ids"].copy()
    top1 = np.take_along_axis(lp1, cached[1]["ids"], 1)
    cached[1]["logprobs"] = top1.astype(np.float32)
    cached[1]["tail_mass"] = np.clip(1 - np.exp(top1).sum(1), 0, 1).astype(np.float32)
    b = {k: torch.from_numpy(v) for k, v in build_targets(cached, V).items()}
    assert (b["n_out"] == 1).all()
    t = fuse(b["teacher_lp"], b["rest_lp"], b["support"], b["valid"], b["n_out"], temperatures=[1.0, 1.0], weights=[0.6, 0.4],
             mode=mode)
    assert t.support is b["support"] and t.valid is b["valid"]  # the target says which ids it is over
    ref = brute_force([dense_from_cache(c, V - 1) for c in cached], [1.0, 1.0], [0.6, 0.4], mode)
    got = np.zeros((6, V))
    np.put_along_axis(got, b["support"].numpy(), t.lp.exp().double().numpy(), 1)
    off = np.ones((6, V), bool)
    np.put_along_axis(off, b["support"].numpy(), False, 1)
    got[off] = t.out_lp.exp().double().numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)


def test_target_fields_have_the_documented_dtypes():
    from logitstore.distributions.targets import build_targets

    rng = np.random.default_rng(0)
    ids = np.argsort(rng.random((5, 30)), axis=1)[:, :4]
    lp = np.log(np.full((5, 4), 0.2, np.float32))
    b = build_targets([{"ids": ids, "logprobs": lp, "tail_mass": np.full(5, 0.2, np.float32)}], 30)
    assert b["support"].dtype == np.int64 and b["valid"].dtype == bool
    assert b["teacher_lp"].dtype == b["rest_lp"].dtype == b["n_out"].dtype == np.float32


def test_off_support_gradient_is_zero_where_only_padded_rows_lie_off_the_support():
    """At k = real vocabulary the support holds every real token; a padded student vocabulary's extra
    rows have log-prob -inf, so the off-support mass is exactly 0 (log: -inf) and its gradient 0,
    not NaN (the backward's -inf - -inf)."""
    from trainer.losses import off_support_logmass

    lp = torch.log_softmax(torch.randn(1, 6, dtype=torch.float64), -1)
    lp = torch.cat([lp, torch.full((1, 2), -math.inf, dtype=torch.float64)], -1).requires_grad_()  # V = 8, 2 padded
    support = torch.arange(6)[None]
    valid = torch.ones(1, 6, dtype=torch.bool)
    out = off_support_logmass(lp, support, valid)
    assert out.item() == -math.inf
    (out * 1.0).sum().backward()
    assert (lp.grad == 0).all(), lp.grad


# ------------------------------------------------------------------------------------- codec


def test_lossless_encoding_bounds_and_description_are_exact():
    from logitstore.format.codec import Encoding, tail_error_bound

    enc = Encoding.from_dict({"name": "lossless"})
    lp = np.log(np.full((5, 3), 1 / 3, np.float32))
    assert enc.error_bound(lp).shape == (5,) and not enc.error_bound(lp).any()
    assert not tail_error_bound(np.array([0.5, 1e-9, 0.0]), enc).any()
    assert enc.to_dict() == {"name": "lossless"}
    assert set(enc.array_specs(3, 500)) == {"ids", "logprobs", "tail_mass", "gold_logprob", "entropy"}


def test_zero_tails_encode_without_warnings():
    import warnings

    from logitstore.format.codec import encode_tail

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # log(0) of an exact zero tail is expected, not a warning for the user
        code = encode_tail(np.array([0.0, 0.25, 1.0], np.float32))
    assert code[0] == 65535 and code[2] == 0


# ----------------------------------------------------------------------------- fusion, targets


def _two_teachers(V=50, k=(4, 3), N=3, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for kk in k:
        ids = np.stack([rng.choice(V, kk, replace=False) for _ in range(N)])
        lp = np.sort(np.log(rng.dirichlet(np.ones(kk + 1), N)[:, :kk]), 1)[:, ::-1].astype(np.float32)
        out.append({"ids": ids, "logprobs": np.ascontiguousarray(lp), "tail_mass": (1 - np.exp(lp).sum(1)).astype(np.float32)})
    return out


def test_padding_of_the_support_carries_minus_infinity_for_every_teacher():
    from logitstore.distributions.targets import build_targets

    b = build_targets(_two_teachers(), 50)
    assert (~b["valid"]).any(), "the union of 4 and 3 ids over 3 rows must leave some padding"
    assert np.isneginf(b["teacher_lp"][:, ~b["valid"]]).all()
    assert np.isfinite(b["teacher_lp"][:, b["valid"]]).all()


def test_fuse_checks_its_arguments_and_a_single_teacher_keeps_the_support():
    from logitstore.distributions.fusion import fuse
    from logitstore.distributions.targets import build_targets

    b = {k: torch.from_numpy(np.asarray(v)) for k, v in build_targets(_two_teachers(), 50).items()}
    args = (b["teacher_lp"], b["rest_lp"], b["support"], b["valid"], b["n_out"])
    with pytest.raises(ValueError, match="--fuse: expected one of"):
        fuse(*args, temperatures=[1.0, 1.0], weights=[0.5, 0.5], mode="median")
    with pytest.raises(ValueError, match="2 teachers but 1 temperatures and 2 weights"):
        fuse(*args, temperatures=[1.0], weights=[0.5, 0.5])
    with pytest.raises(ValueError, match="2 teachers but 2 temperatures and 3 weights"):
        fuse(*args, temperatures=[1.0, 1.0], weights=[0.2, 0.3, 0.5])
    one = fuse(b["teacher_lp"][:1], b["rest_lp"][:1], b["support"], b["valid"], b["n_out"], temperatures=[1.0], weights=[1.0])
    assert torch.equal(one.support, b["support"]) and torch.equal(one.valid, b["valid"])


def _full_support_target(V=12, N=5, seed=0, teachers=1, weights=None, mode="mean-probs"):
    """Teachers that keep every token (k = V): the sparse target is then the dense distribution."""
    from logitstore.distributions.fusion import fuse
    from logitstore.distributions.targets import build_targets

    rng = np.random.default_rng(seed)
    dense, cached = [], []
    for _ in range(teachers):
        lp = np.log(rng.dirichlet(np.ones(V), N))
        ids = np.argsort(-lp, 1)
        cached.append({"ids": ids, "logprobs": np.take_along_axis(lp, ids, 1).astype(np.float32),
                       "tail_mass": np.zeros(N, np.float32)})
        dense.append(torch.from_numpy(lp))
    b = {k: torch.from_numpy(np.asarray(v)) for k, v in build_targets(cached, V).items()}
    w = weights or [1.0 / teachers] * teachers
    return dense, fuse(b["teacher_lp"], b["rest_lp"], b["support"], b["valid"], b["n_out"], temperatures=[1.0] * teachers,
                       weights=w, mode=mode)


def test_jsd_beta_reaches_both_the_logits_and_the_chunked_head_paths():
    from trainer.losses import kd_ce_loss

    V, N, H, beta = 12, 5, 6, 0.2
    (t,), target = _full_support_target(V, N)
    torch.manual_seed(0)
    head = torch.nn.Linear(H, V, bias=False).double()
    h = torch.randn(N, H, dtype=torch.float64)
    labels = torch.randint(0, V, (N,))
    s = torch.log_softmax(head(h), -1)
    t = t.double()
    m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log(1 - beta)]), 0)
    want = (beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)).sum()
    for x, hd in ((head(h), None), (h, head)):
        _, kd, _ = kd_ce_loss(x, labels, target, head=hd, loss="jsd", beta=beta, chunk_positions=2)
        torch.testing.assert_close(kd.double(), want, rtol=1e-4, atol=1e-6)


def test_dense_divergence_defaults_to_forward_kl():
    from trainer.losses import dense_divergence

    s = torch.log_softmax(torch.randn(3, 7, dtype=torch.float64), -1)
    t = torch.log_softmax(torch.randn(3, 7, dtype=torch.float64), -1)
    torch.testing.assert_close(dense_divergence(s, t), (t.exp() * (t - s)).sum(-1))


def test_mean_logits_with_a_zero_weight_teacher_and_no_token_off_the_support():
    (a, b), fused = _full_support_target(teachers=2, weights=[1.0, 0.0], mode="mean-logits")
    assert (fused.n_out == 0).all() and torch.isneginf(fused.out_lp).all()
    lp = torch.where(fused.valid, fused.lp, torch.tensor(-math.inf))
    assert torch.isfinite(lp[fused.valid]).all()
    got = torch.full_like(lp, -math.inf).scatter(1, fused.support, lp)
    torch.testing.assert_close(got.double(), a.double(), rtol=1e-5, atol=1e-5)  # teacher a alone


def test_codec_refuses_ids_beyond_the_vocabulary_and_keeps_zero_entropy_exact():
    from logitstore.errors import FormatError
    from logitstore.format.codec import Encoding, check_values

    lossless = Encoding.from_dict({"name": "lossless"})
    ids = np.array([[3, 1, 9]], np.int64)
    lp = np.log(np.array([[0.5, 0.3, 0.1]], np.float32))
    scal = {"tail_mass": np.array([0.1], np.float32), "gold_logprob": np.array([-0.7], np.float32), "entropy": np.zeros(1, np.float32)}
    enc = lossless.encode(ids, lp, scal, 10)
    with pytest.raises(FormatError, match="ids: found id 9 >= vocab_size 9"):
        lossless.decode(enc, 9)
    compact = Encoding.from_dict({"name": "compact", "value_bits": 7, "tail": "log"})
    _, _, back = compact.decode(compact.encode(ids, lp, scal, 10), 10)
    assert back["entropy"][0] == 0.0  # a one-hot teacher's entropy is 0, not one quantisation step
    assert lossless.error_bound(lp).dtype == np.float32
    with pytest.raises(FormatError, match=r"entropy.*\[0, inf\)"):
        check_values(None, {"entropy": np.array([-1.0], np.float32)})


def test_id_dtypes_are_the_smallest_that_hold_the_vocabulary():
    from logitstore.format.codec import id_dtype

    assert [id_dtype(v) for v in (2, 256, 257, 65536, 65537, 200_000)] == \
        [np.uint8, np.uint8, np.uint16, np.uint16, np.uint32, np.uint32]


def test_log_tail_bound_is_half_a_step_and_float32_rounding():
    from logitstore.format.codec import Encoding, tail_error_bound

    enc = Encoding.from_dict({"name": "compact", "value_bits": 7, "tail": "log"})
    t = np.array([1.0, 0.5, 1e-6, 1e-20, 1e-30])
    rel = math.expm1(0.5 / 1024) + 2.0**-23  # FORMAT.md
    np.testing.assert_allclose(tail_error_bound(t, enc)[:4], rel * t[:4], rtol=1e-12)
    assert tail_error_bound(t, enc)[4] == pytest.approx(math.exp(-65534 / 1024))  # below e^-64 (1.6e-28): the floor's size


def test_equal_weights_by_default_sum_to_one():
    from logitstore.distributions.fusion import normalize_weights

    assert normalize_weights(None, 4) == [0.25] * 4 and normalize_weights([2, 6], 2) == [0.25, 0.75]


def test_targets_of_no_positions_and_rest_logprob_dtypes():
    from logitstore.distributions.targets import build_targets, rest_logprob

    empty = {"ids": np.zeros((0, 3), np.int64), "logprobs": np.zeros((0, 3), np.float32), "tail_mass": np.zeros(0, np.float32)}
    b = build_targets([empty], 10)
    assert b["support"].shape == (0, 0) and b["teacher_lp"].shape == (1, 0, 0)
    tails = np.array([0.2, 0.0], np.float32)
    assert rest_logprob(tails, 10, 3).dtype == np.float32 and rest_logprob(tails, 10, 10).dtype == np.float32
    assert np.isneginf(rest_logprob(tails, 10, 10)).all()


def test_evaluation_argmax_and_ce_ignore_a_padded_vocabulary():
    from trainer.losses import kd_ce_loss

    V, N = 7, 6
    torch.manual_seed(1)
    x = torch.randn(N, V)
    padded = torch.cat([x, torch.full((N, 3), 50.0)], -1)  # rows beyond the store's vocabulary, very likely
    labels = torch.randint(0, V, (N,))
    with torch.no_grad():
        ce, _, _, pred = kd_ce_loss(padded, labels, None, vocab_size=V, return_argmax=True, chunk_positions=4)
    assert torch.equal(pred, x.argmax(-1))
    torch.testing.assert_close(ce, torch.nn.functional.cross_entropy(x, labels, reduction="sum"))


def test_a_rank_just_past_id_order_is_refused_not_wrapped():
    from logitstore.errors import FormatError
    from logitstore.format.codec import _ids_from_deltas

    id_order = np.array([5, 2, 7], np.uint16)
    assert _ids_from_deltas(np.array([[0, 1, 1]], np.uint16), id_order).tolist() == [[5, 2, 7]]
    with pytest.raises(FormatError, match="ids: rank 3 outside id_order of length 3"):
        _ids_from_deltas(np.array([[0, 1, 2]], np.uint16), id_order)  # rank 3 would wrap to id 5


def test_check_values_names_the_tail_range():
    from logitstore.errors import FormatError
    from logitstore.format.codec import check_values

    with pytest.raises(FormatError, match=r"tail_mass.*\[0, 1\]"):
        check_values(None, {"tail_mass": np.array([1.5], np.float32)})


def test_dense_divergence_is_infinite_where_the_student_gives_zero_to_a_teacher_token():
    from trainer.losses import dense_divergence

    t = torch.log(torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64))
    s = torch.log(torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64))
    assert torch.isposinf(dense_divergence(s, t)).all()  # the teacher's token 1 has no student mass
    assert dense_divergence(t, t).item() == 0.0  # tokens both give 0 contribute nothing


def test_compact_decodes_more_rows_than_one_block():
    from logitstore.format.codec import Encoding

    rng = np.random.default_rng(0)
    N, k, V = 4096 * 2 + 7, 4, 300  # several decode blocks of 4096 rows and a partial one
    ids = np.stack([rng.choice(V, k, replace=False) for _ in range(N)])
    lp = np.sort(np.log(rng.dirichlet(np.ones(k + 1), N)[:, :k]), 1)[:, ::-1].astype(np.float32)
    scal = {"tail_mass": (1 - np.exp(lp).sum(1)).astype(np.float32), "gold_logprob": lp[:, 0].copy(), "entropy": np.ones(N, np.float32)}
    enc = Encoding.from_dict({"name": "compact", "value_bits": 7, "tail": "log"})
    got, _, _ = enc.decode(enc.encode(ids, np.ascontiguousarray(lp), scal, V), V)
    assert np.array_equal(np.sort(got.astype(np.int64), 1), np.sort(ids, 1))  # each row's ids, in the encoding's order


def test_divergence_defaults_to_forward_kl_with_the_tail_bucket():
    from trainer.losses import divergence

    (t,), target = _full_support_target()
    s = torch.log_softmax(torch.randn(t.shape, dtype=torch.float64), -1)
    torch.testing.assert_close(divergence(s, target).double(), (t.exp() * (t - s)).sum(-1), rtol=1e-4, atol=1e-6)


def test_online_jsd_takes_beta_and_compact_log_probs_are_float32():
    from logitstore.format.codec import Encoding
    from trainer.losses import kd_ce_loss

    torch.manual_seed(0)
    V, N, beta = 9, 4, 0.2
    x, tl = torch.randn(N, V, dtype=torch.float64), torch.randn(N, V, dtype=torch.float64)
    s, t = torch.log_softmax(x, -1), torch.log_softmax(tl, -1)
    m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log(1 - beta)]), 0)
    want = (beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)).sum()
    _, kd, _ = kd_ce_loss(x, torch.randint(0, V, (N,)), None, teacher_logits=tl, loss="jsd", beta=beta)
    torch.testing.assert_close(kd.double(), want)
    enc = Encoding.from_dict({"name": "compact", "value_bits": 7, "tail": "log"})
    lp = np.log(np.array([[0.6, 0.3]], np.float32))
    scal = {"tail_mass": np.array([0.1], np.float32), "gold_logprob": lp[:, 0].copy(), "entropy": np.ones(1, np.float32)}
    _, back, _ = enc.decode(enc.encode(np.array([[4, 2]]), lp, scal, 10), 10)
    assert back.dtype == np.float32
