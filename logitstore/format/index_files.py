"""The index files of a version-2 store (``index/*.parquet``, see FORMAT.md "Index files").

- ``shards.parquet``: one row per shard: ``start``, ``n_sequences``, ``n_tokens`` (int64);
- ``files.parquet``: one row per file of a part: ``shard`` int64, ``part`` uint8 (0 = inputs, ``i + 1``
  = teacher ``i``), ``name`` uint16 (index into the manifest's ``index.file_names``), ``bytes`` int64,
  ``sha256`` 32 x uint8; sorted by (shard, part, name);
- ``sequences.parquet``: one row per sequence: ``seq_hash`` 16 x uint8, ``length`` uint32.

They are Parquet files in the layout of the ``arrow`` backend, read through its footer checks (types,
shapes and uncompressed sizes before any page is decompressed), after their sizes and sha256 were
checked against the manifest. The manifest itself stays small whatever the number of shards:
~2 kB plus the teachers. Written before the manifest, so a store with a manifest has its index.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from logitstore.errors import FormatError
from logitstore.format import layout
from logitstore.format.backends.arrow_backend import ROWS, ArrowBackend
from logitstore.format.codec import Encoding
from logitstore.format.hashing import SEQ_HASH_BYTES, sha256_hex
from logitstore.format.index import ShardIndex, file_table, index_from_v1
from logitstore.format.manifest import INDEX_DIR
from logitstore.storage.fsio import StoreFS

#: ``(path inside the store, {"bytes", "sha256"}) -> bytes``, checked (see ``PartFetcher.read_file``)
ReadFile = Callable[[str, dict], bytes]

_I64 = np.dtype(np.int64)
#: rows per row group of an index file: a reader decodes one group at a time
ROW_GROUP_ROWS = 4096


def _specs(name: str, rows: int) -> dict:
    if name == "shards.parquet":
        return {k: (_I64, (rows,)) for k in ("start", "n_sequences", "n_tokens")}
    if name == "files.parquet":
        return {"shard": (_I64, (rows,)), "part": (np.dtype(np.uint8), (rows,)), "name": (np.dtype(np.uint16), (rows,)),
                "bytes": (_I64, (rows,)), "sha256": (np.dtype(np.uint8), (rows, 32))}
    return {"seq_hash": (np.dtype(np.uint8), (rows, SEQ_HASH_BYTES)), "length": (np.dtype(np.uint32), (rows,))}


def _read_table(read: ReadFile, manifest: dict, name: str, rows: int) -> dict[str, np.ndarray]:
    rel = f"{INDEX_DIR}/{name}"
    data = read(rel, manifest["index"]["files"][name])
    return ArrowBackend().decode_part({ROWS: data}, _specs(name, rows), rel)


def read_index(read: ReadFile, manifest: dict, encoding: Encoding) -> ShardIndex:
    """The shard index of a store: from its index files (version 2) or its manifest (version 1)."""
    if manifest["format_version"] == 1:
        return index_from_v1(manifest, encoding)
    shards = _read_table(read, manifest, "shards.parquet", manifest["n_shards"])
    files = _read_table(read, manifest, "files.parquet", manifest["index"]["n_files"])
    return ShardIndex(manifest, encoding, shards, files, manifest["index"]["file_names"], where=f"{INDEX_DIR}/")


def read_sequences(read: ReadFile, manifest: dict, index: ShardIndex) -> tuple[np.ndarray, np.ndarray]:
    """``(seq_hash [n, 16] uint8, length [n] uint32)`` of every sequence, from ``sequences.parquet``
    (20 bytes per sequence); checked against the shard table (lengths in ``[1, seq_len]``, each
    shard's lengths summing to its ``n_tokens``)."""
    n = manifest["n_sequences"]
    t = _read_table(read, manifest, "sequences.parquet", n)
    h, lengths = t["seq_hash"], t["length"]
    where = f"{INDEX_DIR}/sequences.parquet"
    if n and (lengths.min() < 1 or lengths.max() > manifest["seq_len"]):
        raise FormatError(f"{where}: length: values must lie in [1, {manifest['seq_len']}]")
    if len(index) and not np.array_equal(np.add.reduceat(lengths.astype(np.int64), index.starts), index.tokens):
        raise FormatError(f"{where}: the lengths of a shard's sequences do not sum to its n_tokens")
    return h, lengths


# ---------------------------------------------------------------------- writing
def write_index(fs: StoreFS, plan: dict, shards: list[dict], seq_hash: np.ndarray, lengths: np.ndarray) -> dict:
    """Write the index files of ``shards`` (``{"start", "n_sequences", "n_tokens", "parts": {part:
    {"files": {rel: {"bytes", "sha256"}}}}}`` in order) and the sequences (``seq_hash`` [n, 16],
    ``lengths`` [n]); return the manifest's ``n_shards`` and ``index`` fields. Each file is written
    atomically; none of them counts before the manifest that names them."""
    parts = [layout.INPUTS] + [t["part"] for t in plan["teachers"]]
    files, names = file_table([[s["parts"][p]["files"] for p in parts] for s in shards], fs.url)
    tables = {
        "shards.parquet": {k: np.array([s[k] for s in shards], np.int64) for k in ("start", "n_sequences", "n_tokens")},
        "files.parquet": files,
        "sequences.parquet": {"seq_hash": np.ascontiguousarray(seq_hash, np.uint8).reshape(-1, SEQ_HASH_BYTES),
                              "length": np.ascontiguousarray(lengths, np.uint32)},
    }
    backend = ArrowBackend()
    meta = {}
    for name, arrays in tables.items():
        data = backend.encode_part(arrays, 0, row_group_rows=ROW_GROUP_ROWS)[ROWS]
        fs.write_atomic(f"{INDEX_DIR}/{name}", data)
        meta[name] = {"bytes": len(data), "sha256": sha256_hex(data)}
    return {"n_shards": len(shards), "index": {"file_names": names, "n_files": len(files["shard"]), "files": meta}}
