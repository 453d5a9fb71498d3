"""``logitstore merge``: concatenate stores dumped with the same teachers and settings on different
parts of a corpus (by different machines or teams) into one store.

Compatible means: the same format version, tokenizer (fingerprint, vocabulary, EOS and pad ids),
``seq_len``, packing, encoding, and the same teachers in the same order (same name and part, and the
same weights, config, dtype and ``k``). Stores holding the same data (equal data fingerprints) are
refused, since their sequences would be counted twice, and so are stores that share any sequence
(equal ``seq_hash``, e.g. one dumped over a prefix of the other's corpus; identical windows of
identical documents count too: deduplicate the corpora first). Sequences keep their order: all of the
first store's, then the second's, and so on. Shards are copied byte for byte after their checksums
are checked (re-encoded if a store has the other backend; the first store's backend is kept).

The merged store's ``data.fingerprint`` is ``canonical_json_hash({"concat": [fingerprints...]})``
and ``data.sources`` lists each input's ``data`` record; see FORMAT.md.
"""

from __future__ import annotations

import sys

from logitstore.tools.derive import ShardJob, check_out, header_of, source_ref, write_derived
from logitstore.errors import ConfigError
from logitstore.format.hashing import canonical_json_hash
from logitstore.format.manifest import teacher_identity, written_version
from logitstore.format.reader import Store

_SAME = ("encoding", "seq_len", "packed", "bos", "tokenizer", "inputs", "targets")


def _same_form(key: str, value):
    """What merge compares: an encoding by what it means (a manifest that spells out a default equals one that omits it)."""
    if key == "encoding" and isinstance(value, dict):
        from logitstore.format.codec import Encoding

        return Encoding.from_dict(value).to_dict()
    return value
#: fields that older stores may lack, read as these values (FORMAT.md)
_DEFAULTS = {"bos": False}


def check_compatible(stores: list[Store]) -> None:
    """Raise :class:`ConfigError` with the reason if ``stores`` cannot be merged."""
    first = stores[0]
    m0 = first.manifest
    seen = {m0["data"]["fingerprint"]: first.url}
    for s in stores[1:]:
        m = s.manifest
        for key in _SAME:
            if _same_form(key, m.get(key, _DEFAULTS.get(key))) != _same_form(key, m0.get(key, _DEFAULTS.get(key))):
                raise ConfigError(f"{s.url}: {key} differs from {first.url}'s ({m.get(key, _DEFAULTS.get(key))!r} vs "
                                  f"{m0.get(key, _DEFAULTS.get(key))!r}); only stores dumped with the same settings can be merged")
        t0 = [(t["name"], t["part"]) for t in m0["teachers"]]
        t1 = [(t["name"], t["part"]) for t in m["teachers"]]
        if t1 != t0:
            raise ConfigError(f"{s.url}: teachers {[n for n, _ in t1]} differ from {first.url}'s {[n for n, _ in t0]}")
        for a, b in zip(m0["teachers"], m["teachers"]):
            ia, ib = teacher_identity(a), teacher_identity(b)
            if ia != ib:
                what = ", ".join(k for k in ia if ia[k] != ib[k])
                raise ConfigError(f"{s.url}: teacher {b['name']!r} is not the same model or settings as in {first.url} (differs in {what})")
            for f in ("top_p", "min_k", "sampled"):  # what a teacher's entries mean (FORMAT.md, "Version 4")
                if a.get(f) != b.get(f):
                    raise ConfigError(f"{s.url}: teacher {b['name']!r} was dumped with {f} {b.get(f)!r}, in {first.url} with "
                                      f"{a.get(f)!r}; only stores of the same targets can be merged")
            if a.get("hidden") != b.get("hidden"):  # layers, width, dtype, pooling and projection of stored hidden states
                raise ConfigError(f"{s.url}: teacher {b['name']!r} stores other hidden states than in {first.url} "
                                  f"({b.get('hidden')} vs {a.get('hidden')}); dump both with the same --hidden-* settings")
        fp = m["data"]["fingerprint"]
        if fp in seen:
            raise ConfigError(f"{s.url}: holds the same data as {seen[fp]} (data fingerprint {fp[:12]}); merging would repeat it")
        seen[fp] = s.url


def check_disjoint(stores: list[Store], *, allow_shared: bool = False) -> int:
    """Refuse stores that share sequences (equal ``seq_hash``), e.g. one dumped over a prefix of the
    other's corpus: their data fingerprints differ, but merging would count those sequences twice.
    Repeats inside one store are its own data and are kept. With ``allow_shared`` (corpora that
    repeat short boilerplate documents) shared sequences are only counted and reported.

    Cost: the 16-byte hashes of every input, sorted with numpy (16 bytes per sequence: 160 MB for
    10^7 sequences), from each store's sequence index (a version-1 store reads its inputs parts). Returns the number
    of shared sequences."""
    import numpy as np

    hashes = [s.sequences()[0] for s in stores]
    keys = [np.ascontiguousarray(h).view("S16").ravel() for h in hashes]
    total = 0
    for si in range(1, len(stores)):
        earlier = np.unique(np.concatenate(keys[:si])) if si else keys[0][:0]
        mine = keys[si]
        pos = np.searchsorted(earlier, mine)
        hit = (pos < earlier.size) & (earlier[np.minimum(pos, max(earlier.size - 1, 0))] == mine) if earlier.size else \
            np.zeros(mine.size, bool)
        shared = int(hit.sum())
        if not shared:
            continue
        total += shared
        i = int(np.flatnonzero(hit)[0])
        other = next(sj for sj in range(si) if (keys[sj] == mine[i]).any())
        i_other = int(np.flatnonzero(keys[other] == mine[i])[0])
        msg = (f"{stores[si].url}: {shared} of its {mine.size} sequences are also in {stores[other].url} (e.g. its sequence {i} "
               f"is sequence {i_other} there, seq_hash {mine[i].hex()[:16]})")
        if not allow_shared:
            raise ConfigError(f"{msg}; merging would count them twice: merge stores of disjoint data, or pass "
                              f"--allow-shared-sequences if the repeats are real (e.g. boilerplate documents)")
        print(f"warning: {msg}; merged anyway (--allow-shared-sequences)", file=sys.stderr)
    return total


def _merged_teachers(manifests: list[dict]) -> list[dict]:
    out = []
    for i, t in enumerate(manifests[0]["teachers"]):
        entries = [m["teachers"][i] for m in manifests]
        w = [m["n_tokens"] for m in manifests]
        total = max(sum(w), 1)
        stats = {key: sum(e["stats"][key] * n for e, n in zip(entries, w)) / total for key in ("mean_topk_mass", "mean_entropy")}
        fwd = sum(e.get("timings", {}).get("forward_seconds") or 0.0 for e in entries)
        wall = sum(e.get("timings", {}).get("wall_seconds") or 0.0 for e in entries)
        out.append({**t, "stats": stats,
                    "timings": {"forward_seconds": fwd, "wall_seconds": wall, "tokens_per_second": sum(w) / wall if wall else None}})
    return out


def merge(sources: list[str], out: str, *, progress: bool = True, allow_shared: bool = False) -> dict:
    """Concatenate the stores ``sources`` (in order) into ``out``; return the new manifest."""
    if len(sources) < 2:
        raise ConfigError("merge: give at least two stores")
    stores = [Store(u) for u in sources]
    check_compatible(stores)
    check_out(out, sources)
    check_disjoint(stores, allow_shared=allow_shared)
    ms = [s.manifest for s in stores]
    head = header_of(ms[0])
    backend = head["backend"]
    header = {**head,
              "shard_sequences": max(m.get("shard_sequences", 0) for m in ms),  # nominal: shards may be smaller
              "n_sequences": sum(m["n_sequences"] for m in ms), "n_tokens": sum(m["n_tokens"] for m in ms),
              "data": {"fingerprint": canonical_json_hash({"concat": [m["data"]["fingerprint"] for m in ms]}),
                       "max_tokens": None, "sources": [m["data"] for m in ms]},
              "teachers": _merged_teachers(ms),
              "derived": {"op": "merge", "sources": [source_ref(u, m) for u, m in zip(sources, ms)]}}
    jobs, start = [], 0
    for store in stores:
        same = store.manifest["backend"] == backend and store.format_version == written_version(store.manifest)  # else re-encoded
        ix = store.index
        for j, s in enumerate(ix.shard_entry(j) for j in range(len(ix))):
            def produce(part, store=store, j=j, same=same):
                return ("files", store.part_files(j, part), None) if same else ("arrays", store.read_part(j, part), None)

            jobs.append(ShardJob(start, s["n_sequences"], s["n_tokens"], produce))
            start += s["n_sequences"]
    return write_derived(out, header, jobs, progress=progress, desc="merge")
