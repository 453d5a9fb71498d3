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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .codec import id_dtype
from .errors import ConfigError, LogitStoreError
from .hashing import canonical_json_hash, file_sha256, sha256_hex


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


def load_texts(path: str, text_field: str = "text") -> list[str]:
    """Read documents from ``.txt`` (one document per file), ``.jsonl``/``.json``, ``.parquet`` or a
    saved ``datasets`` directory. Raises a one-line :class:`LogitStoreError` on any problem."""
    import datasets

    datasets.disable_progress_bars()  # our own bar reports the dump; theirs would bury error lines
    p = Path(path)
    if not p.exists():
        raise LogitStoreError(f"--data {path}: no such file or directory")
    try:
        if p.is_dir():
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if "train" not in ds:
                    raise LogitStoreError(f"--data {path}: dataset has splits {sorted(ds)}, expected a 'train' split")
                ds = ds["train"]
        else:
            suffix = p.suffix.lower()
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
                raise LogitStoreError(f"--data {path}: expected .txt, .jsonl, .json, .parquet or a saved datasets directory")
    except LogitStoreError:
        raise
    except Exception as e:  # datasets raises many types for unreadable input
        raise LogitStoreError(f"--data {path}: cannot read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    if text_field not in ds.column_names:
        raise LogitStoreError(f"--data {path}: no field {text_field!r} (fields: {', '.join(ds.column_names)}); pass --text-field")
    texts = [t for t in ds[text_field] if isinstance(t, str) and t.strip()]
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
    return {"path": os.path.abspath(path), "sha256": file_sha256(path), "text_field": text_field}
