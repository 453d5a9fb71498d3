import numpy as np
import pytest

from logitstore.format.codec import SCALARS, Encoding, id_dtype
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


#: FORMAT.md, compact ``tail: "log"``: relative error of a tail mass in [e^-64, 1]
TAIL_REL = np.expm1(2.0**-11) + 2.0**-23


def documented_bound(arrays, bits):
    """FORMAT.md's bound, from the stored bounds and nothing of the code's: ``(lp_hi - lp_lo) /
    (2 * (2^value_bits - 1))`` with ``lp = -stored / 64``, plus float32 rounding (2 ulp of the
    position's largest magnitude), ``[N]`` float64."""
    lo = -arrays["lp_lo"].astype(np.float64) / 64
    hi = -arrays["lp_hi"].astype(np.float64) / 64
    return (hi - lo) / (2 * (2**bits - 1)) + 2 * np.spacing(np.maximum(1, np.abs(lo)).astype(np.float32)).astype(np.float64)


def assert_tails_within_documented_bound(decoded, exact):
    """FORMAT.md: relative error <= exp(2^-11) - 1 + 2^-23 from 1 down to e^-64, a smaller non-zero
    tail reads as e^-64, and only an exact 0 (or a rounding-negative tail) reads as 0."""
    t, d = np.asarray(exact, np.float64), np.asarray(decoded, np.float64)
    floor = np.exp(-65534 / 1024)
    assert (d[t <= 0] == 0).all()
    big = t >= floor
    assert (np.abs(d - t)[big] <= TAIL_REL * t[big]).all(), np.max(np.abs(d - t)[big] / t[big])
    small = (t > 0) & ~big
    np.testing.assert_allclose(d[small], floor, rtol=2.0**-22)


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
    enc = Encoding("compact", value_bits=bits, codebook="uniform")
    arrays = enc.encode(ids, lp, sc, vocab)
    i2, l2, s2 = enc.decode(arrays, vocab)
    bound = documented_bound(arrays, bits)  # FORMAT.md's, not the code's own error_bound()
    assert (enc.error_bound(lp) >= bound - 1e-6).all(), "error_bound() may not promise more than FORMAT.md"
    worst = 0.0
    for row, (orig, dec) in enumerate(zip(as_dicts(ids, lp), as_dicts(i2, l2))):
        assert set(orig) == set(dec), "the id set of a position must survive exactly"
        err = max(abs(orig[t] - dec[t]) for t in orig)
        assert err <= bound[row], (row, err, bound[row])
        worst = max(worst, err / bound[row])
    assert worst > 0.6, "the sample reaches the bound, so a codec twice as coarse would fail above"
    assert_tails_within_documented_bound(s2["tail_mass"], sc["tail_mass"])
    for s in ("gold_logprob", "entropy"):  # fixed point, 1/256 nat: within 1/512 plus float32 rounding
        err = np.abs(s2[s].astype(np.float64) - sc[s])
        assert (err <= 1 / 512 + 2 * np.spacing(np.maximum(1, np.abs(sc[s])))).all(), (s, err.max())


def test_compact_bound_is_tight_enough_to_matter():
    # the bound is half a step of the position's range: 7 bits over a ~10-nat range is < 0.05 nats
    rng = np.random.default_rng(0)
    ids, lp, sc = random_topk(rng, 32, 5000, 64)
    enc = Encoding("compact", value_bits=7, codebook="uniform")
    rng_span = lp.max(1).astype(np.float64) - lp.min(1)
    bound = documented_bound(enc.encode(ids, lp, sc, 5000), 7)
    # the stored range is the true one widened by at most 2/64 nat (bounds rounded outwards)
    np.testing.assert_array_less(bound, (rng_span + 2 / 64) / 254 + 1e-5)
    assert (bound < 0.05).all() and (enc.error_bound(lp) < 0.05).all()


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


@pytest.mark.parametrize("bad", [{"name": "zip"}, {"name": "compact", "value_bits": 12}, {"name": "compact", "x": 1}, "compact",
                                 {"name": "compact", "value_bits": 7, "tail": "bf16"}, {"name": "lossless", "tail": "log"},
                                 {"name": "compact", "value_bits": 5, "codebook": "companded"}, {"name": "compact", "codebook": "mu-law"},
                                 {"name": "lossless", "codebook": "companded"}])
def test_unknown_encodings_are_refused(bad):
    with pytest.raises(FormatError, match="encoding"):
        Encoding.from_dict(bad)


def _tail_round_trip(enc, tails):
    n = len(tails)
    ids = np.zeros((n, 1), np.int64)
    lp = np.log1p(-np.minimum(tails.astype(np.float64), 1 - 1e-7))[:, None].astype(np.float32)
    sc = {"tail_mass": tails, "gold_logprob": lp[:, 0], "entropy": np.zeros(n, np.float32)}
    return enc.decode(enc.encode(ids, lp, sc, 2), 2)[2]["tail_mass"].astype(np.float64)


def test_tail_mass_within_the_documented_bound_from_1e_12_to_1():
    """FORMAT.md's tail bound over a sweep of tails, for both tail encodings of ``compact``. The
    first version's claim for float16 ("relative error <= 2^-11") is false below 6.1e-5."""
    from logitstore.format.codec import tail_error_bound

    tails = np.concatenate([np.geomspace(1e-12, 1, 40_001), np.geomspace(2**-14, 2**-26, 2_001), [1.0]]).astype(np.float32)
    exact = tails.astype(np.float64)
    new, old = Encoding("compact"), Encoding.from_dict({"name": "compact", "value_bits": 7})
    assert new.tail == "log" and old.tail == "float16" and new.to_dict()["tail"] == "log" and "tail" not in old.to_dict()
    for enc in (new, old):
        err = np.abs(_tail_round_trip(enc, tails) - exact)
        bound = tail_error_bound(exact, enc)
        assert (err <= bound).all(), (enc, tails[np.argmax(err - bound)])
    err_new = np.abs(_tail_round_trip(new, tails) - exact)
    assert (err_new <= 4.9e-4 * exact).all()  # the stated relative bound, down to 1e-12 (and to 1.6e-28)
    err_old = np.abs(_tail_round_trip(old, tails) - exact)
    assert (err_old > 2**-11 * exact).any()  # what FORMAT.md used to claim for float16 does not hold
    assert (err_old[exact >= 2**-14] <= 2**-11 * exact[exact >= 2**-14]).all()


def test_tail_zero_only_for_an_exact_zero():
    """Which tails decode to 0: with the log tail only an exact 0; tiny tails stay positive."""
    tails = np.array([0.0, 1e-45, 1e-38, 1e-30, 1e-28, 1e-20, 1e-10, 2.9e-8, 1.0], np.float32)
    dec = _tail_round_trip(Encoding("compact"), tails)
    assert dec[0] == 0 and (dec[1:] > 0).all()
    assert dec[1] == pytest.approx(np.exp(-65534 / 1024), rel=1e-6)  # below e^-64: clamped there
    old = _tail_round_trip(Encoding("compact", tail="float16"), tails)
    assert (old[:8] == 0).all()  # float16 reads every tail under 3e-8 as 0


def test_stores_of_the_first_version_with_float16_tails_still_read(tmp_path, llama_dir, corpus):
    """A store written before ``tail: "log"`` (encoding without ``tail``, ``tail_mass`` float16)."""
    import hashlib
    import json
    import shutil

    import logitstore
    from logitstore.dump import DumpConfig, dump
    from logitstore.tools.verify import verify
    from storeindex import entries, rewrite

    out = tmp_path / "s"
    dump(DumpConfig(teachers=(f"t={llama_dir}",), data=str(corpus), out=str(out), top_k=4, seq_len=16, max_tokens=200,
                    shard_sequences=4, progress=False))
    store = logitstore.open(str(out))
    assert store.manifest["encoding"] == {"name": "compact", "value_bits": 8, "tail": "log", "codebook": "companded"}
    new_tails = np.concatenate([store.load_shard(j)["teachers"]["t"]["tail_mass"] for j in range(store.n_shards)])
    old = Encoding.from_dict({"name": "compact", "value_bits": 7})
    m = json.loads((out / "manifest.json").read_text())
    shards = entries(out)
    for j, entry in enumerate(shards):
        td = store.load_shard(j)["teachers"]["t"]
        n, L, k = td["ids"].shape
        flat = old.encode(td["ids"].reshape(-1, k), td["logprobs"].reshape(-1, k),
                          {s: td[s].reshape(-1) for s in SCALARS}, store.vocab_size)
        arrays = {a: (v if a == "id_order" else v.reshape(n, L, *v.shape[1:])) for a, v in flat.items()}
        part_dir = out / entry["path"] / "t0"
        shutil.rmtree(part_dir)
        files = store.backend.encode_part(arrays, 4)
        for rel, data in files.items():
            (part_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            (part_dir / rel).write_bytes(data)
        entry["parts"]["t0"]["files"] = {rel: {"bytes": len(d), "sha256": hashlib.sha256(d).hexdigest()} for rel, d in files.items()}
    m["encoding"] = {"name": "compact", "value_bits": 7}
    rewrite(out, shards, m)
    again = logitstore.open(str(out))
    assert again.encoding.tail == "float16" and "tail_mass" in again.part_specs(0, "t0")
    old_tails = np.concatenate([again.load_shard(j)["teachers"]["t"]["tail_mass"] for j in range(again.n_shards)])
    np.testing.assert_array_equal(old_tails, new_tails.astype(np.float16).astype(np.float32))
    assert verify(str(out)) == []
