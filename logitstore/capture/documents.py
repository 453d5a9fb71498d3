"""Reading ``--data``: the documents of a corpus, one at a time, in a fixed order.

Every source is read a batch of rows at a time and nothing is converted to an Arrow cache, so
memory does not grow with the corpus: ``.txt`` (each file one document) and ``.jsonl`` (one JSON
object per line) with the standard library, ``.parquet`` one column at a time with pyarrow,
``.json`` (which may be one array) through ``datasets``' streaming JSON loader, and a saved
``datasets`` directory from its memory-mapped Arrow files (file-backed pages the kernel can drop).
The standard-library and pyarrow readers keep a dump rank ~200 MB smaller than ``datasets``'
streaming loader and exactly flat (tools/bench_dump_memory.py). Order: files sorted by path, rows in file order, the same on every
rank and every run.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from logitstore.errors import LogitStoreError
from logitstore.format.hashing import canonical_json_hash, file_sha256

GLOB_CHARS = "*?["
KINDS = (".txt", ".jsonl", ".json", ".parquet")
#: rows read per batch from a loader
BATCH_ROWS = 512
#: the key of a batch's row positions
POSITIONS = "__position__"


def data_files(path: str) -> tuple[str, list[Path]] | None:
    """The files ``--data`` names, if it names files: ``(kind, sorted paths)``, kind the common
    suffix. A glob (``corpus/*.jsonl``) gives its matches; a directory without a saved ``datasets``
    dataset in it gives every ``*.txt`` directly inside it. None for one file or a saved dataset."""
    import glob

    p = Path(path)
    if any(c in path for c in GLOB_CHARS) and not p.exists():
        files = sorted(Path(f) for f in glob.glob(path, recursive=True) if os.path.isfile(f))
        if not files:
            raise LogitStoreError(f"--data {path}: the pattern matches no files")
        kinds = {f.suffix.lower() for f in files}
        if len(kinds) > 1:
            raise LogitStoreError(f"--data {path}: matches files of several kinds ({', '.join(sorted(kinds))}); use one kind per dump")
        kind = kinds.pop()
        if kind not in KINDS:
            raise LogitStoreError(f"--data {path}: matches {kind or 'extension-less'} files; expected .txt, .jsonl, .json or .parquet")
        return kind, files
    if p.is_dir() and not _is_saved_dataset(p):
        # hidden files (".DS_Store", macOS "._x.txt" resource forks) are not documents
        files = sorted(f for f in p.iterdir() if f.suffix.lower() == ".txt" and f.is_file() and not f.name.startswith("."))
        if not files:
            raise LogitStoreError(f"--data {path}: a directory with neither .txt files nor a saved datasets dataset in it")
        return ".txt", files
    return None


def _is_saved_dataset(p: Path) -> bool:
    return any((p / n).exists() for n in ("dataset_info.json", "state.json", "dataset_dict.json"))


@dataclass
class DocumentCount:
    """What one pass over a corpus saw: rows read, and rows skipped because the field was not a string."""

    rows: int = 0
    not_str: int = 0
    kinds: set | None = None


def iter_documents(path: str, text_field: str = "text", count: DocumentCount | None = None,
                   warn: bool = True) -> Iterator[str]:
    """Yield the non-empty documents of ``--data`` in order (see the module docstring).

    Rows whose field is not a string (null, a number) are skipped and counted in ``count``; with
    ``warn`` a pass that skipped some prints one warning line at its end. Raises a one-line
    :class:`LogitStoreError` for a missing, empty, non-UTF-8 or unreadable source, a missing field,
    or a corpus without a single document."""
    for _, t in iter_positioned(path, text_field, count, warn):
        yield t


def iter_positioned(path: str, text_field: str = "text", count: DocumentCount | None = None, warn: bool = True,
                    start: tuple[int, int] | None = None) -> Iterator[tuple[tuple[int, int] | None, str]]:
    """:func:`iter_documents` with each document's position: ``(file index, byte offset of its
    line)`` in JSON Lines, ``(file index, row)`` in Parquet, ``(file index, 0)`` for .txt files,
    None where a source cannot be entered in the middle (.json, saved datasets). ``start``: a
    position this function gave, to begin there without reading what comes before."""
    count = count if count is not None else DocumentCount()
    count.kinds = set()
    batches, field = _open(path, text_field, start)
    yielded = 0
    try:
        for batch in batches:
            if field not in batch:
                raise LogitStoreError(f"--data {path}: no field {field!r} (fields: {', '.join(batch)}); pass --text-field")
            positions = batch.get(POSITIONS) or [None] * len(batch[field])
            for pos, t in zip(positions, batch[field]):
                count.rows += 1
                if not isinstance(t, str):
                    count.not_str += 1
                    count.kinds.add("null" if t is None else type(t).__name__)
                elif t.strip():
                    yielded += 1
                    yield pos, t
    except LogitStoreError:
        raise
    except Exception as e:  # datasets raises many types for unreadable input, lazily while streaming
        raise LogitStoreError(f"--data {path}: cannot read ({type(e).__name__}: {_first_line(e)})") from e
    if count.not_str and warn:
        print(f"warning: --data {path}: skipped {count.not_str} of {count.rows} rows whose {field!r} is not a string "
              f"({', '.join(sorted(count.kinds))})", file=sys.stderr, flush=True)
    if not yielded and start is None:
        raise LogitStoreError(f"--data {path}: no non-empty documents in field {field!r}")


def iter_records(path: str, field: str, optional: tuple[str, ...] = (),
                 start: tuple[int, int] | None = None) -> Iterator[tuple[tuple[int, int] | None, dict]]:
    """Every row of ``--data`` as ``(position, {field: value, optional field: value, ...})``, in
    order, none skipped (a row's index is its place in this sequence): for sources whose rows are
    not text (conversations, token ids), which the caller validates row by row. ``position`` and
    ``start`` as in :func:`iter_positioned`. A source without ``field`` at all is refused."""
    batches, field = _open(path, field, start, optional)
    try:
        for batch in batches:
            if field not in batch:
                raise LogitStoreError(f"--data {path}: no field {field!r} (fields: {', '.join(k for k in batch if k != POSITIONS)})")
            positions = batch.get(POSITIONS) or [None] * len(batch[field])
            names = [f for f in (field, *optional) if f in batch]
            for r, pos in enumerate(positions):
                yield pos, {f: batch[f][r] for f in names}
    except LogitStoreError:
        raise
    except Exception as e:  # datasets raises many types for unreadable input, lazily while streaming
        raise LogitStoreError(f"--data {path}: cannot read ({type(e).__name__}: {_first_line(e)})") from e


def load_texts(path: str, text_field: str = "text") -> list[str]:
    """Every document of ``--data`` as a list (small corpora, tests and tools; a dump streams)."""
    return list(iter_documents(path, text_field))


def _open(path: str, text_field: str, start: tuple[int, int] | None = None,
          optional: tuple[str, ...] = ()) -> tuple[Iterator[dict], str]:
    """Batches ``{field: [values], POSITIONS: [positions]}`` of ``--data`` (from ``start``, where
    the source can be entered there) and the field that holds documents; ``optional`` fields are
    read too where the source has them (absent ones are left out of the batches)."""
    import datasets

    datasets.disable_progress_bars()  # our own bar reports the dump; theirs would bury error lines
    p = Path(path)
    files = data_files(path)
    if files is None and not p.exists():
        raise LogitStoreError(f"--data {path}: no such file or directory")
    if files is None and p.is_dir():
        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as e:
            raise LogitStoreError(f"--data {path}: cannot read ({type(e).__name__}: {_first_line(e)})") from e
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise LogitStoreError(f"--data {path}: dataset has splits {sorted(ds)}, expected a 'train' split")
            ds = ds["train"]
        if text_field not in ds.column_names:
            raise LogitStoreError(f"--data {path}: no field {text_field!r} (fields: {', '.join(ds.column_names)}); pass --text-field")
        return ds.select_columns([text_field] + [f for f in optional if f in ds.column_names]).iter(batch_size=BATCH_ROWS), text_field
    if files is None:
        kind = p.suffix.lower()
        if kind not in KINDS:
            raise LogitStoreError(f"--data {path}: expected .txt, .jsonl, .json, .parquet, a directory of .txt files, "
                                  "a glob or a saved datasets directory")
        paths = [p]
    else:
        kind, paths = files
    for f in paths:
        if f.stat().st_size == 0 and (kind != ".txt" or files is None):  # an empty .txt in a directory is an empty document
            raise LogitStoreError(f"--data {f}: the file is empty")
        if kind in (".txt", ".jsonl", ".json"):
            _check_utf8(f)
    first, offset = start if start is not None else (0, 0)
    if kind == ".txt":  # each file is one document (universal newlines, as Python and datasets read text)
        return ({"text": [f.read_text(encoding="utf-8")], POSITIONS: [(i, 0)]}
                for i, f in enumerate(paths) if i >= first), "text"
    if kind == ".jsonl":
        return _jsonl_batches(paths, text_field, first, offset, optional), text_field
    if kind == ".parquet":
        return _parquet_batches(paths, text_field, first, offset, optional), text_field
    # .json may be one array of records: datasets reads both shapes
    ds = datasets.load_dataset("json", data_files=[str(f) for f in paths], split="train", streaming=True)
    return ds.iter(batch_size=BATCH_ROWS), text_field


def _jsonl_batches(paths: list[Path], field: str, first: int = 0, offset: int = 0, optional: tuple[str, ...] = ()) -> Iterator[dict]:
    """JSON Lines read line by line (blank lines skipped): one record per line, an object; from
    byte ``offset`` of file ``first`` on."""
    import json

    for i, f in enumerate(paths):
        if i < first:
            continue
        with open(f, "rb") as fh:
            at = offset if i == first else 0
            fh.seek(at)
            values: list = []
            extra: dict[str, list] = {f: [] for f in optional}
            positions: list = []
            lineno = 0 if at == 0 else None  # entered in the middle: lines are named by byte offset
            first_record = at == 0
            for line in fh:
                pos, at = (i, at), at + len(line)
                lineno = None if lineno is None else lineno + 1
                if not line.strip():
                    continue
                where = f"line {lineno}" if lineno is not None else f"the line at byte {pos[1]}"
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise LogitStoreError(f"--data {f}: {where} is not valid JSON ({e})") from None
                if not isinstance(row, dict):
                    raise LogitStoreError(f"--data {f}: {where} is a JSON {type(row).__name__}, expected an object")
                if first_record and field not in row:  # the file's first record names the fields
                    raise LogitStoreError(f"--data {f}: no field {field!r} (fields: {', '.join(row)}); pass --text-field")
                first_record = False
                values.append(row.get(field))
                for f in optional:
                    extra[f].append(row.get(f))
                positions.append(pos)
                if len(values) == BATCH_ROWS:
                    yield {field: values, **extra, POSITIONS: positions}
                    values, positions, extra = [], [], {f: [] for f in optional}
            if values:
                yield {field: values, **extra, POSITIONS: positions}


def _parquet_batches(paths: list[Path], field: str, first: int = 0, row: int = 0, optional: tuple[str, ...] = ()) -> Iterator[dict]:
    """One column of Parquet files, a row batch at a time, from row ``row`` of file ``first`` on
    (whole row groups before it are not read)."""
    import pyarrow.parquet as pq

    for i, f in enumerate(paths):
        if i < first:
            continue
        try:
            pf = pq.ParquetFile(f)
        except Exception as e:  # pyarrow raises ArrowInvalid/OSError for a file that is not Parquet
            raise LogitStoreError(f"--data {f}: cannot read as Parquet ({type(e).__name__}: {_first_line(e)})") from e
        if field not in pf.schema_arrow.names:
            raise LogitStoreError(f"--data {f}: no field {field!r} (fields: {', '.join(pf.schema_arrow.names)}); pass --text-field")
        skip = row if i == first else 0
        groups, at = [], 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if groups or at + n > skip:
                groups.append(g)
            else:
                at += n  # whole row groups before ``skip``: not read
        columns = [field] + [f for f in optional if f in pf.schema_arrow.names]
        for b in pf.iter_batches(batch_size=BATCH_ROWS, columns=columns, row_groups=groups):
            cols = {c: b.column(n).to_pylist() for n, c in enumerate(columns)}
            positions = [(i, at + r) for r in range(b.num_rows)]
            at += b.num_rows
            keep = [k for k, p in enumerate(positions) if p[1] >= skip]
            if keep:
                yield {**{c: [v[k] for k in keep] for c, v in cols.items()}, POSITIONS: [positions[k] for k in keep]}


def _check_utf8(p: Path) -> None:
    with open(p, "rb") as f:
        offset = 0
        for block in iter(lambda: f.read(1 << 24), b""):
            try:
                block.decode("utf-8")
            except UnicodeDecodeError as e:
                if e.start < len(block) - 4:  # a character cut by the block boundary is fine
                    raise LogitStoreError(f"--data {p}: not valid UTF-8 at byte {offset + e.start}") from None
            offset += len(block)


def describe_source(path: str, text_field: str) -> dict:
    """The manifest's ``data.source``: the path and its file's sha256; for a directory of ``.txt``
    files or a glob also ``files`` (each file's path relative to the directory, or as matched, and
    sha256, in reading order) and ``sha256`` = the hash of that list."""
    files = data_files(path)
    if files is None:
        return {"path": os.path.abspath(path), "sha256": file_sha256(path), "text_field": text_field}
    base = Path(path) if Path(path).is_dir() else None
    listed = [{"path": str(f.relative_to(base)) if base else str(f), "sha256": file_sha256(f)} for f in files[1]]
    return {"path": os.path.abspath(path), "sha256": canonical_json_hash(listed), "files": listed, "text_field": text_field}


def _first_line(e: Exception) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else ""
