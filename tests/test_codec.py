import numpy as np
import pytest

from logitstore.codec import SCALARS, Encoding, id_dtype
from logitstore.errors import FormatError


def random_topk(rng, n, vocab, k, sharp=3.0):
    logits = rng.normal(size=(n, vocab)) * sharp
    lp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    ids = np.argsort(-lp, axis=1)[:, :k]
    top = np.take_along_axis(lp, ids, 1).astype(np.float32)
    scalars = {"tail_mass": (1 - np.exp(top.astype(np.float64)).sum(1)).astype(np.float32),
               "gold_logprob": lp[:, 0].astype(np.float32), "entropy": -(np.exp(lp) * lp).sum(1).astype(np.float32)}
    return ids, top, scalars


def as_dicts(ids, lp):
    return [dict(zip(i.tolist(), v.tolist())) for i, v in zip(ids, lp)]


@pytest.mark.parametrize("vocab,k", [(200, 1), (300, 17), (70000, 64)])
def test_lossless_is_exact(vocab, k):
    rng = np.random.default_rng(vocab + k)
    ids, lp, sc = random_topk(rng, 40, vocab, k)
    enc = Encoding("lossless")
    arrays = enc.encode(ids, lp, sc, vocab)
    assert arrays["ids"].dtype == id_dtype(vocab)
    i2, l2, s2 = enc.decode(arrays, vocab)
    np.testing.assert_array_equal(i2, ids)
    np.testing.assert_array_equal(l2, lp)
    for s in SCALARS:
        np.testing.assert_array_equal(s2[s], sc[s])


@pytest.mark.parametrize("vocab,k,bits", [(257, 8, 7), (1000, 64, 7), (70000, 32, 8), (500, 500, 4)])
def test_compact_within_documented_bound(vocab, k, bits):
    rng = np.random.default_rng(k * bits)
    ids, lp, sc = random_topk(rng, 64, vocab, k)
    enc = Encoding("compact", value_bits=bits)
    i2, l2, s2 = enc.decode(enc.encode(ids, lp, sc, vocab), vocab)
    bound = enc.error_bound(lp)
    for row, (orig, dec) in enumerate(zip(as_dicts(ids, lp), as_dicts(i2, l2))):
        assert set(orig) == set(dec), "the id set of a position must survive exactly"
        err = max(abs(orig[t] - dec[t]) for t in orig)
        assert err <= bound[row], (row, err, bound[row])
    np.testing.assert_allclose(s2["tail_mass"], sc["tail_mass"], rtol=1e-3, atol=1e-7)
    for s in ("gold_logprob", "entropy"):  # fixed point, 1/256 nat
        np.testing.assert_allclose(s2[s], sc[s], rtol=0, atol=1 / 512 + 1e-6)


def test_compact_bound_is_tight_enough_to_matter():
    # the bound is half a step of the position's range: 7 bits over a ~10-nat range is < 0.05 nats
    rng = np.random.default_rng(0)
    ids, lp, sc = random_topk(rng, 32, 5000, 64)
    enc = Encoding("compact")
    rng_span = lp.max(1) - lp.min(1)
    np.testing.assert_array_less(enc.error_bound(lp), rng_span / 254 + 0.02)


def test_compact_detects_ids_outside_vocab():
    rng = np.random.default_rng(1)
    ids, lp, sc = random_topk(rng, 8, 300, 4)
    enc = Encoding("compact")
    arrays = enc.encode(ids, lp, sc, 300)
    arrays["id_order"] = arrays["id_order"].copy()
    arrays["id_order"][0] = 299 + 5
    with pytest.raises(FormatError, match="id_order"):
        enc.decode(arrays, 300)
    arrays = enc.encode(ids, lp, sc, 300)
    arrays["ids"] = arrays["ids"].copy()
    arrays["ids"][0, -1] = 60000
    with pytest.raises(FormatError, match="rank"):
        enc.decode(arrays, 300)


@pytest.mark.parametrize("bad", [{"name": "zip"}, {"name": "compact", "value_bits": 12}, {"name": "compact", "x": 1}, "compact"])
def test_unknown_encodings_are_refused(bad):
    with pytest.raises(FormatError, match="encoding"):
        Encoding.from_dict(bad)
