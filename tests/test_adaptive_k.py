"""Adaptive k (--top-p/--min-k/--top-k): per position the fewest entries whose mass reaches P,
checked against the model's own full-vocabulary forward, through both encodings, the trainer's
targets and a run."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

import logitstore
from logitstore.capture.adaptive import truncate_top_p
from logitstore.distributions.targets import build_targets
from logitstore.dump import DumpConfig, dump
from logitstore.errors import ConfigError, FormatError
from logitstore.format.codec import Encoding
from logitstore.tools.verify import verify

from helpers import reference_outputs, store_arrays

K, L, P = 12, 48, 0.8


def expected_n(row_lp, top_p, min_k, k):
    """Brute force: sort the full distribution, the smallest n with mass >= P, clamped to [min_k, k]."""
    p = np.sort(np.exp(row_lp))[::-1]
    n = int(np.searchsorted(np.cumsum(p), top_p) + 1)
    return min(max(n, min_k), k)


def test_truncation_against_brute_force():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 40)) * rng.uniform(0.3, 4, size=(3, 5, 1))
    lp = logits - np.logaddexp.reduce(logits, -1, keepdims=True)
    ids = np.argsort(-lp, -1)[..., :10]
    top = np.take_along_axis(lp, ids, -1).astype(np.float32)
    res = {"ids": ids, "logprobs": top, "tail_mass": (1 - np.exp(top.astype(np.float64)).sum(-1)).astype(np.float32)}
    valid = np.ones((3, 5), bool)
    valid[2, 3:] = False
    out = truncate_top_p(res, 0.7, 2, valid)
    for i in range(3):
        for t in range(5):
            n = int(np.isfinite(out["logprobs"][i, t]).sum())
            if not valid[i, t]:
                assert n == 10 and out["n_entries"][i, t] == 0  # padding untouched
                continue
            assert n == out["n_entries"][i, t] == expected_n(lp[i, t], 0.7, 2, 10)
            kept = np.exp(lp[i, t][ids[i, t][:n]]).sum()
            assert out["tail_mass"][i, t] == pytest.approx(1 - kept, abs=1e-6)
            assert np.isneginf(out["logprobs"][i, t][n:]).all()


@pytest.mark.parametrize("encoding", ["compact", "lossless"])
def test_dump_matches_the_models_own_forward(tmp_path, llama_dir, corpus, encoding):
    packed, ref_lp = reference_outputs(llama_dir, corpus, L)
    out, fixed = tmp_path / "adaptive", tmp_path / "fixed"
    base = dict(teachers=(f"t={llama_dir}",), data=str(corpus), top_k=K, seq_len=L, batch_size=5, encoding=encoding,
                shard_sequences=7, progress=False)
    dump(DumpConfig(out=str(out), top_p=P, min_k=2, **base))
    dump(DumpConfig(out=str(fixed), **base))
    store = logitstore.open(str(out))
    assert store.format_version == 4 and store.teacher("t")["top_p"] == P and store.teacher("t")["min_k"] == 2
    enc = Encoding.from_dict(store.manifest["encoding"])
    got = store_arrays(store, "t")
    counts = []
    for n in range(len(packed.lengths)):
        for t in range(int(packed.lengths[n])):
            row = ref_lp[n, t]
            lps, ids = got["logprobs"][n, t], got["ids"][n, t]
            keep = np.isfinite(lps)
            want = expected_n(row, P, 2, K)
            assert keep.sum() == want, (n, t)
            assert set(ids[keep].tolist()) == set(np.argsort(-row)[:want].tolist())
            bound = 2e-4 + (enc.error_bound(row[ids[keep]][None].astype(np.float32))[0] if encoding == "compact" else 0)
            assert np.abs(lps[keep] - row[ids[keep]]).max() <= bound
            tail = 1 - np.exp(row[ids[keep]]).sum()
            assert abs(got["tail_mass"][n, t] - tail) <= 1e-5 + 1e-3 * tail
            counts.append(want)
    assert 2 <= np.mean(counts) < K - 1, "the data exercises both ends"
    assert verify(str(out)) == []
    a, f = logitstore.open(str(out)), logitstore.open(str(fixed))
    if encoding == "compact":  # absent entries compress to nearly nothing: fewer entries, fewer bytes
        assert a.manifest["total_bytes"] < f.manifest["total_bytes"]


def test_targets_spread_the_tail_over_the_tokens_a_position_does_not_hold():
    V = 30
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(6, V)) * 2
    lp = logits - np.logaddexp.reduce(logits, -1, keepdims=True)
    ids = np.argsort(-lp, -1)[:, :5]
    top = np.take_along_axis(lp, ids, -1).astype(np.float32)
    n = np.array([1, 2, 5, 3, 1, 4])
    top[np.arange(5)[None, :] >= n[:, None]] = -np.inf
    kept = np.where(np.isfinite(top), np.exp(top.astype(np.float64)), 0).sum(1)
    t = build_targets([{"ids": ids, "logprobs": top, "tail_mass": (1 - kept).astype(np.float32), "absent": True}], V)
    for r in range(6):
        sup = t["support"][r][t["valid"][r]]
        assert set(sup.tolist()) == set(ids[r, : n[r]].tolist())
        assert t["n_out"][r] == V - n[r]
        assert t["rest_lp"][0, r] == pytest.approx(np.log((1 - kept[r]) / (V - n[r])), rel=1e-5)


def test_fit_trains_from_an_adaptive_store_and_bad_flags(tmp_path, llama_dir, corpus, tokenizer):
    from trainer.cli import app

    store = tmp_path / "s"
    dump(DumpConfig(teachers=(f"a={llama_dir}",), data=str(corpus), out=str(store), top_k=8, top_p=0.9, seq_len=32,
                    max_tokens=600, shard_sequences=8, progress=False))
    from helpers import tiny_student

    student = tiny_student(tmp_path / "student.json", tokenizer)
    r = CliRunner().invoke(app, ["fit", "--logits", str(store), "--student", str(student), "--out", str(tmp_path / "run"),
                                 "--max-steps", "2", "--batch-size", "4", "-q"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(x["kd_loss"]) for x in rows)
    for kw, needle in [({"top_p": 0.0}, "--top-p"), ({"top_p": 1.5}, "--top-p"), ({"top_p": 0.9, "min_k": 9}, "--min-k")]:
        with pytest.raises(ConfigError, match=needle):
            DumpConfig(teachers=("x",), data="d", out="o", top_k=8, **kw)


def test_version_3_stores_may_not_hold_adaptive_teachers(tmp_path, llama_dir, corpus):
    from logitstore.format.manifest import validate_manifest

    out = tmp_path / "s"
    dump(DumpConfig(teachers=(f"a={llama_dir}",), data=str(corpus), out=str(out), top_k=4, top_p=0.5, seq_len=16,
                    max_tokens=200, progress=False))
    m = json.loads((out / "manifest.json").read_text())
    m["format_version"] = 3
    with pytest.raises(FormatError, match="version-4 field"):
        validate_manifest(m, "manifest.json")


def test_entries_counted_are_the_held_ones_when_min_k_keeps_a_masked_id():
    lp = np.array([[[-0.01, -np.inf, -np.inf], [-1.0, -1.2, -np.inf]]], np.float32)
    res = {"ids": np.array([[[0, 1, 2], [0, 1, 2]]]), "logprobs": lp, "tail_mass": np.zeros((1, 2), np.float32)}
    out = truncate_top_p(res, 0.5, 3, np.ones((1, 2), bool))
    assert out["n_entries"].tolist() == [[1, 2]]  # min_k = 3 keeps slots, but a -inf one holds nothing
