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


def check_joinable(urls: list[str], stores: list, prefix: str) -> None:
    """Refuse, with one line starting with ``prefix``, stores that cannot be trained on together:
    another tokenizer, ``seq_len`` or vocabulary than the first, or document starts recorded in one
    and not the other (their teachers saw different context)."""
    from logitstore.format.manifest import inputs_arrays

    m0 = stores[0].manifest
    for url, s in zip(urls[1:], stores[1:]):
        m = s.manifest
        if m["tokenizer"]["fingerprint"] != m0["tokenizer"]["fingerprint"]:
            raise LogitStoreError(f"{prefix}{url}: tokenizer fingerprint differs from {urls[0]}'s; stores must share a tokenizer")
        if m["seq_len"] != m0["seq_len"]:
            raise LogitStoreError(f"{prefix}{url}: seq_len {m['seq_len']} differs from {urls[0]}'s {m0['seq_len']}")
        if m["tokenizer"]["vocab_size"] != m0["tokenizer"]["vocab_size"]:
            raise LogitStoreError(f"{prefix}{url}: vocab_size differs from {urls[0]}'s")
        for key in ("num_labels", "label_names"):  # classify stores: the same classes, in the same order
            if m.get(key) != m0.get(key):
                raise LogitStoreError(f"{prefix}{url}: {key} {m.get(key)!r} differ from {urls[0]}'s {m0.get(key)!r}; "
                                      "classify stores trained together must share their classes")
        here, there = "doc_start" in inputs_arrays(m), "doc_start" in inputs_arrays(m0)
        if here != there:
            raise LogitStoreError(f"{prefix}{url}: {'records' if here else 'does not record'} document starts and {urls[0]} "
                                  f"{'does not' if here else 'does'}: its teacher saw other context; dump both with the same "
                                  "--doc-boundaries")


def refuse_repeated_teachers(urls: list[str], stores: list, teachers: list[tuple[int, str]], prefix: str) -> None:
    """The same model (weights and config, whatever its name, k or dtype) in two stores would be
    fused as two teachers and get twice its weight."""
    from logitstore.format.manifest import teacher_identity

    seen: dict[str, tuple[int, str]] = {}
    for si, name in teachers:
        ident = teacher_identity(stores[si].teacher(name))
        key = repr((ident["weights"], ident["config_hash"]))
        if key in seen:
            sj, other = seen[key]
            raise LogitStoreError(f"{prefix}{urls[si]}: teacher {name!r} is the same model as teacher {other!r} of "
                                  f"{urls[sj]} (same weights and config); give each teacher once")
        seen[key] = (si, name)


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
