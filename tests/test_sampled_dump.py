"""--targets sampled|both: the stored draws against the model's own forward, the trainer's estimate
against the full distribution over many draws, and a run."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import logitstore
from logitstore.capture.sampled_targets import Sampler
from logitstore.capture.teacher import topk_stats
from logitstore.distributions.fusion import fuse
from logitstore.distributions.targets import build_targets
from logitstore.dump import DumpConfig, dump

from helpers import reference_outputs, store_arrays

K, S, L = 4, 8, 32


@pytest.mark.parametrize("encoding", ["compact", "lossless"])
def test_both_mode_holds_the_exact_top_k_and_draws_from_the_rest(tmp_path, llama_dir, corpus, encoding):
    packed, ref = reference_outputs(llama_dir, corpus, L, max_tokens=400)
    cfg = dict(teachers=(f"t={llama_dir}",), data=str(corpus), top_k=K, seq_len=L, max_tokens=400, targets="both", samples=S,
               encoding=encoding, shard_sequences=5, progress=False)
    dump(DumpConfig(out=str(tmp_path / "a"), **cfg))
    dump(DumpConfig(out=str(tmp_path / "b"), **cfg))
    st = logitstore.open(str(tmp_path / "a"))
    assert st.format_version == 4 and st.teacher("t")["k"] == K + S
    assert st.teacher("t")["sampled"] == {"mode": "both", "samples": S, "proposal_temperature": 1.0, "top_k": K}
    got, again = store_arrays(st, "t"), store_arrays(logitstore.open(str(tmp_path / "b")), "t")
    for key in ("ids", "counts"):  # draws are seeded by the windows' tokens: a second dump writes the same
        np.testing.assert_array_equal(np.where(np.isneginf(got["logprobs"]), -1, got[key]),
                                      np.where(np.isneginf(again["logprobs"]), -1, again[key]))
    tol = 2e-4 + (0.0625 if encoding == "compact" else 0)
    drawn_any = 0
    for n in range(len(packed.lengths)):
        for t in range(int(packed.lengths[n])):
            row = ref[n, t]
            ids, lp, c = got["ids"][n, t], got["logprobs"][n, t], got["counts"][n, t]
            held = ~np.isneginf(lp)
            top = set(np.argsort(-row)[:K].tolist())
            assert set(ids[held & (c == 0)].tolist()) == top
            drawn = ids[held & (c > 0)]
            assert not set(drawn.tolist()) & top and len(set(drawn.tolist())) == len(drawn)
            assert c.sum() == S and (c[~held] == 0).all()
            assert np.abs(lp[held] - row[ids[held]]).max() <= tol
            rest = np.delete(row, list(top))
            assert got["log_z"][n, t] == pytest.approx(np.logaddexp.reduce(rest), abs=1e-4)  # tau = 1: log tail mass
            tail = 1 - np.exp(row[ids[held]]).sum()
            assert abs(got["tail_mass"][n, t] - tail) <= 1e-5 + 1e-3 * tail
            drawn_any += len(drawn)
    assert drawn_any > 0


@pytest.mark.parametrize("mode,tau", [("both", 1.0), ("sampled", 1.0), ("sampled", 2.0)])
def test_the_trainers_target_is_the_teacher_on_average(mode, tau):
    """Through the dump's sampler and the trainer's own build_targets + fuse: the mean fused target
    over many draws equals the full distribution within Monte-Carlo error at tau = 1 (the weights sum
    to 1 exactly); otherwise the trainer's per-position normalisation makes it the self-normalised
    estimator, whose bias shrinks with S (trainer/sampled.py says so)."""
    torch.manual_seed(0)
    V, N, draws = 60, 5, 3000
    logits = torch.randn(N, V) * 2.5
    p = torch.softmax(logits.double(), -1).numpy()
    samp = Sampler(mode, S, tau)
    st0 = topk_stats(logits, K, V, None)
    acc, sq = np.zeros((N, V)), np.zeros((N, V))
    for d in range(draws):
        st = samp(logits, dict(st0), V, torch.Generator().manual_seed(d))
        t = {k: v.numpy() for k, v in st.items() if k in ("ids", "logprobs", "tail_mass", "counts", "log_z")}
        t["proposal_temperature"] = tau
        b = {k: torch.from_numpy(v) for k, v in build_targets([t], V).items()}
        tgt = fuse(b["teacher_lp"], b["rest_lp"], b["support"], b["valid"], b["n_out"], temperatures=[1.0], weights=[1.0])
        q = np.zeros((N, V))
        for r in range(N):
            sup = b["support"][r][b["valid"][r]].numpy()
            q[r, sup] = np.exp(tgt.lp[r][b["valid"][r]].numpy())
        assert np.isneginf(tgt.out_lp).all()  # nothing off the held entries
        acc += q
        sq += q * q
    mean = acc / draws
    # the larger of the sample and the exact standard error (a rare id never drawn has sample spread 0):
    # at tau = 1 a drawn id's weight is P_A * c / S with c ~ Binomial(S, p / P_A)
    mass = np.ones(N) if mode == "sampled" else 1 - np.take_along_axis(p, st0["ids"].numpy(), 1).sum(1)
    pi = p / mass[:, None]
    if mode == "both":
        np.put_along_axis(pi, st0["ids"].numpy(), 0.0, 1)
    exact = np.sqrt(mass[:, None] ** 2 * pi * (1 - pi) / S / draws)
    se = np.maximum(np.sqrt(np.maximum(sq / draws - mean**2, 0) / draws), exact)
    z = np.abs(mean - p) / (se + 1e-6)  # exact top-k entries have no spread: float32 rounding only
    if tau == 1.0:
        assert z.max() < 5, z.max()
        np.testing.assert_allclose(acc.sum(1) / draws, 1.0, atol=1e-6)  # weights sum to 1 exactly
    else:  # self-normalised: biased by O(1/S) (up to ~0.05 in probability at S = 8 here), consistent as S grows
        bias8 = np.abs(mean - p).max()
        big = Sampler(mode, 64, tau)
        acc64 = np.zeros((N, V))
        for d in range(400):
            st = big(logits, dict(st0), V, torch.Generator().manual_seed(d))
            t = {k: v.numpy() for k, v in st.items() if k in ("ids", "logprobs", "tail_mass", "counts", "log_z")}
            b = {k: torch.from_numpy(v) for k, v in build_targets([{**t, "proposal_temperature": tau}], V).items()}
            tgt = fuse(b["teacher_lp"], b["rest_lp"], b["support"], b["valid"], b["n_out"], temperatures=[1.0], weights=[1.0])
            for r in range(N):
                acc64[r, b["support"][r][b["valid"][r]].numpy()] += np.exp(tgt.lp[r][b["valid"][r]].numpy())
        bias64 = np.abs(acc64 / 400 - p).max()
        assert bias64 < bias8 / 3, (bias8, bias64)


def test_fit_on_sampled_targets_and_what_it_refuses(tmp_path, llama_dir, corpus, tokenizer):
    from trainer.cli import app

    store = tmp_path / "s"
    dump(DumpConfig(teachers=(f"a={llama_dir}",), data=str(corpus), out=str(store), top_k=4, targets="both", samples=6, seq_len=32,
                    max_tokens=600, shard_sequences=8, progress=False))
    from helpers import tiny_student

    student = tiny_student(tmp_path / "student.json", tokenizer)
    base = ["fit", "--logits", str(store), "--student", str(student), "--max-steps", "2", "--batch-size", "4", "-q"]
    r = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(x["kd_loss"]) and x["kd_loss"] > 0 for x in rows)
    for extra, needle in [(["--loss", "rkl"], "--loss rkl: not linear"), (["--temperature", "2"], "--temperature: the samples"),
                          (["--tail", "renorm"], "--tail renorm")]:
        r = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "bad"), *extra])
        assert r.exit_code == 2 and needle in r.output and "Traceback" not in r.output, r.output


def test_the_tools_know_sampled_and_adaptive_stores(tmp_path, llama_dir, corpus):
    """verify is clean, export carries counts and log_z, fuse refuses, merge refuses stores of other targets."""
    import pyarrow.parquet as pq

    from logitstore.errors import ConfigError
    from logitstore.tools.export import export
    from logitstore.tools.fuse import fuse_store
    from logitstore.tools.merge import merge
    from logitstore.tools.verify import verify

    base = dict(teachers=(f"a={llama_dir}",), data=str(corpus), top_k=4, seq_len=24, progress=False)
    dump(DumpConfig(out=str(tmp_path / "s1"), max_tokens=200, targets="both", samples=5, **base))
    dump(DumpConfig(out=str(tmp_path / "p1"), max_tokens=200, **base))  # the same data, plain top-k
    dump(DumpConfig(out=str(tmp_path / "p2"), max_tokens=400, **base))
    assert verify(str(tmp_path / "s1")) == []
    export(str(tmp_path / "s1"), str(tmp_path / "x"), progress=False)
    cols = set(pq.read_schema(next((tmp_path / "x").rglob("*.parquet"))).names)
    assert {"a.counts", "a.log_z", "a.ids"} <= cols
    with pytest.raises(ConfigError, match="sampled targets"):
        fuse_store([str(tmp_path / "s1"), str(tmp_path / "p1")], str(tmp_path / "f"), teachers=["a", "a"])
    # both version 3+ (document starts) with 9 entries per position, so only the teachers' targets differ
    dump(DumpConfig(out=str(tmp_path / "p3"), max_tokens=400, doc_boundaries="on", **{**base, "top_k": 9}))  # 9 = 4 + 5
    dump(DumpConfig(out=str(tmp_path / "s3"), max_tokens=200, doc_boundaries="on", targets="both", samples=5, **base))
    for pair in (("p3", "s3"), ("s3", "p3")):
        with pytest.raises(ConfigError, match="only stores of the same targets can be merged"):
            merge([str(tmp_path / pair[0]), str(tmp_path / pair[1])], str(tmp_path / "m"), progress=False)


def test_minus_inf_is_absent_only_for_teachers_that_say_so():
    """A plain lossless store's -inf is refused on read, and build_targets keeps a plain teacher's
    -inf entry on the support (probability 0) rather than moving the id into the tail."""
    from logitstore.errors import FormatError
    from logitstore.format.codec import Encoding

    enc = Encoding("lossless")
    lp = np.array([[-0.1, -np.inf]], np.float32)
    arrays = enc.encode(np.array([[0, 1]]), lp, {"tail_mass": np.array([0.9], np.float32), "gold_logprob": lp[:, 0],
                                                "entropy": np.ones(1, np.float32)}, 5)
    with pytest.raises(FormatError, match="logprobs"):
        enc.decode(arrays, 5)
    assert np.isneginf(enc.decode(arrays, 5, absent=True)[1][0, 1])
    t = {"ids": np.array([[0, 1]]), "logprobs": lp, "tail_mass": np.array([0.9], np.float32)}
    plain, ragged = build_targets([t], 5), build_targets([{**t, "absent": True}], 5)
    assert plain["valid"].sum() == 2 and ragged["valid"].sum() == 1


def test_the_sampler_works_a_bounded_number_of_rows_at_a_time(monkeypatch):
    """Above SAMPLE_BYTES per [rows, V] copy the rows are drawn in blocks: the same fields, shapes and
    per-row invariants as one block."""
    import logitstore.capture.sampled_targets as smod

    torch.manual_seed(3)
    V, N = 50, 37
    logits = torch.randn(N, V) * 2
    st = topk_stats(logits, K, V, None)
    whole = Sampler("both", S)(logits, dict(st), V, torch.Generator().manual_seed(0))
    monkeypatch.setattr(smod, "SAMPLE_BYTES", 4 * V * 5)  # 5 rows at a time: 8 blocks, the last one short
    blocks = Sampler("both", S)(logits, dict(st), V, torch.Generator().manual_seed(0))
    assert whole.keys() == blocks.keys()
    for key in whole:
        assert whole[key].shape == blocks[key].shape, key
    assert (blocks["counts"].sum(-1) == S).all()
    torch.testing.assert_close(blocks["log_z"], whole["log_z"])  # deterministic per row
    torch.testing.assert_close(blocks["ids"][:, :K], st["ids"])  # the exact top-k first
