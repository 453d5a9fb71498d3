"""Hostile files inside a store: FIFOs, devices and links out of the root; bombs in Parquet parts;
zarr chunk shapes that are zero or larger than the array.

Every read that could hang or exhaust memory on a regression runs in a child process with a
wall-clock timeout and an address-space limit, so a regression fails the test instead of hanging it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import logitstore
from storeindex import entries, resign, unzip_part
from logitstore.dump import DumpConfig, dump
from logitstore.errors import FormatError

#: address-space limit of the child processes (a read of /dev/zero dies of MemoryError well before)
CHILD_MEMORY = 3 << 30
TIMEOUT = 60

READ_ALL = r"""
import sys
import logitstore
from logitstore.errors import LogitStoreError
try:
    s = logitstore.open(sys.argv[1])
    for j in range(s.n_shards):
        s.load_shard(j)
except LogitStoreError as e:
    print(f"refused: {e}")
    sys.exit(3)
print("read every shard")
"""


def _limit_memory():
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY, CHILD_MEMORY))


def run_child(*args):
    """Run ``python ARGS`` with a timeout and a memory limit; a hang or a runaway read fails the test."""
    try:
        return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=TIMEOUT,
                              preexec_fn=_limit_memory, env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=os.path.dirname(__file__))
    except subprocess.TimeoutExpired:
        pytest.fail(f"python {' '.join(map(str, args))} still running after {TIMEOUT} s (a blocking or endless read)")


@pytest.fixture(scope="module", params=["zarr", "arrow"])
def store(request, tmp_path_factory, llama_dir, corpus):
    out = tmp_path_factory.mktemp(f"hostile-{request.param}") / "store"
    dump(DumpConfig(teachers=(str(llama_dir),), data=str(corpus), out=str(out), top_k=4, seq_len=16, max_tokens=200,
                    shard_sequences=4, format=request.param, progress=False))
    return out


def biggest_teacher_file(store_dir) -> str:
    entry = entries(store_dir)[0]
    files = entry["parts"]["t0"]["files"]
    rel = max((r for r in files if not r.endswith("zarr.json")), key=lambda r: files[r]["bytes"])
    return f"{entry['path']}/t0/{rel}"


def replace_with(path, kind, tmp_path):
    original = path.read_bytes()
    path.unlink()
    if kind == "devzero":
        path.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "link-outside":  # the right bytes, but outside the store
        outside = tmp_path / "outside.bin"
        outside.write_bytes(original)
        path.symlink_to(outside)
    else:
        raise ValueError(kind)


@pytest.mark.parametrize("kind,needle", [("devzero", "character device"), ("fifo", "FIFO"), ("link-outside", "outside the store root")])
def test_non_regular_or_outside_shard_file_is_refused(tmp_path, store, kind, needle):
    s = tmp_path / "s"
    shutil.copytree(store, s, symlinks=True)
    victim = biggest_teacher_file(s)
    replace_with(s / victim, kind, tmp_path)

    r = run_child("-c", READ_ALL, s)
    assert r.returncode == 3, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    line = r.stdout.strip()
    assert len(line.splitlines()) == 1 and victim in line and needle in line, line

    r = run_child("-m", "logitstore", "verify", s)
    assert r.returncode == 1 and "Traceback" not in r.stdout + r.stderr, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    named = [ln for ln in r.stdout.splitlines() if victim in ln]
    assert named and needle in named[0], r.stdout


@pytest.mark.parametrize("kind,needle", [("devzero", "character device"), ("fifo", "FIFO")])
def test_manifest_that_is_not_a_regular_file_is_refused(tmp_path, store, kind, needle):
    s = tmp_path / "s"
    shutil.copytree(store, s, symlinks=True)
    replace_with(s / "manifest.json", kind, tmp_path)
    r = run_child("-c", READ_ALL, s)
    assert r.returncode == 3 and "manifest.json" in r.stdout and needle in r.stdout, (r.stdout[-2000:], r.stderr[-2000:])


def test_symlink_to_a_regular_file_inside_the_store_is_read(tmp_path, store):
    """Documented choice (FORMAT.md): a link that resolves to a regular file inside the store root
    is followed (deduplicated files); only its target's size and sha256 count."""
    s = tmp_path / "s"
    shutil.copytree(store, s, symlinks=True)
    victim = s / biggest_teacher_file(s)
    shutil.move(victim, s / "dedup.bin")
    victim.symlink_to(os.path.relpath(s / "dedup.bin", victim.parent))
    want = logitstore.open(str(store)).load_shard(0)
    got = logitstore.open(str(s)).load_shard(0)
    for name, td in want["teachers"].items():
        np.testing.assert_array_equal(got["teachers"][name]["ids"], td["ids"])
    from logitstore.tools.verify import verify

    assert verify(str(s)) == []


def test_cache_entry_that_is_a_fifo_is_a_miss(tmp_path):
    """The read-through cache never opens a FIFO or device planted under its name."""
    code = r"""
import os, sys
from logitstore.storage.cache import FileCache
c = FileCache(sys.argv[1])
sha = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"  # sha256 of b""
p = c._path(sha)
p.parent.mkdir(parents=True)
os.mkfifo(p)
assert c.get(sha, 0) is None
os.unlink(p)
p.symlink_to("/dev/zero")
assert c.get(sha, 0) is None
print("miss")
"""
    r = run_child("-c", code, tmp_path / "cache")
    assert r.returncode == 0 and r.stdout.strip() == "miss", (r.stdout, r.stderr[-2000:])


def test_remote_reads_are_bounded_by_the_declared_size(monkeypatch):
    """fsspec filesystems: a file larger than declared is refused, and even when the filesystem's
    metadata lies about the size the read asks for at most declared + 1 bytes."""
    from logitstore.storage.fsio import StoreFS

    fs = StoreFS("memory://bounded-read-test")
    fs.write("big.bin", b"x" * 100_000)
    with pytest.raises(FormatError, match="big.bin: 100000 bytes, manifest says 10"):
        fs.read("big.bin", size=10)
    assert fs.read("big.bin", size=100_000) == b"x" * 100_000

    real_info, asked = fs.fs.info, []
    real_cat = fs.fs.cat_file
    monkeypatch.setattr(fs.fs, "info", lambda p, **kw: {**real_info(p, **kw), "size": 10})
    monkeypatch.setattr(fs.fs, "cat_file", lambda p, start=None, end=None, **kw: asked.append((start, end)) or real_cat(p, start, end, **kw))
    with pytest.raises(FormatError, match="big.bin: 11 bytes, manifest says 10"):
        fs.read("big.bin", size=10)
    assert asked == [(0, 11)]
    with pytest.raises(FormatError, match="big.bin: larger than the 10 bytes allowed"):
        fs.read("big.bin", max_bytes=10)
    fs.fs.rm(fs.path(""), recursive=True)


# ---------------------------------------------------------------- item: bombs and chunk shapes


@pytest.fixture(scope="module")
def arrow_store(tmp_path_factory, llama_dir, corpus):
    out = tmp_path_factory.mktemp("bomb-arrow") / "store"
    dump(DumpConfig(teachers=(str(llama_dir),), data=str(corpus), out=str(out), top_k=4, seq_len=16, max_tokens=200,
                    shard_sequences=4, format="arrow", progress=False))
    return out


@pytest.fixture(scope="module")
def zarr_store(tmp_path_factory, llama_dir, corpus):
    out = tmp_path_factory.mktemp("chunks-zarr") / "store"
    dump(DumpConfig(teachers=(str(llama_dir),), data=str(corpus), out=str(out), top_k=4, seq_len=16, max_tokens=200,
                    shard_sequences=4, progress=False))
    return out


def _bomb_table(table, how: str):
    """``table`` with its ``ids`` column grown 4096-fold (zeros: compresses to almost nothing)."""
    import pyarrow as pa

    from logitstore.format.backends.arrow_backend import _to_column

    S, L, k = len(table), 16, 4
    if how == "list_size":  # every row declares 4096 times the positions
        cols = {n: table.column(n) for n in table.column_names}
        cols["ids"] = _to_column(np.zeros((S, L * 4096, k), np.uint16))
        return pa.table(cols)
    if how == "rows":  # 4096 times the rows in every column
        return pa.table({n: _to_column(np.zeros((S * 4096, *np.asarray(table.column(n).to_pylist()).shape[1:]),
                                                 table.column(n).type.value_type.value_type.to_pandas_dtype()
                                                 if n in ("ids", "codes") else table.column(n).type.value_type.to_pandas_dtype()))
                         for n in table.column_names})
    raise ValueError(how)


@pytest.mark.parametrize("how", ["list_size", "rows"])
def test_parquet_bomb_is_refused_from_the_footer_before_decoding(tmp_path, arrow_store, monkeypatch, how):
    import pyarrow.parquet as pq

    from logitstore.format.backends.arrow_backend import ROWS, _write
    from logitstore.tools.verify import verify

    s = tmp_path / "s"
    shutil.copytree(arrow_store, s)
    shard = entries(s)[0]["path"]
    f = s / shard / "t0" / ROWS
    bomb = _write(_bomb_table(pq.read_table(f), how))
    f.write_bytes(bomb)
    resign(s, shard, "t0")

    store = logitstore.open(str(s))
    assert len(store.index)  # the index files are read (decoded) before the patches count decodes
    decoded = []
    for cls_method in ("read", "read_row_group", "read_row_groups", "iter_batches"):
        real = getattr(pq.ParquetFile, cls_method)
        monkeypatch.setattr(pq.ParquetFile, cls_method, lambda self, *a, _r=real, **kw: decoded.append(self.metadata.num_rows) or _r(self, *a, **kw))
    real_read_table = pq.read_table
    monkeypatch.setattr(pq, "read_table", lambda src, *a, **kw: decoded.append("read_table") or real_read_table(src, *a, **kw))
    files = store.part_files(0, "t0")
    with pytest.raises(FormatError, match=rf"{shard}/t0/ids: expected shape"):
        store.backend.decode_part(files, store.part_specs(0, "t0"), f"{shard}/t0")
    assert decoded == [], "the bomb was decompressed before its shape was checked"
    monkeypatch.undo()
    with pytest.raises(FormatError, match=rf"{shard}/t0/ids: expected shape"):
        store.load_shard(0)
    assert any(f"{shard}/t0/ids: expected shape" in p for p in verify(str(s)))


def test_parquet_footer_sizes_are_bounded(arrow_store, monkeypatch):
    """The uncompressed-size bound is checked (here made impossibly tight) before decoding."""
    from logitstore.format.backends import arrow_backend

    store = logitstore.open(str(arrow_store))
    files = store.part_files(0, "t0")
    specs = store.part_specs(0, "t0")
    assert store.backend.decode_part(files, specs, "p")  # sound as it is
    monkeypatch.setattr(arrow_backend, "MAX_BYTES_PER_VALUE", 0)
    monkeypatch.setattr(arrow_backend, "SLACK_BYTES", 0)
    with pytest.raises(FormatError, match=r"p/part.parquet: column '\w+' declares \d+ bytes uncompressed, more than the 0"):
        store.backend.decode_part(files, specs, "p")


def _rewrite_zarr_array(part_dir, name, *, chunks, shards):
    """Rewrite array ``name`` of a zarr part with the same values and another chunk layout (through zarr)."""
    import zarr
    from zarr.codecs import BloscCodec, Crc32cCodec

    data = zarr.open_array(str(part_dir / name), mode="r")[...]
    shutil.rmtree(part_dir / name)
    group = zarr.open_group(str(part_dir), mode="a", zarr_format=3)
    arr = group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks, shards=shards, fill_value=0,
                             compressors=[BloscCodec(cname="zstd", clevel=5, shuffle="shuffle"), Crc32cCodec()])
    arr[...] = data


def _set_inner_chunk(part_dir, name, value):
    meta_path = part_dir / name / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["codecs"][0]["configuration"]["chunk_shape"][0] = value
    meta_path.write_text(json.dumps(meta))


@pytest.mark.parametrize("case,needle", [
    ("inner-zero", "positive integers"),
    ("inner-negative", "positive integers"),
    ("inner-larger-than-array", "inner chunk shape [65536, 16, 4] exceeds the array's shape [4, 16, 4]"),
    ("unsharded-chunk-larger-than-array", "chunk shape [65536, 16, 4] exceeds the array's shape [4, 16, 4]"),
])
def test_zarr_chunk_shapes_are_checked_before_opening(tmp_path, zarr_store, case, needle):
    """An inner chunk shape of 0 once raised ZeroDivisionError (not a FormatError, so
    ``--skip-bad-shards`` missed it); chunks larger than the array made the decoder allocate (and
    decompress) 16384 times the declared array."""
    from logitstore.tools.verify import verify

    s = tmp_path / "s"
    shutil.copytree(zarr_store, s)
    shard = entries(s)[0]["path"]
    part_dir = s / shard / "t0"
    unzip_part(part_dir)
    if case == "inner-zero":
        _set_inner_chunk(part_dir, "ids", 0)
    elif case == "inner-negative":
        _set_inner_chunk(part_dir, "ids", -4)
    elif case == "inner-larger-than-array":
        _rewrite_zarr_array(part_dir, "ids", chunks=(65536, 16, 4), shards=(65536, 16, 4))
    else:
        _rewrite_zarr_array(part_dir, "ids", chunks=(65536, 16, 4), shards=None)
    resign(s, shard, "t0")
    store = logitstore.open(str(s))
    with pytest.raises(FormatError) as e:
        store.load_shard(0)
    assert f"{shard}/t0/ids/zarr.json" in str(e.value) and needle in str(e.value), str(e.value)
    assert any(f"{shard}/t0/ids/zarr.json" in p and needle in p for p in verify(str(s)))
    if case == "inner-zero":  # a FormatError, so --skip-bad-shards leaves the shard out
        from trainer.data import DistillDataset

        ds = DistillDataset([str(s)], batch_size=2, skip_bad_shards=True)
        assert [b["shard"] for b in ds.skipped] == [0] and needle in ds.skipped[0]["error"]


def test_zarr_layouts_we_write_pass_the_chunk_checks():
    from logitstore.format.backends import get_backend

    backend = get_backend("zarr")
    rng = np.random.default_rng(0)
    for rows in (1, 3, 5, 7, 64):
        for chunk_rows in (1, 2, 5, 64):
            arrays = {"ids": rng.integers(0, 600, size=(rows, 9, 3)).astype(np.uint16), "length": np.arange(rows, dtype=np.uint32),
                      "id_order": np.arange(1 + rows, dtype=np.uint16)}
            files = backend.encode_part(arrays, chunk_rows)
            specs = {k: (v.dtype, v.shape) for k, v in arrays.items()}
            for path in (backend.decode_part, backend.decode_part_zarr):
                out = path(files, specs, "p")
                for k, v in arrays.items():
                    np.testing.assert_array_equal(out[k], v)
