"""Content hashes and fingerprints recorded in a store."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

SEQ_HASH_BYTES = 16
#: Weight files above this total size are fingerprinted by names, sizes and their first and last MiB.
FULL_HASH_LIMIT = 4 << 30
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | os.PathLike) -> str | None:
    """sha256 of a local file's contents, read in blocks (None if it is not a file)."""
    p = Path(path)
    if not p.is_file():
        return None
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def canonical_json_hash(obj) -> str:
    return sha256_hex(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode())


def sequence_hash(ids: np.ndarray) -> bytes:
    """blake2b-128 of a sequence's token ids as little-endian uint32: the key that joins stores."""
    return hashlib.blake2b(np.ascontiguousarray(ids, dtype="<u4").tobytes(), digest_size=SEQ_HASH_BYTES).digest()


def sequence_hashes(input_ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``[S, 16]`` uint8 hashes of the first ``lengths[i]`` tokens of each row of ``input_ids``."""
    out = np.empty((len(lengths), SEQ_HASH_BYTES), dtype=np.uint8)
    for i, n in enumerate(lengths):
        out[i] = np.frombuffer(sequence_hash(input_ids[i, : int(n)]), dtype=np.uint8)
    return out


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 over the vocabulary, merges/model, added and special tokens.

    Two tokenizers with the same fingerprint map every text to the same ids.
    """
    parts: dict = {"vocab": sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        for key in ("model", "added_tokens", "normalizer", "pre_tokenizer"):
            parts[key] = spec.get(key)
    parts["special"] = sorted((str(k), str(v)) for k, v in tokenizer.special_tokens_map.items())
    return canonical_json_hash(parts)


def config_hash(config) -> str:
    """sha256 of a model config without fields that do not change the function it computes."""
    d = config.to_dict()
    for key in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash", "architectures"):
        d.pop(key, None)
    return canonical_json_hash(d)


def weights_hash(path: str | os.PathLike) -> str | None:
    """sha256 over the weight files under a local model path (file or directory), or None."""
    p = Path(path)
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES)) if p.is_dir() else []
    if not files:
        return None
    total = sum(f.stat().st_size for f in files)
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(p) if p.is_dir() else f.name}:{size}\n".encode())
        with open(f, "rb") as fh:
            if total <= FULL_HASH_LIMIT:
                for block in iter(lambda: fh.read(1 << 24), b""):
                    h.update(block)
            else:
                h.update(fh.read(1 << 20))
                fh.seek(max(0, size - (1 << 20)))
                h.update(fh.read(1 << 20))
    return h.hexdigest()
