"""Stores on object storage: a real S3-protocol server on loopback (moto), reached through fsspec/s3fs."""

import json
import os
import subprocess
import sys

import fsspec
import numpy as np
import pytest
from typer.testing import CliRunner

import logitstore
from logitstore.cli import app
from logitstore.dump import DumpConfig, dump
from logitstore.storage.prefetch import Prefetcher
from trainer.config import FitConfig

from helpers import store_arrays

runner = CliRunner()


@pytest.fixture(scope="module")
def s3_store(s3_bucket, llama_dir, gpt2_dir, corpus):
    url = f"{s3_bucket}/stores/both"
    dump(DumpConfig(teachers=(f"a={llama_dir}", f"b={gpt2_dir}"), data=str(corpus), out=url, top_k=8, seq_len=32,
                    max_tokens=1200, shard_sequences=8, progress=False))
    return url


def test_dump_to_s3_equals_local_dump(tmp_path, s3_store, llama_dir, gpt2_dir, corpus):
    local = tmp_path / "local"
    dump(DumpConfig(teachers=(f"a={llama_dir}", f"b={gpt2_dir}"), data=str(corpus), out=str(local), top_k=8, seq_len=32,
                    max_tokens=1200, shard_sequences=8, progress=False))
    remote = logitstore.open(s3_store)
    assert remote.n_shards >= 3
    for s_remote, s_local in zip(remote.index.entries(), logitstore.open(str(local)).index.entries()):
        assert s_remote["parts"] == s_local["parts"]  # the same bytes, by checksum
    fs, root = fsspec.core.url_to_fs(s3_store)
    assert not [p for p in fs.find(root) if "/.tmp-" in p]  # no temporary objects left behind


def test_info_verify_ls_on_s3(s3_store, s3_bucket):
    r = runner.invoke(app, ["info", s3_store])
    assert r.exit_code == 0 and "id           ls-" in r.output
    r = runner.invoke(app, ["verify", s3_store])
    assert r.exit_code == 0 and r.output.strip().endswith("OK")
    r = runner.invoke(app, ["ls", s3_bucket, "--json"])
    assert r.exit_code == 0 and s3_store in [row["url"] for row in json.loads(r.output)]


def test_verify_on_s3_finds_a_damaged_object(tmp_path, s3_store, s3_bucket):
    copy = f"{s3_bucket}/stores/damaged"
    fs, root = fsspec.core.url_to_fs(s3_store)
    fs.copy(root, fsspec.core.url_to_fs(copy)[1], recursive=True)
    e = logitstore.open(copy).index.entries()[1]
    victim = f"{e['path']}/t0/{sorted(e['parts']['t0']['files'])[0]}"
    path = fsspec.core.url_to_fs(copy)[1] + "/" + victim
    data = bytearray(fs.cat_file(path))
    data[len(data) // 2] ^= 0x10
    fs.pipe_file(path, bytes(data))
    r = runner.invoke(app, ["verify", copy])
    assert r.exit_code == 1 and victim in r.output


def test_store_tools_read_and_write_s3(tmp_path, s3_store, s3_bucket):
    out = f"{s3_bucket}/stores/arrow"
    r = runner.invoke(app, ["convert", s3_store, "--out", out, "--to", "arrow", "-q"])
    assert r.exit_code == 0, r.output
    a, b = store_arrays(logitstore.open(out), "a"), store_arrays(logitstore.open(s3_store), "a")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_read_through_cache(tmp_path, s3_store):
    cache = tmp_path / "cache"
    first = logitstore.open(s3_store, cache_dir=str(cache))
    ref = store_arrays(first, "a")
    # files are cached by checksum, so identical files (e.g. zarr metadata) are fetched once
    assert first.file_cache.misses == len(list((cache / "sha256").rglob("*/*"))) > 0
    again = logitstore.open(s3_store, cache_dir=str(cache))
    np.testing.assert_array_equal(store_arrays(again, "a")["logprobs"], ref["logprobs"])
    assert again.file_cache.misses == 0 and again.file_cache.hits == first.file_cache.hits + first.file_cache.misses
    # a damaged cache entry is detected by its checksum and fetched again
    victim = sorted((cache / "sha256").rglob("*"))[-1]
    victim.write_bytes(b"x" * victim.stat().st_size)
    third = logitstore.open(s3_store, cache_dir=str(cache))
    np.testing.assert_array_equal(store_arrays(third, "a")["logprobs"], ref["logprobs"])
    assert third.file_cache.misses == 1


def test_prefetch_gives_the_same_data(s3_store):
    plain = logitstore.open(s3_store)
    ahead = logitstore.open(s3_store)
    order = list(range(ahead.n_shards))[::-1]
    ahead.prefetch(order, depth=3)
    for j in order:
        x, y = plain.load_shard(j), ahead.load_shard(j)
        np.testing.assert_array_equal(x["teachers"]["b"]["ids"], y["teachers"]["b"]["ids"])
    ahead.close()


def test_prefetcher_order_and_errors():
    calls = []

    def fetch(key):
        calls.append(key)
        if key == "bad":
            raise ValueError("boom")
        return key * 2

    p = Prefetcher(fetch, ["a", "bad", "b", "c", "d", "e", "f"], depth=2)
    assert p.take("a") == "aa"
    with pytest.raises(ValueError, match="boom"):
        p.take("bad")
    assert p.take("b") == "bb"  # window now c, d
    assert p.take("zzz") is None  # not planned: the reader fetches it itself
    assert p.take("e") is None  # ahead of the window: c, d are dropped, prefetching goes on after e
    assert p.take("c") is None and p.take("f") == "ff"
    p.close()
    # two threads fetch: "a" and "bad" run at once, so their order in ``calls`` is not fixed
    assert set(calls[:3]) == {"a", "bad", "b"} and "e" not in calls


def test_fit_streams_from_s3_and_reuses_the_cache(tmp_path, s3_store, tokenizer):
    """Two runs from S3 with one --cache-dir; before the second the shard objects are deleted from
    the bucket, so it can only have read them from the cache. Both runs train identically."""
    fs, root = fsspec.core.url_to_fs(s3_store)
    copy = root.rsplit("/", 1)[0] + "/for-fit"
    fs.copy(root, copy, recursive=True)
    url = "s3://" + copy
    student = tmp_path / "student.json"
    student.write_text(json.dumps({"model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
                                   "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
                                   "max_position_embeddings": 64, "tie_word_embeddings": False}))
    cache = tmp_path / "cache"
    args = ["-m", "trainer", "fit", "--logits", url, "--student", str(student), "--max-steps", "4", "--batch-size", "4",
            "--cache-dir", str(cache), "--num-workers", "1", "-q"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "run1")], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    n_cached = len([p for p in (cache / "sha256").rglob("*") if p.is_file()])
    assert n_cached > 0
    fs.rm(copy + "/shards", recursive=True)
    r = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "run2")], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    losses = [[json.loads(x)["loss"] for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()] for run in ("run1", "run2")]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    assert len([p for p in (cache / "sha256").rglob("*") if p.is_file()]) == n_cached


def test_fit_config_takes_cache_and_prefetch():
    cfg = FitConfig(logits=("s3://b/x",), student="s", out="o", cache_dir="/tmp/c", prefetch=0)
    assert cfg.cache_dir == "/tmp/c" and cfg.prefetch == 0
    with pytest.raises(Exception, match="--prefetch"):
        FitConfig(logits=("s3://b/x",), student="s", out="o", prefetch=-1)


@pytest.mark.parametrize("to", ["parquet", "hf"])
def test_export_to_s3(tmp_path, s3_store, s3_bucket, to):
    """Written to S3, then copied down and read (datasets refuses remote paths in offline mode)."""
    import datasets

    out = f"{s3_bucket}/exports/{to}"
    r = runner.invoke(app, ["export", s3_store, "--out", out, "--to", to, "-q"])
    assert r.exit_code == 0, r.output
    fs, root = fsspec.core.url_to_fs(out)
    assert not fs.exists(root + "/.partial")
    local = tmp_path / "copy"
    fs.get(root, str(local), recursive=True)
    if to == "parquet":
        ds = datasets.load_dataset("parquet", data_dir=str(local), split="train")
    else:
        ds = datasets.load_from_disk(str(local))
    store = logitstore.open(s3_store)
    assert len(ds) == len(store)
    np.testing.assert_array_equal(np.asarray(ds[3]["a.logprobs"]), store[3]["teachers"]["a"]["logprobs"])
