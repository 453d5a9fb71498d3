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

from logitstore.errors import FormatError
from logitstore.format.backends import PART_LEVEL
from logitstore.format.backends import ArraySpecs
from logitstore.format.backends import check_array

ROWS = "part.parquet"
#: Uncompressed bytes a column chunk may hold per value it must decode to: the widest physical
#: type we write (4 bytes; uint8/uint16 are stored as INT32) plus repetition/definition levels of
#: the nested lists, with room to spare. A footer claiming more is refused before decompressing.
MAX_BYTES_PER_VALUE = 16
#: plus this much per column chunk (page headers, statistics, tiny columns)
SLACK_BYTES = 1 << 20


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
    dtype = numpy_dtype(col.type)  # the values buffer as it is (no nulls, checked): to_numpy would import pandas
    values = np.frombuffer(col.buffers()[1], dtype=dtype, count=len(col), offset=col.offset * dtype.itemsize) if len(col) else \
        np.zeros(0, dtype)
    return values, tuple(shape)


def _write(table: pa.Table, row_group_rows: int | None = None) -> bytes:
    sink = io.BytesIO()
    split = [f.name for f in table.schema if not pa.types.is_uint8(_leaf(f.type))]
    pq.write_table(table, sink, compression="zstd", compression_level=3, use_dictionary=False,
                   use_byte_stream_split=split or False, write_statistics=False, row_group_size=row_group_rows)
    return sink.getvalue()


_NUMPY = {"int8": "i1", "int16": "i2", "int32": "i4", "int64": "i8", "uint8": "u1", "uint16": "u2", "uint32": "u4",
          "uint64": "u8", "halffloat": "f2", "float": "f4", "double": "f8", "bool": "?"}


def numpy_dtype(t: pa.DataType) -> np.dtype:
    """The numpy dtype of a primitive Arrow type, without ``to_pandas_dtype`` (which imports pandas:
    ~50 MB and ~0.2 s per process); :class:`TypeError` for any other type."""
    code = _NUMPY.get(str(t))
    if code is None:
        raise TypeError(f"unsupported type {t}")
    return np.dtype(code)


def _leaf(t: pa.DataType) -> pa.DataType:
    while pa.types.is_fixed_size_list(t):
        t = t.value_type
    return t


class ArrowBackend:
    name = "arrow"

    def encode_part(self, arrays: dict[str, np.ndarray], chunk_rows: int, row_group_rows: int | None = None) -> dict[str, bytes]:
        """``row_group_rows``: rows per Parquet row group (default: pyarrow's, one group for a part);
        a reader decodes one group at a time, so smaller groups bound its transient memory."""
        rows = {n: _to_column(a) for n, a in arrays.items() if n not in PART_LEVEL}
        files = {ROWS: _write(pa.table(rows), row_group_rows)}
        for n in PART_LEVEL:
            if n in arrays:
                files[f"{n}.parquet"] = _write(pa.table({n: pa.array(arrays[n])}))
        return files

    def decode_part(self, files: dict[str, bytes], specs: ArraySpecs, where: str) -> dict[str, np.ndarray]:
        out = {}
        try:
            by_file: dict[str, dict] = {}
            for name, spec in specs.items():
                fname = f"{name}.parquet" if name in PART_LEVEL else ROWS
                if fname not in files:
                    raise FormatError(f"{where}: missing file {fname}")
                by_file.setdefault(fname, {})[name] = spec
            for fname, fspecs in by_file.items():
                pf = pq.ParquetFile(pa.BufferReader(files[fname]))
                _check_footer(pf, fspecs, fname, where)  # shapes, value counts and sizes, before decoding
                out.update(_read_groups(pf, fspecs))  # only the checked columns, one row group at a time
            for name, spec in specs.items():
                check_array(name, out[name].dtype, out[name].shape, spec, where)
        except FormatError:
            raise
        except Exception as e:  # pyarrow raises several types for malformed files
            raise FormatError(f"{where}: cannot decode parquet part ({type(e).__name__}: {e})") from e
        return out


def _read_groups(pf: pq.ParquetFile, specs: ArraySpecs) -> dict[str, np.ndarray]:
    """The columns ``specs`` names, decoded row group by row group into numpy (pyarrow's transient
    buffers then hold one group, not the file: ~35 MiB instead of ~115 MiB for a 200k-row index)."""
    groups = range(pf.metadata.num_row_groups)
    tables = [pf.read_row_group(i, columns=list(specs), use_threads=False) for i in groups] if len(groups) <= 1 else None
    pieces: dict[str, list[np.ndarray]] = {name: [] for name in specs}
    for i in groups:
        t = tables[i] if tables is not None else pf.read_row_group(i, columns=list(specs), use_threads=False)
        for name in specs:
            values, shape = _from_column(t.column(name))
            pieces[name].append(values.reshape(shape))
        del t
    if not len(groups):
        t = pf.read(columns=list(specs))
        pieces = {name: [_from_column(t.column(name))[0].reshape(_shape_of(t.column(name)))] for name in specs}
    return {name: p[0] if len(p) == 1 else np.concatenate(p) for name, p in pieces.items()}


def _check_footer(pf: pq.ParquetFile, specs: ArraySpecs, fname: str, where: str) -> None:
    """Check a Parquet file's footer against the declared arrays before any page is decompressed:
    every column's type and shape (rows from the footer), its number of values, and its total
    uncompressed size against :data:`MAX_BYTES_PER_VALUE` per value (a decompression bomb)."""
    md, schema = pf.metadata, pf.schema_arrow
    rows = md.num_rows
    groups = [md.row_group(i) for i in range(md.num_row_groups)]
    if sum(g.num_rows for g in groups) != rows:
        raise FormatError(f"{where}/{fname}: row groups hold {sum(g.num_rows for g in groups)} rows, the footer says {rows}")
    for name, spec in specs.items():
        i = schema.get_field_index(name)
        if i < 0:
            raise FormatError(f"{where}/{fname}: missing column {name!r}")
        t, dims = schema.field(i).type, []
        while pa.types.is_fixed_size_list(t):
            dims.append(t.list_size)
            t = t.value_type
        try:
            dtype = numpy_dtype(t)
        except (NotImplementedError, TypeError):
            raise FormatError(f"{where}/{name}: unsupported column type {schema.field(i).type}") from None
        check_array(name, dtype, (rows, *dims), spec, where)
        values = int(np.prod((rows, *dims), dtype=np.int64))
        chunks = [g.column(j) for g in groups for j in range(g.num_columns) if g.column(j).path_in_schema.split(".")[0] == name]
        found = sum(c.num_values for c in chunks)
        if found != values:
            raise FormatError(f"{where}/{fname}: column {name!r} holds {found} values, its shape {(rows, *dims)} needs {values}")
        unc = sum(c.total_uncompressed_size for c in chunks)
        bound = values * MAX_BYTES_PER_VALUE + SLACK_BYTES * max(len(chunks), 1)
        if unc > bound:
            raise FormatError(f"{where}/{fname}: column {name!r} declares {unc} bytes uncompressed, more than the "
                              f"{bound} its shape {(rows, *dims)} allows")


def _shape_of(col) -> tuple[int, ...]:
    shape, t = [len(col)], col.type
    while pa.types.is_fixed_size_list(t):
        shape.append(t.list_size)
        t = t.value_type
    return tuple(shape)
