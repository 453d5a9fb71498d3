"""Teacher hidden states in a store (format version 3, FORMAT.md "Hidden states").

A teacher entry of the manifest may carry ``hidden``::

    {"layers": [2, 4], "dim": 64, "model_dim": 576, "dtype": "bfloat16", "pooling": "token",
     "projection": {"kind": "rademacher-sha256", "seed": 0, "sha256": "..."}}

``layers`` index the model's ``output_hidden_states`` (0 = the embeddings' output, ``n_layers`` =
the last layer's, after the final norm where the model applies one). Per layer the teacher part
holds ``hidden_{layer}``: ``[S, L, dim]`` per token (``pooling: "token"``, language-model stores;
``[P, dim]`` where the store holds trained positions only) or ``[S, dim]`` per sequence
(``mean`` over the real tokens, the ``first`` or the ``last`` real token; classify stores), as
the 16-bit patterns of ``dtype`` (``bfloat16`` or ``float16``) in ``uint16`` arrays, zeros at
padding. With a ``projection`` the states were multiplied by the fixed matrix
:func:`projection_matrix` ``[model_dim, dim]`` before rounding (``h @ R``), so the bytes per
token are bounded whatever the teacher's width; without, ``dim == model_dim``.

The projection is random but fully specified (not a library's RNG stream, which may change
between versions): entry ``R[i, j]`` is ``+1/sqrt(dim)`` or ``-1/sqrt(dim)`` by bit ``j`` of the
SHA-256 stream of ``(seed, i)``. A Rademacher projection preserves squared distances and inner
products in expectation (Johnson-Lindenstrauss), which is what MSE, cosine and relation losses
compare. The digest of row ``i``, block ``b`` is ``sha256(b"logitstore-projection" || seed (8 bytes,
little-endian) || i (4 bytes) || b (4 bytes))``; column ``j`` takes bit ``j % 8`` (least significant
first) of byte ``(j % 256) // 8`` of block ``j // 256``; the magnitude is ``1 / sqrt(dim)`` computed
in float64 and rounded once to float32. ``sha256`` (of the float32 matrix, little-endian, row-major) lets a reader check it
rebuilt the same matrix.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

from logitstore.errors import FormatError

HIDDEN_DTYPES = ("bfloat16", "float16")
#: ``token``: every position (language-model stores); else one vector per sequence (classify stores)
POOLINGS = ("token", "mean", "first", "last")
PROJECTION_KIND = "rademacher-sha256"
MAX_LAYER = 4096
MAX_DIM = 1 << 16
#: stored values per position over all layers (e.g. 32 layers of 8,192), and entries of a projection
MAX_VALUES = 1 << 18
MAX_PROJECTION = 1 << 28
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def array_name(layer: int) -> str:
    """The teacher-part array holding layer ``layer``."""
    return f"hidden_{layer}"


def projection_matrix(model_dim: int, dim: int, seed: int) -> np.ndarray:
    """The fixed projection ``R`` [model_dim, dim] float32 (see the module docstring)."""
    if not (1 <= dim <= MAX_DIM and 1 <= model_dim <= MAX_DIM and 0 <= seed < 1 << 63):
        raise ValueError(f"projection: dim {dim}, model_dim {model_dim}, seed {seed} out of range")
    blocks = -(-dim // 256)  # one SHA-256 digest gives 256 signs
    raw = bytearray()
    prefix = b"logitstore-projection" + seed.to_bytes(8, "little")
    for i in range(model_dim):
        row = prefix + i.to_bytes(4, "little")
        for b in range(blocks):
            raw += hashlib.sha256(row + b.to_bytes(4, "little")).digest()
    bits = np.unpackbits(np.frombuffer(bytes(raw), np.uint8), bitorder="little").reshape(model_dim, blocks * 256)[:, :dim]
    scale = np.float32(1.0 / np.sqrt(np.float64(dim)))  # computed in float64, rounded once to float32
    return np.where(bits == 1, scale, -scale).astype(np.float32)


def projection_sha256(matrix: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(matrix, "<f4").tobytes()).hexdigest()


def parse_hidden(h: object, task: str, where: str) -> dict:
    """A teacher's ``hidden`` entry, validated (one-line :class:`FormatError` naming the field)."""
    if not isinstance(h, dict):
        raise FormatError(f"{where}: expected an object")
    layers = h.get("layers")
    if (not isinstance(layers, list) or not layers or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers)
            or layers != sorted(set(layers)) or layers[0] < 0 or layers[-1] > MAX_LAYER):
        raise FormatError(f"{where}.layers: expected distinct ascending integers in [0, {MAX_LAYER}], got {layers!r}")
    for key in ("dim", "model_dim"):
        v = h.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_DIM:
            raise FormatError(f"{where}.{key}: expected an integer in [1, {MAX_DIM}], got {v!r}")
    if h.get("dtype") not in HIDDEN_DTYPES:
        raise FormatError(f"{where}.dtype: expected one of {list(HIDDEN_DTYPES)}, got {h.get('dtype')!r}")
    pooling = h.get("pooling")
    if pooling not in POOLINGS or (pooling == "token") != (task == "lm"):
        want = "'token'" if task == "lm" else "'mean', 'first' or 'last'"
        raise FormatError(f"{where}.pooling: a {task} store's hidden states are pooled {want}, got {pooling!r}")
    if len(layers) * h["dim"] > MAX_VALUES:
        raise FormatError(f"{where}: {len(layers)} layers x dim {h['dim']} values per position, more than the {MAX_VALUES} allowed")
    p = h.get("projection")
    if p is None:
        if h["dim"] != h["model_dim"]:
            raise FormatError(f"{where}.dim: {h['dim']} differs from model_dim {h['model_dim']} without a projection")
    elif not (isinstance(p, dict) and p.get("kind") == PROJECTION_KIND and isinstance(p.get("seed"), int)
              and not isinstance(p.get("seed"), bool) and 0 <= p["seed"] < 1 << 63 and isinstance(p.get("sha256"), str)
              and _HEX64.match(p["sha256"])):
        raise FormatError(f"{where}.projection: expected {{'kind': {PROJECTION_KIND!r}, 'seed': an integer >= 0, 'sha256': 64 hex digits}}")
    elif not h["dim"] < h["model_dim"] or h["dim"] * h["model_dim"] > MAX_PROJECTION:
        raise FormatError(f"{where}.dim: a projection maps model_dim {h['model_dim']} to fewer dims (got {h['dim']}), "
                          f"at most {MAX_PROJECTION} entries")
    return h


def stored_projection(h: dict, where: str) -> np.ndarray | None:
    """The projection a ``hidden`` entry records, rebuilt and checked against its sha256 (None: none)."""
    p = h.get("projection")
    if p is None:
        return None
    m = projection_matrix(h["model_dim"], h["dim"], p["seed"])
    if projection_sha256(m) != p["sha256"]:
        raise FormatError(f"{where}.projection.sha256: the rebuilt matrix has another hash; the store was written with "
                          "another projection than FORMAT.md specifies")
    return m


def part_specs(h: dict, rows: tuple) -> dict:
    """``{array: (dtype, shape)}`` of the hidden arrays of a teacher part, ``rows`` its leading dims."""
    return {array_name(layer): (np.dtype(np.uint16), rows + (h["dim"],)) for layer in h["layers"]}


def to_bits(x, dtype: str) -> np.ndarray:
    """A float tensor (torch) to the uint16 patterns of ``dtype``, as numpy."""
    import torch

    t = x.detach().to(torch.bfloat16 if dtype == "bfloat16" else torch.float16).cpu()
    return t.view(torch.int16).numpy().view(np.uint16)


def from_bits(bits: np.ndarray, dtype: str, where: str) -> np.ndarray:
    """uint16 patterns of ``dtype`` to float32, refusing non-finite values (a damaged or hostile part)."""
    if dtype == "bfloat16":
        out = (bits.astype(np.uint32) << 16).view(np.float32)
    else:
        out = bits.view(np.float16).astype(np.float32)
    if out.size and not np.isfinite(out).all():
        raise FormatError(f"{where}: non-finite hidden states")
    return out


def decode_hidden(h: dict, arrays: dict[str, np.ndarray], where: str, trained: np.ndarray | None = None,
                  layers: list[int] | None = None) -> dict[str, np.ndarray]:
    """The hidden arrays of a decoded teacher part as float32: ``hidden_{layer}`` [S, L, dim] or [S, dim];
    a trained-only part's ``[P, dim]`` rows scattered back to ``[S, L, dim]`` with zeros elsewhere."""
    out = {}
    for layer in h["layers"] if layers is None else layers:
        name = array_name(layer)
        v = from_bits(arrays[name], h["dtype"], f"{where}/{name}")
        if trained is not None:
            if v.shape[0] != int(trained.sum()):
                raise FormatError(f"{where}/{name}: holds {v.shape[0]} positions, the inputs' loss_mask trains {int(trained.sum())}")
            full = np.zeros(trained.shape + (h["dim"],), np.float32)
            full[trained] = v
            v = full
        out[name] = v
    return out


def hidden_of(manifest: dict) -> dict[str, dict]:
    """``{teacher name: hidden entry}`` for the teachers of a store that hold hidden states."""
    return {t["name"]: t["hidden"] for t in manifest.get("teachers", []) if isinstance(t, dict) and "hidden" in t}
