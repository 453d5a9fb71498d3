"""Arrow/Parquet backend: one Parquet file per part, one row per sequence.

Per-sequence arrays ``[S, *shape]`` become columns of nested ``fixed_size_list`` (a ``[S, L, k]``
field is ``fixed_size_list<fixed_size_list<T, k>, L>``), so ``datasets.load_dataset("parquet",
data_files=".../inputs.parquet")`` reads a part as a table. A part-level array that is not per
sequence (``id_order``) goes to a second one-column file ``NAME.parquet``. Columns are zstd-compressed
with byte-stream-split for multi-byte types and no dictionary.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import FormatError
from . import PART_LEVEL, ArraySpecs, check_array

ROWS = "part.parquet"


def _to_column(a: np.ndarray) -> pa.Array:
    col = pa.array(np.ascontiguousarray(a).reshape(-1))
    for dim in reversed(a.shape[1:]):
        col = pa.FixedSizeListArray.from_arrays(col, dim)
    return col


def _from_column(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, tuple[int, ...]]:
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    shape = [len(col)]
    while pa.types.is_fixed_size_list(col.type):
        shape.append(col.type.list_size)
        col = col.flatten()
    if col.null_count:
        raise FormatError("null values")
    return col.to_numpy(zero_copy_only=False), tuple(shape)


def _write(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    split = [f.name for f in table.schema if not pa.types.is_uint8(_leaf(f.type))]
    pq.write_table(table, sink, compression="zstd", compression_level=3, use_dictionary=False,
                   use_byte_stream_split=split or False, write_statistics=False)
    return sink.getvalue()


def _leaf(t: pa.DataType) -> pa.DataType:
    while pa.types.is_fixed_size_list(t):
        t = t.value_type
    return t


class ArrowBackend:
    name = "arrow"

    def encode_part(self, arrays: dict[str, np.ndarray], chunk_rows: int) -> dict[str, bytes]:
        rows = {n: _to_column(a) for n, a in arrays.items() if n not in PART_LEVEL}
        files = {ROWS: _write(pa.table(rows))}
        for n in PART_LEVEL:
            if n in arrays:
                files[f"{n}.parquet"] = _write(pa.table({n: pa.array(arrays[n])}))
        return files

    def decode_part(self, files: dict[str, bytes], specs: ArraySpecs, where: str) -> dict[str, np.ndarray]:
        out = {}
        try:
            tables = {}
            for name, spec in specs.items():
                fname = f"{name}.parquet" if name in PART_LEVEL else ROWS
                if fname not in files:
                    raise FormatError(f"{where}: missing file {fname}")
                if fname not in tables:
                    tables[fname] = pq.read_table(pa.BufferReader(files[fname]))
                table = tables[fname]
                if name not in table.column_names:
                    raise FormatError(f"{where}/{fname}: missing column {name!r}")
                col = table.column(name)
                check_array(name, _leaf(col.type).to_pandas_dtype(), _shape_of(col), spec, where)
                values, shape = _from_column(col)
                out[name] = values.reshape(shape)
        except FormatError:
            raise
        except Exception as e:  # pyarrow raises several types for malformed files
            raise FormatError(f"{where}: cannot decode parquet part ({type(e).__name__}: {e})") from e
        return out


def _shape_of(col) -> tuple[int, ...]:
    shape, t = [len(col)], col.type
    while pa.types.is_fixed_size_list(t):
        shape.append(t.list_size)
        t = t.value_type
    return tuple(shape)
