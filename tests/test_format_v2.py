"""Format version 2: a constant-size manifest, index files, one file per part; version-1 stores
(real ones, written by the first version) still read, verify and convert; a store still being
written reads as its committed shards."""

import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

import logitstore
from logitstore.dump import DumpConfig, dump
from logitstore.errors import FormatError
from logitstore.format.backends.container import PART_ZIP, pack, unpack
from logitstore.format.manifest import store_id
from logitstore.tools.convert import convert
from logitstore.tools.verify import verify
from storeindex import entries
from trainer.data import DistillDataset

V1 = Path(__file__).parent / "data" / "v1"


@pytest.fixture(scope="module")
def v2_store(tmp_path_factory, llama_dir, corpus):
    out = tmp_path_factory.mktemp("v2") / "store"
    dump(DumpConfig(teachers=(f"t={llama_dir}",), data=str(corpus), out=str(out), top_k=4, seq_len=16, max_tokens=600,
                    shard_sequences=3, progress=False))
    return out


def test_the_manifest_stays_the_same_size_whatever_the_number_of_shards(tmp_path, llama_dir, corpus):
    sizes = {}
    for per in (2, 20):
        out = tmp_path / f"s{per}"
        dump(DumpConfig(teachers=(f"t={llama_dir}",), data=str(corpus), out=str(out), top_k=4, seq_len=16, max_tokens=600,
                        shard_sequences=per, progress=False))
        m = json.loads((out / "manifest.json").read_text())
        assert m["format_version"] == 2 and "shards" not in m and m["n_shards"] == logitstore.open(str(out)).n_shards
        sizes[per] = len((out / "manifest.json").read_bytes()) - len(json.dumps(m["dump"]))
    assert logitstore.open(str(tmp_path / "s2")).n_shards >= 10 * logitstore.open(str(tmp_path / "s20")).n_shards - 10
    assert abs(sizes[2] - sizes[20]) < 64, sizes  # a few digits of counts differ, nothing per shard


def test_each_part_is_one_file_and_the_index_names_every_file_on_disk(v2_store):
    s = logitstore.open(str(v2_store))
    on_disk = sorted(str(p.relative_to(v2_store)) for p in (v2_store / "shards").rglob("*")
                     if p.is_file() and not p.name.endswith(".commit.json"))
    listed = sorted(f"{e['path']}/{p}/{rel}" for e in entries(v2_store) for p, v in e["parts"].items() for rel in v["files"])
    assert on_disk == listed
    assert all(rel.endswith("/" + PART_ZIP) for rel in listed) and len(listed) == 2 * s.n_shards
    assert sorted(p.name for p in (v2_store / "index").iterdir()) == ["files.parquet", "sequences.parquet", "shards.parquet"]


def test_a_part_archive_opens_with_zarrs_own_zip_store(v2_store):
    import zarr
    from zarr.storage import ZipStore

    s = logitstore.open(str(v2_store))
    path = v2_store / s.index.path(1) / "inputs" / PART_ZIP
    g = zarr.open_group(ZipStore(str(path), mode="r"), mode="r")
    np.testing.assert_array_equal(g["length"][...], s.load_shard(1)["length"])
    np.testing.assert_array_equal(g["seq_hash"][...], s.load_shard(1)["seq_hash"])


def test_the_sequence_index_equals_the_inputs_parts(v2_store):
    s = logitstore.open(str(v2_store))
    h, lengths = s.sequences()
    assert h.shape == (len(s), 16) and lengths.dtype == np.uint32
    np.testing.assert_array_equal(h, np.concatenate([s.load_shard(j)["seq_hash"] for j in range(s.n_shards)]))
    np.testing.assert_array_equal(lengths, np.concatenate([s.load_shard(j)["length"] for j in range(s.n_shards)]))


@pytest.mark.parametrize("name", ["shards.parquet", "files.parquet", "sequences.parquet"])
def test_a_damaged_index_file_is_named_by_the_reader_and_verify(tmp_path, v2_store, name):
    s = tmp_path / "s"
    shutil.copytree(v2_store, s)
    p = s / "index" / name
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    with pytest.raises(FormatError, match=f"index/{name}: sha256 mismatch"):
        st = logitstore.open(str(s))
        st.index
        st.sequences()
    assert any(f"index/{name}" in line for line in verify(str(s)))


def test_verify_finds_a_sequence_index_that_disagrees_with_the_inputs(tmp_path, v2_store):
    from storeindex import rewrite

    s = tmp_path / "s"
    shutil.copytree(v2_store, s)
    h, lengths = logitstore.open(str(s)).sequences()
    h = h.copy()
    h[4, 0] ^= 0xFF  # a forged but well-signed index
    rewrite(s, entries(s), sequences=(h, lengths))
    problems = verify(str(s))
    assert any("index/sequences.parquet: sequence 4 differs from shards/000001/inputs row 1" in p for p in problems), problems


# ---------------------------------------------------------------- the part container
def _zip(entries_, compress=zipfile.ZIP_STORED):
    sink = io.BytesIO()
    with zipfile.ZipFile(sink, "w", compression=compress) as z:
        for name, data in entries_:
            info = zipfile.ZipInfo(name)
            info.compress_type = compress
            z.writestr(info, data)
    return sink.getvalue()


def _flag_encrypted(data: bytes) -> bytes:
    """Set the 'encrypted' bit of every entry (local header and central directory)."""
    out = bytearray(data)
    for sig, off in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        i = out.find(sig)
        while i >= 0:
            out[i + off] |= 0x1
            i = out.find(sig, i + 4)
    return bytes(out)


def test_pack_and_unpack_round_trip_and_pack_is_deterministic():
    files = {"zarr.json": b"{}", "a/zarr.json": b"{1}", "a/c/0/0": bytes(range(256)) * 10}
    assert unpack(pack(files), "p") == files
    assert pack(files) == pack(dict(reversed(list(files.items()))))


@pytest.mark.parametrize("data,needle", [
    (_zip([("a", b"x" * 1000)], compress=zipfile.ZIP_DEFLATED), "compressed or encrypted"),
    (_flag_encrypted(_zip([("a", b"x")])), "compressed or encrypted"),
    (_zip([("../a", b"x")]), "not a plain relative path"),
    (_zip([("/abs", b"x")]), "not a plain relative path"),
    (_zip([(f"e{i}", b"") for i in range(300)]), "more than the 256"),
    (b"PK\x03\x04 not really a zip", "not a valid zip archive"),
    (b"", "not a valid zip archive"),
])
def test_a_hostile_part_archive_is_refused_naming_it(data, needle):
    with pytest.raises(FormatError, match=needle):
        unpack(data, "shards/000000/t0/part.zip")


def test_an_archive_with_a_repeated_name_is_refused():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate it is asked to write
        data = _zip([("a", b"1"), ("a", b"2")])
    with pytest.raises(FormatError, match="appears twice"):
        unpack(data, "p")


# ---------------------------------------------------------------- version 1
@pytest.mark.parametrize("backend", ["zarr", "arrow"])
def test_a_version_1_store_reads_verifies_trains_and_converts_to_version_2(tmp_path, backend):
    src = V1 / backend
    old = logitstore.open(str(src))
    assert old.format_version == 1 and old.n_shards == 3
    assert verify(str(src)) == []
    rows = [old[i] for i in range(len(old))]
    ds = DistillDataset([str(src)], batch_size=4)
    assert sorted(int(i) for b in ds for i, w in zip(b["index"], b["weight"]) if w > 0) == list(range(len(old)))
    out = tmp_path / "v2"
    m = convert(str(src), str(out), backend, progress=False)
    new = logitstore.open(str(out))
    assert m["format_version"] == 2 and new.format_version == 2 and store_id(m) == store_id(old.manifest)
    assert verify(str(out)) == []
    for i, r in enumerate(rows):
        got = new[i]
        np.testing.assert_array_equal(got["input_ids"], r["input_ids"])
        for a, v in r["teachers"]["teacher"].items():
            np.testing.assert_array_equal(got["teachers"]["teacher"][a], v)
    np.testing.assert_array_equal(new.sequences()[0], old.sequences()[0])


def test_a_damaged_version_1_file_is_named_by_verify(tmp_path):
    s = tmp_path / "v1"
    shutil.copytree(V1 / "zarr", s)
    victim = next(p for p in sorted((s / "shards" / "000001" / "t0").rglob("*")) if p.is_file() and p.name != "zarr.json")
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    assert [p for p in verify(str(s)) if str(victim.relative_to(s)) in p]


# ---------------------------------------------------------------- a store still being written
def _unfinish(store, keep: int, tmp):
    """Hide the manifest, the index and the commit records of teacher parts from shard ``keep`` on."""
    hidden = tmp / "hidden"
    hidden.mkdir()
    (store / "manifest.json").rename(hidden / "manifest.json")
    shutil.rmtree(store / "index")
    moved = []
    for j in range(keep, logitstore.open(str(hidden.parent / "ref")).n_shards):
        rec = store / f"shards/{j:06d}/t0.commit.json"
        rec.rename(hidden / f"{j}.json")
        moved.append((hidden / f"{j}.json", rec))
    return hidden, moved


def test_a_store_being_written_reads_as_its_committed_shards_and_grows(tmp_path, v2_store):
    ref = tmp_path / "ref"
    shutil.copytree(v2_store, ref)
    s = tmp_path / "s"
    shutil.copytree(v2_store, s)
    full = logitstore.open(str(ref))
    hidden, moved = _unfinish(s, 2, tmp_path)
    with pytest.raises(FormatError, match="no manifest.json"):
        logitstore.open(str(s))
    live = logitstore.open(str(s), follow=True)
    assert not live.complete and live.n_shards == 2 and len(live) == int(full.index.sizes[:2].sum())
    for i in range(len(live)):
        np.testing.assert_array_equal(live[i]["teachers"]["t"]["logprobs"], full[i]["teachers"]["t"]["logprobs"])
    assert store_id(live.manifest) == store_id(full.manifest)
    # shard 3 commits before shard 2: the prefix waits for shard 2, so numbering never changes
    moved[1][0].rename(moved[1][1])
    assert live.refresh() == 0 and live.n_shards == 2
    moved[0][0].rename(moved[0][1])
    assert live.refresh() == 2 and live.n_shards == 4
    for src, dst in moved[2:]:
        src.rename(dst)
    shutil.copytree(ref / "index", s / "index")
    (hidden / "manifest.json").rename(s / "manifest.json")
    live.refresh()
    assert live.complete and len(live) == len(full) and live.n_shards == full.n_shards
    assert live[len(live) - 1]["seq_hash"] == full[len(full) - 1]["seq_hash"]


def test_a_forged_commit_record_is_refused_naming_it(tmp_path, v2_store):
    s = tmp_path / "s"
    shutil.copytree(v2_store, s)
    (s / "manifest.json").unlink()
    rec_path = s / "shards/000000/inputs.commit.json"
    rec = json.loads(rec_path.read_text())
    rec["sequences"]["length"][0] = 10**6
    rec_path.write_text(json.dumps(rec))
    with pytest.raises(FormatError, match=r"shards/000000/inputs.commit.json: sequences.length"):
        logitstore.open(str(s), follow=True)


def test_following_a_directory_that_is_not_a_store_says_so(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(FormatError, match="no manifest.json"):
        logitstore.open(str(tmp_path / "x"), follow=True)


def test_a_derived_store_records_what_a_follower_needs_and_reads_while_written(tmp_path, v2_store, llama_dir, corpus):
    from logitstore.tools.merge import merge

    other = tmp_path / "other"
    dump(DumpConfig(teachers=(f"t={llama_dir}",), data=str(corpus), out=str(other), top_k=4, seq_len=16, max_tokens=900,
                    shard_sequences=5, progress=False))  # the same teacher over more of the corpus: shards of another size
    out = tmp_path / "merged"
    merge([str(v2_store), str(other)], str(out), progress=False, allow_shared=True)  # the corpora overlap
    full = logitstore.open(str(out))
    for j in range(full.n_shards):
        rec = json.loads((out / f"shards/{j:06d}/inputs.commit.json").read_text())
        assert rec["start"] == int(full.index.starts[j]) and len(rec["sequences"]["length"]) == rec["n_sequences"]
    (out / "manifest.json").unlink()
    live = logitstore.open(str(out), follow=True)
    assert live.n_shards == full.n_shards and len(live) == len(full) and len(entries(v2_store)) < live.n_shards
    np.testing.assert_array_equal(live.sequences()[0], full.sequences()[0])
