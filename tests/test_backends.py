"""One conformance suite for every backend."""

import numpy as np
import pytest

from logitstore.backends import BACKENDS, get_backend
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
    with pytest.raises(FormatError, match="p"):
        backend.decode_part(garbage, specs_of(arrays), "p")


def test_zarr_refuses_unknown_codec():
    import json

    backend = get_backend("zarr")
    arrays = {"x": np.arange(10, dtype=np.uint16)}
    files = backend.encode_part(arrays, 4)
    meta = json.loads(files["x/zarr.json"])
    meta["codecs"][0]["configuration"]["codecs"].insert(1, {"name": "evil_codec"})
    files["x/zarr.json"] = json.dumps(meta).encode()
    with pytest.raises(FormatError, match="evil_codec|cannot decode"):
        backend.decode_part(files, {"x": (np.dtype(np.uint16), (10,))}, "p")
