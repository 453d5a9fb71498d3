"""Teacher hidden states in a store (``--hidden-layers``, FORMAT.md "Hidden states"): what is
stored equals the model's own ``output_hidden_states`` (through the recorded projection), per
token for LM stores and pooled per text for classify stores; bad requests and damaged entries
are refused in one line."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import logitstore
from logitstore.dump import DumpConfig, dump
from logitstore.errors import ConfigError, FormatError
from logitstore.format.hidden import from_bits, projection_matrix, projection_sha256, to_bits

from test_classify import _classifier, cls_tok, setup  # noqa: F401  (module fixtures)


def _bf16_tol(ref: np.ndarray) -> float:
    return float(np.abs(ref).max()) * 2.0 ** -8 + 1e-6  # one rounding to bfloat16


@pytest.mark.parametrize("dim,backend,dtype", [(None, "zarr", "bf16"), (16, "arrow", "fp16"), (8, "zarr", "bf16")])
def test_stored_hidden_states_equal_the_models_own(tmp_path, llama_dir, corpus, dim, backend, dtype):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "s"
    dump(DumpConfig(teachers=(f"t={llama_dir}",), data=str(corpus), out=str(out), top_k=8, seq_len=32, max_tokens=1024,
                    progress=False, format=backend, hidden_layers="0,1,2", hidden_dim=dim, hidden_dtype=dtype, batch_size=3))
    store = logitstore.open(str(out))
    entry = store.teacher("t")["hidden"]
    assert store.format_version == 3 and entry["layers"] == [0, 1, 2] and entry["pooling"] == "token"
    R = store.hidden_projection("t")
    assert (R is None) == (dim is None)
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    for i in (0, 5, len(store) - 1):
        x = store[i]
        ids = torch.from_numpy(x["input_ids"].astype(np.int64))[None]
        with torch.no_grad():
            hs = model(ids, output_hidden_states=True).hidden_states
        assert sorted(x["teachers"]["t"]["hidden"]) == [0, 1, 2]
        for layer, got in x["teachers"]["t"]["hidden"].items():
            ref = hs[layer][0].double().numpy()
            ref = (ref @ R.astype(np.float64)) if R is not None else ref
            assert got.shape == (len(x["input_ids"]), dim or 32) and got.dtype == np.float32
            tol = _bf16_tol(ref) if dtype == "bf16" else float(np.abs(ref).max()) * 2.0 ** -11 + 1e-6
            np.testing.assert_allclose(got, ref, atol=tol, rtol=0)
    # padding past a window's end is zero in the decoded shard
    assert not any(a.startswith("hidden_") for a in store.load_shard(0)["teachers"]["t"])  # decoded only when asked for
    assert sorted(a for a in store.load_shard(0, hidden=[2])["teachers"]["t"] if a.startswith("hidden_")) == ["hidden_2"]
    sh = store.load_shard(0, hidden=True)
    pad = np.arange(32)[None, :] >= sh["length"][:, None]
    assert not sh["teachers"]["t"]["hidden_2"][pad].any()


def test_the_projection_is_the_one_format_md_specifies():
    H, d, seed = 40, 300, 7  # two digests per row
    R = projection_matrix(H, d, seed)
    assert R.shape == (H, d) and R.dtype == np.float32
    # entry (i, j): bit j % 256 (little-endian within bytes) of sha256(prefix || seed || i || j // 256)
    for i, j in [(0, 0), (3, 255), (3, 256), (39, 299), (17, 128)]:
        digest = hashlib.sha256(b"logitstore-projection" + seed.to_bytes(8, "little") + i.to_bytes(4, "little")
                                + (j // 256).to_bytes(4, "little")).digest()
        bit = (digest[(j % 256) // 8] >> (j % 8)) & 1
        assert R[i, j] == np.float32((1.0 if bit else -1.0) / np.sqrt(d))
    assert not np.array_equal(R, projection_matrix(H, d, seed + 1))
    # Johnson-Lindenstrauss: squared norms kept on average
    x = np.random.default_rng(0).standard_normal((200, H)).astype(np.float32)
    ratio = (np.square(x @ projection_matrix(H, 64, 0)).sum(1) / np.square(x).sum(1)).mean()
    assert 0.9 < ratio < 1.1


def test_bits_round_trip_at_the_extremes():
    x = torch.tensor([0.0, -0.0, 1.0, -3.5, 1e-30, 3e38, -3e38, 65504.0, 1e-8])
    assert torch.equal(torch.from_numpy(from_bits(to_bits(x, "bfloat16"), "bfloat16", "w")), x.to(torch.bfloat16).float())
    small = x[(x.abs() <= 65504)]
    assert torch.equal(torch.from_numpy(from_bits(to_bits(small, "float16"), "float16", "w")), small.half().float())
    with pytest.raises(FormatError, match="non-finite"):
        from_bits(np.array([0x7F80], np.uint16), "bfloat16", "part/hidden_1")  # +inf
    with pytest.raises(FormatError, match="non-finite"):
        from_bits(np.array([0x7E00], np.uint16), "float16", "part/hidden_1")  # nan


@pytest.mark.parametrize("pooling", ["mean", "first", "last"])
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_classify_stores_hold_pooled_hidden_states(setup, tmp_path, cls_tok, pooling, family):  # noqa: F811
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "c"
    dump(DumpConfig(teachers=(f"t={setup[family]}",), data=str(setup["data"]), out=str(out), seq_len=32, batch_size=5,
                    task="classify", label_field="label", progress=False, shard_sequences=8, hidden_layers="1,2",
                    hidden_pooling=pooling, hidden_dim=12))
    store = logitstore.open(str(out))
    R = store.hidden_projection("t").astype(np.float64)
    model = AutoModelForSequenceClassification.from_pretrained(setup[family]).eval()
    for i in (0, 7, len(store) - 1):
        x = store[i]
        ids = torch.from_numpy(x["input_ids"].astype(np.int64))[None]
        with torch.no_grad():
            hs = model(ids, output_hidden_states=True).hidden_states
        for layer in (1, 2):
            h = hs[layer][0].double().numpy()
            ref = {"mean": h.mean(0), "first": h[0], "last": h[-1]}[pooling] @ R
            got = x["teachers"]["t"]["hidden"][layer]
            assert got.shape == (12,)
            np.testing.assert_allclose(got, ref, atol=_bf16_tol(ref) + 1e-5, rtol=0)


def test_bad_hidden_requests_are_refused_before_anything_is_written(tmp_path, llama_dir, corpus):
    base = dict(teachers=(f"t={llama_dir}",), data=str(corpus), top_k=8, seq_len=32, max_tokens=512, progress=False)
    with pytest.raises(ConfigError, match=r"--hidden-layers 9: teacher .* has 2 layers \(hidden states 0..2"):
        dump(DumpConfig(**base, out=str(tmp_path / "a"), hidden_layers="1,9"))
    with pytest.raises(ConfigError, match="--hidden-dim 64: expected 1..32"):
        dump(DumpConfig(**base, out=str(tmp_path / "b"), hidden_layers="1", hidden_dim=64))
    with pytest.raises(ConfigError, match="--hidden-dim: only with --hidden-layers"):
        DumpConfig(**base, out=str(tmp_path / "c"), hidden_dim=8)
    with pytest.raises(ConfigError, match="--hidden-layers: expected comma-separated"):
        DumpConfig(**base, out=str(tmp_path / "c"), hidden_layers="1,x")
    with pytest.raises(ConfigError, match="not with --tp"):
        DumpConfig(**base, out=str(tmp_path / "c"), hidden_layers="1", tp=2)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    # the CLI: one line, exit 2, no manifest
    r = subprocess.run([sys.executable, "-m", "logitstore", "dump", "--teacher", f"t={llama_dir}", "--data", str(corpus),
                        "--out", str(tmp_path / "cli"), "--seq-len", "32", "--max-tokens", "512", "--hidden-layers", "3", "-q"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--hidden-layers 3" in r.stderr
    assert not (tmp_path / "cli" / "manifest.json").exists()


def _rewrite_manifest(path, edit):
    m = json.loads((path / "manifest.json").read_text())
    edit(m)
    (path / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("edit,match", [
    (lambda h: h.update(layers=[2, 1]), r"hidden.layers: expected distinct ascending"),
    (lambda h: h.update(dtype="float8"), r"hidden.dtype: expected one of"),
    (lambda h: h.update(pooling="mean"), r"hidden.pooling: a lm store's hidden states are pooled 'token'"),
    (lambda h: h.update(projection=None), r"hidden.dim: 8 differs from model_dim 32 without a projection"),
    (lambda h: h["projection"].update(kind="gaussian"), r"hidden.projection: expected"),
    (lambda h: h["projection"].update(sha256="nothex"), r"hidden.projection: expected"),
    (lambda h: h.update(dim=64), r"hidden.dim: a projection maps model_dim 32 to fewer dims"),
    (lambda h: h.update(layers=list(range(40)), dim=8192, model_dim=16384), r"40 layers x dim 8192 values per position, more than"),
])
def test_damaged_hidden_entries_are_refused(tmp_path, llama_dir, corpus, edit, match):
    out = tmp_path / "s"
    dump(DumpConfig(teachers=(f"t={llama_dir}",), data=str(corpus), out=str(out), top_k=8, seq_len=32, max_tokens=512,
                    progress=False, hidden_layers="1,2", hidden_dim=8))
    _rewrite_manifest(out, lambda m: edit(m["teachers"][0]["hidden"]))
    with pytest.raises(FormatError, match=match):
        logitstore.open(str(out))


def test_a_projection_with_another_hash_is_refused(tmp_path, llama_dir, corpus):
    out = tmp_path / "s"
    dump(DumpConfig(teachers=(f"t={llama_dir}",), data=str(corpus), out=str(out), top_k=8, seq_len=32, max_tokens=512,
                    progress=False, hidden_layers="1", hidden_dim=8, hidden_seed=3))
    assert logitstore.open(str(out)).teacher("t")["hidden"]["projection"]["sha256"] == projection_sha256(projection_matrix(32, 8, 3))
    _rewrite_manifest(out, lambda m: m["teachers"][0]["hidden"]["projection"].update(seed=4))
    with pytest.raises(FormatError, match="projection.sha256: the rebuilt matrix has another hash"):
        logitstore.open(str(out)).hidden_projection("t")


def test_store_tools_keep_hidden_states(tmp_path, llama_dir, corpus):
    import pyarrow.parquet as pq

    from logitstore.tools.convert import convert
    from logitstore.tools.export import export
    from logitstore.tools.merge import merge
    from logitstore.tools.verify import verify

    lines = corpus.read_text().splitlines()
    halves = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    halves[0].write_text("\n".join(lines[: len(lines) // 2]) + "\n")
    halves[1].write_text("\n".join(lines[len(lines) // 2:]) + "\n")
    base = dict(teachers=(f"t={llama_dir}",), top_k=8, seq_len=32, max_tokens=400, progress=False, hidden_layers="2", hidden_dim=8)
    a, b, c = tmp_path / "sa", tmp_path / "sb", tmp_path / "sc"
    dump(DumpConfig(**base, data=str(halves[0]), out=str(a)))
    dump(DumpConfig(**base, data=str(halves[1]), out=str(b)))
    dump(DumpConfig(**{**base, "hidden_seed": 1}, data=str(halves[1]), out=str(c)))
    assert verify(str(a)) == []
    ref = logitstore.open(str(a))[2]["teachers"]["t"]["hidden"][2]
    convert(str(a), str(tmp_path / "arrow"), "arrow", progress=False)
    np.testing.assert_array_equal(logitstore.open(str(tmp_path / "arrow"))[2]["teachers"]["t"]["hidden"][2], ref)
    merge([str(a), str(b)], str(tmp_path / "m"), progress=False)
    m = logitstore.open(str(tmp_path / "m"))
    assert m.teacher("t")["hidden"] == logitstore.open(str(a)).teacher("t")["hidden"]
    np.testing.assert_array_equal(m[2]["teachers"]["t"]["hidden"][2], ref)
    with pytest.raises(ConfigError, match="stores other hidden states"):
        merge([str(a), str(c)], str(tmp_path / "m2"), progress=False)
    export(str(a), str(tmp_path / "pq"), "parquet", progress=False)
    table = pq.read_table(sorted((tmp_path / "pq" / "data").glob("*.parquet"))[0])
    np.testing.assert_array_equal(np.array(table.column("t.hidden_2")[2].as_py(), np.float32), ref)
