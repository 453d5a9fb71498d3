"""The companded codebook (logitstore/format/codebook.py) against FORMAT.md's formulas, computed
here independently: the code scale, the per-entry error bound, and that it beats the uniform grid
on the KL that distillation cares about."""

import numpy as np
import pytest

from logitstore.errors import FormatError
from logitstore.format.codec import Encoding
from tests.test_codec import as_dicts, assert_tails_within_documented_bound, random_topk

F = 56  # FORMAT.md: t(lp) = s * (2 F exp(lp / 2) + lp), s = 2^(value_bits - 5)


def documented_distance(lp, bits):
    s = 2.0 ** (bits - 5)
    x = np.clip(np.asarray(lp, np.float64), -4096, 0)
    return s * (2 * F - 2 * F * np.exp(x / 2) - x)


def local_bound(lp, dec, bits):
    """FORMAT.md: half a code of the scale at the coarser of the two ends, plus float32 rounding."""
    s = 2.0 ** (bits - 5)
    m = np.minimum(lp, dec).astype(np.float64)
    return 0.5 / (s * (F * np.exp(m / 2) + 1)) + 2 * np.spacing(np.maximum(1, np.abs(m)).astype(np.float32))


@pytest.mark.parametrize("bits", [6, 7, 8])
@pytest.mark.parametrize("vocab,k,sharp", [(300, 17, 1.0), (5000, 64, 3.0), (70000, 32, 12.0), (64, 64, 40.0)])
def test_round_trip_within_the_per_entry_bound(bits, vocab, k, sharp):
    rng = np.random.default_rng(bits * 1000 + k)
    ids, lp, sc = random_topk(rng, 96, vocab, k, sharp)
    enc = Encoding("compact", value_bits=bits)
    assert enc.codebook == "companded"
    arrays = enc.encode(ids, lp, sc, vocab)
    assert arrays["codes"].dtype == np.uint16 and "lp_lo" not in arrays
    i2, l2, s2 = enc.decode(arrays, vocab)
    worst, top_err = 0.0, 0.0
    for orig, dec in zip(as_dicts(ids, lp), as_dicts(i2, l2)):
        assert set(orig) == set(dec)
        t = np.array(list(orig))
        a, b = np.array([orig[i] for i in t]), np.array([dec[i] for i in t])
        err = np.abs(a.astype(np.float64) - b)
        bound = local_bound(a, b, bits)
        assert (err <= bound).all(), (err - bound).max()
        assert err.max() <= 2.0 ** (4 - bits) + 1e-5  # the global bound: 1 / (2 s)
        worst = max(worst, (err / bound).max())
        top_err = max(top_err, err[a.argmax()])
    assert worst > 0.6, "the sample reaches the bound"
    assert (enc.error_bound(lp) >= 2.0 ** (4 - bits) - 1e-7).all()
    if sharp >= 3:  # the top entries of confident positions are much finer than the 1/(2s) worst case
        assert top_err < 0.1 * 2.0 ** (4 - bits)
    assert_tails_within_documented_bound(s2["tail_mass"], sc["tail_mass"])


@pytest.mark.parametrize("bits", [6, 8])
def test_decoded_values_invert_the_documented_scale(bits):
    """Every distance a store can hold decodes to the x with t(0) - t(x) = distance, to float32."""
    enc = Encoding("compact", value_bits=bits)
    s = 2 ** (bits - 5)
    d = np.concatenate([np.arange(0, s * 200), np.array([s * 2000, s * (2 * F + 4096)])])
    lp = np.zeros((d.size, 1), np.float32)
    arrays = enc.encode(np.zeros((d.size, 1), np.int64), lp, {"tail_mass": np.zeros(d.size, np.float32),
                        "gold_logprob": np.zeros(d.size, np.float32), "entropy": np.zeros(d.size, np.float32)}, 2)
    arrays["code_lo"] = d.astype(np.uint32)  # codes are 0: the distance is code_lo itself
    x = enc.decode(arrays, 2)[1][:, 0].astype(np.float64)
    assert np.all(np.diff(x) < 0)
    resid = np.abs(documented_distance(x, bits) - d)
    # float32 rounding of x moves the distance by at most |dt/dx| * ulp(x)
    slack = s * (F * np.exp(x / 2) + 1) * np.spacing(np.maximum(np.abs(x), 1e-3).astype(np.float32))
    assert (resid <= slack + 1e-9).all(), (resid - slack).max()
    assert x[-1] == -4096 and x[0] == 0  # distance 0 is probability 1 exactly (padding decodes to 0)


def test_codes_are_offsets_from_the_bottom_code():
    rng = np.random.default_rng(3)
    ids, lp, sc = random_topk(rng, 50, 900, 16, 4.0)
    arrays = Encoding("compact").encode(ids, lp, sc, 900)
    dist = np.rint(documented_distance(lp, 8))
    np.testing.assert_array_equal(arrays["code_lo"], dist.max(1))
    np.testing.assert_array_equal(np.sort(arrays["codes"], 1), np.sort(dist.max(1)[:, None] - dist, 1))


def test_log_probs_below_the_floor_read_as_the_floor():
    lp = np.array([[-0.01, -50.0, -5000.0]], np.float32)
    enc = Encoding("compact")
    sc = {"tail_mass": np.zeros(1, np.float32), "gold_logprob": lp[:, 0], "entropy": np.ones(1, np.float32)}
    out = enc.decode(enc.encode(np.array([[0, 1, 2]]), lp, sc, 3), 3)[1][0]
    assert out.min() == -4096 and enc.error_bound(lp)[0] > 900


def kl(lp_exact, lp_hat):
    """KL(hat || exact) over the top-k renormalised, per position."""
    p = np.exp(lp_exact - np.logaddexp.reduce(lp_exact, 1, keepdims=True))
    q = np.exp(lp_hat - np.logaddexp.reduce(lp_hat, 1, keepdims=True))
    return (q * (np.log(q) - np.log(p))).sum(1)


def test_companded_beats_the_uniform_grid_on_kl():
    """The reason for the codebook: at the same value_bits its KL is smaller (here 1.7x; 2x on
    SmolLM2's real distributions, tools/bench_store.py, at fewer bytes), because the entries that
    carry the mass get the fine steps."""
    rng = np.random.default_rng(0)
    ids, lp, sc = random_topk(rng, 400, 4000, 64, 4.0)
    out = {}
    for cb in ("companded", "uniform"):
        enc = Encoding("compact", value_bits=8, codebook=cb)
        i2, l2, _ = enc.decode(enc.encode(ids, lp, sc, 4000), 4000)
        back = np.array([[dict(zip(r2, v2))[i] for i in r] for r, r2, v2 in zip(ids, i2, l2)])
        out[cb] = kl(lp.astype(np.float64), back.astype(np.float64)).mean()
    assert out["companded"] < out["uniform"] / 1.5, out


def test_corrupt_codes_are_refused():
    rng = np.random.default_rng(1)
    ids, lp, sc = random_topk(rng, 8, 300, 4)
    enc = Encoding("compact")
    arrays = enc.encode(ids, lp, sc, 300)
    arrays["codes"] = arrays["codes"].copy()
    arrays["codes"][0, 0] = arrays["code_lo"][0] + 1  # a negative distance
    with pytest.raises(FormatError, match="codes"):
        enc.decode(arrays, 300)
    arrays = enc.encode(ids, lp, sc, 300)
    arrays["code_lo"] = np.full_like(arrays["code_lo"], 2**31)
    with pytest.raises(FormatError, match="companded"):
        enc.decode(arrays, 300)


def test_manifest_round_trip_and_old_stores():
    assert Encoding().to_dict() == {"name": "compact", "value_bits": 8, "tail": "log", "codebook": "companded"}
    assert Encoding.from_dict(Encoding().to_dict()) == Encoding()
    old = Encoding.from_dict({"name": "compact", "value_bits": 7, "tail": "log"})  # written before the codebook
    assert old.codebook == "uniform" and old.to_dict() == {"name": "compact", "value_bits": 7, "tail": "log"}
    assert Encoding("lossless").to_dict() == {"name": "lossless"}


@pytest.mark.parametrize("codebook", ["companded", "uniform"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, 0.5])
def test_values_no_teacher_produces_are_refused_at_encode(codebook, bad):
    """NaN would otherwise wrap to distance 0 and read back as probability 1."""
    lp = np.array([[-1.0, bad, -2.0]], np.float32)
    sc = {"tail_mass": np.zeros(1, np.float32), "gold_logprob": np.zeros(1, np.float32), "entropy": np.zeros(1, np.float32)}
    with pytest.raises(FormatError, match="logprobs"):
        Encoding("compact", value_bits=8, codebook=codebook).encode(np.array([[0, 1, 2]]), lp, sc, 3)
