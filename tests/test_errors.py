"""Bad input: one clear line naming the file/field, a non-zero exit, nothing that looks complete."""

import json
from pathlib import Path
import re

import numpy as np

import pytest
from typer.testing import CliRunner

import logitstore
from logitstore.cli import app
from logitstore.dump import DumpConfig, dump
from logitstore.errors import ConfigError, FormatError, LogitStoreError

from conftest import build_tokenizer, save_llama

runner = CliRunner()


def run_cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def dump_args(teacher, data, out, *extra):
    return ["dump", "--teacher", teacher, "--data", data, "--out", out, "--top-k", "4", "--seq-len", "16", "-q", *extra]


@pytest.fixture(scope="module")
def small_store(tmp_path_factory, llama_dir, corpus):
    out = tmp_path_factory.mktemp("small") / "store"
    dump(DumpConfig(teachers=(str(llama_dir),), data=str(corpus), out=str(out), top_k=4, seq_len=16, max_tokens=200,
                    shard_sequences=4, progress=False))
    return out


def assert_one_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    err = result.output.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), result.output
    for n in needles:
        assert n in err[0], (n, err[0])
    assert "Traceback" not in result.output


def test_mismatched_tokenizers_refused_before_work(tmp_path, llama_dir, corpus):
    other_tok = build_tokenizer(vocab_size=300, extra_special="<|other|>")
    other = save_llama(tmp_path / "other", other_tok)
    out = tmp_path / "out"
    r = run_cli(*dump_args(f"a={llama_dir}", corpus, out, "--teacher", f"b={other}"))
    assert_one_line_error(r, "tokenizer differs", str(other))
    assert not out.exists()


@pytest.mark.parametrize("flag,value,needle", [
    ("--top-k", "0", "--top-k"), ("--top-k", "100000", "larger than the vocabulary"),
    ("--seq-len", "0", "--seq-len"), ("--seq-len", "-5", "--seq-len"),
    ("--format", "hdf5", "--format"), ("--encoding", "zip", "--encoding"), ("--dtype", "int8", "--dtype"),
])
def test_bad_flags(tmp_path, llama_dir, corpus, flag, value, needle):
    out = tmp_path / "out"
    args = dump_args(str(llama_dir), corpus, out)
    i = args.index(flag) if flag in args else None
    if i is not None:
        args[i + 1] = value
    else:
        args += [flag, value]
    assert_one_line_error(run_cli(*args), needle)
    assert not (out / "manifest.json").exists()


def test_missing_teacher_path(tmp_path, corpus):
    assert_one_line_error(run_cli(*dump_args(str(tmp_path / "nope"), corpus, tmp_path / "o")), "nope", "no such")


def test_missing_text_field(tmp_path, llama_dir):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"body": "hello world"}) + "\n")
    assert_one_line_error(run_cli(*dump_args(str(llama_dir), data, tmp_path / "o")), "no field 'text'", "--text-field")


def test_empty_corpus(tmp_path, llama_dir):
    data = tmp_path / "empty.jsonl"
    data.write_text(json.dumps({"text": "   "}) + "\n")
    assert_one_line_error(run_cli(*dump_args(str(llama_dir), data, tmp_path / "o")), "no non-empty documents")


def test_non_utf8_corpus(tmp_path, llama_dir):
    data = tmp_path / "bad.txt"
    data.write_bytes(b"hello \xff\xfe world " * 3)
    assert_one_line_error(run_cli(*dump_args(str(llama_dir), data, tmp_path / "o")), "not valid UTF-8", "bad.txt")


def test_other_store_at_output(tmp_path, llama_dir, corpus, small_store):
    r = run_cli(*dump_args(str(llama_dir), corpus, small_store, "--top-k", "5"))
    assert_one_line_error(r, "different settings")


V1_STORE = Path(__file__).parent / "data" / "v1" / "zarr"


def tampered_copy(small_store, dest, edit):
    """A copy of the store whose manifest went through ``edit(manifest_dict)``."""
    import shutil

    shutil.copytree(small_store, dest)
    m = json.loads((dest / "manifest.json").read_text())
    edit(m)
    (dest / "manifest.json").write_text(json.dumps(m))
    return dest


def test_newer_format_version_refused(tmp_path, small_store):
    s = tampered_copy(small_store, tmp_path / "newer", lambda m: m.update(format_version=5))
    with pytest.raises(FormatError, match="format_version: 5 is newer"):
        logitstore.open(str(s))
    assert_one_line_error(run_cli("info", s), "newer than this logitstore reads")


def test_truncated_manifest_refused(tmp_path, small_store):
    import shutil

    s = tmp_path / "trunc"
    shutil.copytree(small_store, s)
    raw = (s / "manifest.json").read_bytes()
    (s / "manifest.json").write_bytes(raw[: len(raw) // 2])
    assert_one_line_error(run_cli("info", s), "manifest.json", "not valid JSON")
    r = run_cli("verify", s)
    assert r.exit_code == 1 and "not valid JSON" in r.output


@pytest.mark.parametrize("path", ["../../etc/passwd", "/etc/passwd", "s3://elsewhere/x", "a/./b"])
def test_paths_outside_store_refused(tmp_path, small_store, path):
    s = tampered_copy(small_store, tmp_path / "evil", lambda m: m["index"]["file_names"].append(path))
    with pytest.raises(FormatError, match="not a plain relative path"):
        logitstore.open(str(s))
    v1 = tampered_copy(V1_STORE, tmp_path / "evil-v1", lambda m: m["shards"][0]["parts"]["inputs"]["files"].update(
        {path: next(iter(m["shards"][0]["parts"]["inputs"]["files"].values()))}))
    with pytest.raises(FormatError, match="not a plain relative path"):
        logitstore.open(str(v1))


def test_huge_declared_sizes_refused_without_allocating(tmp_path, small_store):
    import shutil

    from storeindex import entries, rewrite

    s = tmp_path / "huge"
    shutil.copytree(small_store, s)
    shards = entries(s)
    shards[0]["n_sequences"] = 10**12
    rewrite(s, shards)
    with pytest.raises(FormatError, match=r"n_sequences: expected integers in \[1, 1048576\]"):
        logitstore.open(str(s)).index
    v1 = tampered_copy(V1_STORE, tmp_path / "huge-v1", lambda m: m["shards"][0].update(n_sequences=10**12))
    with pytest.raises(FormatError, match=r"n_sequences: expected an integer in"):
        logitstore.open(str(v1))
    s = tampered_copy(small_store, tmp_path / "long", lambda m: m.update(seq_len=10**9))
    with pytest.raises(FormatError, match="seq_len"):
        logitstore.open(str(s))


def test_unfinished_store_is_not_readable(tmp_path, small_store):
    import shutil

    s = tmp_path / "unfinished"
    shutil.copytree(small_store, s)
    (s / "manifest.json").unlink()
    with pytest.raises(FormatError, match="unfinished or crashed"):
        logitstore.open(str(s))


def test_errors_are_logitstore_errors():
    assert issubclass(FormatError, LogitStoreError) and issubclass(ConfigError, LogitStoreError)
    with pytest.raises(ConfigError):
        DumpConfig(teachers=(), data="x", out="y")


def test_document_longer_than_seq_len_is_split_without_losing_tokens(tokenizer):
    """Not an error: a long document continues in the next window(s), packed or not (documented in
    logitstore/capture/corpus.py)."""
    from logitstore.capture.corpus import pack

    long_doc = " ".join(f"word{i}" for i in range(200))
    n_doc = len(tokenizer(long_doc, add_special_tokens=False)["input_ids"]) + 1
    for packed in (True, False):
        p = pack(tokenizer, [long_doc, "short one"], 16, packed=packed)
        assert p.lengths.max() == 16 and int(p.lengths.sum()) >= n_doc
        first = np.concatenate([p.input_ids[i, : p.lengths[i]] for i in range(-(-n_doc // 16))])[:n_doc]
        want = tokenizer(long_doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert first.tolist() == want


def test_fp16_overflow_in_the_teacher_is_one_clear_line(tmp_path, tokenizer, corpus):
    """Logits beyond fp16 range become inf/NaN: refused with the position, nothing written as complete."""
    import torch
    from transformers import AutoModelForCausalLM

    teacher = save_llama(tmp_path / "hot", tokenizer, seed=4)
    model = AutoModelForCausalLM.from_pretrained(teacher)
    with torch.no_grad():
        model.lm_head.weight.mul_(1e4)  # logits far beyond fp16's 65,504
    model.save_pretrained(teacher)
    out = tmp_path / "out"
    r = run_cli(*dump_args(str(teacher), corpus, out, "--dtype", "fp16", "--device", "cpu", "--max-tokens", "64"))
    assert_one_line_error(r, "non-finite logits", "fp16")
    assert not (out / "manifest.json").exists()


def _rewrite_array(store_dir, shard_path, part, array, mutate):
    """Change one stored array of a part and re-sign it, as a hostile store would: every checksum
    matches, only the values are wrong."""
    from storeindex import rewrite_arrays

    rewrite_arrays(store_dir, int(shard_path.rsplit("/", 1)[1]), part, lambda arrays: mutate(arrays[array]))


@pytest.mark.parametrize("part,array,mutate,needle", [
    ("t0", "logprobs", lambda a: a.__setitem__((0, 0, 0), np.nan), "logprobs: non-finite"),
    ("t0", "tail_mass", lambda a: a.__setitem__((0, 1), 1.5), "tail_mass: outside [0, 1]"),
    ("t0", "ids", lambda a: a.__setitem__((0, 2, 0), 10**6 % 65536), ">= vocab_size"),
    ("inputs", "length", lambda a: a.__setitem__(0, 0), "length: values must lie in"),
])
def test_well_signed_but_invalid_values_are_named(tmp_path, llama_dir, corpus, part, array, mutate, needle):
    from logitstore.tools.verify import verify

    store = tmp_path / "s"
    dump(DumpConfig(teachers=(str(llama_dir),), data=str(corpus), out=str(store), top_k=4, seq_len=16, max_tokens=200,
                    shard_sequences=4, encoding="lossless", progress=False))
    shard = logitstore.open(str(store)).index.entries()[0]["path"]
    _rewrite_array(store, shard, part, array, mutate)
    problems = verify(str(store))
    assert any(needle in p and f"{shard}/{part}" in p for p in problems), problems
    r = run_cli("verify", store)  # one line per problem, non-zero exit
    assert r.exit_code != 0 and f"{shard}/{part}" in r.output and "Traceback" not in r.output
    # readers refuse them too, at decode time, with the shard, part and field named
    with pytest.raises(FormatError, match=re.escape(f"{shard}/{part}") + ".*" + re.escape(needle)):
        logitstore.open(str(store)).load_shard(0)
    from trainer.data import DistillDataset

    with pytest.raises(FormatError, match=re.escape(needle)):
        ds = DistillDataset([str(store)], batch_size=2)
        for _ in ds:
            pass
