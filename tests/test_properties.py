"""Property tests (hypothesis): codec round trips for arbitrary shapes, fused targets are
distributions independent of teacher order, and the streaming dataset covers every sequence
exactly once for any number of ranks and workers."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from logitstore.format.codec import SCALARS, Encoding
from test_codec import assert_tails_within_documented_bound, documented_bound
from trainer.data import DistillDataset
from logitstore.distributions.fusion import fuse
from logitstore.distributions.targets import build_targets


def topk_rows(seed: int, n: int, vocab: int, k: int, sharp: float):
    """Top-k of n random distributions over vocab (ids in rank order, float32 log-probs)."""
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.choice(vocab, size=k, replace=False) for _ in range(n)]) if n else np.zeros((0, k), np.int64)
    logits = rng.normal(size=(n, vocab if vocab <= 4096 else k + 1)) * sharp
    lse = np.logaddexp.reduce(logits, axis=1, keepdims=True) if n else np.zeros((0, 1))
    lp = np.sort(logits[:, :k] - lse, axis=1)[:, ::-1].astype(np.float32)
    tail = np.clip(1 - np.exp(lp.astype(np.float64)).sum(1), 0, 1).astype(np.float32)
    scalars = {"tail_mass": tail, "gold_logprob": lp[:, 0] if n else np.zeros(0, np.float32),
               "entropy": rng.uniform(0, 8, size=n).astype(np.float32)}
    return ids, lp, scalars


shapes = st.tuples(st.integers(0, 40), st.integers(2, 70000), st.integers(1, 64)).map(lambda t: (t[0], t[1], min(t[2], t[1])))


@settings(max_examples=60, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31), bits=st.integers(2, 8), sharp=st.floats(0.1, 20))
def test_compact_round_trip_within_documented_bound(shape, seed, bits, sharp):
    n, vocab, k = shape
    ids, lp, sc = topk_rows(seed, n, vocab, k, sharp)
    enc = Encoding("compact", value_bits=bits, codebook="uniform")
    arrays = enc.encode(ids, lp, sc, vocab)
    ids2, lp2, sc2 = enc.decode(arrays, vocab)
    assert ids2.shape == ids.shape and lp2.shape == lp.shape
    bound = documented_bound(arrays, bits)  # FORMAT.md's bound, plus float32 rounding only
    for r in range(n):
        order, order2 = np.argsort(ids[r]), np.argsort(ids2[r])
        np.testing.assert_array_equal(ids[r][order], ids2[r][order2])  # the same id set
        assert np.abs(lp[r][order].astype(np.float64) - lp2[r][order2]).max() <= bound[r]
    assert_tails_within_documented_bound(sc2["tail_mass"], sc["tail_mass"])
    for s in ("gold_logprob", "entropy"):  # 1/512 nat plus float32 rounding
        err = np.abs(sc2[s].astype(np.float64) - sc[s])
        assert (err <= 1 / 512 + 2 * np.spacing(np.maximum(1, np.abs(sc[s])))).all(), (s, err.max(initial=0))


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31))
def test_lossless_round_trip_is_exact(shape, seed):
    n, vocab, k = shape
    ids, lp, sc = topk_rows(seed, n, vocab, k, 3.0)
    enc = Encoding("lossless")
    ids2, lp2, sc2 = enc.decode(enc.encode(ids, lp, sc, vocab), vocab)
    np.testing.assert_array_equal(ids2, ids)
    np.testing.assert_array_equal(lp2, lp)
    for s in SCALARS:
        np.testing.assert_array_equal(sc2[s], sc[s])


def _as_dense(target, b, V):
    """Fused target as [N, V] probabilities: support entries, the bucket spread over the rest."""
    N = target.lp.shape[0]
    p = np.zeros((N, V))
    for r in range(N):
        on = b["support"][r][target.valid[r]].numpy()
        assert len(set(on.tolist())) == len(on), "support ids are distinct"
        off = np.setdiff1d(np.arange(V), on)
        assert len(off) == int(target.n_out[r])
        p[r, on] = target.lp[r][target.valid[r]].double().exp().numpy()
        if len(off):
            p[r, off] = float(target.out_lp[r].double().exp()) / len(off)
    return torch.from_numpy(p)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), V=st.integers(2, 60), M=st.integers(1, 4), data=st.data())
def test_fused_targets_sum_to_one_and_ignore_teacher_order(seed, V, M, data):
    ks = data.draw(st.lists(st.integers(1, V), min_size=M, max_size=M))
    temps = data.draw(st.lists(st.floats(0.25, 4.0), min_size=M, max_size=M))
    raw = data.draw(st.lists(st.floats(0.0, 5.0), min_size=M, max_size=M).filter(lambda w: sum(w) > 1e-3))
    weights = [w / sum(raw) for w in raw]
    mode = data.draw(st.sampled_from(["mean-probs", "mean-logits"]))
    perm = data.draw(st.permutations(list(range(M))))
    rng = np.random.default_rng(seed)
    N = 6
    cached = []
    for k in ks:
        logits = rng.normal(size=(N, V)) * rng.uniform(0.5, 6)
        lp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
        ids = np.argsort(-lp, axis=1)[:, :k]
        top = np.take_along_axis(lp, ids, 1)
        cached.append({"ids": ids, "logprobs": top.astype(np.float32),
                       "tail_mass": np.clip(1 - np.exp(top).sum(1), 0, 1).astype(np.float32)})

    def fused(order):
        b = {n: torch.from_numpy(v) for n, v in build_targets([cached[i] for i in order], V).items()}
        t = fuse(b["teacher_lp"], b["rest_lp"], b["support"], b["valid"], b["n_out"], temperatures=[temps[i] for i in order],
                 weights=[weights[i] for i in order], mode=mode)
        return _as_dense(t, b, V)

    p = fused(list(range(M)))
    torch.testing.assert_close(p.sum(1), torch.ones(N, dtype=torch.float64), atol=2e-5, rtol=0)
    assert (p >= 0).all()
    torch.testing.assert_close(fused(perm), p, atol=2e-6, rtol=1e-5)


@pytest.fixture(scope="module")
def coverage_store(tmp_path_factory, llama_dir, corpus):
    from logitstore.dump import DumpConfig, dump

    out = tmp_path_factory.mktemp("prop-store") / "s"
    dump(DumpConfig(teachers=(f"llama={llama_dir}",), data=str(corpus), out=str(out), top_k=3, seq_len=16, max_tokens=500,
                    shard_sequences=5, progress=False))
    return out


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(world=st.integers(1, 4), workers=st.integers(0, 2), batch=st.integers(1, 9), buffer=st.integers(1, 40),
       seed=st.integers(0, 1000), epoch=st.integers(0, 3))
def test_stream_covers_every_sequence_once(coverage_store, world, workers, batch, buffer, seed, epoch):
    seen, steps = [], []
    for rank in range(world):
        ds = DistillDataset([coverage_store], batch_size=batch, seed=seed, shuffle_buffer=buffer, rank=rank, world_size=world,
                            num_workers=workers)
        ds.set_epoch(epoch)
        batches = list(DataLoader(ds, batch_size=None, num_workers=workers))
        steps.append(len(batches))
        for bt in batches:
            seen += bt["index"][bt["weight"] > 0].tolist()
    assert sorted(seen) == list(range(ds.n))
    assert len(set(steps)) == 1
