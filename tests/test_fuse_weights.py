"""Per-position teacher weights (--fuse-weights entropy|gold) against a brute-force fusion of full
distributions, and through the trainer's data path to a run."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from logitstore.distributions.fusion import fuse, position_weights
from logitstore.distributions.targets import build_targets
from tests.test_fusion import V, brute_force, dense_from_cache, make_teachers


def scalars(full, gold):
    """Exact full-vocabulary entropy and gold log-prob of each teacher, [M, N]."""
    H = np.stack([-(np.exp(lp) * lp).sum(1) for lp in full])
    G = np.stack([np.take_along_axis(lp, gold[:, None], 1)[:, 0] for lp in full])
    return H, G


def brute_weights(weighting, base, H, G, tau):
    score = -H if weighting == "entropy" else G
    with np.errstate(divide="ignore"):
        a = np.log(np.asarray(base))[:, None] + score / tau
    a -= a.max(0, keepdims=True)
    w = np.exp(a)
    return w / w.sum(0, keepdims=True)


def brute_fusion(dense, temps, W, mode):
    """Position by position: the fixed-weight brute force with that position's weights."""
    out = np.zeros_like(dense[0])
    for t in range(dense[0].shape[0]):
        out[t] = brute_force([d[t:t + 1] for d in dense], temps, list(W[:, t]), mode)[0]
    return out


@pytest.mark.parametrize("weighting", ["entropy", "gold"])
@pytest.mark.parametrize("mode", ["mean-probs", "mean-logits"])
@pytest.mark.parametrize("ks,temps,tau", [([V, V, V], [1.0, 1.0, 1.0], 1.0), ([6, 11, 9], [2.0, 1.0, 0.5], 0.3)])
def test_matches_brute_force(weighting, mode, ks, temps, tau):
    rng = np.random.default_rng(len(weighting) * 7 + len(mode) + int(tau * 10))
    N = 30
    full, cached = make_teachers(rng, N, ks, sharp=2.5)
    gold = rng.integers(0, V, size=N)
    H, G = scalars(full, gold)
    base = [0.5, 0.3, 0.2]
    W = brute_weights(weighting, base, H, G, tau)
    assert W.std(1).max() > 0.05, "the weights vary by position, so a fixed-weight fusion would fail"
    b = {k: torch.from_numpy(v) for k, v in build_targets(cached, V).items()}
    pw = position_weights(weighting, base, torch.from_numpy(H).float(), torch.from_numpy(G).float(), tau)
    np.testing.assert_allclose(pw.numpy(), W, rtol=1e-4, atol=1e-6)
    t = fuse(b["teacher_lp"], b["rest_lp"], b["support"], b["valid"], b["n_out"], temperatures=temps, weights=base, mode=mode,
             position_weights=pw)
    dense = [dense_from_cache(c, k) for c, k in zip(cached, ks)]  # = the full distributions when k = V
    want = brute_fusion(dense, temps, W, mode)
    got = np.zeros((N, V))
    sup, valid, lp = b["support"].numpy(), b["valid"].numpy(), t.lp.numpy()
    for r in range(N):
        off = np.ones(V, bool)
        off[sup[r][valid[r]]] = False
        got[r, sup[r][valid[r]]] = np.exp(lp[r][valid[r]])
        if off.any():  # off the support every teacher is even, so the fusion is even there too
            got[r, off] = np.exp(t.out_lp[r].item()) / off.sum()
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6)


def test_limits_of_tau_and_zero_weights():
    rng = np.random.default_rng(5)
    H = torch.from_numpy(rng.uniform(0.1, 5, size=(3, 50))).float()
    G = torch.from_numpy(-rng.uniform(0.1, 8, size=(3, 50))).float()
    base = [0.6, 0.4, 0.0]
    far = position_weights("entropy", base, H, G, 1e6)
    np.testing.assert_allclose(far.numpy(), np.array(base)[:, None].repeat(50, 1), atol=1e-5)  # tau -> inf: fixed
    near = position_weights("gold", [0.5, 0.5, 0.0], H, G, 1e-3)
    assert torch.equal(near.argmax(0), G[:2].argmax(0))  # tau -> 0: the likelier teacher of the two
    assert (position_weights("entropy", base, H, G, 0.5)[2] == 0).all()  # weight 0 stays 0
    assert position_weights("fixed", base, None, None) is None
    with pytest.raises(ValueError, match="fuse-weight-temperature"):
        position_weights("gold", base, H, G, 0.0)


def test_batches_carry_the_stored_scalars_and_a_run_uses_them(tmp_path, llama_dir, gpt2_dir, corpus, tokenizer):
    import logitstore
    from logitstore.dump import DumpConfig, dump
    from trainer.cli import app
    from trainer.config import FitConfig
    from trainer.data import DistillDataset

    store = tmp_path / "both"
    dump(DumpConfig(teachers=(f"a={llama_dir}", f"b={gpt2_dir}"), data=str(corpus), out=str(store), top_k=8, seq_len=32,
                    max_tokens=600, shard_sequences=8, progress=False))
    ds = DistillDataset([str(store)], batch_size=2, shuffle=False)
    batch = ds.make_batch(np.array([0, 1]), np.ones(2, np.float32))
    sh = logitstore.open(str(store)).load_shard(0)
    for key in ("entropy", "gold_logprob"):
        got = batch[f"teacher_{key}"].numpy()
        assert got.shape == (2, 2 * 32)
        for m, name in enumerate(("a", "b")):
            np.testing.assert_array_equal(got[m], sh["teachers"][name][key][:2].reshape(-1))
    from helpers import tiny_student

    student = tiny_student(tmp_path / "student.json", tokenizer)
    runs = {}
    for weighting in ("fixed", "entropy", "gold"):
        run = tmp_path / weighting
        r = CliRunner().invoke(app, ["fit", "--logits", str(store), "--student", str(student), "--out", str(run), "--max-steps", "2",
                                     "--batch-size", "4", "--fuse-weights", weighting, "--fuse-weight-temperature", "0.5", "-q"])
        assert r.exit_code == 0, r.output
        runs[weighting] = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert "fuse_weights: gold" in (tmp_path / "gold" / "config.yaml").read_text()
    first = {w: rs[0]["kd_loss"] for w, rs in runs.items()}
    assert len(set(first.values())) == 3, first  # the same student and batch, three different targets
    assert FitConfig(logits=(str(store),), student="x", out="y", fuse_weights="entropy").fuse_weights == "entropy"


@pytest.mark.parametrize("extra,needle", [(["--fuse-weights", "loudest"], "--fuse-weights: expected one of"),
                                          (["--fuse-weight-temperature", "0"], "--fuse-weight-temperature: expected > 0")])
def test_bad_flags(tmp_path, extra, needle):
    from trainer.cli import app

    r = CliRunner().invoke(app, ["fit", "--logits", str(tmp_path), "--student", "x", "--out", str(tmp_path / "r"), "-q", *extra])
    assert r.exit_code == 2, r.output
    assert needle in r.output and "Traceback" not in r.output
