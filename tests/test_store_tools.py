"""merge, convert, fuse and export, each checked against the data it came from."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

import logitstore
from storeindex import entries
from logitstore.cli import app
from logitstore.tools.convert import convert
from logitstore.dump import DumpConfig, dump
from logitstore.errors import ConfigError
from logitstore.tools.export import export
from logitstore.tools.fuse import fuse_store
from logitstore.format.manifest import store_id
from logitstore.tools.merge import merge
from logitstore.tools.verify import verify

from conftest import corpus_texts
from helpers import reference_outputs, store_arrays

runner = CliRunner()
FIELDS = ("ids", "logprobs", "tail_mass", "gold_logprob", "entropy")


def write_corpus(path, texts):
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    return path


def cfg(teachers, data, out, **kw):
    base = dict(teachers=tuple(teachers), data=str(data), out=str(out), top_k=6, seq_len=24, batch_size=4,
                shard_sequences=5, pack=False, progress=False)
    return DumpConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def halves(tmp_path_factory, llama_dir, gpt2_dir):
    """Two halves of a corpus dumped separately, and the whole corpus dumped at once (one document
    per window, so the halves' windows are exactly the whole's)."""
    d = tmp_path_factory.mktemp("halves")
    texts = corpus_texts(n_docs=4, max_chars=700)
    teachers = [f"a={llama_dir}", f"b={gpt2_dir}"]
    out = {}
    for name, part in (("first", texts[:2]), ("second", texts[2:]), ("whole", texts)):
        out[name] = d / name
        dump(cfg(teachers, write_corpus(d / f"{name}.jsonl", part), out[name]))
    return out


def assert_same_sequences(a, b, teachers):
    for t in teachers:
        x, y = store_arrays(a, t), store_arrays(b, t)
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=f"{t}.{k}")


def test_merge_equals_dumping_the_whole_corpus(tmp_path, halves):
    out = tmp_path / "merged"
    m = merge([str(halves["first"]), str(halves["second"])], str(out), progress=False)
    merged, whole = logitstore.open(str(out)), logitstore.open(str(halves["whole"]))
    assert len(merged) == len(whole) and m["n_tokens"] == whole.manifest["n_tokens"]
    assert_same_sequences(merged, whole, ["a", "b"])
    assert verify(str(out)) == []
    assert m["derived"]["op"] == "merge" and len(m["data"]["sources"]) == 2
    # the shards were copied byte for byte
    assert entries(out)[0]["parts"] == entries(halves["first"])[0]["parts"]


def test_merge_refuses_incompatible_stores(tmp_path, halves, llama_dir, gpt2_dir):
    other_k = tmp_path / "k8"
    dump(cfg([f"a={llama_dir}", f"b={gpt2_dir}"], write_corpus(tmp_path / "c.jsonl", corpus_texts(6, 300)[4:]), other_k, top_k=8))
    with pytest.raises(ConfigError, match="teacher 'a' is not the same model or settings.*differs in k"):
        merge([str(halves["first"]), str(other_k)], str(tmp_path / "x"), progress=False)
    with pytest.raises(ConfigError, match="holds the same data"):
        merge([str(halves["first"]), str(halves["first"])], str(tmp_path / "y"), progress=False)
    swapped = tmp_path / "swapped"
    dump(cfg([f"a={gpt2_dir}", f"b={llama_dir}"], write_corpus(tmp_path / "d.jsonl", corpus_texts(6, 300)[4:]), swapped))
    with pytest.raises(ConfigError, match="not the same model"):
        merge([str(halves["first"]), str(swapped)], str(tmp_path / "z"), progress=False)
    with_bos = tmp_path / "bos"
    r = runner.invoke(app, ["dump", "--teacher", f"a={llama_dir}", "--teacher", f"b={gpt2_dir}", "--data",
                            str(write_corpus(tmp_path / "e.jsonl", corpus_texts(6, 300)[4:])), "--out", str(with_bos), "--top-k", "6",
                            "--seq-len", "24", "--no-pack", "--bos", "always", "-q"])
    assert r.exit_code == 0, r.output
    assert logitstore.open(str(with_bos)).manifest["bos"] is True
    with pytest.raises(ConfigError, match="bos differs"):
        merge([str(halves["first"]), str(with_bos)], str(tmp_path / "w"), progress=False)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    r = runner.invoke(app, ["merge", str(halves["first"]), str(other_k), "--out", str(tmp_path / "cli"), "-q"])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "differs in k" in r.output


def test_convert_round_trip_keeps_values_and_id(tmp_path, halves):
    src = logitstore.open(str(halves["whole"]))
    arrow = convert(str(halves["whole"]), str(tmp_path / "arrow"), "arrow", progress=False)
    assert arrow["backend"] == "arrow" and verify(str(tmp_path / "arrow")) == []
    back = convert(str(tmp_path / "arrow"), str(tmp_path / "zarr"), "zarr", progress=False)
    for m in (arrow, back):
        assert store_id(m) == store_id(src.manifest)
    assert_same_sequences(logitstore.open(str(tmp_path / "arrow")), src, ["a", "b"])
    assert_same_sequences(logitstore.open(str(tmp_path / "zarr")), src, ["a", "b"])
    with pytest.raises(ConfigError, match="already a zarr store"):
        convert(str(halves["whole"]), str(tmp_path / "again"), "zarr", progress=False)


@pytest.fixture(scope="module")
def full_store(tmp_path_factory, llama_dir, gpt2_dir, corpus, tokenizer):
    """Two teachers at k = V (lossless): their stored distributions are the full ones."""
    out = tmp_path_factory.mktemp("full") / "store"
    V = len(tokenizer)
    dump(DumpConfig(teachers=(f"a={llama_dir}", f"b={gpt2_dir}"), data=str(corpus), out=str(out), top_k=V, seq_len=24,
                    encoding="lossless", shard_sequences=3, max_tokens=150, progress=False))
    return out


def brute_fused(lps, weights, temps, mode):
    """Fusion of full log-prob arrays [N, L, V] (float64)."""
    tempered = []
    for lp, T in zip(lps, temps):
        a = lp / T
        tempered.append(a - np.logaddexp.reduce(a, axis=-1, keepdims=True))
    if mode == "mean-probs":
        return np.log(sum(w * np.exp(a) for w, a in zip(weights, tempered)))
    s = sum(w * a for w, a in zip(weights, tempered))
    return s - np.logaddexp.reduce(s, axis=-1, keepdims=True)


@pytest.mark.parametrize("mode,weights,temps", [("mean-probs", [0.7, 0.3], [1.0, 1.0]), ("mean-logits", [0.5, 0.5], [1.0, 1.0])])
def test_fuse_equals_brute_force_from_full_teachers(tmp_path, full_store, llama_dir, gpt2_dir, corpus, mode, weights, temps):
    packed, lp_a = reference_outputs(llama_dir, corpus, 24, max_tokens=150)
    _, lp_b = reference_outputs(gpt2_dir, corpus, 24, max_tokens=150)
    q = brute_fused([lp_a, lp_b], weights, temps, mode)  # [N, L, V]
    k = 16
    out = tmp_path / "fused"
    m = fuse_store([str(full_store)], str(out), weights=weights, temperatures=temps, mode=mode, top_k=k, progress=False)
    assert m["teachers"][0]["k"] == k and m["teachers"][0]["fusion"]["mode"] == mode
    assert verify(str(out)) == []
    got = store_arrays(logitstore.open(str(out)), "fused")
    valid = np.arange(24)[None] < packed.lengths[:, None]
    exp_lp = -np.sort(-q, axis=-1)[..., :k]
    np.testing.assert_allclose(got["logprobs"][valid], exp_lp[valid], atol=2e-4)
    picked = np.take_along_axis(q, got["ids"].astype(np.int64), -1)  # ids: the most probable (ties either way)
    np.testing.assert_allclose(picked[valid], exp_lp[valid], atol=2e-4)
    np.testing.assert_allclose(got["tail_mass"][valid], (1 - np.exp(exp_lp).sum(-1))[valid], atol=2e-4)
    ent = -(np.exp(q) * q).sum(-1)
    np.testing.assert_allclose(got["entropy"][valid], ent[valid], atol=2e-4)
    nxt = np.zeros_like(packed.input_ids)
    nxt[:, :-1] = packed.input_ids[:, 1:]
    has_next = np.arange(24)[None] < (packed.lengths[:, None] - 1)
    gold = np.take_along_axis(q, nxt[..., None].astype(np.int64), -1)[..., 0]
    np.testing.assert_allclose(got["gold_logprob"][has_next], gold[has_next], atol=2e-4)
    assert np.all(got["gold_logprob"][valid & ~has_next] == 0)
    np.testing.assert_array_equal(got["input_ids"], packed.input_ids)


def test_fuse_refuses_bad_arguments(tmp_path, full_store, halves):
    with pytest.raises(ConfigError, match="--weights: 3 weight"):
        fuse_store([str(full_store)], str(tmp_path / "a"), weights=[1, 1, 1], progress=False)
    with pytest.raises(ConfigError, match="no teacher 'c'"):
        fuse_store([str(full_store)], str(tmp_path / "b"), teachers=["a", "c"], progress=False)
    with pytest.raises(ConfigError, match="must cover the same data|holds different data"):
        fuse_store([str(full_store), str(halves["whole"])], str(tmp_path / "c"), teachers=["a", "b"], progress=False)
    r = runner.invoke(app, ["fuse", str(full_store), "--out", str(tmp_path / "d"), "--weights", "x,1"])
    assert r.exit_code == 2 and "--weights: expected comma-separated numbers" in r.output
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_fuse_refuses_tempered_targets(tmp_path, full_store):
    """Stored values are T = 1 log-probs and the trainer tempers what it reads, so a fused store
    written at T != 1 would be tempered twice: fuse refuses it and names the alternative."""
    with pytest.raises(ConfigError, match="--temperature 2,2: a store holds T = 1 log-probs.*trainer fit --temperature"):
        fuse_store([str(full_store)], str(tmp_path / "a"), temperatures=[2.0, 2.0], progress=False)
    with pytest.raises(ConfigError, match="--temperature 1,0.5"):
        fuse_store([str(full_store)], str(tmp_path / "b"), temperatures=[1.0, 0.5], progress=False)
    r = runner.invoke(app, ["fuse", str(full_store), "--out", str(tmp_path / "c"), "--temperature", "2,2", "-q"])
    assert r.exit_code == 2 and "T = 1 log-probs" in r.output
    assert not any((tmp_path / n).exists() for n in "abc")
    m = fuse_store([str(full_store)], str(tmp_path / "d"), temperatures=[1.0, 1.0], progress=False)
    assert m["teachers"][0]["fusion"]["temperatures"] == [1.0, 1.0]


def test_fused_store_trains_like_any_single_teacher_store(tmp_path, full_store):
    """The CLI writes it; the reader and the trainer's dataset take it as one teacher."""
    out = tmp_path / "fused"
    r = runner.invoke(app, ["fuse", str(full_store), "--out", str(out), "--weights", "0.5,0.5", "--top-k", "8", "-q"])
    assert r.exit_code == 0, r.output
    from trainer.data import DistillDataset

    ds = DistillDataset([str(out)], batch_size=2, shuffle=False)
    batch = next(iter(ds))
    assert batch["teacher_lp"].shape[0] == 1
    r = runner.invoke(app, ["info", str(out)])
    assert "derived      fuse of ls-" in r.output and "fused" in r.output


@pytest.mark.parametrize("to", ["parquet", "hf"])
def test_export_round_trip(tmp_path, halves, to):
    import datasets

    out = tmp_path / f"export-{to}"
    r = runner.invoke(app, ["export", str(halves["whole"]), "--out", str(out), "--to", to, "-q"])
    assert r.exit_code == 0, r.output
    if to == "parquet":
        ds = datasets.load_dataset("parquet", data_dir=str(out), split="train")
        assert json.loads((out / "logitstore_export.json").read_text())["rows"] == len(ds)
        assert not (out / ".partial").exists()
    else:
        ds = datasets.load_from_disk(str(out))
    store = logitstore.open(str(halves["whole"]))
    assert len(ds) == len(store)
    for i in range(len(store)):
        seq, row = store[i], ds[i]
        assert row["input_ids"] == seq["input_ids"].tolist() and row["length"] == len(seq["input_ids"])
        assert row["seq_hash"] == seq["seq_hash"]
        for t in ("a", "b"):
            for f in FIELDS:
                np.testing.assert_array_equal(np.asarray(row[f"{t}.{f}"]), seq["teachers"][t][f], err_msg=f"{t}.{f}")
    again = runner.invoke(app, ["export", str(halves["whole"]), "--out", str(out), "--to", to])
    assert again.exit_code == 2 and "not empty" in again.output


def test_interrupted_merge_resumes_to_the_same_store(tmp_path, halves, monkeypatch):
    from logitstore.format.writer import PartWriter

    ref = merge([str(halves["first"]), str(halves["second"])], str(tmp_path / "ref"), progress=False)
    real, calls = PartWriter.write_files, []

    def flaky(self, *a, **kw):
        calls.append(1)
        if len(calls) == 7:
            raise OSError("disk went away")
        return real(self, *a, **kw)

    monkeypatch.setattr(PartWriter, "write_files", flaky)
    out = tmp_path / "merged"
    with pytest.raises(OSError):
        merge([str(halves["first"]), str(halves["second"])], str(out), progress=False)
    assert not (out / "manifest.json").exists()
    monkeypatch.setattr(PartWriter, "write_files", real)
    m = merge([str(halves["first"]), str(halves["second"])], str(out), progress=False)
    assert m["index"]["files"] == ref["index"]["files"]  # the same index files: the same parts, byte for byte
    with pytest.raises(ConfigError, match="different settings"):
        merge([str(halves["second"]), str(halves["first"])], str(out), progress=False)


def test_tools_on_memory_urls(halves, memory_url):
    """Any fsspec URL works for reading and writing (memory://: no rename, like an object store)."""
    merged, arrow = f"{memory_url}/merged", f"{memory_url}/arrow"
    m = merge([str(halves["first"]), str(halves["second"])], merged, progress=False)
    convert(merged, arrow, "arrow", progress=False)
    assert verify(arrow) == []
    assert store_id(logitstore.open(arrow).manifest) == store_id(m)
    assert_same_sequences(logitstore.open(arrow), logitstore.open(str(halves["whole"])), ["a", "b"])


def test_merge_refuses_stores_that_share_sequences(tmp_path, halves):
    """One store over a prefix of the other's corpus: different data fingerprints, shared sequences."""
    whole = logitstore.open(str(halves["whole"]))
    first = logitstore.open(str(halves["first"]))
    with pytest.raises(ConfigError, match=rf"{len(first)} of its {len(first)} sequences are also in .*whole.*seq_hash [0-9a-f]{{16}}"):
        merge([str(halves["whole"]), str(halves["first"])], str(tmp_path / "m"), progress=False)
    with pytest.raises(ConfigError, match=rf"{len(first)} of its {len(whole)} sequences are also in .*first"):
        merge([str(halves["first"]), str(halves["whole"])], str(tmp_path / "n"), progress=False)
    r = runner.invoke(app, ["merge", str(halves["second"]), str(halves["whole"]), "--out", str(tmp_path / "cli"), "-q"])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "sequences are also in" in r.output, r.output
    assert not any((tmp_path / n).exists() for n in ("m", "n", "cli"))
    # repeats that are real (boilerplate documents) can be merged on purpose, with a count
    r = runner.invoke(app, ["merge", str(halves["first"]), str(halves["whole"]), "--out", str(tmp_path / "both"), "-q",
                            "--allow-shared-sequences"])
    assert r.exit_code == 0 and f"{len(first)} of its {len(whole)} sequences are also in" in r.output, r.output
    assert len(logitstore.open(str(tmp_path / "both"))) == len(first) + len(whole)


@pytest.mark.parametrize("part", ["inputs", "t1"])
def test_merge_refuses_a_damaged_input_shard(tmp_path, halves, part):
    import shutil

    damaged = tmp_path / "second"
    shutil.copytree(halves["second"], damaged)
    shard = entries(damaged)[-1]
    rel = max(shard["parts"][part]["files"], key=lambda f: shard["parts"][part]["files"][f]["bytes"])
    victim = damaged / shard["path"] / part / rel
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    out = tmp_path / "merged"
    r = runner.invoke(app, ["merge", str(halves["first"]), str(damaged), "--out", str(out), "-q"])
    assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
    assert f"{shard['path']}/{part}/{rel}" in r.output and "sha256" in r.output, r.output
    assert not (out / "manifest.json").exists()


def _interrupt_nth_write(monkeypatch, n):
    from logitstore.format.writer import PartWriter

    real, calls = PartWriter.write, []

    def flaky(self, *a, **kw):
        calls.append(1)
        if len(calls) == n:
            raise OSError("disk went away")
        return real(self, *a, **kw)

    monkeypatch.setattr(PartWriter, "write", flaky)
    return lambda: monkeypatch.setattr(PartWriter, "write", real)


def test_interrupted_convert_resumes_to_the_same_store(tmp_path, halves, monkeypatch):
    ref = convert(str(halves["whole"]), str(tmp_path / "ref"), "arrow", progress=False)
    restore = _interrupt_nth_write(monkeypatch, 5)
    out = tmp_path / "arrow"
    with pytest.raises(OSError):
        convert(str(halves["whole"]), str(out), "arrow", progress=False)
    assert not (out / "manifest.json").exists() and not (out / "lock.json").exists()
    restore()
    m = convert(str(halves["whole"]), str(out), "arrow", progress=False)
    assert m["index"]["files"] == ref["index"]["files"]  # the same index files: the same parts, byte for byte
    assert store_id(m) == store_id(ref) and verify(str(out)) == []


def test_interrupted_fuse_resumes_to_the_same_store(tmp_path, halves, monkeypatch):
    ref = fuse_store([str(halves["whole"])], str(tmp_path / "ref"), weights=[0.6, 0.4], progress=False)
    restore = _interrupt_nth_write(monkeypatch, 4)
    out = tmp_path / "fused"
    with pytest.raises(OSError):
        fuse_store([str(halves["whole"])], str(out), weights=[0.6, 0.4], progress=False)
    assert not (out / "manifest.json").exists()
    restore()
    m = fuse_store([str(halves["whole"])], str(out), weights=[0.6, 0.4], progress=False)
    assert m["index"]["files"] == ref["index"]["files"]  # the same index files: the same parts, byte for byte
    assert store_id(m) == store_id(ref) and verify(str(out)) == []
    with pytest.raises(ConfigError, match=r"different settings \(.*weights"):
        fuse_store([str(halves["whole"])], str(out), weights=[0.5, 0.5], progress=False)
