"""Crash mid-dump, re-run the same command, get the same store as an uninterrupted dump."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import logitstore
from storeindex import entries
from logitstore.format import layout
from logitstore.dump import DumpConfig, dump
from logitstore.errors import ConfigError, FormatError
from logitstore.tools.verify import verify
from logitstore.format.writer import PartWriter


def part_hashes(url):
    return [{p: v["files"] for p, v in s["parts"].items()} for s in entries(url)]


def config(teachers, corpus, out, **kw):
    base = dict(teachers=teachers, data=str(corpus), out=str(out), top_k=6, seq_len=24, batch_size=3,
                shard_sequences=4, max_tokens=600, progress=False)
    return DumpConfig(**{**base, **kw})


@pytest.mark.parametrize("fail_after", [1, 5, 11])
def test_crash_then_resume_equals_uninterrupted(tmp_path, llama_dir, gpt2_dir, corpus, monkeypatch, fail_after):
    teachers = (f"a={llama_dir}", f"b={gpt2_dir}")
    ref = tmp_path / "ref"
    dump(config(teachers, corpus, ref))

    out = tmp_path / "crashed"
    real_write = PartWriter.write
    calls = {"n": 0}

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > fail_after:
            raise OSError("simulated crash")
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(PartWriter, "write", flaky)
    with pytest.raises(OSError, match="simulated crash"):
        dump(config(teachers, corpus, out))
    with pytest.raises(FormatError, match="no manifest.json"):
        logitstore.open(str(out))  # an unfinished store never looks complete
    monkeypatch.setattr(PartWriter, "write", real_write)
    result = dump(config(teachers, corpus, out))
    assert result.resumed_parts >= min(fail_after, 1)
    assert part_hashes(out) == part_hashes(ref)
    assert verify(str(out)) == []
    # and a third run is a no-op
    assert dump(config(teachers, corpus, out)).tokens_this_run == 0


def test_uncommitted_part_debris_is_redone(tmp_path, llama_dir, corpus):
    ref, out = tmp_path / "ref", tmp_path / "out"
    dump(config((str(llama_dir),), corpus, ref))
    dump(config((str(llama_dir),), corpus, out))
    # simulate a crash between a part's rename and its commit record, and leftovers of a temp dir
    (out / "manifest.json").unlink()
    (out / layout.commit_path(1, "t0")).unlink()
    (out / layout.shard_dir(0) / ".tmp-t0-deadbeef").mkdir()
    victim = next(p for p in sorted((out / layout.part_dir(2, "t0")).rglob("*")) if p.is_file() and p.name != "zarr.json")
    with open(victim, "ab") as f:  # a committed part whose file no longer matches its record
        f.write(b"junk")
    r = dump(config((str(llama_dir),), corpus, out))
    assert r.tokens_this_run > 0
    assert not (out / layout.shard_dir(0) / ".tmp-t0-deadbeef").exists()
    assert part_hashes(out) == part_hashes(ref)


def test_different_settings_into_existing_store_is_refused(tmp_path, llama_dir, corpus):
    out = tmp_path / "s"
    dump(config((str(llama_dir),), corpus, out))
    with pytest.raises(ConfigError, match="different settings.*top_k|teachers"):
        dump(config((str(llama_dir),), corpus, out, top_k=7))
    with pytest.raises(ConfigError, match="different settings"):
        dump(config((str(llama_dir),), corpus, out, seq_len=30))
    # a store begun before the companded default: the error says how to resume it
    with pytest.raises(ConfigError, match=r"encoding\.value_bits: 8 -> 7.*dumped with --codebook companded --value-bits 8"):
        dump(config((str(llama_dir),), corpus, out, codebook="uniform", value_bits=7))


def test_non_store_output_directory_is_refused(tmp_path, llama_dir, corpus):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a logitstore store"):
        dump(config((str(llama_dir),), corpus, out))


def test_kill_9_mid_dump_then_resume(tmp_path, llama_dir, corpus):
    """A real SIGKILL of the CLI while it writes; the re-run completes to the uninterrupted content."""
    args = ["--teacher", f"a={llama_dir}", "--data", str(corpus), "--top-k", "6", "--seq-len", "24",
            "--batch-size", "1", "--shard-sequences", "2", "--max-tokens", "480", "-q"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    ref = tmp_path / "ref"
    subprocess.run([sys.executable, "-m", "logitstore", "dump", *args, "--out", str(ref)], check=True, env=env,
                   capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "logitstore", "dump", *args, "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(Path(out).glob("shards/*/t0.commit.json")):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "killed before the end: there must be no manifest"
    subprocess.run([sys.executable, "-m", "logitstore", "dump", *args, "--out", str(out)], check=True, env=env,
                   capture_output=True)
    assert part_hashes(out) == part_hashes(ref)
    assert verify(str(out)) == []


def test_a_resume_reuses_the_corpus_plan_only_for_the_same_corpus(tmp_path, llama_dir, corpus, monkeypatch):
    """A resumed dump takes the shard starts from corpus_plan.json instead of tokenising the corpus
    again, and ends with the same store; a changed corpus file is planned again (and refused)."""
    import logitstore.capture.shard_inputs as dump_mod

    ref, out = tmp_path / "ref", tmp_path / "out"
    dump(config((str(llama_dir),), corpus, ref))
    dump(config((str(llama_dir),), corpus, out))
    assert (out / "corpus_plan.json").exists()
    (out / "manifest.json").unlink()
    (out / layout.commit_path(1, "t0")).unlink()
    scans = []
    real_scan = dump_mod.scan
    monkeypatch.setattr(dump_mod, "scan", lambda *a, **k: scans.append(1) or real_scan(*a, **k))
    r = dump(config((str(llama_dir),), corpus, out))
    assert scans == [] and r.tokens_this_run > 0
    assert part_hashes(out) == part_hashes(ref)
    changed = tmp_path / "changed.jsonl"
    changed.write_text(Path(corpus).read_text().replace(" the ", " THE ", 5))
    (out / "manifest.json").unlink()
    with pytest.raises(ConfigError, match="different settings"):
        dump(config((str(llama_dir),), changed, out))
    assert scans == [1]


def test_later_teachers_read_the_inputs_back_instead_of_the_corpus(tmp_path, llama_dir, gpt2_dir, corpus, monkeypatch):
    from logitstore.capture.windows import ShardWindows

    restarts, gets = [], []
    real_restarted, real_get = ShardWindows.restarted, ShardWindows.arrays
    monkeypatch.setattr(ShardWindows, "restarted", lambda self: restarts.append(1) or real_restarted(self))
    monkeypatch.setattr(ShardWindows, "arrays", lambda self, j: gets.append(j) or real_get(self, j))
    out = tmp_path / "s"
    m = dump(config((f"a={llama_dir}", f"b={gpt2_dir}"), corpus, out)).manifest
    assert restarts == [] and gets == list(range(m["n_shards"]))  # each shard built from the corpus once
