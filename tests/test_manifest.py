"""Every invariant the manifest and shard-index validators promise (FORMAT.md), each broken once on a
real manifest: one written by this version (2) and one written by the first version."""

import copy
import json
from pathlib import Path

import pytest

import logitstore
from logitstore.dump import DumpConfig, dump
from logitstore.errors import FormatError
from logitstore.format.index import ShardIndex
from logitstore.format.manifest import MAX_MANIFEST_BYTES, parse_manifest, validate_manifest


@pytest.fixture(scope="module")
def store_url(tmp_path_factory, llama_dir, gpt2_dir, corpus):
    out = tmp_path_factory.mktemp("manifest") / "store"
    dump(DumpConfig(teachers=(f"a={llama_dir}", f"b={gpt2_dir}"), data=str(corpus), out=str(out), top_k=4, seq_len=16,
                    max_tokens=300, shard_sequences=4, progress=False))
    return str(out)


@pytest.fixture(scope="module")
def manifest(store_url):
    return logitstore.open(store_url).manifest


def shard_gap(m):
    m["shards"][1]["start"] += 1


def count_off(m):
    m["n_sequences"] += 1


def tokens_off(m):
    m["n_tokens"] -= 1


def duplicate_name(m):
    m["teachers"][1]["name"] = m["teachers"][0]["name"]


def bad_sha(m):
    f = next(iter(m["shards"][0]["parts"]["inputs"]["files"].values()))
    f["sha256"] = f["sha256"].upper()


def short_sha(m):
    f = next(iter(m["shards"][0]["parts"]["inputs"]["files"].values()))
    f["sha256"] = f["sha256"][:63]


def missing_part(m):
    del m["shards"][0]["parts"][m["teachers"][0]["part"]]


def empty_files(m):
    m["shards"][0]["parts"]["inputs"]["files"] = {}


def escaping_path(m):
    m["shards"][0]["path"] = "../elsewhere"


def k_above_vocab(m):
    m["teachers"][0]["k"] = m["tokenizer"]["vocab_size"] + 1


def newer_version(m):
    m["format_version"] = 99


def shard_tokens_too_many(m):
    m["shards"][0]["n_tokens"] = m["shards"][0]["n_sequences"] * m["seq_len"] + 1


V1_MANIFEST = Path(__file__).parent / "data" / "v1" / "zarr" / "manifest.json"


@pytest.mark.parametrize("breakit,needle", [
    (shard_gap, "shards must tile the sequences"),
    (count_off, "n_sequences"),
    (tokens_off, "n_tokens"),
    (bad_sha, "64 lowercase hex digits"),
    (short_sha, "64 lowercase hex digits"),
    (missing_part, "parts"),
    (empty_files, "files: empty"),
    (escaping_path, "path"),
    (k_above_vocab, ".k"),
    (newer_version, "newer than this logitstore reads"),
    (shard_tokens_too_many, "n_tokens"),
])
def test_each_invariant_of_a_version_1_manifest_is_enforced(breakit, needle):
    manifest = json.loads(V1_MANIFEST.read_text())  # written by the first version of the format
    assert manifest["format_version"] == 1
    validate_manifest(copy.deepcopy(manifest))  # the real one passes
    m = copy.deepcopy(manifest)
    breakit(m)
    with pytest.raises(FormatError, match=needle.replace(".", r"\.").replace("(", r"\(")):
        validate_manifest(m)


def index_sha_upper(m):
    f = m["index"]["files"]["files.parquet"]
    f["sha256"] = f["sha256"].upper()


def index_file_missing(m):
    del m["index"]["files"]["sequences.parquet"]


def file_name_escapes(m):
    m["index"]["file_names"][0] = "../x"


def file_names_repeat(m):
    m["index"]["file_names"].append(m["index"]["file_names"][0])


def shards_negative(m):
    m["n_shards"] = -1


def version_zero(m):
    m["format_version"] = 0


def too_few_files(m):
    m["index"]["n_files"] = m["n_shards"]


def more_shards_than_sequences(m):
    m["n_shards"] = m["n_sequences"] + 1


@pytest.mark.parametrize("breakit,needle", [
    (too_few_files, "n_files"),
    (more_shards_than_sequences, "a shard holds at least one"),
    (duplicate_name, "duplicate teacher name"),
    (k_above_vocab, ".k"),
    (newer_version, "newer than this logitstore reads"),
    (version_zero, "expected one of [1, 2, 3, 4]"),
    (index_sha_upper, "64 lowercase hex digits"),
    (index_file_missing, "sequences.parquet"),
    (file_name_escapes, "file_names[0]"),
    (file_names_repeat, "names repeat"),
    (shards_negative, "n_shards"),
])
def test_each_invariant_of_a_version_2_manifest_is_enforced(manifest, breakit, needle):
    assert manifest["format_version"] == 2 and "shards" not in manifest
    validate_manifest(copy.deepcopy(manifest))
    m = copy.deepcopy(manifest)
    breakit(m)
    with pytest.raises(FormatError, match=needle.replace(".", r"\.").replace("(", r"\(").replace("[", r"\[")):
        validate_manifest(m)


def _tables(index):
    shards = {"start": index.starts.copy(), "n_sequences": index.sizes.copy(), "n_tokens": index.tokens.copy()}
    files = {"shard": index.file_shard.copy(), "part": index.file_part.copy(), "name": index.file_name.copy(),
             "bytes": index.file_bytes.copy(), "sha256": index.file_sha256.copy()}
    return shards, files


def idx_gap(sh, f):
    sh["start"][1] += 1


def idx_count(sh, f):
    sh["n_sequences"][-1] += 1


def idx_tokens(sh, f):
    sh["n_tokens"][0] -= 1


def idx_tokens_too_many(sh, f):
    sh["n_tokens"][0] = sh["n_sequences"][0] * 16 + 1


def idx_missing_part(sh, f):
    keep = ~((f["shard"] == 0) & (f["part"] == 1))
    for k in f:
        f[k] = f[k][keep]


def idx_unknown_shard(sh, f):
    f["shard"][-1] = len(sh["start"])


def idx_unsorted(sh, f):
    for k in f:
        f[k] = f[k][::-1].copy()


def idx_size(sh, f):
    f["bytes"][0] = -1


@pytest.mark.parametrize("breakit,needle", [
    (idx_gap, "shards must tile"), (idx_count, "sequences, the manifest says"), (idx_tokens, "tokens, the manifest says"),
    (idx_tokens_too_many, "n_tokens"), (idx_missing_part, "lists no files"), (idx_unknown_shard, "does not exist"),
    (idx_unsorted, "must be sorted"), (idx_size, "size out of range"),
])
def test_each_invariant_of_the_shard_index_is_enforced(store_url, breakit, needle):
    store = logitstore.open(store_url)
    sh, f = _tables(store.index)
    ShardIndex(store.manifest, store.encoding, sh, f, store.index.names)  # the real one passes
    breakit(sh, f)
    with pytest.raises(FormatError, match=needle):
        ShardIndex(store.manifest, store.encoding, sh, f, store.index.names)


def test_size_cap_is_checked_before_parsing():
    raw = b" " * (MAX_MANIFEST_BYTES + 1)
    with pytest.raises(FormatError, match="more than the"):
        parse_manifest(raw)
    with pytest.raises(FormatError, match="not valid JSON"):
        parse_manifest(b"{" + json.dumps({"format": 1}).encode())
