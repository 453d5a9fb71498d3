"""Injected faults: write failures through an fsspec filesystem that fails on the Nth write, and a
real kill -9 of ``trainer fit`` followed by ``--resume``."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest
from fsspec.implementations.local import LocalFileSystem

import logitstore
from storeindex import entries
from logitstore.dump import DumpConfig, dump
from logitstore.errors import LogitStoreError
from logitstore.tools.verify import verify


class FailingFS(LocalFileSystem):
    """Local files, but the Nth ``pipe_file`` raises ``error`` (disk full, permission denied...)."""

    protocol = "failfs"
    fail_at = 10**9
    error: OSError = OSError(errno.ENOSPC, "No space left on device")
    writes = 0

    def pipe_file(self, path, value, **kwargs):
        type(self).writes += 1
        if type(self).writes == type(self).fail_at:
            raise type(self).error
        return super().pipe_file(path, value, **kwargs)

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(str(path).removeprefix("failfs://"))


fsspec.register_implementation("failfs", FailingFS, clobber=True)


def part_hashes(url):
    return [{p: v["files"] for p, v in s["parts"].items()} for s in logitstore.open(str(url)).index.entries()]


@pytest.mark.parametrize("fail_at,error", [
    (3, OSError(errno.ENOSPC, "No space left on device")),
    (9, PermissionError(errno.EACCES, "Permission denied")),
    (25, OSError(errno.EIO, "upload failed: connection reset")),
])
def test_write_failure_is_clear_leaves_nothing_complete_and_rerun_completes(tmp_path, llama_dir, corpus, fail_at, error):
    cfg = dict(teachers=(f"a={llama_dir}",), data=str(corpus), top_k=4, seq_len=24, batch_size=2, shard_sequences=3,
               max_tokens=600, progress=False)
    ref = tmp_path / "ref"
    dump(DumpConfig(out=str(ref), **cfg))
    out = tmp_path / "out"
    FailingFS.writes, FailingFS.fail_at, FailingFS.error = 0, fail_at, error
    try:
        with pytest.raises(LogitStoreError) as e:
            dump(DumpConfig(out=f"failfs://{out}", **cfg))
    finally:
        FailingFS.fail_at = 10**9
    msg = str(e.value)
    assert "\n" not in msg and error.strerror in msg, msg
    assert not (out / "manifest.json").exists()
    with pytest.raises(LogitStoreError, match="manifest"):
        logitstore.open(str(out))
    dump(DumpConfig(out=str(out), **cfg))  # the same command again, on a working disk
    assert part_hashes(out) == part_hashes(ref)
    assert verify(str(out)) == []


def test_kill_9_of_fit_then_resume_matches_uninterrupted(tmp_path, llama_dir, corpus, tokenizer):
    store = tmp_path / "store"
    dump(DumpConfig(teachers=(f"a={llama_dir}",), data=str(corpus), out=str(store), top_k=6, seq_len=32, max_tokens=1200,
                    shard_sequences=8, progress=False))
    student = tmp_path / "student.json"
    student.write_text(json.dumps({"model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
                                   "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
                                   "max_position_embeddings": 64}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # 60 steps, killed after the checkpoint of step 6: the run cannot finish before the kill lands
    args = [sys.executable, "-m", "trainer", "fit", "--logits", str(store), "--student", str(student), "--max-steps", "60",
            "--batch-size", "3", "--num-workers", "1", "--checkpoint-every", "3", "--seed", "3", "--device", "cpu", "-q"]
    subprocess.run([*args, "--out", str(tmp_path / "ref")], check=True, env=env, capture_output=True)
    run = tmp_path / "run"
    proc = subprocess.Popen([*args, "--out", str(run)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (run / "checkpoints" / "step-00000006" / "trainer_state.json").exists():
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "result.json").exists(), "killed before the end"
    subprocess.run([*args, "--out", str(run), "--resume"], check=True, env=env, capture_output=True)

    def train_rows(p):
        return [json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines() if not json.loads(x).get("eval")]

    a, b = train_rows(tmp_path / "ref"), train_rows(run)
    assert [x["step"] for x in b] == list(range(1, 61))
    for x, y in zip(a, b):
        assert x["loss"] == y["loss"] and x["lr"] == y["lr"], (x["step"], x["loss"], y["loss"])


@pytest.fixture(scope="module")
def damaged(tmp_path_factory, llama_dir, corpus, tokenizer):
    import shutil

    root = tmp_path_factory.mktemp("damaged")
    good = root / "good"
    dump(DumpConfig(teachers=(f"a={llama_dir}",), data=str(corpus), out=str(good), top_k=6, seq_len=32, max_tokens=1200,
                    shard_sequences=8, progress=False))
    bad = root / "bad"
    shutil.copytree(good, bad)
    part = bad / "shards" / "000001" / "t0"
    victim = max((p for p in part.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)  # a data file
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x10
    victim.write_bytes(bytes(data))
    student = root / "student.json"
    student.write_text(json.dumps({"model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
                                   "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
                                   "max_position_embeddings": 64}))
    return {"root": root, "good": good, "bad": bad, "victim": victim.relative_to(bad), "student": student}


def test_fit_refuses_a_damaged_store_by_default(damaged):
    from typer.testing import CliRunner

    from trainer.cli import app

    r = CliRunner().invoke(app, ["fit", "--logits", str(damaged["bad"]), "--student", str(damaged["student"]), "--out",
                                 str(damaged["root"] / "run-default"), "--epochs", "1", "--batch-size", "4", "--num-workers", "1", "-q"])
    assert r.exit_code == 2, r.output
    line = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(line) == 1 and str(damaged["victim"]) in line[0] and "sha256" in line[0], r.output
    assert not (damaged["root"] / "run-default" / "final").exists()


def test_fit_skip_bad_shards_leaves_them_out_and_logs_them(damaged):
    from torch.utils.data import DataLoader

    from trainer.config import FitConfig
    from trainer.data import DistillDataset
    from trainer.fit import fit

    ds = DistillDataset([str(damaged["bad"])], batch_size=4, skip_bad_shards=True, num_workers=0)
    assert [(b["shard"], b["inputs_ok"]) for b in ds.skipped] == [(1, True)]
    entry = logitstore.open(str(damaged["good"])).index.entries()[1]
    lost = set(range(entry["start"], entry["start"] + entry["n_sequences"]))
    seen = [i for bt in DataLoader(ds, batch_size=None) for i in bt["index"][bt["weight"] > 0].tolist()]
    assert sorted(seen) == sorted(set(range(ds.n)) - lost)
    run = damaged["root"] / "run-skip"
    res = fit(FitConfig(logits=(str(damaged["bad"]),), student=str(damaged["student"]), out=str(run), epochs=1, batch_size=4,
                        num_workers=1, skip_bad_shards=True, progress=False))
    assert res["steps"] > 0
    logged = json.loads((run / "skipped_shards.json").read_text())
    assert logged[0]["shard"] == 1 and str(damaged["victim"]) in logged[0]["error"]


def test_a_damaged_file_is_refused_when_read_through_the_cache(damaged, tmp_path):
    """With --cache-dir, a fetched file is checked before it is cached or used; nothing damaged is
    cached. (Files are cached by content: a damaged copy of a file whose intact twin, same sha256,
    is already cached is never read, which is correct; the victim here is unique.)"""
    import shutil

    from logitstore.errors import FormatError
    from logitstore.format.hashing import sha256_hex

    bad = tmp_path / "bad"
    shutil.copytree(damaged["good"], bad)
    files = [(s["path"], part, rel, meta) for s in entries(bad) for part, p in s["parts"].items() for rel, meta in p["files"].items()]
    shas = [f[3]["sha256"] for f in files]
    path, part, rel, meta = max((f for f in files if shas.count(f[3]["sha256"]) == 1), key=lambda f: f[3]["bytes"])
    victim = bad / path / part / rel
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x10
    victim.write_bytes(bytes(data))
    cache = tmp_path / "cache"
    store = logitstore.open(str(bad), cache_dir=str(cache))
    with pytest.raises(FormatError, match=f"{path}/{part}/{rel}: sha256 mismatch"):
        for j in range(store.n_shards):
            store.load_shard(j)
    cached = [p for p in cache.rglob("*") if p.is_file()]
    assert cached and all(sha256_hex(f.read_bytes()) == f.name for f in cached)
    assert meta["sha256"] not in {f.name for f in cached}
