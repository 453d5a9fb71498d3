"""Joining stores by the content hash of their sequences, without reading any ``input_ids``.

Stores over the same data (equal data fingerprints) and the same shard table hold the same sequences
in the same order, so they join by position and nothing is read (each batch still checks, row by
row, that the hashes agree). Otherwise each store's sequence index (16-byte hash and length per
sequence) is read once and matched by sorting: ~56 bytes per sequence while it runs, none of it
Python objects. Repeated sequences match occurrence by occurrence, in order.
"""

from __future__ import annotations

import numpy as np

from logitstore.errors import LogitStoreError


def same_layout(a, b, shards: int | None = None) -> bool:
    """Two stores hold the same sequences in the same order and shards (no index needs reading);
    with ``shards``, compared over their first ``shards`` shards (stores still being written)."""
    if a.manifest["data"]["fingerprint"] != b.manifest["data"]["fingerprint"]:
        return False
    if shards is None:
        return a.manifest["n_sequences"] == b.manifest["n_sequences"] and np.array_equal(a.index.sizes, b.index.sizes)
    return np.array_equal(a.index.sizes[:shards], b.index.sizes[:shards])


def hash_keys(h: np.ndarray) -> np.ndarray:
    """Hashes [n, 16] uint8 as [n] ``S16`` (a view; ``S16`` orders fixed 16-byte values as bytes)."""
    return np.ascontiguousarray(h, np.uint8).view("S16").ravel()


def hash_map(primary: np.ndarray, other: np.ndarray, unknown: np.ndarray, url: str, primary_url: str) -> np.ndarray:
    """For each primary sequence ``i`` (hashes [n, 16]), the index in ``other`` of the same content
    (``-1`` where ``unknown[i]``: its hash could not be read). Raises if ``other`` lacks one of them."""
    n = len(primary)
    if len(other) != n:
        raise LogitStoreError(f"--logits {url}: holds {len(other)} sequences, {primary_url} holds {n}; "
                              f"stores must cover the same sequences")
    mapping = np.full(n, -1, dtype=np.int64)
    pk, ok = hash_keys(primary), hash_keys(other)
    known = np.flatnonzero(~unknown)
    po = known[np.argsort(pk[known], kind="stable")]  # sorted by hash, occurrences in store order
    oo = np.argsort(ok, kind="stable")
    pks, oks = pk[po], ok[oo]
    if not len(pks):
        return mapping
    new_run = np.r_[True, pks[1:] != pks[:-1]]
    occurrence = np.arange(len(pks)) - np.flatnonzero(new_run)[np.cumsum(new_run) - 1]
    at = np.searchsorted(oks, pks, side="left") + occurrence  # the r-th repeat pairs with the r-th repeat
    hit = at < len(oks)
    hit[hit] = oks[at[hit]] == pks[hit]
    if not hit.all():
        i = int(po[np.flatnonzero(~hit)[0]])
        raise LogitStoreError(f"--logits {url}: does not contain sequence {i} of {primary_url} (content hash "
                              f"{bytes(primary[i]).hex()}); stores must cover the same sequences")
    mapping[po] = oo[at]
    return mapping
