"""``torchrun -m logitstore dump`` with 2 CPU processes (gloo) equals a single-process dump."""

import os
import subprocess
import sys

import pytest

import logitstore
from storeindex import entries
from logitstore.format.manifest import store_id
from logitstore.tools.verify import verify

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def dump_args(teachers, corpus, out):
    args = ["dump", "--data", str(corpus), "--out", str(out), "--top-k", "6", "--seq-len", "24", "--batch-size", "3",
            "--shard-sequences", "4", "--max-tokens", "700", "--device", "cpu", "-q"]
    for t in teachers:
        args += ["--teacher", t]
    return args


def torchrun(nproc, args, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m", "logitstore", *args]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300, **kw)


def data_files(url):
    """Every part's files and checksums (the content), leaving out timings and creation time."""
    return [(s["start"], s["n_sequences"], {p: v["files"] for p, v in s["parts"].items()}) for s in entries(url)]


@pytest.fixture(scope="module")
def single(tmp_path_factory, llama_dir, gpt2_dir, corpus):
    out = tmp_path_factory.mktemp("single") / "store"
    subprocess.run([sys.executable, "-m", "logitstore", *dump_args([f"a={llama_dir}", f"b={gpt2_dir}"], corpus, out)],
                   env=ENV, check=True, capture_output=True, timeout=300)
    return out


def test_two_processes_equal_one(tmp_path, single, llama_dir, gpt2_dir, corpus):
    out = tmp_path / "store"
    r = torchrun(2, dump_args([f"a={llama_dir}", f"b={gpt2_dir}"], corpus, out))
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = logitstore.open(str(single)), logitstore.open(str(out))
    assert one.n_shards >= 4  # both ranks had several shards
    assert data_files(out) == data_files(single)
    assert store_id(two.manifest) == store_id(one.manifest)
    assert two.manifest["n_tokens"] == one.manifest["n_tokens"]
    assert verify(str(out)) == []


def test_crashed_rank_resumes_its_own_shards(tmp_path, single, llama_dir, gpt2_dir, corpus):
    """Rank 1's shards are removed after a 2-process dump (as if it had died before writing them);
    the same command completes them, reuses rank 0's, and the store equals the single-process one."""
    out = tmp_path / "store"
    args = dump_args([f"a={llama_dir}", f"b={gpt2_dir}"], corpus, out)
    assert torchrun(2, args).returncode == 0
    shards = entries(out)
    (out / "manifest.json").unlink()
    rank1 = [s["path"] for s in shards[1::2]]
    for p in rank1:
        for f in (out / p).parent.glob(f"{os.path.basename(p)}/*.commit.json"):
            f.unlink()
    before = os.stat(out / shards[0]["path"] / "t0").st_mtime_ns
    r = torchrun(2, args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert data_files(out) == data_files(single)
    assert os.stat(out / shards[0]["path"] / "t0").st_mtime_ns == before  # rank 0's work was reused


def test_rank_error_fails_the_whole_run(tmp_path, llama_dir, corpus):
    """A user mistake is reported once, non-zero, with no manifest written."""
    out = tmp_path / "store"
    r = torchrun(2, dump_args([f"a={llama_dir}", f"b={tmp_path / 'missing'}"], corpus, out))
    assert r.returncode != 0
    assert "error:" in r.stderr and "missing" in r.stderr
    assert not (out / "manifest.json").exists()
