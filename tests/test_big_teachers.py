"""Teachers placed by accelerate (device map with CPU and disk offload) or split by transformers'
tensor parallelism (torchrun, gloo, CPU) write the same store content as a dump on one device."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import logitstore
from logitstore.capture.dump import DumpConfig, dump
from logitstore.capture.placement import Parallel, gpus_for_process, parse_device_map, parse_max_memory
from logitstore.errors import ConfigError

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
COMMON = dict(top_k=8, seq_len=32, batch_size=3, max_tokens=700, shard_sequences=4, encoding="lossless", device="cpu",
              progress=False)


def _args(teacher, corpus, out, *extra):
    return ["dump", "--teacher", f"t={teacher}", "--data", str(corpus), "--out", str(out), "--top-k", "8", "--seq-len", "32",
            "--batch-size", "3", "--max-tokens", "700", "--shard-sequences", "4", "--encoding", "lossless", "--device", "cpu",
            "-q", *extra]


@pytest.fixture(scope="module")
def plain(tmp_path_factory, llama_dir, corpus):
    out = tmp_path_factory.mktemp("plain") / "store"
    dump(DumpConfig(teachers=(f"t={llama_dir}",), data=str(corpus), out=str(out), **COMMON))
    return out


def assert_same_content(a, b, atol=2e-5):
    sa, sb = logitstore.open(str(a)), logitstore.open(str(b))
    assert sa.n_shards == sb.n_shards and len(sa) == len(sb)
    assert sa.manifest["data"]["fingerprint"] == sb.manifest["data"]["fingerprint"]
    for j in range(sa.n_shards):
        x, y = sa.load_shard(j), sb.load_shard(j)
        np.testing.assert_array_equal(x["input_ids"], y["input_ids"])
        tx, ty = x["teachers"]["t"], y["teachers"]["t"]
        np.testing.assert_allclose(tx["logprobs"], ty["logprobs"], atol=atol, rtol=0)
        distinct = np.abs(np.diff(tx["logprobs"], axis=-1)).min(-1) > 1e-4  # no near-tie reorders the ids
        np.testing.assert_array_equal(tx["ids"][distinct], ty["ids"][distinct])
        for key in ("tail_mass", "gold_logprob", "entropy"):
            np.testing.assert_allclose(tx[key], ty[key], atol=atol, rtol=1e-5, err_msg=key)


def _commit_stats(store):
    return json.loads((store / "shards" / "000000" / "t0.commit.json").read_text())["stats"]


def test_a_device_map_with_disk_offload_writes_what_one_device_writes(tmp_path, plain, llama_dir, corpus, monkeypatch):
    from logitstore.capture.teacher import TeacherSpec

    placed = []
    real_load = TeacherSpec.load_model

    def load(self, *a, **kw):
        model = real_load(self, *a, **kw)
        placed.append(dict(model.hf_device_map))
        return model

    monkeypatch.setattr(TeacherSpec, "load_model", load)
    dmap = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
            "model.norm": "cpu", "lm_head": "disk"}
    path = tmp_path / "map.json"
    path.write_text(json.dumps(dmap))
    out, off = tmp_path / "store", tmp_path / "offload"
    dump(DumpConfig(teachers=(f"t={llama_dir}",), data=str(corpus), out=str(out), device_map=str(path),
                    offload_folder=str(off), **COMMON))
    assert placed == [dmap]  # the layers really went to disk (safetensors weights are read from the checkpoint itself)
    assert _commit_stats(out)["lm_head"] == "chunked"  # the offloaded output layer still runs in chunks, in float32
    assert_same_content(plain, out)


def test_device_map_auto_with_a_memory_limit_through_the_cli(tmp_path, plain, llama_dir, corpus):
    out, off = tmp_path / "store", tmp_path / "offload"
    args = [a for a in _args(llama_dir, corpus, out, "--device-map", "auto", "--max-memory", "cpu=60KB",
                             "--offload-folder", str(off)) if a != "-q"]
    r = subprocess.run([sys.executable, "-m", "logitstore", *args], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"offloaded to the [a-z ]*disk", r.stderr), r.stderr[-3000:]
    assert_same_content(plain, out)


def test_tensor_parallel_dp2_x_tp2_writes_what_one_device_writes(tmp_path, plain, llama_dir, corpus):
    """4 processes: 2 copies of the teacher, each split over 2 ranks (the output layer's 327 rows as
    164 + 163); only the first rank of each copy writes; statistics combined across the vocabulary."""
    out = tmp_path / "store"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4", "-m", "logitstore",
           *_args(llama_dir, corpus, out, "--tp", "2")]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert _commit_stats(out)["lm_head"] == "vocab-parallel"
    assert_same_content(plain, out)
    # a resume where only the first copy has work left: the other copy still joins the teacher's
    # device mesh (a collective of every rank), then waits
    (out / "manifest.json").unlink()
    (out / "shards" / "000000" / "t0.commit.json").unlink()
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert_same_content(plain, out)


def test_tp_that_does_not_divide_the_world_is_refused(tmp_path, llama_dir, corpus):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3", "-m", "logitstore",
                        *_args(llama_dir, corpus, tmp_path / "s", "--tp", "2")], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "not a multiple" in r.stderr
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("kw,needle", [
    ({"tp": 2}, "torchrun"),
    ({"device_map": "everywhere"}, "--device-map"),
    ({"device_map": "auto", "max_memory": "gpu0=1GB"}, "--max-memory"),
    ({"device_map": "auto", "max_memory": "0=lots"}, "expected a size"),
    ({"max_memory": "cpu=1GB"}, "only with --device-map"),
    ({"tp": 2, "device_map": "auto"}, "choose one"),
])
def test_bad_placement_settings_are_one_line_errors(tmp_path, llama_dir, corpus, kw, needle):
    with pytest.raises(ConfigError, match=needle):
        dump(DumpConfig(teachers=(str(llama_dir),), data=str(corpus), out=str(tmp_path / "s"), progress=False, **kw))
    assert not (tmp_path / "s").exists()


def test_placement_planning():
    from logitstore.capture.placement import device_map_kwargs

    assert parse_max_memory("0=70GiB, 1=70GiB,cpu=200GiB") == {0: "70GiB", 1: "70GiB", "cpu": "200GiB"}
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:  # each process of a node offloads into its own folder
        folders = {device_map_kwargs("auto", None, tmp, r, 2)["offload_folder"] for r in range(2)}
        assert len(folders) == 2 and all(f.startswith(tmp) for f in folders)
    assert parse_device_map("balanced") == "balanced"
    assert gpus_for_process(8, 1, 2) == [4, 5, 6, 7] and gpus_for_process(8, 0, 1) == list(range(8))
    with pytest.raises(ConfigError, match="share"):
        gpus_for_process(2, 0, 4)
    groups = [Parallel(r, 8, 4) for r in range(8)]
    assert [p.group for p in groups] == [0, 0, 0, 0, 1, 1, 1, 1] and [p.writer for p in groups].count(True) == 2
    assert groups[5].shards(7) == [1, 3, 5] and groups[0].shards(7) == [0, 2, 4, 6]


def test_a_corpus_error_on_rank_0_is_one_line_on_every_rank(tmp_path, llama_dir):
    """Rank 0 alone reads the corpus to plan it; when that fails every rank stops with the same
    line instead of waiting for a plan that never comes."""
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine"}\n{"text": \n')
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "logitstore",
           *_args(llama_dir, data, tmp_path / "s")]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 2 and all("line 2 is not valid JSON" in line for line in lines), r.stderr[-3000:]
    assert not (tmp_path / "s").exists()
