"""Run directories and resume as users meet them: dropout students, several workers, gradient
accumulation across an epoch boundary, runs that died before a checkpoint, SIGINT/SIGTERM,
changed settings on --resume, and the mistakes that must end in one line."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from logitstore.dump import DumpConfig, dump
from logitstore.errors import ConfigError, LogitStoreError
from trainer.cli import app
from trainer.config import FitConfig
from trainer.fit import MetricsLog, fit

runner = CliRunner()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, llama_dir, gpt2_dir, corpus, tokenizer):
    root = tmp_path_factory.mktemp("runs")
    base = dict(data=str(corpus), top_k=8, seq_len=32, max_tokens=900, shard_sequences=8, progress=False)
    store = root / "store"
    dump(DumpConfig(teachers=(f"a={llama_dir}", f"b={gpt2_dir}"), out=str(store), **base))
    swapped = root / "swapped"
    dump(DumpConfig(teachers=(f"b={gpt2_dir}", f"a={llama_dir}"), out=str(swapped), **base))
    only_a = root / "only_a"
    dump(DumpConfig(teachers=(f"a={llama_dir}",), out=str(only_a), **base))
    # a GPT-2 student: dropout 0.1 everywhere, so resume is exact only if the RNG stream is
    dropout = root / "gpt2-dropout.json"
    dropout.write_text(json.dumps({"model_type": "gpt2", "vocab_size": len(tokenizer), "n_embd": 32, "n_layer": 2, "n_head": 2,
                                   "n_positions": 64, "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1}))
    llama = root / "llama.json"
    llama.write_text(json.dumps({"model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
                                 "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
                                 "max_position_embeddings": 64}))
    return {"root": root, "store": store, "swapped": swapped, "only_a": only_a, "dropout": dropout, "llama": llama}


def rows(run, eval_rows=False):
    out = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in out if bool(r.get("eval")) == eval_rows]


def crash_at(monkeypatch, step, exc=KeyboardInterrupt("simulated crash")):
    real = MetricsLog.write

    def write(self, row):
        real(self, row)
        if row.get("step") == step and not row.get("eval"):
            raise exc

    monkeypatch.setattr(MetricsLog, "write", write)
    return real


def test_resume_is_exact_with_dropout_workers_accumulation_and_a_new_epoch(setup, monkeypatch):
    n_seq = 28  # about 900 tokens / 32; one step takes 3 x 2 sequences: ~5 steps per epoch
    common = dict(logits=(str(setup["store"]),), student=str(setup["dropout"]), batch_size=3, grad_accum=2, max_steps=9,
                  num_workers=2, progress=False, seed=11, lr=2e-3, warmup_steps=2)
    ref = setup["root"] / "dropout-ref"
    fit(FitConfig(out=str(ref), **common))
    run = setup["root"] / "dropout-crashed"
    real = crash_at(monkeypatch, 7)
    with pytest.raises(KeyboardInterrupt):
        fit(FitConfig(out=str(run), checkpoint_every=6, **common))
    monkeypatch.setattr(MetricsLog, "write", real)
    fit(FitConfig(out=str(run), checkpoint_every=6, resume=True, **common))
    a, b = rows(ref), rows(run)
    assert a[-1]["epoch"] >= 1 and any(r["epoch"] == 1 for r in a if r["step"] > 6), "the resumed part must cross an epoch"
    assert [x["step"] for x in b] == list(range(1, 10))
    for x, y in zip(a, b):
        assert (x["loss"], x["lr"], x["tokens"]) == (y["loss"], y["lr"], y["tokens"]), (x["step"], x["loss"], y["loss"])
    assert n_seq > 0


def test_a_run_that_died_before_its_first_checkpoint_can_be_run_again(setup, monkeypatch):
    run = setup["root"] / "died-early"
    common = dict(logits=(str(setup["store"]),), student=str(setup["llama"]), out=str(run), batch_size=2, max_steps=3,
                  num_workers=0, progress=False)
    real = crash_at(monkeypatch, 1, RuntimeError("killed"))
    with pytest.raises(RuntimeError):
        fit(FitConfig(**common))
    monkeypatch.setattr(MetricsLog, "write", real)
    assert (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()
    fit(FitConfig(**common))  # nothing to lose: starts over
    assert [r["step"] for r in rows(run)] == [1, 2, 3]
    # --resume with no checkpoint also starts at step 0, rather than refusing
    run2 = setup["root"] / "died-early-2"
    crash_at(monkeypatch, 1, RuntimeError("killed"))
    with pytest.raises(RuntimeError):
        fit(FitConfig(**{**common, "out": str(run2)}))
    monkeypatch.setattr(MetricsLog, "write", real)
    fit(FitConfig(**{**common, "out": str(run2), "resume": True}))
    assert [r["step"] for r in rows(run2)] == [1, 2, 3]
    # a finished run is still protected
    with pytest.raises(ConfigError, match="--resume"):
        fit(FitConfig(**common))


def test_sigint_checkpoints_the_step_and_resume_continues_exactly(setup, monkeypatch):
    common = dict(logits=(str(setup["store"]),), student=str(setup["dropout"]), batch_size=2, max_steps=6, num_workers=1,
                  progress=False, seed=4)
    ref = setup["root"] / "sig-ref"
    fit(FitConfig(out=str(ref), **common))
    run = setup["root"] / "sig"
    real = MetricsLog.write

    def write(self, row):
        real(self, row)
        if row.get("step") == 3:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C would, in the middle of the run

    monkeypatch.setattr(MetricsLog, "write", write)
    from trainer.interrupt import Interrupted

    with pytest.raises(Interrupted) as info:
        fit(FitConfig(out=str(run), checkpoint_every=0, **common))
    assert info.value.step == 3 and info.value.exit_code == 130 and "--resume" in str(info.value)
    assert (run / "checkpoints" / "step-00000003" / "trainer_state.json").is_file()
    monkeypatch.setattr(MetricsLog, "write", real)
    fit(FitConfig(out=str(run), resume=True, **common))
    assert [(x["loss"], x["lr"]) for x in rows(ref)] == [(x["loss"], x["lr"]) for x in rows(run)]


def test_sigterm_through_the_cli_exits_143_with_one_line(setup):
    """As torchrun and SLURM stop a rank: SIGTERM to its whole process group, data workers included."""
    run = setup["root"] / "sigterm"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "trainer", "fit", "--logits", str(setup["store"]), "--student", str(setup["llama"]),
                          "--out", str(run), "--max-steps", "100000", "--batch-size", "2", "--num-workers", "2", "-q"],
                         env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((run / "metrics.jsonl").exists() and len(rows(run)) >= 2):
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "interrupted by SIGTERM at step" in lines[0] and "--resume" in lines[0], err[-2000:]
    step = int(lines[0].split("at step ")[1].split(";")[0])
    assert (run / "checkpoints" / f"step-{step:08d}" / "trainer_state.json").is_file()


LEAKED_FAILURE = """
import sys
from trainer.config import FitConfig
from trainer.fit import MetricsLog, fit
real = MetricsLog.write
def write(self, row):
    real(self, row)
    if row.get("step") == 2:
        raise RuntimeError("simulated failure")
MetricsLog.write = write
KEEP = []
try:
    fit(FitConfig(logits=(sys.argv[1],), student=sys.argv[2], out=sys.argv[3], batch_size=2, max_steps=6, num_workers=2,
                  progress=False))
except RuntimeError as e:
    KEEP.append(e)  # the traceback keeps the failed run's frames (and its loader iterator) alive
print("returned", flush=True)
"""


def test_a_failed_fit_whose_exception_is_kept_does_not_hang_the_process_at_exit(setup):
    """Workers ignore SIGTERM, which is how multiprocessing stops them at interpreter exit: an
    iterator left alive by a stored exception used to make the process wait for them forever."""
    run = setup["root"] / "kept-exception"
    p = subprocess.run([sys.executable, "-c", LEAKED_FAILURE, str(setup["store"]), str(setup["llama"]), str(run)],
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0 and "returned" in p.stdout, p.stderr[-2000:]
    assert [r["step"] for r in rows(run)] == [1, 2]


def test_resume_refuses_changed_settings_and_logs_runtime_ones(setup, capsys):
    run = setup["root"] / "changed"
    common = dict(logits=(str(setup["store"]),), student=str(setup["llama"]), out=str(run), batch_size=2, num_workers=0,
                  progress=False, checkpoint_every=2)
    fit(FitConfig(max_steps=2, lr=1e-3, **common))
    with pytest.raises(ConfigError, match=r"lr: 0.001 -> 0.002"):
        fit(FitConfig(max_steps=2, lr=2e-3, resume=True, **common))
    with pytest.raises(ConfigError, match=r"max_steps: 2 -> 4.*change the trajectory"):
        fit(FitConfig(max_steps=4, lr=1e-3, resume=True, **common))
    assert "lr: 0.001\n" in (run / "config.yaml").read_text()  # the config on disk still says what ran
    capsys.readouterr()
    fit(FitConfig(max_steps=2, lr=1e-3, resume=True, **{**common, "num_workers": 1}))
    assert "--resume: num_workers: 0 -> 1" in capsys.readouterr().err
    assert "num_workers: 1\n" in (run / "config.yaml").read_text()


def test_resume_refuses_stores_whose_content_changed(setup, tmp_path):
    run = tmp_path / "run"
    common = dict(student=str(setup["llama"]), out=str(run), batch_size=2, num_workers=0, progress=False, max_steps=2, checkpoint_every=1)
    fit(FitConfig(logits=(str(setup["store"]),), **common))
    with pytest.raises(ConfigError, match="stores differ"):
        fit(FitConfig(logits=(str(setup["swapped"]),), resume=True, **common))


def test_eval_weights_follow_teachers_not_positions(setup, tmp_path):
    """The same validation data with its teachers listed the other way gives the same metrics."""
    common = dict(logits=(str(setup["store"]),), student=str(setup["llama"]), batch_size=2, num_workers=0, progress=False,
                  max_steps=2, weights=(0.9, 0.1), seed=1)
    a = fit(FitConfig(out=str(tmp_path / "a"), eval_logits=str(setup["store"]), **common))["eval"]
    b = fit(FitConfig(out=str(tmp_path / "b"), eval_logits=str(setup["swapped"]), **common))["eval"]
    assert a["kl"] == pytest.approx(b["kl"], rel=1e-6) and a["ce"] == pytest.approx(b["ce"], rel=1e-6)
    assert a["top1_agreement"] == pytest.approx(b["top1_agreement"])
    with pytest.raises(ConfigError, match="lacks training teacher"):
        fit(FitConfig(out=str(tmp_path / "c"), eval_logits=str(setup["only_a"]), **common))


def test_fit_takes_any_module_without_a_student_setting(setup, tmp_path, tokenizer):
    class Tiny(torch.nn.Module):
        def __init__(self, v):
            super().__init__()
            self.emb = torch.nn.Embedding(len(tokenizer), 16)
            self.out = torch.nn.Linear(16, v)

        def forward(self, input_ids, attention_mask=None):
            return self.out(self.emb(input_ids))

    res = fit(FitConfig(logits=(str(setup["store"]),), out=str(tmp_path / "m"), max_steps=2, batch_size=2, num_workers=0,
                        progress=False), model=Tiny(len(tokenizer)))
    assert res["steps"] == 2 and (tmp_path / "m" / "final" / "model.safetensors").is_file()
    with pytest.raises(ConfigError, match="outputs 100 logits per position, fewer than the store's vocabulary"):
        fit(FitConfig(logits=(str(setup["store"]),), out=str(tmp_path / "small"), max_steps=1, batch_size=2, num_workers=0,
                      progress=False), model=Tiny(100))
    with pytest.raises(ConfigError, match="--student: required"):
        fit(FitConfig(logits=(str(setup["store"]),), out=str(tmp_path / "none"), max_steps=1, progress=False))


def test_student_with_another_tokenizer_is_refused(setup, tmp_path):
    from conftest import build_tokenizer, save_llama

    other = save_llama(tmp_path / "other-student", build_tokenizer(vocab_size=400))
    with pytest.raises(ConfigError, match="its tokenizer differs from the stores'"):
        fit(FitConfig(logits=(str(setup["store"]),), student=str(other), out=str(tmp_path / "o"), max_steps=1, progress=False))


def test_alpha_weights_kd_and_ce_as_documented(setup, tmp_path):
    out = tmp_path / "alpha"
    fit(FitConfig(logits=(str(setup["store"]),), student=str(setup["llama"]), out=str(out), max_steps=2, batch_size=2, num_workers=0,
                  progress=False, alpha=0.3))
    for r in rows(out):
        assert r["loss"] == pytest.approx(0.3 * r["kd_loss"] + 0.7 * r["ce_loss"], rel=1e-6)
        assert r["kd_loss"] != pytest.approx(r["ce_loss"], rel=1e-3)  # the check can tell them apart


@pytest.mark.parametrize("args,needle", [
    (["warmup_steps=abc"], "--warmup-steps: expected an integer, got 'abc'"),
    (["--weights", "a,b"], "--weights: expected a number, got 'a'"),
    (["lr=[1]"], "--lr: expected a number"),
    (["--eval-every", "2"], "--eval-every: needs --eval-logits"),
    (["extra-store"], "unexpected argument 'extra-store'"),
    (["log_every=0"], "--log-every: expected a positive integer"),
    (["chunk_positions=0"], "--chunk-positions: expected a positive integer"),
    (["min_lr_ratio=-5"], "--min-lr-ratio: expected a value in [0, 1]"),
    (["grad_clip=.nan"], "--grad-clip: expected a number >= 0"),
])
def test_mistakes_end_in_one_line(setup, tmp_path, args, needle):
    r = runner.invoke(app, ["fit", "--logits", str(setup["store"]), "--student", str(setup["llama"]), "--out", str(tmp_path / "x"),
                            "--max-steps", "1", "-q", *args])
    assert r.exit_code == 2 and needle in r.output and r.output.count("\n") == 1, r.output


def test_yaml_numbers_written_as_strings_are_read_as_numbers(setup, tmp_path):
    cfg = tmp_path / "fit.yaml"
    cfg.write_text(f"logits: [{setup['store']}]\nstudent: {setup['llama']}\nout: {tmp_path / 'y'}\nlr: 3e-4\nmax_steps: 1\n"
                   "batch_size: 2\nnum_workers: 0\n")
    r = runner.invoke(app, ["fit", "--config", str(cfg), "-q"])
    assert r.exit_code == 0, r.output
    assert rows(tmp_path / "y")[0]["lr"] == pytest.approx(3e-4)


def test_config_types_are_checked_from_python():
    with pytest.raises(ConfigError, match="--epochs: expected an integer, got 1.5"):
        FitConfig(logits=("x",), student="s", out="o", epochs=1.5)
    assert FitConfig(logits="a", student="s", out="o", lr="1e-3").lr == 1e-3
    assert FitConfig(logits="s3://bucket/x,y", student="s", out="o").logits == ("s3://bucket/x,y",)  # one URL, commas and all
    assert FitConfig(logits="a", student="s", out="o", weights="0.7, 0.3").weights == (0.7, 0.3)
    assert FitConfig(logits="a", student="s", out="o", seed="12345678901234567890").seed == 12345678901234567890
    assert isinstance(LogitStoreError("x"), Exception)


def test_resume_puts_the_schedule_at_the_checkpoint_step(setup, tmp_path):
    """A checkpoint whose scheduler state ran ahead (multi-process runs before the schedule was
    stepped once per step) resumes on the schedule of its step."""
    from trainer.resume import latest_checkpoint

    common = dict(logits=(str(setup["store"]),), student=str(setup["llama"]), batch_size=2, num_workers=0, progress=False,
                  max_steps=6, warmup_steps=2, checkpoint_every=3, lr=1e-3)
    ref = tmp_path / "ref"
    fit(FitConfig(out=str(ref), **common))
    run = tmp_path / "run"
    fit(FitConfig(out=str(run), **{**common, "max_steps": 6}))
    import shutil

    shutil.rmtree(run / "checkpoints" / "step-00000006")
    (run / "final").rename(tmp_path / "final-moved")
    ckpt = latest_checkpoint(run / "checkpoints")
    sched = ckpt / "scheduler.bin"
    state = torch.load(sched, weights_only=True)
    state["last_epoch"] *= 8  # as an 8-process run of the old code left it
    state["_step_count"] = state["last_epoch"] + 1
    torch.save(state, sched)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n")
    fit(FitConfig(out=str(run), resume=True, **common))
    assert [r["lr"] for r in rows(ref)] == [r["lr"] for r in rows(run)]


def test_quiet_fit_prints_nothing(setup, tmp_path, tokenizer):
    tied = tmp_path / "tied.json"
    tied.write_text(json.dumps({**json.loads(setup["llama"].read_text()), "tie_word_embeddings": True}))
    p = subprocess.run([sys.executable, "-m", "trainer", "fit", "--logits", str(setup["store"]), "--student", str(tied), "--out",
                        str(tmp_path / "q"), "--max-steps", "2", "--batch-size", "2", "--checkpoint-every", "1", "-q"],
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout == "" and p.stderr == "", p.stderr[-2000:]


def test_online_teacher_through_fit_and_its_tokenizer_check(setup, tmp_path, llama_dir):
    from conftest import build_tokenizer, save_llama

    out = tmp_path / "online"
    res = fit(FitConfig(logits=(str(setup["only_a"]),), student=str(setup["llama"]), out=str(out), max_steps=2, batch_size=2,
                        num_workers=0, progress=False, online_teacher=str(llama_dir), eval_logits=str(setup["only_a"])))
    assert res["steps"] == 2 and all(r["kd_loss"] > 0 for r in rows(out))
    other = save_llama(tmp_path / "other-teacher", build_tokenizer(vocab_size=400))
    with pytest.raises(ConfigError, match="--online-teacher .*tokenizer differs"):
        fit(FitConfig(logits=(str(setup["only_a"]),), student=str(setup["llama"]), out=str(tmp_path / "o2"), max_steps=1,
                      progress=False, online_teacher=str(other)))


def test_a_padded_larger_student_vocabulary_trains_and_its_extra_rows_get_no_probability(setup, tmp_path, tokenizer):
    padded = tmp_path / "padded.json"
    padded.write_text(json.dumps({**json.loads(setup["llama"].read_text()), "vocab_size": len(tokenizer) + 13}))
    out = tmp_path / "padded"
    res = fit(FitConfig(logits=(str(setup["store"]),), student=str(padded), out=str(out), max_steps=2, batch_size=2, num_workers=0,
                        progress=False, eval_logits=str(setup["store"])))
    assert res["steps"] == 2 and math_isfinite(res["eval"]["ce"])
    # the loss ignores the extra rows: the same student with them set to +inf logits trains identically
    from trainer.losses import kd_ce_loss

    x = torch.randn(5, len(tokenizer) + 13)
    y = x.clone()
    y[:, len(tokenizer):] = 1e4
    labels = torch.randint(0, len(tokenizer), (5,))
    assert torch.equal(kd_ce_loss(x, labels, None, vocab_size=len(tokenizer))[0], kd_ce_loss(y, labels, None, vocab_size=len(tokenizer))[0])


def math_isfinite(x):
    import math

    return math.isfinite(x)


def test_rows_are_shuffled_within_each_shard(setup):
    """With the shuffle buffer off, the order inside each visited shard must still be permuted."""
    import numpy as np

    from trainer.data import DistillDataset

    ds = DistillDataset([str(setup["store"])], batch_size=2, shuffle_buffer=1, seed=0)
    order = ds.epoch_order(0)
    starts = [e["start"] for e in ds.stores[0].index.entries()]
    shard_of = np.searchsorted(starts, order, side="right") - 1
    runs = np.split(order, np.flatnonzero(np.diff(shard_of)) + 1)
    assert len(runs) == len(starts), "with buffer 1 each shard is visited in one run"
    assert any(not np.array_equal(r, np.sort(r)) for r in runs if len(r) > 2)
    assert not np.array_equal(np.concatenate(runs), np.arange(len(order)))


def test_a_fresh_student_takes_the_stores_special_tokens(setup, tmp_path, tokenizer):
    gpt2 = tmp_path / "gpt2.json"  # GPT-2's config says bos = eos = 50256, far outside this vocabulary
    gpt2.write_text(json.dumps({"model_type": "gpt2", "vocab_size": len(tokenizer), "n_embd": 32, "n_layer": 1, "n_head": 2,
                                "n_positions": 64}))
    out = tmp_path / "fresh"
    fit(FitConfig(logits=(str(setup["store"]),), student=str(gpt2), out=str(out), max_steps=1, batch_size=2, num_workers=0,
                  progress=False))
    cfg = json.loads((out / "final" / "config.json").read_text())
    assert cfg["eos_token_id"] == tokenizer.eos_token_id and cfg["pad_token_id"] == tokenizer.eos_token_id
    assert cfg["bos_token_id"] is None or cfg["bos_token_id"] < len(tokenizer)


def test_help_shows_the_effective_defaults():
    r = runner.invoke(app, ["fit", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    for needle in ("(default: 0.0003)", "(default: 1000)", "(default: fp32)", "(default: bucket)"):
        assert needle in r.output, needle
