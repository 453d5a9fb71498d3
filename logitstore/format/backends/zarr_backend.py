"""Zarr v3 backend: one zarr group per part, one sharded array per field, packed into one file.

The group's files are packed into one uncompressed zip archive, ``part.zip``
(:mod:`~logitstore.format.backends.container`), which ``zarr.storage.ZipStore`` opens as it is;
stores of format version 1 hold the group's files unpacked, and are still read. Each array uses the ``sharding_indexed`` codec with a single shard covering the whole array, so an
array is exactly two files (``NAME/zarr.json`` and ``NAME/c/0...``). Inner chunks run along the
sequence axis (``chunk_rows`` sequences) and go through ``bytes -> blosc(zstd level 5, shuffle) -> crc32c``;
only codecs from the zarr v3 spec are used, so any v3 implementation can read a part.
"""

from __future__ import annotations

import json

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.storage import MemoryStore

from logitstore.errors import FormatError
from logitstore.format.backends import PART_LEVEL
from logitstore.format.backends import ArraySpecs
from logitstore.format.backends import check_array
from logitstore.format.backends.container import PART_ZIP, pack, unpack
from logitstore.format.backends.zarr_fast import decode_array

ALLOWED_CODECS = frozenset({"bytes", "blosc", "zstd", "gzip", "crc32c", "sharding_indexed", "transpose"})


def _codec_names(codecs) -> set[str]:
    names = set()
    for c in codecs:
        d = c.to_dict()
        names.add(d["name"])
        conf = d.get("configuration") or {}
        for key in ("codecs", "index_codecs"):
            for inner in conf.get(key, ()):
                names.add(inner["name"] if isinstance(inner, dict) else inner.to_dict()["name"])
    return names


def _dims(v: object, rank: int, what: str) -> tuple[int, ...]:
    if not isinstance(v, list) or len(v) != rank or not all(type(x) is int and x >= 1 for x in v):
        raise FormatError(f"{what}: expected {rank} positive integers, got {v!r}")
    return tuple(v)


def check_chunking(meta: dict, shape: tuple[int, ...], name: str, where: str) -> None:
    """Refuse chunk and shard shapes that could divide by zero or make a decoder allocate more than
    the array: a regular grid of positive chunk shapes; with ``sharding_indexed`` (once, not nested)
    inner chunks of at most the array's extent (at least 1) that divide the shard, and a shard that
    ends less than one inner chunk past the array; without sharding, chunks of at most the array's
    extent. Called before zarr or the fast path opens anything."""
    w = f"{where}/{name}/zarr.json"
    grid = meta.get("chunk_grid")
    if not isinstance(grid, dict) or grid.get("name") != "regular" or not isinstance(grid.get("configuration"), dict):
        raise FormatError(f"{w}: chunk_grid: expected a regular chunk grid")
    rank = len(shape)
    outer = _dims(grid["configuration"].get("chunk_shape"), rank, f"{w}: chunk_grid chunk_shape")
    extent = tuple(max(s, 1) for s in shape)
    codecs = [c if isinstance(c, dict) else {"name": c} for c in (meta.get("codecs") or [])]
    sharding = [c for c in codecs if c.get("name") == "sharding_indexed"]
    if not sharding:
        if any(o > e for o, e in zip(outer, extent)):
            raise FormatError(f"{w}: chunk shape {list(outer)} exceeds the array's shape {list(shape)}")
        return
    if len(sharding) > 1:
        raise FormatError(f"{w}: more than one sharding_indexed codec")
    conf = sharding[0].get("configuration")
    if not isinstance(conf, dict):
        raise FormatError(f"{w}: sharding_indexed: expected a configuration object")
    inner = _dims(conf.get("chunk_shape"), rank, f"{w}: sharding_indexed chunk_shape")
    for c in list(conf.get("codecs") or []) + list(conf.get("index_codecs") or []):
        if (c.get("name") if isinstance(c, dict) else c) == "sharding_indexed":
            raise FormatError(f"{w}: nested sharding_indexed codecs are not supported")
    if any(i > e for i, e in zip(inner, extent)):
        raise FormatError(f"{w}: inner chunk shape {list(inner)} exceeds the array's shape {list(shape)}")
    if any(o % i for o, i in zip(outer, inner)):
        raise FormatError(f"{w}: inner chunk shape {list(inner)} does not divide the shard shape {list(outer)}")
    if any(o >= e + i for o, e, i in zip(outer, extent, inner)):
        raise FormatError(f"{w}: shard shape {list(outer)} extends a whole inner chunk past the array's shape {list(shape)}")


def _fast_decode(files: dict[str, bytes], name: str, spec, where: str):
    """Check the array's metadata against the spec, then decode it directly (None: use zarr)."""
    raw = files.get(f"{name}/zarr.json")
    if raw is None:
        raise FormatError(f"{where}: missing array {name!r}")
    try:
        meta = json.loads(raw)
        dtype, shape = np.dtype(meta["data_type"]), tuple(meta["shape"])
    except (ValueError, KeyError, TypeError):
        return None
    check_array(name, dtype, shape, spec, where)
    if not all(type(s) is int and s >= 0 for s in shape):
        raise FormatError(f"{where}/{name}/zarr.json: shape: expected non-negative integers, got {list(shape)}")
    check_chunking(meta, shape, name, where)
    return decode_array(files, name, where, meta)


class ZarrBackend:
    name = "zarr"

    def encode_part(self, arrays: dict[str, np.ndarray], chunk_rows: int) -> dict[str, bytes]:
        """``{"part.zip": the zarr group packed}`` (see :meth:`encode_group`)."""
        return {PART_ZIP: pack(self.encode_group(arrays, chunk_rows))}

    def encode_group(self, arrays: dict[str, np.ndarray], chunk_rows: int) -> dict[str, bytes]:
        """The zarr v3 group's files, ``{store key: bytes}`` (``zarr.json``, ``NAME/zarr.json``, ``NAME/c/0...``)."""
        store = MemoryStore()
        group = zarr.open_group(store, mode="w", zarr_format=3)
        for name, a in arrays.items():
            a = np.ascontiguousarray(a)
            # a part-level array is one chunk: many tiny chunks cost more to decode than they save
            rows = max(1, a.shape[0] if name in PART_LEVEL else min(chunk_rows, a.shape[0]))
            chunks = (rows,) + a.shape[1:]
            # one shard holds the whole array: its length is the array's, rounded up to whole chunks (at
            # least one: an empty array, such as a shard of a trained-only store that trains nothing)
            shard = (max(rows, -(-a.shape[0] // rows) * rows),) + a.shape[1:]
            arr = group.create_array(
                name,
                shape=a.shape,
                dtype=a.dtype,
                chunks=chunks,
                shards=shard,
                compressors=[BloscCodec(cname="zstd", clevel=5, shuffle="shuffle" if a.dtype.itemsize > 1 else "noshuffle"), Crc32cCodec()],
                fill_value=0,
            )
            if a.size:
                arr[...] = a
        return {key: buf.to_bytes() for key, buf in store._store_dict.items()}

    def decode_part(self, files: dict[str, bytes], specs: ArraySpecs, where: str) -> dict[str, np.ndarray]:
        """``files``: one ``part.zip`` (version-2 stores) or the zarr group's files themselves (version 1)."""
        if PART_ZIP in files:
            if len(files) != 1:
                raise FormatError(f"{where}: a part with {PART_ZIP} holds no other files")
            files = unpack(files[PART_ZIP], f"{where}/{PART_ZIP}")
        out = {}
        for name, spec in specs.items():
            arr = _fast_decode(files, name, spec, where)
            if arr is None:
                return self.decode_part_zarr(files, specs, where)
            out[name] = arr
        return out

    def decode_part_zarr(self, files: dict[str, bytes], specs: ArraySpecs, where: str) -> dict[str, np.ndarray]:
        """Decode through zarr itself (any valid v3 layout; the reference for the fast path)."""
        if PART_ZIP in files:
            files = unpack(files[PART_ZIP], f"{where}/{PART_ZIP}")
        proto = default_buffer_prototype()
        store = MemoryStore({k: proto.buffer.from_bytes(v) for k, v in files.items()}, read_only=True)
        out = {}
        try:
            group = zarr.open_group(store, mode="r", zarr_format=3, use_consolidated=False)
            for name, spec in specs.items():
                try:
                    arr = group[name]
                except KeyError:
                    raise FormatError(f"{where}: missing array {name!r}") from None
                bad = _codec_names(arr.metadata.codecs) - ALLOWED_CODECS
                if bad:
                    raise FormatError(f"{where}/{name}: unsupported codecs {sorted(bad)}")
                check_array(name, arr.dtype, arr.shape, spec, where)
                check_chunking(json.loads(files[f"{name}/zarr.json"]), tuple(arr.shape), name, where)
                out[name] = arr[...]
        except FormatError:
            raise
        except Exception as e:  # zarr raises many types for malformed metadata or chunks
            raise FormatError(f"{where}: cannot decode zarr part ({type(e).__name__}: {e})") from e
        return out
