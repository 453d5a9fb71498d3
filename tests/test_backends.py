"""One conformance suite for every backend."""

import numpy as np
import pytest

from logitstore.format.backends import BACKENDS, get_backend
from logitstore.errors import FormatError


def sample_arrays(rng):
    return {
        "ids": rng.integers(0, 60000, size=(5, 7, 3)).astype(np.uint16),
        "codes": rng.integers(0, 128, size=(5, 7, 3)).astype(np.uint8),
        "tail_mass": rng.random((5, 7)).astype(np.float16),
        "logprobs": -rng.random((5, 7, 3)).astype(np.float32),
        "length": np.arange(1, 6, dtype=np.uint32),
        "id_order": rng.permutation(100).astype(np.uint16),
    }


def specs_of(arrays):
    s = {k: (v.dtype, v.shape) for k, v in arrays.items()}
    s["id_order"] = (arrays["id_order"].dtype, (None,))
    return s


@pytest.fixture(params=BACKENDS)
def backend(request):
    return get_backend(request.param)


@pytest.mark.parametrize("chunk_rows", [1, 2, 5, 64])
def test_round_trip_exact(backend, chunk_rows):
    arrays = sample_arrays(np.random.default_rng(chunk_rows))
    files = backend.encode_part(arrays, chunk_rows)
    assert all(isinstance(v, bytes) for v in files.values())
    out = backend.decode_part(files, specs_of(arrays), "part")
    for k, v in arrays.items():
        assert out[k].dtype == v.dtype, k
        np.testing.assert_array_equal(out[k], v)


def test_wrong_shape_or_dtype_refused_before_reading(backend):
    arrays = sample_arrays(np.random.default_rng(0))
    files = backend.encode_part(arrays, 2)
    specs = specs_of(arrays)
    with pytest.raises(FormatError, match="ids: expected shape"):
        backend.decode_part(files, {**specs, "ids": (np.dtype(np.uint16), (5, 7, 4))}, "p")
    with pytest.raises(FormatError, match="ids: expected dtype uint32"):
        backend.decode_part(files, {**specs, "ids": (np.dtype(np.uint32), (5, 7, 3))}, "p")
    with pytest.raises(FormatError, match="missing"):
        backend.decode_part(files, {**specs, "nope": (np.dtype(np.uint8), (5,))}, "p")


def test_garbage_bytes_give_format_error(backend):
    arrays = sample_arrays(np.random.default_rng(0))
    files = backend.encode_part(arrays, 2)
    garbage = {k: b"\x00garbage" * 3 for k in files}
    with pytest.raises(FormatError, match=r"^shard-7/teacher-x(/part.zip: not a valid zip archive|: cannot decode (zarr|parquet) part) \("):
        backend.decode_part(garbage, specs_of(arrays), "shard-7/teacher-x")


def test_zarr_refuses_unknown_codec():
    import json

    backend = get_backend("zarr")
    arrays = {"x": np.arange(10, dtype=np.uint16)}
    files = backend.encode_group(arrays, 4)
    meta = json.loads(files["x/zarr.json"])
    meta["codecs"][0]["configuration"]["codecs"].insert(1, {"name": "evil_codec"})
    files["x/zarr.json"] = json.dumps(meta).encode()
    with pytest.raises(FormatError, match="evil_codec|cannot decode"):
        backend.decode_part(files, {"x": (np.dtype(np.uint16), (10,))}, "p")


@pytest.mark.parametrize("rows,chunk_rows", [(5, 2), (64, 16), (1, 1), (7, 64)])
def test_zarr_fast_path_equals_zarr(rows, chunk_rows):
    from logitstore.format.backends import zarr_fast

    backend = get_backend("zarr")
    rng = np.random.default_rng(rows)
    arrays = {"a": rng.integers(0, 2**16, size=(rows, 9, 4)).astype(np.uint16), "b": rng.random((rows, 9)).astype(np.float16),
              "c": rng.integers(0, 255, size=(rows,)).astype(np.uint8), "z": np.zeros((rows, 3), np.uint32)}
    files = backend.encode_group(arrays, chunk_rows)
    specs = {k: (v.dtype, v.shape) for k, v in arrays.items()}
    via_zarr = backend.decode_part_zarr(files, specs, "p")
    for name in arrays:
        fast = zarr_fast.decode_array(files, name, "p")
        assert fast is not None, "our own layout must take the fast path"
        np.testing.assert_array_equal(fast, via_zarr[name])
        np.testing.assert_array_equal(fast, arrays[name])


def test_zarr_fast_path_rejects_lying_chunk_sizes():
    import struct

    from logitstore.format.backends import zarr_fast

    backend = get_backend("zarr")
    files = backend.encode_group({"a": np.arange(40, dtype=np.uint16).reshape(4, 10)}, 2)
    key = "a/c/0/0"
    shard = bytearray(files[key])
    struct.pack_into("<I", shard, 4, 10**9)  # first chunk's blosc header claims a gigabyte
    files[key] = bytes(shard)
    with pytest.raises(FormatError, match="declares"):
        zarr_fast.decode_array(files, "a", "p")
    shard = bytearray(backend.encode_group({"a": np.arange(40, dtype=np.uint16).reshape(4, 10)}, 2)[key])
    struct.pack_into("<Q", shard, len(shard) - 4 - 32, 10**12)  # index offset far outside the shard
    files[key] = bytes(shard)
    with pytest.raises(FormatError, match="outside the shard"):
        zarr_fast.decode_array(files, "a", "p")


def test_zarr_fast_path_reports_damaged_compressed_bytes():
    """Flipped bytes inside a compressed frame (read with checksums off) give a FormatError, never a
    bare decompressor error."""
    from logitstore.format.backends import zarr_fast

    backend = get_backend("zarr")
    rng = np.random.default_rng(0)
    a = np.cumsum(rng.integers(0, 3, size=(64, 300)), axis=1).astype(np.uint16)  # compressible, like id deltas
    clean = backend.encode_group({"a": a}, 64)
    key = "a/c/0/0"
    failures = 0
    for trial in range(40):
        shard = bytearray(clean[key])
        for pos in rng.integers(16, len(shard) - 40, size=8):  # past the blosc header, before the index
            shard[pos] ^= 0xFF
        files = {**clean, key: bytes(shard)}
        try:
            got = zarr_fast.decode_array(files, "a", "p")
        except FormatError as e:
            assert key in str(e)
            failures += 1
            continue
        assert got.shape == a.shape  # some damage still decodes (to wrong values): only sha256 catches that
    assert failures > 0


@pytest.mark.parametrize("codec", [{"name": "numcodecs.delta", "configuration": {"dtype": "<u2"}},
                                   {"name": "no-such-codec", "configuration": {}}])
def test_zarr_codecs_outside_the_allowed_set_are_refused(codec):
    import json

    backend = get_backend("zarr")
    files = backend.encode_group({"a": np.arange(40, dtype=np.uint16).reshape(4, 10)}, 2)
    meta = json.loads(files["a/zarr.json"])
    meta["codecs"][0]["configuration"]["codecs"][1] = codec  # in place of blosc
    files["a/zarr.json"] = json.dumps(meta).encode()
    with pytest.raises(FormatError, match="unsupported codecs|cannot decode zarr part"):
        backend.decode_part(files, {"a": (np.dtype(np.uint16), (4, 10))}, "p")
