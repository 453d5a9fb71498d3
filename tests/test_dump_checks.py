"""What a dump checks before it writes anything, and what it says: one line naming the flag."""

import json

import pytest
from typer.testing import CliRunner

import logitstore
from logitstore.cli import app
from logitstore.dump import DumpConfig, dump
from logitstore.errors import ConfigError, LogitStoreError
from logitstore.format.manifest import store_id

from conftest import corpus_texts

runner = CliRunner()


def run_cli(*args, **kw):
    return runner.invoke(app, [str(a) for a in args], **kw)


def dump_args(teacher, data, out, *extra):
    return ["dump", "--teacher", teacher, "--data", data, "--out", out, "--top-k", "4", "--seq-len", "16",
            "--max-tokens", "120", "-q", *extra]


def one_line_error(r, *needles):
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.output, r.output
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_seq_len_beyond_the_teachers_positions_is_refused_before_anything_is_written(tmp_path, which, llama_dir, gpt2_dir, corpus):
    """GPT-2 (learned positions, n_positions = 512) used to fail with an IndexError in the embedding
    and leave a partial store; Llama (RoPE, max_position_embeddings = 512) was accepted silently."""
    teacher = {"llama": llama_dir, "gpt2": gpt2_dir}[which]
    out = tmp_path / "out"
    r = run_cli(*dump_args(f"{which}={teacher}", corpus, out, "--seq-len", "600", "--max-tokens", "700"))
    line = one_line_error(r, "--seq-len 600", f"teacher {which}", "512")
    assert ("n_positions" if which == "gpt2" else "max_position_embeddings") in line
    assert not out.exists()
    # the corrected command then works into the same --out
    assert run_cli(*dump_args(f"{which}={teacher}", corpus, out, "--seq-len", "512", "--max-tokens", "600")).exit_code == 0


def test_position_limit_follows_rope_scaling():
    from transformers import GPT2Config, LlamaConfig

    from logitstore.capture.teacher import position_limit

    assert position_limit(GPT2Config(n_positions=256))[0] == 256
    assert position_limit(LlamaConfig(max_position_embeddings=4096))[0] == 4096
    yarn = LlamaConfig(max_position_embeddings=32768,
                       rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768})
    limit, why = position_limit(yarn)
    assert limit == 131072 and "yarn" in why
    llama3 = LlamaConfig(max_position_embeddings=131072, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192, "low_freq_factor": 1.0, "high_freq_factor": 4.0})
    assert position_limit(llama3)[0] == 131072  # the declared length is already the scaled one
    linear = LlamaConfig(max_position_embeddings=2048, rope_scaling={"rope_type": "linear", "factor": 2.0})
    assert position_limit(linear)[0] == 4096


def test_alibi_teachers_have_no_position_limit():
    from transformers import BloomConfig, FalconConfig, MptConfig

    from logitstore.capture.teacher import position_limit

    assert position_limit(BloomConfig(seq_length=2048)) is None
    assert position_limit(MptConfig(max_seq_len=2048)) is None  # MPT's default attention is ALiBi
    assert position_limit(FalconConfig(alibi=True)) is None
    assert position_limit(FalconConfig(alibi=False, max_position_embeddings=2048))[0] == 2048


def test_seq_len_1_is_refused(tmp_path, llama_dir, corpus):
    one_line_error(run_cli(*dump_args(str(llama_dir), corpus, tmp_path / "o", "--seq-len", "1")), "--seq-len", "at least 2")
    with pytest.raises(ConfigError, match="at least 2"):
        DumpConfig(teachers=("t",), data="d", out="o", seq_len=1)
    assert not (tmp_path / "o").exists()


def test_format_parquet_is_the_arrow_backend(tmp_path, llama_dir, corpus):
    out = tmp_path / "pq"
    r = run_cli(*dump_args(str(llama_dir), corpus, out, "--format", "parquet"))
    assert r.exit_code == 0, r.output
    assert logitstore.open(str(out)).manifest["backend"] == "arrow"
    assert list(out.glob("shards/*/inputs/part.parquet"))
    # the same command again resumes (finds it complete), whichever name was used
    assert run_cli(*dump_args(str(llama_dir), corpus, out, "--format", "arrow")).exit_code == 0


def test_resume_with_other_settings_names_the_setting(tmp_path, llama_dir, corpus):
    out = tmp_path / "s"
    assert run_cli(*dump_args(f"t={llama_dir}", corpus, out)).exit_code == 0
    one_line_error(run_cli(*dump_args(f"t={llama_dir}", corpus, out, "--top-k", "8")), "teachers[0].k: 4 -> 8", "different settings")
    one_line_error(run_cli(*dump_args(f"t={llama_dir}", corpus, out, "--seq-len", "20")), "seq_len: 16 -> 20")


def test_missing_relative_teacher_directory(tmp_path, corpus, monkeypatch):
    """``models/x`` also reads as a hub id (org/name); the message must still say the directory is missing."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    one_line_error(run_cli(*dump_args("models/x", corpus, tmp_path / "o")), "--teacher models/x", "no such directory")
    assert not (tmp_path / "o").exists()


def test_empty_jsonl_says_the_file_is_empty(tmp_path, llama_dir):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    one_line_error(run_cli(*dump_args(str(llama_dir), data, tmp_path / "o")), "empty.jsonl", "the file is empty")


def test_rows_whose_text_is_not_a_string_are_counted(tmp_path, llama_dir, capsys):
    from logitstore.capture.documents import load_texts

    data = tmp_path / "mixed.jsonl"
    rows = [{"text": "hello world, a document"}, {"text": None}, {"text": 42}, {"text": "another one"}, {"text": None}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_texts(str(data)) == ["hello world, a document", "another one"]
    err = capsys.readouterr().err
    assert "warning: --data" in err and "skipped 3 of 5 rows" in err and "'text' is not a string" in err, err


def test_a_directory_or_glob_of_txt_files_is_one_document_per_file(tmp_path, llama_dir):
    from logitstore.capture.documents import describe_source, load_texts

    d = tmp_path / "docs"
    d.mkdir()
    texts = corpus_texts(n_docs=3, max_chars=300)
    for name, t in zip(["b.txt", "a.txt", "c.txt"], texts):
        (d / name).write_text(t, encoding="utf-8")
    (d / "notes.md").write_text("not a document")
    expected = [texts[1], texts[0], texts[2]]  # sorted by file name
    assert load_texts(str(d)) == expected
    assert load_texts(str(d / "*.txt")) == expected
    src = describe_source(str(d), "text")
    assert [f["path"] for f in src["files"]] == ["a.txt", "b.txt", "c.txt"] and all(len(f["sha256"]) == 64 for f in src["files"])
    out = tmp_path / "s"
    m = dump(DumpConfig(teachers=(str(llama_dir),), data=str(d), out=str(out), top_k=4, seq_len=16, progress=False)).manifest
    assert m["data"]["source"]["files"] == src["files"]
    (d / "a.txt").write_text(texts[1] + " changed", encoding="utf-8")
    assert describe_source(str(d), "text")["sha256"] != src["sha256"]
    with pytest.raises(ConfigError, match="different settings"):
        dump(DumpConfig(teachers=(str(llama_dir),), data=str(d), out=str(out), top_k=4, seq_len=16, progress=False))
    with pytest.raises(LogitStoreError, match="matches no files"):
        load_texts(str(d / "*.jsonl"))


def test_trust_remote_code_is_off_by_default(tmp_path, tokenizer, corpus):
    """A teacher whose config needs code from its repository is refused unless --trust-remote-code.
    The repository's code would create a marker file if it ran; it must not run."""
    repo = tmp_path / "remote"
    tokenizer.save_pretrained(repo)
    marker = tmp_path / "remote-code-ran"
    (repo / "config.json").write_text(json.dumps({
        "model_type": "logitstore_test_remote", "architectures": ["RemoteForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_remote.RemoteConfig", "AutoModelForCausalLM": "modeling_remote.RemoteForCausalLM"}}))
    (repo / "configuration_remote.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nraise SystemExit('remote code ran')\n")
    (repo / "modeling_remote.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nraise SystemExit('remote code ran')\n")
    assert DumpConfig(teachers=("t",), data="d", out="o").trust_remote_code is False
    out = tmp_path / "o"
    one_line_error(run_cli(*dump_args(str(repo), corpus, out)), str(repo), "--trust-remote-code")
    assert not marker.exists() and not out.exists()


def test_help_shows_defaults():
    r = run_cli("dump", "--help", env={"COLUMNS": "250", "TERM": "dumb"})
    assert r.exit_code == 0
    text = " ".join(r.output.split())
    assert "[default: 64]" in text and "[default: 512]" in text and "[default: zarr]" in text
    assert "(off unless given)" in text and "'parquet' is accepted too" in text
    r = run_cli("ls", "--help", env={"COLUMNS": "250"})
    assert "[default: 4]" in " ".join(r.output.split())


def test_ctrl_c_says_how_to_resume_and_exits_130(tmp_path, llama_dir, corpus, monkeypatch):
    from logitstore.capture.teacher import TeacherRunner

    real, calls = TeacherRunner.run, []

    def interrupted(self, *a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *a, **kw)

    monkeypatch.setattr(TeacherRunner, "run", interrupted)
    out = tmp_path / "s"
    args = dump_args(str(llama_dir), corpus, out, "--batch-size", "1", "--shard-sequences", "2", "--max-tokens", "200")
    r = run_cli(*args)
    assert r.exit_code == 130, r.output
    assert r.output.strip().splitlines()[-1] == "interrupted; re-run the same command to resume"
    assert not (out / "manifest.json").exists() and not (out / "lock.json").exists()
    monkeypatch.setattr(TeacherRunner, "run", real)
    assert run_cli(*args).exit_code == 0 and (out / "manifest.json").exists()


def test_quiet_dump_prints_nothing_from_the_libraries(tmp_path, tokenizer, corpus):
    """A teacher checkpoint with a weight missing makes transformers print a load report; -q hides
    it (and every loading bar). A subprocess, so that the libraries' own handlers write to its stderr."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file, save_file

    from conftest import ROOT, save_llama

    teacher = save_llama(tmp_path / "t", tokenizer)
    weights = load_file(teacher / "model.safetensors")
    weights.pop(next(k for k in weights if "layers.1.mlp" in k))
    save_file(weights, teacher / "model.safetensors", metadata={"format": "pt"})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "logitstore", *[str(a) for a in dump_args(str(teacher), corpus, tmp_path / "q")]]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", (r.stdout, r.stderr)
    loud_cmd = [sys.executable, "-m", "logitstore", *[str(a) for a in dump_args(str(teacher), corpus, tmp_path / "loud") if a != "-q"]]
    loud = subprocess.run(loud_cmd, env=env, capture_output=True, text=True, timeout=300)
    assert loud.returncode == 0 and "MISSING" in loud.stdout + loud.stderr  # the report exists without -q


def test_store_id_changes_with_what_the_store_holds(tmp_path, llama_dir, corpus):
    """data, seq_len, packing, dtype and max_tokens each change the id (paths and names do not:
    tests/test_store.py)."""
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"text": t[::-1]}) + "\n" for t in corpus_texts(n_docs=4, max_chars=2500)))
    base = dict(teachers=(f"t={llama_dir}",), data=str(corpus), top_k=4, seq_len=16, max_tokens=120, progress=False)
    variants = {"base": {}, "data": {"data": str(other)}, "seq_len": {"seq_len": 20}, "packing": {"pack": False},
                "dtype": {"dtype": "bf16"}, "max_tokens": {"max_tokens": 110}}
    ids = {}
    for name, change in variants.items():
        m = dump(DumpConfig(**{**base, **change, "out": str(tmp_path / name)})).manifest
        ids[name] = store_id(m)
    assert len(set(ids.values())) == len(ids), ids
    # and the same settings again, elsewhere, give the same id
    again = dump(DumpConfig(**{**base, "out": str(tmp_path / "again")})).manifest
    assert store_id(again) == ids["base"]
