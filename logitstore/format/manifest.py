"""The manifest (``manifest.json``): parsing, validation and atomic writing.

A store is complete exactly when its manifest exists; readers trust nothing that the manifest does
not list. Everything in a manifest is untrusted input: :func:`validate_manifest` checks types,
bounds and paths before anything is allocated or opened.
"""

from __future__ import annotations

import json
import re

from logitstore.format.codec import Encoding
from logitstore.errors import FormatError
from logitstore.format.hashing import canonical_json_hash
from logitstore.format.hidden import parse_hidden

FORMAT_NAME = "logitstore"
#: the newest version this package writes and reads; a store is written as version 2 unless it uses
#: a field of version 3 (:func:`written_version`), so stores of plain text stay readable by older readers
FORMAT_VERSION = 4
#: versions this package reads: 1 (per-shard table inside the manifest), 2 (index files), 3
#: (optional per-token inputs: loss mask, document starts, source rows; teacher targets for trained
#: positions only) and 4 (absent top-k entries: adaptive k, a teacher's ``top_p``/``min_k``)
READ_VERSIONS = (1, 2, 3, 4)
#: optional arrays of the inputs part (version 3), named by the manifest's ``inputs``
OPTIONAL_INPUTS = ("loss_mask", "doc_start", "row", "label")
#: what a store's teachers predict (version 3 ``task``; absent: ``lm``): the next token at every
#: position, or one class per sequence (``classify``: every class's logit, lossless)
TASKS = ("lm", "classify")
MAX_LABELS = 1 << 16
#: what a teacher part holds: every position of every window, or only the positions the loss mask trains
TARGETS = ("all", "trained")
MANIFEST = "manifest.json"
PLAN = "plan.json"
MAX_MANIFEST_BYTES = 256 << 20
# Bounds that keep a hostile manifest from asking for absurd allocations.
MAX_SEQ_LEN = 1 << 20
MAX_VOCAB = 1 << 24
MAX_SHARD_SEQUENCES = 1 << 20
MAX_SEQUENCES = 1 << 40
MAX_SHARDS = 1 << 24
#: distinct file names inside parts, listed in a version-2 manifest's ``index.file_names``
MAX_FILE_NAMES = 4096
#: the index files of a version-2 store (see FORMAT.md, "Index files")
INDEX_FILES = ("shards.parquet", "files.parquet", "sequences.parquet")
INDEX_DIR = "index"
#: what a teacher part's commit record (``stats``) says about its model, copied into the manifest
MODEL_FIELDS = ("config_hash", "model_type", "model_vocab_size", "n_parameters")
_SAFE_PATH = re.compile(r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def check_relpath(path: object, where: str) -> str:
    """A path inside the store: relative, no ``..``, no scheme, conservative characters."""
    if not isinstance(path, str) or not _SAFE_PATH.match(path) or any(seg in ("..", ".") for seg in path.split("/")):
        raise FormatError(f"{where}: path {path!r} is not a plain relative path inside the store")
    return path


def _get(d: dict, key: str, types, where: str):
    if not isinstance(d, dict):
        raise FormatError(f"{where}: expected an object")
    if key not in d:
        raise FormatError(f"{where}.{key}: missing")
    v = d[key]
    if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise FormatError(f"{where}.{key}: expected {_tname(types)}, got {v!r}")
    if not isinstance(v, types):
        raise FormatError(f"{where}.{key}: expected {_tname(types)}, got {type(v).__name__}")
    return v


def _int(d: dict, key: str, where: str, lo: int, hi: int) -> int:
    v = _get(d, key, int, where)
    if not lo <= v <= hi:
        raise FormatError(f"{where}.{key}: expected an integer in [{lo}, {hi}], got {v}")
    return v


def _tname(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join({int: "an integer", str: "a string", dict: "an object", list: "a list", bool: "a boolean", float: "a number"}.get(t, t.__name__) for t in types)


def parse_manifest(raw: bytes, where: str = MANIFEST) -> dict:
    """Parse and validate manifest bytes; raise :class:`FormatError` with a one-line reason."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise FormatError(f"{where}: {len(raw)} bytes, more than the {MAX_MANIFEST_BYTES} allowed")
    try:
        d = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{where}: not valid JSON ({e}); the store is damaged or was not finished") from None
    return validate_manifest(d, where)


def validate_manifest(d: object, where: str = MANIFEST) -> dict:
    """A manifest of version 1 (with its ``shards``) or 2 (naming its index files), validated."""
    validate_header(d, where)
    if d["format_version"] == 1:
        _validate_v1_shards(d, where)
    else:
        _validate_index(d, where)
    return d


def validate_header(d: object, where: str = MANIFEST) -> dict:
    """The fields every manifest and plan share (format, version, backend, encoding, sizes,
    tokenizer, data, teachers), validated; not the shard table."""
    if not isinstance(d, dict):
        raise FormatError(f"{where}: expected a JSON object")
    if d.get("format") != FORMAT_NAME:
        raise FormatError(f"{where}.format: expected {FORMAT_NAME!r}, got {d.get('format')!r}")
    version = _get(d, "format_version", int, where)
    if version > FORMAT_VERSION:
        raise FormatError(f"{where}.format_version: {version} is newer than this logitstore reads ({FORMAT_VERSION}); upgrade logitstore")
    if version not in READ_VERSIONS:
        raise FormatError(f"{where}.format_version: expected one of {list(READ_VERSIONS)}, got {version}")
    backend = _get(d, "backend", str, where)
    if backend not in ("zarr", "arrow"):
        raise FormatError(f"{where}.backend: expected 'zarr' or 'arrow', got {backend!r}")
    Encoding.from_dict(_get(d, "encoding", dict, where))
    seq_len = _int(d, "seq_len", where, 1, MAX_SEQ_LEN)
    _get(d, "packed", bool, where)
    _validate_v3_fields(d, version, where)
    if "bos" in d:  # optional: absent (stores written before it existed) means no BOS
        _get(d, "bos", bool, where)
    _int(d, "n_sequences", where, 0, MAX_SEQUENCES)
    _int(d, "n_tokens", where, 0, MAX_SEQUENCES * seq_len)
    tok = _get(d, "tokenizer", dict, where)
    vocab = _int(tok, "vocab_size", f"{where}.tokenizer", 1, MAX_VOCAB)
    _get(tok, "fingerprint", str, f"{where}.tokenizer")
    _get(_get(d, "data", dict, where), "fingerprint", str, f"{where}.data")
    teachers = _get(d, "teachers", list, where)
    if len(teachers) > 255:  # a part is coded in one byte in the index (0 = inputs)
        raise FormatError(f"{where}.teachers: {len(teachers)} teachers, more than the 255 a store holds")
    names = set()
    for i, t in enumerate(teachers):
        w = f"{where}.teachers[{i}]"
        name = _get(t, "name", str, w)
        if name in names:
            raise FormatError(f"{w}.name: duplicate teacher name {name!r}")
        names.add(name)
        k = _int(t, "k", w, 1, vocab)
        if "top_p" in t or "min_k" in t:  # version 4: adaptive k (FORMAT.md, "Absent entries")
            if version < 4:
                raise FormatError(f"{w}.top_p: a version-4 field in a version-{version} store")
            p = _get(t, "top_p", (int, float), w)
            if isinstance(p, bool) or not 0 < p <= 1:
                raise FormatError(f"{w}.top_p: expected a probability in (0, 1], got {p!r}")
            _int(t, "min_k", w, 1, k)
        if "sampled" in t:  # version 4: sampled targets (FORMAT.md, "Sampled targets")
            _check_sampled(t["sampled"], k, version, f"{w}.sampled")
        check_relpath(_get(t, "part", str, w), f"{w}.part")
        if "hidden" in t:  # version 3: hidden states at some layers (logitstore/format/hidden.py)
            if version < 3:
                raise FormatError(f"{w}.hidden: a version-3 field in a version-{version} store")
            parse_hidden(t["hidden"], d.get("task", "lm"), f"{w}.hidden")
    if len({t["part"] for t in teachers}) != len(teachers) or "inputs" in {t["part"] for t in teachers}:
        raise FormatError(f"{where}.teachers: every teacher needs its own part name, other than 'inputs'")
    return d


def _check_sampled(e: object, k: int, version: int, where: str) -> None:
    if version < 4:
        raise FormatError(f"{where}: a version-4 field in a version-{version} store")
    mode = _get(e, "mode", str, where)
    if mode not in ("sampled", "both"):
        raise FormatError(f"{where}.mode: expected 'sampled' or 'both', got {mode!r}")
    s = _int(e, "samples", where, 1, 255)
    top = _int(e, "top_k", where, 1, k) if mode == "both" else 0
    tau = _get(e, "proposal_temperature", (int, float), where)
    if not tau > 0:
        raise FormatError(f"{where}.proposal_temperature: expected > 0, got {tau!r}")
    if k != (top + s if mode == "both" else s):
        raise FormatError(f"{where}: k = {k} entries, but mode {mode!r} with top_k {top} and {s} samples holds "
                          f"{top + s if mode == 'both' else s}")


def _validate_v3_fields(d: dict, version: int, where: str) -> None:
    """``inputs`` (optional inputs arrays) and ``targets`` (``all`` | ``trained``): version 3 only."""
    if version < 3:
        for key in ("inputs", "targets", "task", "num_labels", "label_names"):
            if key in d:
                raise FormatError(f"{where}.{key}: a version-3 field in a version-{version} store")
        return
    arrays = _get(d, "inputs", list, where)
    if any(a not in OPTIONAL_INPUTS for a in arrays) or len(set(arrays)) != len(arrays):
        raise FormatError(f"{where}.inputs: expected distinct names from {list(OPTIONAL_INPUTS)}, got {arrays!r}")
    targets = _get(d, "targets", str, where)
    if targets not in TARGETS:
        raise FormatError(f"{where}.targets: expected one of {list(TARGETS)}, got {targets!r}")
    if targets == "trained" and "loss_mask" not in arrays:
        raise FormatError(f"{where}.targets: 'trained' needs a loss_mask among the inputs")
    task = d.get("task", "lm")
    if task not in TASKS:
        raise FormatError(f"{where}.task: expected one of {list(TASKS)}, got {task!r}")
    if task == "classify":
        n = _int(d, "num_labels", where, 2, MAX_LABELS)
        names = _get(d, "label_names", list, where)
        if len(names) != n or not all(isinstance(x, str) for x in names):
            raise FormatError(f"{where}.label_names: expected {n} strings")
        if d.get("encoding", {}).get("name") != "lossless" or targets != "all" or "label" not in arrays:
            raise FormatError(f"{where}: a classify store has encoding lossless, targets 'all' and a label among the inputs")
        for i, t in enumerate(d.get("teachers", [])):
            if isinstance(t, dict) and t.get("k") != n:
                raise FormatError(f"{where}.teachers[{i}].k: a classify teacher stores all {n} class logits (k = {n})")


def written_version(header: dict) -> int:
    """The version a store with this header is written as: 3 if it has optional inputs,
    trained-only targets, classify teachers or hidden states, else 2."""
    hidden = any(isinstance(t, dict) and "hidden" in t for t in header.get("teachers", []))
    if any(isinstance(t, dict) and ("top_p" in t or "sampled" in t) for t in header.get("teachers", [])):
        return 4  # absent entries: a reader of version 3 would read them as duplicate ids
    return 3 if header.get("inputs") or header.get("targets", "all") != "all" or header.get("task", "lm") != "lm" or hidden else 2


def task_of(manifest: dict) -> str:
    """``lm`` or ``classify`` (see :data:`TASKS`)."""
    return manifest.get("task", "lm")


def inputs_arrays(manifest: dict) -> tuple[str, ...]:
    """The optional inputs arrays a store holds (none before version 3)."""
    return tuple(manifest.get("inputs", ()))


def trained_only(manifest: dict) -> bool:
    """Teacher parts hold only the positions the loss mask trains (``targets: "trained"``)."""
    return manifest.get("targets", "all") == "trained"


def _file_meta(meta: object, where: str) -> None:
    _int(meta, "bytes", where, 0, 1 << 40)
    if not _HEX64.match(str(_get(meta, "sha256", str, where))):
        raise FormatError(f"{where}.sha256: expected 64 lowercase hex digits")


def _validate_index(d: dict, where: str) -> None:
    """Version 2: the shard table lives in index files; the manifest names them and their checksums."""
    _int(d, "n_shards", where, 0, MAX_SHARDS)
    index = _get(d, "index", dict, where)
    w = f"{where}.index"
    names = _get(index, "file_names", list, w)
    if len(names) > MAX_FILE_NAMES:
        raise FormatError(f"{w}.file_names: {len(names)} names, more than the {MAX_FILE_NAMES} allowed")
    for i, n in enumerate(names):
        check_relpath(n, f"{w}.file_names[{i}]")
    if len(set(names)) != len(names):
        raise FormatError(f"{w}.file_names: names repeat")
    _int(index, "n_files", w, 0, MAX_SHARDS * 64)
    files = _get(index, "files", dict, w)
    for name in INDEX_FILES:
        _file_meta(_get(files, name, dict, f"{w}.files"), f"{w}.files[{name!r}]")
    if d["n_shards"] > d["n_sequences"]:
        raise FormatError(f"{where}.n_shards: {d['n_shards']} shards for {d['n_sequences']} sequences (a shard holds at least one)")
    if index["n_files"] < d["n_shards"] * (1 + len(d["teachers"])) or index["n_files"] > d["n_shards"] * (1 + len(d["teachers"])) * 256:
        raise FormatError(f"{w}.n_files: {index['n_files']} files for {d['n_shards']} shards of {1 + len(d['teachers'])} parts")


def _validate_v1_shards(d: dict, where: str) -> None:
    seq_len, n_seq, n_tok = d["seq_len"], d["n_sequences"], d["n_tokens"]
    teachers = d["teachers"]
    shards = _get(d, "shards", list, where)
    start = tokens = 0
    for j, s in enumerate(shards):
        w = f"{where}.shards[{j}]"
        if _int(s, "start", w, 0, MAX_SEQUENCES) != start:
            raise FormatError(f"{w}.start: expected {start} (shards must tile the sequences in order)")
        n = _int(s, "n_sequences", w, 1, MAX_SHARD_SEQUENCES)
        tokens += _int(s, "n_tokens", w, 1, n * seq_len)
        start += n
        check_relpath(_get(s, "path", str, w), f"{w}.path")
        parts = _get(s, "parts", dict, w)
        for pname in ["inputs"] + [t["part"] for t in teachers]:
            part = _get(parts, pname, dict, f"{w}.parts")
            files = _get(part, "files", dict, f"{w}.parts.{pname}")
            if not files:
                raise FormatError(f"{w}.parts.{pname}.files: empty")
            for rel, meta in files.items():
                fw = f"{w}.parts.{pname}.files[{rel!r}]"
                check_relpath(rel, fw)
                _file_meta(meta, fw)
    if start != n_seq:
        raise FormatError(f"{where}.n_sequences: {n_seq}, but the shards hold {start}")
    if tokens != n_tok:
        raise FormatError(f"{where}.n_tokens: {n_tok}, but the shards hold {tokens}")


def dumps(d: dict) -> bytes:
    return (json.dumps(d, indent=1, sort_keys=False) + "\n").encode()


def store_id(manifest: dict) -> str:
    """Content-derived id of a store (``ls-`` + 20 hex digits), computed from the manifest.

    It hashes what determines the stored values: the tokenizer fingerprint, the data fingerprint,
    ``seq_len``, packing, the token budget, the encoding, and per teacher (in order) its weights
    (``weights_hash``; the ``fusion`` record for a fused store; source + revision for a hub id),
    ``config_hash``, dtype and ``k``. Paths,
    teacher names, the backend, shard sizes and timings are left out, so two teams that dump the same
    teacher over the same data with the same settings get the same id."""
    teachers = [teacher_identity(t) for t in manifest["teachers"]]
    key = {"tokenizer": manifest["tokenizer"]["fingerprint"], "data": manifest["data"].get("fingerprint"),
           "max_tokens": manifest["data"].get("max_tokens"), "seq_len": manifest["seq_len"], "packed": manifest["packed"],
           "encoding": manifest["encoding"], "teachers": teachers}
    return "ls-" + canonical_json_hash(key)[:20]


def teacher_identity(t: dict) -> dict:
    """The fields of a teacher entry that determine its values (not its name, path, stats or timings)."""
    return {"weights": t.get("weights_hash") or t.get("fusion") or [t.get("source"), t.get("revision")],
            "config_hash": t.get("config_hash"), "dtype": t.get("dtype"), "k": t.get("k")}
