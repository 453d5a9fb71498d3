"""--kd-positions: which positions get KD, the masked loss against a dense reference on exactly
those positions, and a run through the CLI."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from tests.test_losses import N, V, teacher_cache
from logitstore.distributions.fusion import SparseTarget
from trainer.losses import kd_ce_loss
from trainer.positions import choose, parse_kd_positions, student_entropy


def test_parse():
    assert parse_kd_positions("all") == ("all", 1.0)
    assert parse_kd_positions("teacher-entropy:0.25") == ("teacher-entropy", 0.25)
    assert parse_kd_positions("student-entropy:1") == ("student-entropy", 1.0)
    for bad, needle in [("loud:0.5", "expected all"), ("teacher-entropy", "needs a fraction"), ("student-entropy:0", "(0, 1]"),
                        ("teacher-entropy:1.5", "(0, 1]"), ("all:0.5", "expected all")]:
        with pytest.raises(ValueError, match=re_escape(needle)):
            parse_kd_positions(bad)


def re_escape(s):
    import re

    return re.escape(s)


def test_teacher_entropy_picks_the_weighted_most_uncertain_trained_positions():
    rng = np.random.default_rng(0)
    H = torch.from_numpy(rng.uniform(0, 6, size=(2, 40))).float()
    labels = torch.arange(40)
    labels[::7] = -100  # untrained positions are never chosen
    mask, scale = choose("teacher-entropy", 0.3, labels, teacher_entropy=H, weights=[0.75, 0.25])
    score = 0.75 * H[0].numpy() + 0.25 * H[1].numpy()
    trained = np.flatnonzero(labels.numpy() != -100)
    keep = math.ceil(0.3 * trained.size)
    want = set(trained[np.argsort(-score[trained])[:keep]].tolist())
    assert set(np.flatnonzero(mask.numpy()).tolist()) == want
    assert scale == pytest.approx(trained.size / keep)
    assert choose("all", 1.0, labels) == (None, 1.0)
    many = torch.arange(100)  # 0.07 * 100 = 7.000000000000001 in floating point: still 7 positions
    assert int(choose("teacher-entropy", 0.07, many, teacher_entropy=torch.rand(1, 100), weights=[1.0])[0].sum()) == 7


def test_student_entropy_is_the_students_own_and_chunking_does_not_matter():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, V + 3, bias=False)  # a padded student vocabulary: extra columns dropped
    x = torch.randn(N, 8)
    ref_lp = F.log_softmax(head(x)[:, :V].detach().double(), -1)
    ref = -(ref_lp.exp() * ref_lp).sum(-1)
    for chunk in (1, 5, 1024):
        np.testing.assert_allclose(student_entropy(x, head, V, chunk).numpy(), ref.numpy(), rtol=1e-5)
    labels = torch.arange(N) % V
    mask, _ = choose("student-entropy", 0.5, labels, x=x, head=head, vocab_size=V, chunk=4)
    assert set(np.flatnonzero(mask.numpy()).tolist()) == set(torch.topk(ref, math.ceil(0.5 * N)).indices.tolist())


def test_masked_kd_equals_the_loss_on_only_those_positions():
    """KD summed over the chosen positions equals the plain loss run on those rows alone; CE is untouched."""
    from logitstore.distributions.targets import build_targets
    from logitstore.distributions.fusion import fuse

    _, cached = teacher_cache(3, 6)
    b = {k: torch.from_numpy(v) for k, v in build_targets([cached], V).items()}
    tgt = fuse(b["teacher_lp"], b["rest_lp"], b["support"], b["valid"], b["n_out"], temperatures=[2.0], weights=[1.0])
    torch.manual_seed(1)
    x = torch.randn(N, V, requires_grad=True)
    labels = torch.randint(0, V, (N,))
    mask = torch.zeros(N, dtype=torch.bool)
    mask[[0, 3, 4, 11, 20]] = True
    ce, kd, n = kd_ce_loss(x, labels, tgt, temperature=2.0, chunk_positions=4, kd_positions=mask)
    sub = SparseTarget(*(getattr(tgt, f)[mask] for f in ("support", "valid", "lp", "out_lp", "n_out")))
    _, kd_ref, _ = kd_ce_loss(x[mask], labels[mask], sub, temperature=2.0)
    ce_all, kd_all, n_all = kd_ce_loss(x, labels, tgt, temperature=2.0, chunk_positions=4)
    torch.testing.assert_close(kd, kd_ref)
    torch.testing.assert_close(ce, ce_all)
    assert int(n) == int(n_all) == N and float(kd.detach()) < float(kd_all.detach())
    g, = torch.autograd.grad(kd, x)
    assert (g[~mask] == 0).all() and (g[mask].abs().sum(-1) > 0).all()


def test_runs_and_bad_flags(tmp_path, llama_dir, corpus, tokenizer):
    from logitstore.dump import DumpConfig, dump
    from trainer.cli import app

    store = tmp_path / "s"
    dump(DumpConfig(teachers=(f"a={llama_dir}",), data=str(corpus), out=str(store), top_k=8, seq_len=32, max_tokens=600,
                    shard_sequences=8, progress=False))
    from helpers import tiny_student

    student = tiny_student(tmp_path / "student.json", tokenizer)
    first = {}
    for spec in ("all", "teacher-entropy:0.5", "student-entropy:0.5"):
        run = tmp_path / spec.replace(":", "-")
        r = CliRunner().invoke(app, ["fit", "--logits", str(store), "--student", str(student), "--out", str(run), "--max-steps", "2",
                                     "--batch-size", "4", "--kd-positions", spec, "-q"])
        assert r.exit_code == 0, r.output
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        first[spec] = (rows[0]["kd_loss"], rows[0]["ce_loss"])
    assert first["all"][1] == pytest.approx(first["teacher-entropy:0.5"][1], rel=1e-6)  # CE on every position either way
    # an untrained student is near uniform, so KL(teacher || student) ~ log V - H(teacher): the mean KD
    # over the teacher's more uncertain half is the smaller one (the selection points the right way)
    assert first["teacher-entropy:0.5"][0] < first["all"][0] and first["student-entropy:0.5"][0] != first["all"][0]
    r = CliRunner().invoke(app, ["fit", "--logits", str(store), "--student", str(student), "--out", str(tmp_path / "bad"),
                                 "--kd-positions", "teacher-entropy:2", "-q"])
    assert r.exit_code == 2 and "--kd-positions: the fraction must be in (0, 1]" in r.output and "Traceback" not in r.output
