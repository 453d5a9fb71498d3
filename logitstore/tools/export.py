"""``logitstore export``: a Parquet or Hugging Face ``datasets`` view of a store.

One row per sequence, decoded (the view holds the values a reader of the store gets, not the
compact encoding). Columns, with ``n`` the sequence's length and per teacher ``T``:

- ``input_ids`` list<int32> [n], ``length`` int32, ``seq_hash`` binary(16);
- ``T.ids`` list<fixed_size_list<int32, k>> [n, k] and ``T.logprobs`` (float32, the same shape);
- ``T.tail_mass``, ``T.gold_logprob``, ``T.entropy`` list<float32> [n];
- in a version-3 store also ``loss_mask`` list<bool> [n] (position ``t`` trains token ``t + 1``;
  targets at other positions are zeros in a store of trained positions only), ``position_ids``
  list<int32> [n] where it records document starts, and ``row`` int64 (the ``--data`` row);
- in a classify store, instead of the teachers' top-k columns: ``label`` int64 and ``T.logits``
  fixed_size_list<float32, C>;
- for a teacher with hidden states (``--hidden-layers``), ``T.hidden_{layer}``: float32
  list<fixed_size_list<float32, dim>> [n, dim] per token, or fixed_size_list<float32, dim> pooled.

:func:`join_targets` goes the other way: it adds the teachers' columns to the user's own rows
(a pre-tokenised dataset dumped with ``--input tokens``), matched by row index and checked by
content hash.

``--to parquet`` writes ``OUT/data/train-SSSSS-of-NNNNN.parquet`` (one file per shard), readable by
``datasets.load_dataset("parquet", data_dir=OUT)`` or any Parquet reader; the manifest's header
is in each file's schema metadata under ``logitstore`` and in ``OUT/logitstore_export.json``,
written last with every file's sha256. Files are staged under ``OUT/.partial`` and moved into
``data/`` only when all are written, so a crash never leaves a directory that reads as complete.
``--to hf`` writes ``datasets.Dataset.save_to_disk`` into ``OUT/.partial`` and moves its files up
into ``OUT``, ``state.json`` last (read with ``datasets.load_from_disk(OUT)``).
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from logitstore.format.codec import SCALARS
from logitstore.tools.derive import header_of, source_ref
from logitstore.errors import ConfigError, StorageError
from logitstore.storage.fsio import StoreFS
from logitstore.format.hashing import sha256_hex
from logitstore.progress import progress_bar
from logitstore.format.reader import Store

TARGETS = ("parquet", "hf")


def shard_table(store: Store, j: int) -> pa.Table:
    """Shard ``j`` of ``store`` as an Arrow table, one row per sequence (columns in the module docstring)."""
    sh = store.load_shard(j, hidden=True)
    lengths = sh["length"].astype(np.int64)
    n, L = sh["input_ids"].shape
    valid = (np.arange(L)[None, :] < lengths[:, None]).ravel()
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))

    def ragged(a: np.ndarray, dtype) -> pa.Array:
        flat = a.reshape(n * L, *a.shape[2:])[valid]
        values = pa.array(flat.reshape(-1).astype(dtype))
        if flat.ndim == 2:
            values = pa.FixedSizeListArray.from_arrays(values, flat.shape[1])
        return pa.ListArray.from_arrays(offsets, values)

    cols = {"input_ids": ragged(sh["input_ids"], np.int32), "length": pa.array(lengths.astype(np.int32)),
            "seq_hash": pa.array([bytes(h) for h in sh["seq_hash"]], pa.binary(16))}
    if "loss_mask" in store.index.optional_inputs:
        cols["loss_mask"] = ragged(np.asarray(sh["loss_mask"]), bool)
    if "doc_start" in store.index.optional_inputs:
        cols["position_ids"] = ragged(np.asarray(sh["position_ids"]), np.int32)
    if "row" in sh:
        cols["row"] = pa.array(sh["row"].astype(np.int64))
    if store.task == "classify":  # per text: its label and every teacher's class logits
        cols["label"] = pa.array(sh["label"].astype(np.int64))
        for name, td in sh["teachers"].items():
            cols[f"{name}.logits"] = pa.FixedSizeListArray.from_arrays(pa.array(td["logits"].reshape(-1)), td["logits"].shape[1])
            for a in (a for a in td if a.startswith("hidden_")):  # pooled hidden states [S, dim] (--hidden-layers)
                cols[f"{name}.{a}"] = pa.FixedSizeListArray.from_arrays(pa.array(td[a].reshape(-1)), td[a].shape[1])
        header = {**header_of(store.manifest), "exported_from": source_ref(store.url, store.manifest)}
        return pa.table(cols).replace_schema_metadata({"logitstore": json.dumps(header)})
    for name, td in sh["teachers"].items():
        cols[f"{name}.ids"] = ragged(td["ids"], np.int32)
        cols[f"{name}.logprobs"] = ragged(td["logprobs"], np.float32)
        for s in SCALARS:
            cols[f"{name}.{s}"] = ragged(td[s], np.float32)
        if "counts" in td:  # sampled targets (FORMAT.md): draws per entry and the proposal's log-normaliser
            cols[f"{name}.counts"] = ragged(td["counts"], np.int32)
            cols[f"{name}.log_z"] = ragged(td["log_z"], np.float32)
        for a in (a for a in td if a.startswith("hidden_")):  # per token [n, dim] (--hidden-layers)
            cols[f"{name}.{a}"] = ragged(td[a], np.float32)
    header = {**header_of(store.manifest), "exported_from": source_ref(store.url, store.manifest)}
    return pa.table(cols).replace_schema_metadata({"logitstore": json.dumps(header)})


def export(src: str, out: str, to: str = "parquet", *, progress: bool = True) -> dict:
    """Write the view of ``src`` at ``out``; return a summary (files, rows, bytes)."""
    if to not in TARGETS:
        raise ConfigError(f"--to: expected one of {', '.join(TARGETS)}, got {to!r}")
    store = Store(src)
    fs = StoreFS(out)
    if fs.exists() and [n for n in fs.ls("") if n != ".partial"]:
        raise ConfigError(f"--out {out}: exists and is not empty; choose another --out")
    n = store.n_shards
    fs.rm(".partial")  # debris of a crashed export
    if to == "hf":
        return _export_hf(store, fs, progress)
    files = {}
    with progress_bar(store.manifest["n_tokens"], "export", enabled=progress) as bar:
        for j in range(n):
            buf = pa.BufferOutputStream()
            pq.write_table(shard_table(store, j), buf, compression="zstd")
            data = buf.getvalue().to_pybytes()
            name = f"train-{j:05d}-of-{n:05d}.parquet"
            fs.write(f".partial/{name}", data)
            files[f"data/{name}"] = {"bytes": len(data), "sha256": sha256_hex(data)}
            bar.update(int(store.index.tokens[j]))
    fs.mv(".partial", "data")
    summary = {"format": "parquet", "source": source_ref(src, store.manifest), "rows": len(store), "files": files}
    fs.write_atomic("logitstore_export.json", json.dumps(summary, indent=1).encode())
    return summary


def _export_hf(store: Store, fs: StoreFS, progress: bool) -> dict:
    """``save_to_disk`` into ``OUT/.partial``, then move its entries up, ``state.json`` (without
    which ``load_from_disk`` refuses the directory) last."""
    import datasets

    with tempfile.TemporaryDirectory(prefix="logitstore-export-") as tmp:
        paths = []
        with progress_bar(store.manifest["n_tokens"], "export", enabled=progress) as bar:
            for j in range(store.n_shards):
                p = os.path.join(tmp, f"{j:05d}.parquet")
                pq.write_table(shard_table(store, j), p)
                paths.append(p)
                bar.update(int(store.index.tokens[j]))
        datasets.disable_progress_bars()
        ds = datasets.Dataset.from_parquet(paths, cache_dir=os.path.join(tmp, "cache"), keep_in_memory=False)
        staging = fs.url.rstrip("/") + "/.partial"
        try:
            ds.save_to_disk(staging)
        except OSError as e:
            raise StorageError(f"{staging}: write failed ({e.strerror or e})") from e
        del ds
    for name in sorted(fs.ls(".partial"), key=lambda n: n == "state.json"):
        fs.mv(f".partial/{name}", name)
    fs.rm(".partial")
    return {"format": "hf", "source": source_ref(store.url, store.manifest), "rows": len(store), "path": fs.url}


def join_targets(dataset, src: str, teachers: list[str] | None = None):
    """The user's ``dataset`` (a ``datasets.Dataset`` with ``input_ids`` and whatever else it holds,
    the rows a store was dumped from with ``--input tokens``) with the teachers' targets added as
    columns ``T.ids``, ``T.logprobs`` [n, k], ``T.tail_mass``, ``T.gold_logprob``, ``T.entropy``
    [n] and ``loss_mask`` [n], ``n`` being the row's real tokens (its ``attention_mask`` ones).

    Rows are matched by their index (the store's ``row``) and every match is checked by content
    hash: a dataset that was filtered, reordered or re-tokenised since the dump is refused with the
    first row that differs, and so is a row the store lacks, unless the dump left it out
    (``--overlong drop``: its columns are None). A row the dump truncated (``--overlong truncate``)
    gets targets for its first ``seq_len`` tokens only. Values are int32/float32; the result is
    built in memory (about the decoded size of the store: for large stores, join shard by shard)."""
    import datasets

    from logitstore.errors import LogitStoreError
    from logitstore.format.hashing import sequence_hashes

    store = Store(src)
    source = store.manifest["data"].get("source") or {}
    if source.get("kind") != "tokens" or store.manifest["packed"]:
        raise ConfigError(f"{src}: not a store of token rows one per window (dump with --input tokens --no-pack)")
    dropped_ok = source.get("overlong") == "drop"
    names = teachers or store.teachers
    arrays = {n: ("ids", "logprobs", *SCALARS, *(("counts", "log_z") if "sampled" in store.teacher(n) else ())) for n in names}
    where: dict[int, int] = {}
    for j in range(store.n_shards):
        rows = store.read_part(j, "inputs")["row"]
        start = int(store.index.starts[j])
        where.update({int(r): start + i for i, r in enumerate(rows)})

    def add(batch, indices):
        out: dict[str, list] = {c: [] for c in ["loss_mask"] + [f"{n}.{a}" for n in names for a in arrays[n]]}
        for b, r in enumerate(indices):
            ids = np.asarray(batch["input_ids"][b], np.int64)
            if batch.get("attention_mask") is not None and batch["attention_mask"][b] is not None:
                real = np.flatnonzero(np.asarray(batch["attention_mask"][b]) != 0)
                ids = ids[real[0]: real[-1] + 1] if real.size else ids[:0]
            if r not in where:
                if not dropped_ok:
                    raise LogitStoreError(f"join: row {r} of the dataset is not in the store {src} (it holds {len(where)} rows); "
                                          "join onto the dataset exactly as it was dumped")
                for c in out:
                    out[c].append(None)  # left out by the dump (--overlong drop)
                continue
            seq = store[where[r]]
            ids = ids[: store.seq_len]  # a row the dump truncated (--overlong truncate) keeps its beginning
            mine = sequence_hashes(ids[None, :].astype(np.uint32), np.array([ids.size], np.uint32))[0]
            if bytes(mine) != seq["seq_hash"]:
                raise LogitStoreError(f"join: row {r} of the dataset differs from the row the store {src} was dumped from "
                                      "(content hash); join onto the dataset exactly as it was dumped")
            out["loss_mask"].append(np.asarray(seq["loss_mask"]))
            for n in names:
                td = seq["teachers"][n]
                for a in arrays[n]:
                    out[f"{n}.{a}"].append(td[a].astype(np.int32 if a in ("ids", "counts") else np.float32))
        return out

    datasets.disable_progress_bars()
    if not isinstance(dataset, datasets.Dataset):
        raise ConfigError("join: expected a datasets.Dataset")
    return dataset.map(add, batched=True, batch_size=256, with_indices=True, keep_in_memory=True)
