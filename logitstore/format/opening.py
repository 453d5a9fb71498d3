"""Opening a store: the manifest found, bounded, parsed and validated before anything else is read.

A directory without ``manifest.json`` is not a store, whatever else it holds; the error says why
(nothing there, a dump still writing it under a live lock, or a dump that stopped before the end).
"""

from __future__ import annotations

from logitstore.errors import FormatError
from logitstore.format.manifest import MANIFEST, MAX_MANIFEST_BYTES, PLAN, parse_manifest
from logitstore.storage.fsio import StoreFS


def read_manifest(fs: StoreFS, url: str) -> dict:
    """The validated manifest of the store at ``fs`` (see FORMAT.md); :class:`FormatError` naming
    ``url`` if there is no complete store there."""
    if not fs.exists(MANIFEST):
        if not fs.exists():
            raise FormatError(f"{url}: no such store (nothing at this path)")
        raise FormatError(f"{url}: no {MANIFEST}; not a complete logitstore store{_unfinished_hint(fs)}")
    return parse_manifest(fs.read(MANIFEST, MAX_MANIFEST_BYTES), f"{url}/{MANIFEST}")


def _unfinished_hint(fs: StoreFS) -> str:
    if not fs.exists(PLAN):
        return ""
    from logitstore.storage.lock import describe, lock_is_live, read_lock

    rec = read_lock(fs)
    if rec is not None and lock_is_live(rec):
        return f" (a {describe(rec)} is still writing it)"
    return " (a dump is unfinished or crashed: re-run it to complete)"
