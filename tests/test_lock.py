"""One writer per store: the lock file, its take-over when stale, and ``ls`` of unfinished stores."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from logitstore.cli import app
from logitstore.dump import DumpConfig, dump
from logitstore.errors import ConfigError
from logitstore.tools.info import list_stores
from logitstore.storage.lock import LOCK, STALE_SECONDS

runner = CliRunner()


def config(teacher, corpus, out, **kw):
    return DumpConfig(**{**dict(teachers=(f"t={teacher}",), data=str(corpus), out=str(out), top_k=4, seq_len=16, max_tokens=120,
                                shard_sequences=3, progress=False), **kw})


def started_store(cfg, monkeypatch):
    """A store whose dump stopped after its first part (no manifest), as a crash leaves it."""
    from logitstore.format.writer import PartWriter

    real, calls = PartWriter.write, []

    def crash(self, *a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("crashed")
        return real(self, *a, **kw)

    monkeypatch.setattr(PartWriter, "write", crash)
    with pytest.raises(OSError):
        dump(cfg)
    monkeypatch.setattr(PartWriter, "write", real)


def write_lock(out, **fields):
    now = time.time()
    rec = {"op": "dump", "host": socket.gethostname(), "pid": os.getppid(), "token": "someone-else", "started": now - 5,
           "refreshed": now, **fields}
    (out / LOCK).write_text(json.dumps(rec))


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_second_dump_refuses_a_store_being_written(tmp_path, llama_dir, corpus, monkeypatch):
    out = tmp_path / "s"
    cfg = config(llama_dir, corpus, out)
    started_store(cfg, monkeypatch)
    assert not (out / LOCK).exists()  # released when the dump failed
    write_lock(out)  # a live writer: this host, a running process (this one), refreshed just now
    with pytest.raises(ConfigError, match=r"another dump on host .* pid \d+, since .* is writing this store"):
        dump(cfg)
    r = runner.invoke(app, ["dump", "--teacher", f"t={llama_dir}", "--data", str(corpus), "--out", str(out), "--top-k", "4",
                            "--seq-len", "16", "--max-tokens", "120", "--shard-sequences", "3", "-q"])
    assert r.exit_code == 2 and "is writing this store" in r.output and r.output.count("\n") == 1, r.output
    assert not (out / "manifest.json").exists() and json.loads((out / LOCK).read_text())["token"] == "someone-else"
    # ls shows it as unfinished and in progress
    rows = list_stores(str(tmp_path))
    assert rows == [{**rows[0], "url": str(tmp_path) + "/s", "unfinished": True, "in_progress": True}] and rows[0]["teachers"] == ["t"]
    r = runner.invoke(app, ["ls", str(tmp_path)])
    assert "UNFINISHED, in progress (dump on host" in r.output, r.output


@pytest.mark.parametrize("stale", ["dead process", "not refreshed"])
def test_a_stale_lock_is_taken_over(tmp_path, llama_dir, corpus, monkeypatch, stale):
    out = tmp_path / "s"
    cfg = config(llama_dir, corpus, out)
    started_store(cfg, monkeypatch)
    if stale == "dead process":
        write_lock(out, pid=dead_pid())
    else:  # another host's writer that stopped refreshing its lock
        write_lock(out, host="elsewhere.example", refreshed=time.time() - STALE_SECONDS - 60)
    rows = list_stores(str(tmp_path))
    assert rows[0]["unfinished"] and not rows[0]["in_progress"]
    assert "no writer running: re-run the same command to resume" in runner.invoke(app, ["ls", str(tmp_path)]).output
    m = dump(cfg).manifest
    assert m["n_tokens"] == 120 and not (out / LOCK).exists()
    assert list_stores(str(tmp_path))[0]["id"].startswith("ls-")


def test_the_lock_is_held_while_writing_and_refreshed(tmp_path, llama_dir, corpus, monkeypatch):
    import logitstore.storage.lock as lock
    from logitstore.capture.teacher import TeacherRunner

    monkeypatch.setattr(lock, "REFRESH_SECONDS", 0.05)
    seen = []
    real = TeacherRunner.run

    def watch(self, *a, **kw):
        seen.append(json.loads((tmp_path / "s" / LOCK).read_text()))
        time.sleep(0.2)
        return real(self, *a, **kw)

    monkeypatch.setattr(TeacherRunner, "run", watch)
    dump(config(llama_dir, corpus, tmp_path / "s", batch_size=2))
    assert seen and all(r["pid"] == os.getpid() and r["host"] == socket.gethostname() and r["op"] == "dump" for r in seen)
    assert seen[-1]["refreshed"] > seen[0]["refreshed"] and len({r["token"] for r in seen}) == 1
    assert not (tmp_path / "s" / LOCK).exists()


def test_merge_takes_the_lock_too(tmp_path, llama_dir, corpus):
    from logitstore.tools.merge import merge

    a, b = tmp_path / "a", tmp_path / "b"
    dump(config(llama_dir, corpus, a, max_tokens=60))
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"text": "a different document, with other words in it " * 8}) + "\n")
    dump(config(llama_dir, other, b, max_tokens=60))
    out = tmp_path / "m"
    out.mkdir()
    write_lock(out, op="merge")
    with pytest.raises(ConfigError, match="another merge on host"):
        merge([str(a), str(b)], str(out), progress=False)
    (out / LOCK).unlink()
    assert merge([str(a), str(b)], str(out), progress=False)["n_tokens"] == 120 and not (out / LOCK).exists()


def test_on_this_host_the_process_table_decides_not_the_clock():
    from logitstore.storage.lock import lock_is_live

    now = time.time()
    here = {"op": "dump", "host": socket.gethostname(), "token": "x", "started": now - 9000, "refreshed": now - 2 * STALE_SECONDS}
    assert lock_is_live({**here, "pid": os.getppid()})  # alive but not refreshing (suspended with Ctrl-Z): still held
    assert not lock_is_live({**here, "pid": dead_pid()})  # dead
    assert not lock_is_live({**here, "pid": os.getpid(), "refreshed": now})  # our pid, none of our tokens: a restarted container
    far = {**here, "host": "elsewhere.example", "pid": 1}
    assert lock_is_live({**far, "refreshed": now - 10}) and not lock_is_live({**far, "refreshed": now - STALE_SECONDS - 1})
