"""``logitstore verify``: check every byte and every invariant of a store."""

from __future__ import annotations

import numpy as np

from logitstore.format import layout
from logitstore.errors import FormatError
from logitstore.format.decode import check_inputs
from logitstore.format.hashing import sequence_hashes, sha256_hex
from logitstore.format.reader import Store

#: float16 scalars carry ~1e-3 relative error; checks on them allow this much slack.
TOL = 2e-3


def verify(url: str) -> list[str]:
    """Return one line per problem found (empty when the store is sound). Never raises for
    damaged content: every problem becomes a line naming the shard file and what was expected."""
    try:
        # this function hashes every file itself (below), so the reader need not hash them again
        store = Store(url, verify_checksums=False, cache_shards=0)
    except FormatError as e:
        return [str(e)]
    problems: list[str] = []
    m = store.manifest
    store.verify_checksums = True  # the index files are hashed by the reader; the parts below by this function
    try:
        index = store.index  # a version-2 store's index files: sizes, sha256 and every invariant
    except FormatError as e:
        return [str(e)]
    seqs = None
    if store.format_version >= 2:
        try:
            seqs = store.sequences()
        except FormatError as e:
            problems.append(str(e))
    store.verify_checksums = False
    for j in range(len(index)):
        entry = index.shard_entry(j)
        base = entry["path"]
        # checksums of every file, part by part, so one bad file does not hide the others
        ok_parts = set()
        for part in index.parts:
            bad = False
            for rel, meta in index.files(j, part).items():
                where = f"{base}/{part}/{rel}"
                try:
                    data = store.fs.read(where, size=meta["bytes"])  # refuses FIFOs, devices, links out of the root
                except FormatError as e:
                    problems.append(str(e) if where in str(e) else f"{where}: {e}")
                    bad = True
                    continue
                if len(data) != meta["bytes"]:
                    problems.append(f"{where}: {len(data)} bytes, manifest says {meta['bytes']}")
                    bad = True
                elif sha256_hex(data) != meta["sha256"]:
                    problems.append(f"{where}: sha256 mismatch (file is corrupt)")
                    bad = True
            if not bad:
                ok_parts.add(part)
        if layout.INPUTS in ok_parts:
            try:
                inp = store.read_part(j, layout.INPUTS)
                problems += _check_inputs(inp, store, entry)
                if seqs is not None:
                    problems += _check_sequence_index(inp, seqs, entry)
            except FormatError as e:
                problems.append(str(e))
        for t in m["teachers"]:
            if t["part"] not in ok_parts or layout.INPUTS not in ok_parts:  # a teacher is read with its inputs
                continue
            try:
                problems += _check_teacher(store, j, t, entry)
            except FormatError as e:
                problems.append(str(e))
    return problems


def _check_sequence_index(inp: dict, seqs: tuple[np.ndarray, np.ndarray], entry: dict) -> list[str]:
    """The sequence index agrees with the shard's inputs part (hashes and lengths, row by row)."""
    lo, hi = entry["start"], entry["start"] + entry["n_sequences"]
    h, lengths = seqs[0][lo:hi], seqs[1][lo:hi]
    if not (np.array_equal(h, inp["seq_hash"]) and np.array_equal(lengths, inp["length"])):
        row = int(np.flatnonzero((h != inp["seq_hash"]).any(axis=1) | (lengths != inp["length"]))[0])
        return [f"index/sequences.parquet: sequence {lo + row} differs from {entry['path']}/inputs row {row} (hash or length)"]
    return []


def _check_inputs(inp: dict, store: Store, entry: dict) -> list[str]:
    where = f"{entry['path']}/inputs"
    out = []
    ids, lens = inp["input_ids"], inp["length"]
    if lens.size and (lens.min() < 1 or lens.max() > store.seq_len):
        out.append(f"{where}/length: values must lie in [1, {store.seq_len}], found [{lens.min()}, {lens.max()}]")
        return out
    if int(lens.sum()) != entry["n_tokens"]:
        out.append(f"{where}/length: sums to {int(lens.sum())}, manifest says {entry['n_tokens']} tokens")
    if ids.size and int(ids.max()) >= store.vocab_size:
        out.append(f"{where}/input_ids: id {int(ids.max())} >= vocab_size {store.vocab_size}")
    bad = np.flatnonzero((sequence_hashes(ids, lens) != inp["seq_hash"]).any(axis=1))
    if bad.size:
        out.append(f"{where}/seq_hash: {bad.size} sequence(s) do not match their token ids (first: row {bad[0]})")
    try:
        check_inputs(inp, store.seq_len, entry["path"], store.index.num_labels)  # the optional arrays (loss_mask, label, ...)
    except FormatError as e:
        out.append(str(e))
    return out


def _check_teacher(store: Store, j: int, t: dict, entry: dict) -> list[str]:
    where = f"{entry['path']}/{t['part']}"
    sh = store.load_shard(j, [t["name"]], hidden=True)
    if store.task == "classify":  # class logits: shape and finiteness are checked by the reader
        return []
    td = sh["teachers"][t["name"]]
    # a store of trained positions only holds targets where the loss mask trains (zeros elsewhere)
    valid = sh["loss_mask"] if store.index.trained_only else np.arange(store.seq_len)[None, :] < sh["length"][:, None]
    out = []
    ragged = "top_p" in t or "sampled" in t  # absent entries read as -inf (FORMAT.md, "Version 4")
    for name, arr in td.items():
        if name == "ids":
            continue
        v = arr[valid]
        if name == "counts":  # sampled targets: S draws per position (none where nothing could be drawn)
            sums = v.astype(np.int64).sum(-1)
            if not np.isin(sums, (0, t["sampled"]["samples"])).all():
                out.append(f"{where}/counts: a position's draws do not sum to {t['sampled']['samples']}")
            continue
        if name == "log_z":  # -inf where nothing could be drawn
            if np.isnan(v).any() or np.isposinf(v).any():
                out.append(f"{where}/log_z: NaN or +inf")
            continue
        if ragged and name == "logprobs":
            if np.isnan(v).any() or np.isposinf(v).any() or np.isneginf(v[:, 0]).any():
                out.append(f"{where}/logprobs: non-finite values (other than absent entries after the first)")
            continue
        if not np.isfinite(v).all():
            out.append(f"{where}/{name}: non-finite values")
    lp, tail = td["logprobs"][valid], td["tail_mass"][valid]
    if lp.size and lp.max() > TOL:
        out.append(f"{where}/logprobs: log-probability {lp.max():.4g} > 0")
    if tail.size and (tail.min() < 0 or tail.max() > 1 + TOL):
        out.append(f"{where}/tail_mass: outside [0, 1] (found [{tail.min():.4g}, {tail.max():.4g}])")
    if lp.size:
        total = np.exp(lp.astype(np.float64)).sum(-1) + tail
        worst = float(np.abs(total - 1).max())
        if worst > 0.05:
            out.append(f"{where}: top-k mass + tail_mass differs from 1 by {worst:.3g}")
    ent = td["entropy"][valid]
    if ent.size and ent.min() < -TOL:
        out.append(f"{where}/entropy: negative entropy {ent.min():.4g}")
    gold = td["gold_logprob"][valid]
    if gold.size and gold.max() > TOL:
        out.append(f"{where}/gold_logprob: log-probability {gold.max():.4g} > 0")
    ids = td["ids"][valid]
    if ids.size and int(ids.max()) >= store.vocab_size:
        out.append(f"{where}/ids: id {int(ids.max())} >= vocab_size {store.vocab_size}")
    if ids.size and t["k"] > 1:
        s = np.sort(np.where(np.isneginf(td["logprobs"][valid]), -1 - np.arange(ids.shape[-1]), ids), axis=-1)  # absent: distinct
        if (s[:, 1:] == s[:, :-1]).any():
            out.append(f"{where}/ids: a position lists the same id twice")
    return out
