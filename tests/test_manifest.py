"""Every invariant the manifest validator promises (FORMAT.md), each broken once on a real manifest."""

import copy
import json

import pytest

import logitstore
from logitstore.dump import DumpConfig, dump
from logitstore.errors import FormatError
from logitstore.format.manifest import MAX_MANIFEST_BYTES, parse_manifest, validate_manifest


@pytest.fixture(scope="module")
def manifest(tmp_path_factory, llama_dir, gpt2_dir, corpus):
    out = tmp_path_factory.mktemp("manifest") / "store"
    dump(DumpConfig(teachers=(f"a={llama_dir}", f"b={gpt2_dir}"), data=str(corpus), out=str(out), top_k=4, seq_len=16,
                    max_tokens=300, shard_sequences=4, progress=False))
    return logitstore.open(str(out)).manifest


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
    m["format_version"] += 1


def shard_tokens_too_many(m):
    m["shards"][0]["n_tokens"] = m["shards"][0]["n_sequences"] * m["seq_len"] + 1


@pytest.mark.parametrize("breakit,needle", [
    (shard_gap, "shards must tile the sequences"),
    (count_off, "n_sequences"),
    (tokens_off, "n_tokens"),
    (duplicate_name, "duplicate teacher name"),
    (bad_sha, "64 lowercase hex digits"),
    (short_sha, "64 lowercase hex digits"),
    (missing_part, "parts"),
    (empty_files, "files: empty"),
    (escaping_path, "path"),
    (k_above_vocab, ".k"),
    (newer_version, "newer than this logitstore reads"),
    (shard_tokens_too_many, "n_tokens"),
])
def test_each_invariant_is_enforced(manifest, breakit, needle):
    validate_manifest(copy.deepcopy(manifest))  # the real one passes
    m = copy.deepcopy(manifest)
    breakit(m)
    with pytest.raises(FormatError, match=needle.replace(".", r"\.").replace("(", r"\(")):
        validate_manifest(m)


def test_size_cap_is_checked_before_parsing():
    raw = b" " * (MAX_MANIFEST_BYTES + 1)
    with pytest.raises(FormatError, match="more than the"):
        parse_manifest(raw)
    with pytest.raises(FormatError, match="not valid JSON"):
        parse_manifest(b"{" + json.dumps({"format": 1}).encode())
