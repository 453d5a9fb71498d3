"""trainer fit end to end: CLI, exact resume, DDP on CPU (gloo), bad inputs."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from logitstore.dump import DumpConfig, dump
from trainer.cli import app
from trainer.config import FitConfig
from trainer.fit import MetricsLog, fit

runner = CliRunner()


@pytest.fixture(scope="module")
def fit_setup(tmp_path_factory, llama_dir, gpt2_dir, corpus, tokenizer):
    root = tmp_path_factory.mktemp("fit")
    base = dict(data=str(corpus), top_k=8, seq_len=32, max_tokens=1200, shard_sequences=8, progress=False)
    both = root / "both"
    dump(DumpConfig(teachers=(f"a={llama_dir}", f"b={gpt2_dir}"), out=str(both), **base))
    only_b = root / "only_b"
    dump(DumpConfig(teachers=(f"b={gpt2_dir}",), out=str(only_b), **base))
    from conftest import save_llama

    only_c = root / "only_c"  # a third, different teacher on the same data
    dump(DumpConfig(teachers=(f"c={save_llama(root / 'teacher-c', tokenizer, seed=7)}",), out=str(only_c), **base))
    swapped = root / "swapped"  # the same two teachers as "both", listed the other way round
    dump(DumpConfig(teachers=(f"b={gpt2_dir}", f"a={llama_dir}"), out=str(swapped), **base))
    student = root / "student.json"
    student.write_text(json.dumps({"model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
                                   "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
                                   "max_position_embeddings": 64, "tie_word_embeddings": False}))
    small = root / "small.json"
    small.write_text(json.dumps({**json.loads(student.read_text()), "vocab_size": len(tokenizer) - 10}))
    return {"root": root, "both": both, "only_b": only_b, "only_c": only_c, "swapped": swapped, "student": student, "small": small}


def rows(run, eval_rows=False):
    out = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in out if bool(r.get("eval")) == eval_rows]


def test_cli_end_to_end(fit_setup):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = fit_setup["root"] / "cli-run"
    r = runner.invoke(app, ["fit", "--logits", str(fit_setup["both"]), "--student", str(fit_setup["student"]), "--out", str(run),
                            "--max-steps", "6", "--batch-size", "4", "--eval-logits", str(fit_setup["both"]), "--eval-every", "3",
                            "--checkpoint-every", "3", "--weights", "0.7,0.3", "--temperature", "2.0", "--fuse", "mean-logits",
                            "--loss", "jsd", "-q", "warmup_steps=2", "temperature_schedule=cosine", "temperature_final=1.0"])
    assert r.exit_code == 0, r.output
    train = rows(run)
    assert [x["step"] for x in train] == list(range(1, 7))
    for key in ("step", "loss", "kd_loss", "ce_loss", "lr", "temperature", "tokens"):
        assert all(key in x for x in train)
    assert train[0]["temperature"] == 2.0 and train[-1]["temperature"] < 2.0  # cosine schedule
    ev = rows(run, eval_rows=True)
    assert [x["step"] for x in ev] == [3, 6] and set(ev[0]["top1_agreement"]) == {"a", "b", "fused"}
    cfg = (run / "config.yaml").read_text()
    assert "warmup_steps: 2" in cfg and "loss: jsd" in cfg
    assert (run / "curves.png").stat().st_size > 1000
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    tok = AutoTokenizer.from_pretrained(run / "final")
    assert model.config.num_hidden_layers == 2 and len(tok) > 0
    assert (run / "final" / "model.safetensors").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]


def test_resume_after_crash_reproduces_the_trajectory(fit_setup, monkeypatch):
    common = dict(logits=(str(fit_setup["both"]),), student=str(fit_setup["student"]), batch_size=3, max_steps=9, num_workers=1,
                  progress=False, seed=5, lr=1e-3)
    ref = fit_setup["root"] / "ref"
    fit(FitConfig(out=str(ref), checkpoint_every=100, **common))

    run = fit_setup["root"] / "crashed"
    real = MetricsLog.write

    def crash_after_5(self, row):
        real(self, row)
        if row.get("step") == 5 and not row.get("eval"):
            raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(MetricsLog, "write", crash_after_5)
    with pytest.raises(KeyboardInterrupt):
        fit(FitConfig(out=str(run), checkpoint_every=4, **common))
    monkeypatch.setattr(MetricsLog, "write", real)
    fit(FitConfig(out=str(run), checkpoint_every=4, resume=True, **common))
    a, b = rows(ref), rows(run)
    assert [x["step"] for x in b] == list(range(1, 10)), "rows after the checkpoint were replaced, not duplicated"
    for x, y in zip(a, b):
        assert x["loss"] == y["loss"] and x["lr"] == y["lr"], (x["step"], x["loss"], y["loss"])


# warm-up, cosine decay and a temperature schedule: the logged lr and temperature of every step must
# not depend on the number of processes (accelerate's scheduler wrapper steps once per process)
SCHEDULED = ["--temperature", "2.0", "--temperature-schedule", "linear", "temperature_final=1.0", "warmup_steps=2"]


def assert_same_schedule(a, b):
    assert [x["lr"] for x in a] == [x["lr"] for x in b]
    assert [x["temperature"] for x in a] == [x["temperature"] for x in b]
    assert a[0]["lr"] < a[1]["lr"] > a[-1]["lr"] and a[0]["temperature"] > a[-1]["temperature"]


def test_ddp_two_processes_match_one(fit_setup):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # with the same streams (a multiple of the world size) the steps do not depend on the number of ranks
    common = ["--logits", str(fit_setup["both"]), "--student", str(fit_setup["student"]), "--max-steps", "4", "--num-workers", "0",
              "--device", "cpu", "-q", "--weights", "0.6,0.4", "--streams", "2", *SCHEDULED]
    one, two = fit_setup["root"] / "one", fit_setup["root"] / "two"
    subprocess.run([sys.executable, "-m", "trainer", "fit", *common, "--out", str(one), "--batch-size", "4"], check=True, env=env,
                   capture_output=True)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "trainer",
                        "fit", *common, "--out", str(two), "--batch-size", "2"], env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    a, b = rows(one), rows(two)
    assert [x["tokens"] for x in a] == [x["tokens"] for x in b]  # the same sequences in every step
    assert_same_schedule(a, b)
    assert a[0]["loss"] == pytest.approx(b[0]["loss"], rel=1e-6)  # same init, same global batch
    assert a[0]["grad_norm"] == pytest.approx(b[0]["grad_norm"], rel=1e-5)  # gradients averaged, not summed, over ranks
    assert a[1]["loss"] == pytest.approx(b[1]["loss"], rel=1e-5)  # one synchronised update later
    for x, y in zip(a, b):  # Adam's first steps amplify all-reduce rounding a little
        assert x["loss"] == pytest.approx(y["loss"], rel=5e-3)


@pytest.mark.parametrize("extra,needle", [
    (["--weights", "0.5"], "1 weight(s) for 2 teacher(s)"),
    (["--weights", "1,-1"], "must be >= 0"),
    (["--weights", "0,0"], "sum to 0"),
    (["--loss", "mse"], "--loss"),
    (["--alpha", "1.5"], "--alpha"),
    (["nonsense_key=3"], "unknown keys"),
    (["--fsdp"], "--fsdp: shards the student across processes; launch with torchrun"),
    (["--prefetch", "-1"], "--prefetch: expected >= 0"),
])
def test_bad_fit_inputs(fit_setup, extra, needle):
    run = fit_setup["root"] / "bad"
    r = runner.invoke(app, ["fit", "--logits", str(fit_setup["both"]), "--student", str(fit_setup["student"]), "--out", str(run),
                            "--max-steps", "1", "-q", *extra])
    assert r.exit_code == 2, r.output
    assert needle in r.output and "Traceback" not in r.output


def test_student_vocab_too_small(fit_setup):
    r = runner.invoke(app, ["fit", "--logits", str(fit_setup["both"]), "--student", str(fit_setup["small"]), "--out",
                            str(fit_setup["root"] / "small-run"), "--max-steps", "1", "-q"])
    assert r.exit_code == 2 and "smaller than the store's" in r.output


def test_two_stores_joined_and_mismatched_refused(fit_setup, tmp_path, llama_dir, corpus):
    run = tmp_path / "joined"
    r = runner.invoke(app, ["fit", "--logits", str(fit_setup["both"]), "--logits", str(fit_setup["only_c"]), "--student",
                            str(fit_setup["student"]), "--out", str(run), "--max-steps", "2", "--weights", "1,1,2", "-q"])
    assert r.exit_code == 0, r.output
    # the same teacher twice would be fused as two teachers with twice the weight
    r = runner.invoke(app, ["fit", "--logits", str(fit_setup["both"]), "--logits", str(fit_setup["only_b"]), "--student",
                            str(fit_setup["student"]), "--out", str(tmp_path / "dup"), "--max-steps", "1", "-q"])
    assert r.exit_code == 2 and "same model as teacher 'b'" in r.output and r.output.count("\n") == 1
    other = tmp_path / "other-seq"
    dump(DumpConfig(teachers=(str(llama_dir),), data=str(corpus), out=str(other), top_k=8, seq_len=24, max_tokens=600, progress=False))
    r = runner.invoke(app, ["fit", "--logits", str(fit_setup["both"]), "--logits", str(other), "--student", str(fit_setup["student"]),
                            "--out", str(tmp_path / "x"), "--max-steps", "1", "-q"])
    assert r.exit_code == 2 and "seq_len" in r.output


def test_existing_run_needs_resume(fit_setup):
    run = fit_setup["root"] / "twice"
    args = ["fit", "--logits", str(fit_setup["both"]), "--student", str(fit_setup["student"]), "--out", str(run), "--max-steps", "1", "-q"]
    assert runner.invoke(app, args).exit_code == 0
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "--resume" in r.output


def test_grad_accum_equals_larger_batch(fit_setup):
    common = dict(logits=(str(fit_setup["both"]),), student=str(fit_setup["student"]), max_steps=3, num_workers=0, progress=False,
                  seed=2, grad_clip=0.0)
    big, acc = fit_setup["root"] / "big", fit_setup["root"] / "acc"
    fit(FitConfig(out=str(big), batch_size=4, **common))
    fit(FitConfig(out=str(acc), batch_size=2, grad_accum=2, **common))
    a, b = rows(big), rows(acc)
    assert [x["tokens"] for x in a] == [x["tokens"] for x in b]
    for x, y in zip(a, b):  # the loss is normalised by the step's total positions either way
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)


def test_temperature_and_lr_schedules():
    from trainer.schedules import lr_factor, temperature_at

    assert temperature_at(0, 10, "constant", 2.0, 1.0, 0.5) == 2.0
    assert temperature_at(5, 10, "linear", 3.0, 1.0, 0.5) == pytest.approx(2.0)
    assert temperature_at(0, 10, "cosine", 3.0, 1.0, 0.5) == pytest.approx(3.0)
    assert temperature_at(10, 10, "cosine", 3.0, 1.0, 0.5) == pytest.approx(1.0)
    assert temperature_at(5, 10, "exp", 4.0, 1.0, 0.25) == pytest.approx(4.0 * 0.25**0.5)
    # the stepwise schedule T = 3.0 * 0.9 ** (step // 1000)
    assert [temperature_at(s, 10**4, "step", 3.0, 1.0, 0.9, 1000) for s in (0, 999, 1000, 2999, 3000)] == \
        pytest.approx([3.0, 3.0, 2.7, 2.43, 3.0 * 0.9**3])
    assert temperature_at(10**6, 10**7, "step", 3.0, 1.0, 0.9, 1000) == 1.0  # floored at the final temperature
    assert lr_factor(0, 100, 10, 0.1) == pytest.approx(0.1) and lr_factor(9, 100, 10, 0.1) == pytest.approx(1.0)
    assert lr_factor(100, 100, 10, 0.1) == pytest.approx(0.1)


def test_fsdp_two_processes_match_one_and_resume(fit_setup):
    """FSDP2 on 2 CPU processes (gloo): the same losses as one unsharded process on the same global
    batch, a full final model, and an exact resume from its sharded checkpoint."""
    from transformers import AutoModelForCausalLM

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # with the same streams (a multiple of the world size) the steps do not depend on the number of ranks
    common = ["--logits", str(fit_setup["both"]), "--student", str(fit_setup["student"]), "--max-steps", "4", "--num-workers", "0",
              "--device", "cpu", "-q", "--weights", "0.6,0.4", "--streams", "2", *SCHEDULED]
    one, two, resumed = (fit_setup["root"] / n for n in ("fsdp-ref", "fsdp", "fsdp-resumed"))
    subprocess.run([sys.executable, "-m", "trainer", "fit", *common, "--out", str(one), "--batch-size", "4"], check=True, env=env,
                   capture_output=True)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "trainer", "fit", *common,
              "--batch-size", "2", "--fsdp"]
    p = subprocess.run([*launch, "--out", str(two)], env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = rows(one), rows(two)
    assert [x["tokens"] for x in a] == [x["tokens"] for x in b]
    assert_same_schedule(a, b)
    assert a[0]["loss"] == pytest.approx(b[0]["loss"], rel=1e-6)
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=5e-3)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=5e-3)
    ref = AutoModelForCausalLM.from_pretrained(one / "final")
    sharded = AutoModelForCausalLM.from_pretrained(two / "final")
    for (n1, p1), (n2, p2) in zip(ref.state_dict().items(), sharded.state_dict().items()):
        assert n1 == n2 and p1.shape == p2.shape
        assert torch.allclose(p1, p2, atol=1e-4), n1
    # checkpoints at steps 2 and 4; drop the last, as if the run had died after step 2; resume
    p = subprocess.run([*launch, "--out", str(resumed), "--checkpoint-every", "2"], env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    shards = sorted(p.name for p in (resumed / "checkpoints" / "step-00000002" / "sharded").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]  # each rank wrote its own shard of model and optimizer
    shutil.rmtree(resumed / "checkpoints" / "step-00000004")
    p = subprocess.run([*launch, "--out", str(resumed), "--resume"], env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    c = rows(resumed)
    assert [x["step"] for x in c] == [1, 2, 3, 4]
    for x, y in zip(b, c):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6)
