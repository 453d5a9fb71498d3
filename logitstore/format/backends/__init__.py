"""Storage backends: how a part's named arrays become files, and back.

A *part* is a set of named numpy arrays (see :mod:`logitstore.format.codec`); a backend turns it into a
few files (relative path -> bytes) and parses such files back. Backends never touch the
filesystem: the writer stores the bytes and the reader fetches them (and checks their checksums)
before a backend parses anything, so backends only ever see verified bytes.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from logitstore.errors import FormatError

#: name -> (dtype, shape); a dimension is an int (exact), an :class:`AtMost` (variable, bounded) or
#: ``None`` (variable, unbounded).
ArraySpecs = dict[str, tuple[np.dtype, tuple]]


class AtMost(int):
    """A variable dimension of at most this many entries (``id_order``: at most the vocabulary)."""

    def __repr__(self) -> str:
        return f"<={int(self)}"


class Backend(Protocol):
    name: str

    def encode_part(self, arrays: dict[str, np.ndarray], chunk_rows: int) -> dict[str, bytes]: ...

    def decode_part(self, files: dict[str, bytes], specs: ArraySpecs, where: str) -> dict[str, np.ndarray]: ...


BACKENDS = ("zarr", "arrow")
#: arrays that describe a whole part rather than one row per sequence
PART_LEVEL = ("id_order",)


def get_backend(name: str) -> Backend:
    if name == "zarr":
        from logitstore.format.backends.zarr_backend import ZarrBackend

        return ZarrBackend()
    if name == "arrow":
        from logitstore.format.backends.arrow_backend import ArrowBackend

        return ArrowBackend()
    raise FormatError(f"backend: expected one of {BACKENDS}, got {name!r}")


def check_array(name: str, dtype: np.dtype, shape: tuple, spec: tuple, where: str) -> None:
    """Refuse an array whose dtype or shape differs from the spec, before reading its data."""
    want_dtype, want_shape = spec
    if np.dtype(dtype) != np.dtype(want_dtype):
        raise FormatError(f"{where}/{name}: expected dtype {np.dtype(want_dtype)}, found {np.dtype(dtype)}")
    if len(shape) != len(want_shape) or any(
            w is not None and (s > w if isinstance(w, AtMost) else w != s) for w, s in zip(want_shape, shape)):
        raise FormatError(f"{where}/{name}: expected shape {tuple(want_shape)}, found {tuple(shape)}")
