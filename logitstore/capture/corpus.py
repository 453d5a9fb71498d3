"""Tokenisation and packing of documents into fixed-length windows (the definition; a dump
streams the same windows through :mod:`logitstore.capture.windows`, documents come from
:mod:`logitstore.capture.documents`).

Packing (default): documents are tokenised without special tokens, each preceded by the
tokenizer's BOS if the tokenizer adds one itself (:func:`adds_bos`; ``--bos`` overrides) and
followed by its EOS, concatenated, and cut into consecutive windows of ``seq_len`` tokens; the last
window may be shorter. ``pack=False``: each document (plus EOS) is split into windows on its own,
so no window spans two documents; short windows are right-padded with the pad id (EOS if the
tokenizer has none) and their ``length`` records the real tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from logitstore.errors import ConfigError, LogitStoreError
from logitstore.format.codec import id_dtype
from logitstore.format.hashing import canonical_json_hash, sha256_hex


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
