"""Corpus loading (through ``datasets``), tokenisation and packing into fixed-length windows.

Packing (default): documents are tokenised without special tokens, each preceded by the
tokenizer's BOS if the tokenizer adds one itself (:func:`adds_bos`; ``--bos`` overrides) and
followed by its EOS, concatenated, and cut into consecutive windows of ``seq_len`` tokens; the last
window may be shorter. ``pack=False``: each document (plus EOS) is split into windows on its own,
so no window spans two documents; short windows are right-padded with the pad id (EOS if the
tokenizer has none) and their ``length`` records the real tokens.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from logitstore.format.codec import id_dtype
from logitstore.errors import ConfigError, LogitStoreError
from logitstore.format.hashing import canonical_json_hash, file_sha256, sha256_hex


@dataclass
class Packed:
    """``input_ids`` [N, seq_len] and ``lengths`` [N] of the windows to dump."""

    input_ids: np.ndarray
    lengths: np.ndarray

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())

    def fingerprint(self) -> str:
        h = [self.input_ids.shape[1], sha256_hex(np.ascontiguousarray(self.input_ids, dtype="<u4").tobytes()),
             sha256_hex(np.ascontiguousarray(self.lengths, dtype="<u4").tobytes())]
        return canonical_json_hash(h)


GLOB_CHARS = "*?["


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
        if kind not in (".txt", ".jsonl", ".json", ".parquet"):
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


def load_texts(path: str, text_field: str = "text") -> list[str]:
    """Read documents from ``--data``: a ``.txt`` file (the whole file is one document),
    ``.jsonl``/``.json`` (one document per record, field ``text_field``), ``.parquet``, a saved
    ``datasets`` directory, a directory of ``.txt`` files (each one document, in sorted order) or a
    glob of files of one kind (sorted). Rows whose field is not a string (null, a number) are
    skipped with a warning that counts them; empty documents are skipped. Raises a one-line
    :class:`LogitStoreError` on any problem."""
    import datasets

    datasets.disable_progress_bars()  # our own bar reports the dump; theirs would bury error lines
    p = Path(path)
    files = data_files(path)
    if files is None and not p.exists():
        raise LogitStoreError(f"--data {path}: no such file or directory")
    try:
        if files is not None:
            kind, paths = files
            for f in paths:
                if kind in (".txt", ".jsonl", ".json"):
                    _check_utf8(f)
                if kind in (".jsonl", ".json") and f.stat().st_size == 0:
                    raise LogitStoreError(f"--data {f}: the file is empty")
            names = [str(f) for f in paths]
            if kind == ".txt":
                ds = datasets.load_dataset("text", data_files=names, sample_by="document", split="train")
                text_field = "text"
            else:
                ds = datasets.load_dataset("json" if kind in (".jsonl", ".json") else "parquet", data_files=names, split="train")
        elif p.is_dir():
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if "train" not in ds:
                    raise LogitStoreError(f"--data {path}: dataset has splits {sorted(ds)}, expected a 'train' split")
                ds = ds["train"]
        else:
            suffix = p.suffix.lower()
            if suffix in (".txt", ".jsonl", ".json", ".parquet") and p.stat().st_size == 0:
                raise LogitStoreError(f"--data {path}: the file is empty")
            if suffix == ".txt":
                _check_utf8(p)
                ds = datasets.load_dataset("text", data_files=str(p), sample_by="document", split="train")
                text_field = "text"
            elif suffix in (".jsonl", ".json"):
                _check_utf8(p)
                ds = datasets.load_dataset("json", data_files=str(p), split="train")
            elif suffix == ".parquet":
                ds = datasets.load_dataset("parquet", data_files=str(p), split="train")
            else:
                raise LogitStoreError(f"--data {path}: expected .txt, .jsonl, .json, .parquet, a directory of .txt files, "
                                      "a glob or a saved datasets directory")
    except LogitStoreError:
        raise
    except Exception as e:  # datasets raises many types for unreadable input
        raise LogitStoreError(f"--data {path}: cannot read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    if text_field not in ds.column_names:
        raise LogitStoreError(f"--data {path}: no field {text_field!r} (fields: {', '.join(ds.column_names)}); pass --text-field")
    column = ds[text_field]
    texts = [t for t in column if isinstance(t, str) and t.strip()]
    not_str = sum(1 for t in column if not isinstance(t, str))
    if not_str:
        kinds = sorted({"null" if t is None else type(t).__name__ for t in column if not isinstance(t, str)})
        print(f"warning: --data {path}: skipped {not_str} of {len(column)} rows whose {text_field!r} is not a string "
              f"({', '.join(kinds)})", file=sys.stderr, flush=True)
    if not texts:
        raise LogitStoreError(f"--data {path}: no non-empty documents in field {text_field!r}")
    return texts


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


BOS_MODES = ("auto", "always", "never")


def adds_bos(tokenizer) -> bool:
    """Whether ``tokenizer(text)`` starts with its BOS token (its ``add_bos_token`` or post-processor
    convention, as Llama 3 and Gemma tokenizers do), i.e. whether its models saw a BOS first."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = list(tokenizer("a")["input_ids"])
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    return len(with_special) > len(plain) and with_special[0] == bos and with_special[1 : 1 + len(plain)] == plain


def resolve_bos(tokenizer, mode: str = "auto") -> bool:
    """``--bos``: ``auto`` follows :func:`adds_bos`; ``always``/``never`` force it."""
    if mode not in BOS_MODES:
        raise ConfigError(f"--bos: expected one of {', '.join(BOS_MODES)}, got {mode!r}")
    if mode == "never":
        return False
    if mode == "always":
        if tokenizer.bos_token_id is None:
            raise ConfigError("--bos always: the tokenizer has no BOS token")
        return True
    return adds_bos(tokenizer)


def pack(tokenizer, texts: list[str], seq_len: int, *, packed: bool = True, max_tokens: int | None = None,
         bos: bool = False) -> Packed:
    """Tokenise ``texts`` and cut them into windows (see the module docstring). ``bos``: start each
    document with the tokenizer's BOS token."""
    if seq_len <= 0:
        raise ConfigError(f"--seq-len: expected a positive integer, got {seq_len}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("tokenizer: has no EOS token to separate documents")
    head = [tokenizer.bos_token_id] if bos else []
    if bos and tokenizer.bos_token_id is None:
        raise ConfigError("tokenizer: has no BOS token to start documents with")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    dtype = id_dtype(len(tokenizer))
    docs: list[np.ndarray] = []
    total = 0
    for start in range(0, len(texts), 512):
        enc = tokenizer(texts[start : start + 512], add_special_tokens=False)["input_ids"]
        for ids in enc:
            arr = np.asarray(head + ids + [eos], dtype=dtype)
            if max_tokens is not None and total + arr.size > max_tokens:
                arr = arr[: max_tokens - total]
            if arr.size:
                docs.append(arr)
                total += arr.size
            if max_tokens is not None and total >= max_tokens:
                break
        if max_tokens is not None and total >= max_tokens:
            break
    if total == 0:
        raise LogitStoreError("--data: tokenised to zero tokens")
    windows: list[np.ndarray] = []
    if packed:
        stream = np.concatenate(docs)
        windows = [stream[i : i + seq_len] for i in range(0, stream.size, seq_len)]
    else:
        for d in docs:
            windows.extend(d[i : i + seq_len] for i in range(0, d.size, seq_len))
    input_ids = np.full((len(windows), seq_len), pad, dtype=dtype)
    lengths = np.empty(len(windows), dtype=np.uint32)
    for i, w in enumerate(windows):
        input_ids[i, : w.size] = w
        lengths[i] = w.size
    return Packed(input_ids=input_ids, lengths=lengths)


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
