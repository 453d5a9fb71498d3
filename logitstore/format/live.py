"""Reading a store while it is still written: the shards committed so far, never a half-written one.

A dump writes ``plan.json`` first and commits each part with a record written after its files
(FORMAT.md, "Layout"). Until ``manifest.json`` exists, a reader opened with ``follow=True`` sees the
longest prefix of shards ``0 .. m - 1`` whose every part has a commit record, so sequence numbers
never change as more shards arrive (shards are numbered by position in the corpus). The view is
built from the plan and the commit records alone: the plan gives the header (tokenizer, data,
teachers, encoding), each record the part's files, sizes and sha256, and each inputs record the
sequences' hashes and lengths; all of it is validated like a manifest. ``refresh()`` reads only the
records past the current prefix; once the manifest exists the store is complete and is read from
it. A part rewritten after its record was read (a resumed dump redoes an uncommitted part, never a
committed one) fails its checksum and is reported, never used.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from logitstore.errors import FormatError
from logitstore.format import layout
from logitstore.format.codec import Encoding
from logitstore.format.hashing import SEQ_HASH_BYTES
from logitstore.format.index import ShardIndex, file_table
from logitstore.format.manifest import MAX_MANIFEST_BYTES, MODEL_FIELDS, PLAN, check_relpath, validate_header
from logitstore.storage.fsio import StoreFS


#: shards whose commit records are looked for at once
AHEAD = 64


class LiveView:
    """The committed prefix of a store being written: ``manifest`` (a version-2 header with the
    prefix's counts), ``index`` and ``sequences`` for it; :meth:`refresh` extends it."""

    def __init__(self, fs: StoreFS, url: str):
        self.fs, self.url = fs, url
        try:
            plan = json.loads(fs.read(PLAN, MAX_MANIFEST_BYTES))
        except ValueError:
            raise FormatError(f"{url}/{PLAN}: not valid JSON") from None
        self.plan = validate_header(plan, f"{url}/{PLAN}")
        self.encoding = Encoding.from_dict(plan["encoding"])
        self.parts = [layout.INPUTS] + [t["part"] for t in plan["teachers"]]
        self._models: dict[str, dict] = {}
        self._rows: list[dict] = []  # per committed shard: start, n_sequences, n_tokens, files per part, sequences
        self.refresh()

    def refresh(self) -> int:
        """Read the commit records of the shards past the current prefix, :data:`AHEAD` shards at a
        time on as many threads (an object store answers each request in tens of milliseconds);
        return how many shards were added."""
        added, done = 0, False
        with ThreadPoolExecutor(16) as pool:
            while not done:
                first = len(self._rows)
                for j, recs in zip(range(first, first + AHEAD), pool.map(self._committed, range(first, first + AHEAD))):
                    if recs is None:
                        done = True
                        break
                    if not self._rows:  # what a teacher part records about its model, as the manifest will hold it
                        self._models = {p: {k: r.get("stats", {}).get(k) for k in MODEL_FIELDS} for p, r in zip(self.parts[1:], recs[1:])}
                    self._rows.append(self._shard(j, recs))
                    added += 1
        if added or not hasattr(self, "index"):
            self._build()
        return added

    def _committed(self, j: int) -> list[dict] | None:
        """The commit records of every part of shard ``j``, or None while one of them is missing."""
        rels = [layout.commit_path(j, p) for p in self.parts]
        if not all(self.fs.exists(r) for r in rels):
            return None
        return [self._record(r) for r in rels]

    def _record(self, rel: str) -> dict:
        try:
            rec = json.loads(self.fs.read(rel, 64 << 20))
        except ValueError:
            raise FormatError(f"{self.url}/{rel}: not valid JSON") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("files"), dict) or not rec["files"]:
            raise FormatError(f"{self.url}/{rel}: files: expected a non-empty object")
        for name, meta in rec["files"].items():
            check_relpath(name, f"{self.url}/{rel}: files")
            if not (isinstance(meta, dict) and type(meta.get("bytes")) is int and 0 <= meta["bytes"] <= 1 << 40
                    and isinstance(meta.get("sha256"), str) and len(meta["sha256"]) == 64):
                raise FormatError(f"{self.url}/{rel}: files[{name!r}]: expected bytes and a sha256")
        return rec

    def _shard(self, j: int, recs: list[dict]) -> dict:
        inp = recs[0]
        where = f"{self.url}/{layout.commit_path(j, layout.INPUTS)}"
        start, n, tokens = inp.get("start"), inp.get("n_sequences"), inp.get("n_tokens")
        if not all(type(v) is int for v in (start, n, tokens)):
            raise FormatError(f"{where}: start, n_sequences, n_tokens: expected integers")
        seq = inp.get("sequences")
        try:
            h = np.frombuffer(bytes.fromhex(seq["seq_hash"]), np.uint8).reshape(n, SEQ_HASH_BYTES)
            lengths = np.asarray(seq["length"], np.int64)
        except (TypeError, KeyError, ValueError) as e:
            raise FormatError(f"{where}: sequences: expected the hashes and lengths of {n} sequences ({e})") from None
        if lengths.shape != (n,) or (n and (lengths.min() < 1 or lengths.max() > self.plan["seq_len"])) or int(lengths.sum()) != tokens:
            raise FormatError(f"{where}: sequences.length: expected {n} lengths in [1, seq_len] summing to n_tokens")
        return {"start": start, "n_sequences": n, "n_tokens": tokens, "files": [r["files"] for r in recs],
                "seq_hash": h, "length": lengths.astype(np.uint32)}

    def _build(self) -> None:
        rows = self._rows
        files, names = file_table([r["files"] for r in rows], f"{self.url} (commit records)")
        shards = {k: np.array([r[k] for r in rows], np.int64) for k in ("start", "n_sequences", "n_tokens")}
        self.manifest = {**self.plan, "n_shards": len(rows), "n_sequences": int(shards["n_sequences"].sum()),
                         "n_tokens": int(shards["n_tokens"].sum()), "live": True,
                         "teachers": [{**t, **self._models.get(t["part"], {}), "stats": {}} for t in self.plan["teachers"]]}
        self.index = ShardIndex(self.manifest, self.encoding, shards, files, names, where=f"{self.url} (commit records)")
        self.sequences = ((np.concatenate([r["seq_hash"] for r in rows]), np.concatenate([r["length"] for r in rows]))
                          if rows else (np.zeros((0, SEQ_HASH_BYTES), np.uint8), np.zeros(0, np.uint32)))
