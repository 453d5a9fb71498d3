"""verify finds damage and names the file; the CLI runs dump, info and verify end to end."""

import json
import shutil

import numpy as np
import pytest

from storeindex import entries
from typer.testing import CliRunner

from logitstore.cli import app
from logitstore.tools.verify import verify

runner = CliRunner()


@pytest.fixture(scope="module", params=["zarr", "arrow"])
def cli_store(request, tmp_path_factory, llama_dir, gpt2_dir, corpus):
    out = tmp_path_factory.mktemp(f"cli-{request.param}") / "store"
    r = runner.invoke(app, ["dump", "--teacher", f"llama={llama_dir}", "--teacher", f"gpt2={gpt2_dir}", "--data", str(corpus),
                            "--out", str(out), "--top-k", "8", "--seq-len", "32", "--format", request.param,
                            "--shard-sequences", "8", "--max-tokens", "900"])
    assert r.exit_code == 0, r.output
    assert "B/token" in r.output and "tokens/s" in r.output
    return out


def test_info_and_verify_cli(cli_store):
    r = runner.invoke(app, ["info", str(cli_store)])
    assert r.exit_code == 0 and "llama" in r.output and "gpt2" in r.output and "B/token" in r.output
    r = runner.invoke(app, ["info", str(cli_store), "--json"])
    d = json.loads(r.output)
    assert d["tokens"] == 900 and len(d["teachers"]) == 2
    r = runner.invoke(app, ["verify", str(cli_store)])
    assert r.exit_code == 0 and r.output.strip().endswith("OK")


def test_flipped_byte_is_found_and_named(tmp_path, cli_store):
    rng = np.random.default_rng(0)
    files = [f"{s['path']}/{p}/{rel}" for s in entries(cli_store) for p, v in s["parts"].items() for rel in v["files"]]
    files += ["index/shards.parquet", "index/files.parquet", "index/sequences.parquet"]  # the index is data too
    for trial in range(6):
        s = tmp_path / f"flip{trial}"
        shutil.copytree(cli_store, s)
        victim = files[rng.integers(len(files))]
        data = bytearray((s / victim).read_bytes())
        pos = int(rng.integers(len(data)))
        data[pos] ^= 1 << int(rng.integers(8))
        (s / victim).write_bytes(bytes(data))
        problems = verify(str(s))
        assert problems and any(victim in p for p in problems), (victim, problems)
        r = runner.invoke(app, ["verify", str(s)])
        assert r.exit_code == 1 and victim in r.output


def test_missing_shard_file_is_reported(tmp_path, cli_store):
    s = tmp_path / "missing"
    shutil.copytree(cli_store, s)
    shutil.rmtree(s / "shards" / "000001" / "t1")
    problems = verify(str(s))
    assert any("shards/000001/t1" in p and "missing" in p for p in problems)


def test_reader_refuses_corrupt_data_by_default(tmp_path, cli_store):
    import logitstore
    from logitstore.errors import FormatError

    s = tmp_path / "corrupt"
    shutil.copytree(cli_store, s)
    rel = next(iter(entries(s)[0]["parts"]["t0"]["files"]))
    p = s / "shards/000000/t0" / rel
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    store = logitstore.open(str(s))
    with pytest.raises(FormatError, match="sha256 mismatch"):
        store[0]


def test_store_id_depends_on_content_not_on_paths_names_or_layout(tmp_path, llama_dir, gpt2_dir, corpus):
    import shutil

    from logitstore.dump import DumpConfig, dump
    from logitstore.tools.info import info

    data = tmp_path / "elsewhere.jsonl"  # the same corpus under another path
    shutil.copy(corpus, data)
    base = dict(top_k=4, seq_len=16, max_tokens=200, progress=False)
    a = dump(DumpConfig(teachers=(f"teamA={llama_dir}",), data=str(corpus), out=str(tmp_path / "a"), shard_sequences=3, **base))
    b = dump(DumpConfig(teachers=(f"teamB={llama_dir}",), data=str(data), out=str(tmp_path / "b"), shard_sequences=5,
                        format="arrow", **base))
    ids = {n: info(str(tmp_path / n))["id"] for n in ("a", "b")}
    assert ids["a"] == ids["b"] and ids["a"].startswith("ls-")
    for name, kw in (("k", dict(top_k=5)), ("enc", dict(encoding="lossless"))):
        dump(DumpConfig(teachers=(f"x={llama_dir}",), data=str(corpus), out=str(tmp_path / name), **{**base, **kw}))
        assert info(str(tmp_path / name))["id"] != ids["a"], name
    dump(DumpConfig(teachers=(f"x={gpt2_dir}",), data=str(corpus), out=str(tmp_path / "other-teacher"), **base))
    assert info(str(tmp_path / "other-teacher"))["id"] != ids["a"]
    assert a.manifest["teachers"][0]["weights_hash"] == b.manifest["teachers"][0]["weights_hash"]


def test_ls_lists_every_store_under_a_prefix(tmp_path, cli_store):
    root = tmp_path / "team"
    shutil.copytree(cli_store, root / "a" / "store1")
    shutil.copytree(cli_store, root / "b" / "nested" / "store2")
    shutil.copytree(cli_store, root / "broken")
    (root / "broken" / "manifest.json").write_text("{not json")
    (root / "not-a-store").mkdir()
    r = runner.invoke(app, ["ls", str(root), "--json"])
    assert r.exit_code == 0, r.output
    rows = {row["url"].removeprefix(str(root)).strip("/"): row for row in json.loads(r.output)}
    assert set(rows) == {"a/store1", "b/nested/store2", "broken"}
    assert rows["a/store1"]["id"] == rows["b/nested/store2"]["id"]  # same content, same id
    assert rows["a/store1"]["teachers"] == ["llama", "gpt2"] and rows["a/store1"]["k"] == [8]
    assert "manifest.json" in rows["broken"]["error"]
    r = runner.invoke(app, ["ls", str(root)])
    assert r.exit_code == 0 and r.output.count("ls-") == 2 and "UNREADABLE" in r.output
    r = runner.invoke(app, ["ls", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "no such directory" in r.output


def test_stats_match_a_direct_computation_and_plot(tmp_path, cli_store):
    import logitstore
    from logitstore.tools.stats import store_stats

    d = store_stats(str(cli_store))
    s = logitstore.open(str(cli_store))
    for name, st in d["teachers"].items():
        cum, gin = [], []
        for i in range(len(s)):
            seq = s[i]
            t = seq["teachers"][name]
            p = np.sort(np.exp(t["logprobs"].astype(np.float64)), axis=-1)[:, ::-1]
            cum.append(np.cumsum(p, -1))
            n = len(seq["input_ids"])
            gin.append(t["gold_logprob"][: n - 1] >= t["logprobs"][: n - 1].min(-1) - 1e-3)
        c = np.concatenate(cum)
        assert st["positions"] == c.shape[0]
        np.testing.assert_allclose(st["mass_at_j"]["mean"], c.mean(0), rtol=1e-9)
        np.testing.assert_allclose(st["mass_at_j"]["p50"], np.percentile(c, 50, axis=0), rtol=1e-9)
        assert st["next_token_in_top_k"] == pytest.approx(np.concatenate(gin).mean())
        assert abs(st["mass_at_j"]["mean"][-1] + st["tail_mass"]["mean"] - 1) < 0.02
    r = runner.invoke(app, ["stats", str(cli_store), "--plot", str(tmp_path / "s.png")])
    assert r.exit_code == 0 and "top-j mass" in r.output and (tmp_path / "s.png").stat().st_size > 1000
