"""Writing parts of a store: encode, store files under a temporary name, rename, commit.

A part becomes visible to a later dump (resume) only through its commit record, written after all
its files; a reader sees a part only through the manifest, written after every commit. A crash at
any moment therefore leaves either a committed part or debris that the next run deletes.
Parts are written by one writer each, so several writers (one per rank) can fill one store.
"""

from __future__ import annotations

import json
import queue
import threading
import uuid
from typing import Callable

import numpy as np

from logitstore.errors import FormatError
from logitstore.format import layout
from logitstore.format.backends import get_backend
from logitstore.format.codec import SCALARS, Encoding
from logitstore.storage.fetch import PartFetcher
from logitstore.storage.fsio import StoreFS
from logitstore.format.hashing import sha256_hex
from logitstore.format.manifest import check_relpath


class PartWriter:
    """Encodes parts with one backend into one store root."""

    def __init__(self, fs: StoreFS, backend: str, chunk_rows: int, position_rows: int = 32768):
        """``chunk_rows``: sequences per inner chunk; ``position_rows``: positions per inner chunk of
        a teacher part that holds trained positions only (its arrays are ``[P, ...]``)."""
        self.fs = fs
        self.backend = get_backend(backend)
        self.chunk_rows = chunk_rows
        self.position_rows = position_rows

    def committed(self, shard: int, part: str) -> dict | None:
        """The commit record of a part if it exists and its files have the recorded sizes."""
        rel = layout.commit_path(shard, part)
        if not self.fs.exists(rel):
            return None
        try:
            rec = json.loads(self.fs.read(rel))
            for f, meta in rec["files"].items():
                check_relpath(f, rel)
                p = self.fs.path(f"{layout.part_dir(shard, part)}/{f}")
                if self.fs.fs.size(p) != meta["bytes"]:
                    return None
        except (ValueError, KeyError, TypeError, FileNotFoundError):
            return None
        return rec

    def read(self, shard: int, part: str, specs: dict) -> dict[str, np.ndarray]:
        """The arrays of a committed part, its files fetched as a reader fetches them (exact size,
        sha256 of the commit record)."""
        rec = self.committed(shard, part)
        where = layout.part_dir(shard, part)
        if rec is None:
            raise FormatError(f"{where}: not committed")
        files = PartFetcher(self.fs, lambda key: (where, rec["files"])).fetch((shard, part))
        return self.backend.decode_part(files, specs, where)

    def write(self, shard: int, part: str, arrays: dict[str, np.ndarray], extra: dict) -> dict:
        """Encode ``arrays`` with this writer's backend and commit them as ``part`` of ``shard``. The
        commit record of an inputs part also holds its sequences' hashes and lengths, from which the
        store's sequence index is built without reading the part again."""
        if part == layout.INPUTS and "sequences" not in extra:
            extra = {**extra, "sequences": sequences_record(arrays["seq_hash"], arrays["length"])}
        rows = self.position_rows if part != layout.INPUTS and "ids" in arrays and arrays["ids"].ndim == 2 else self.chunk_rows
        return self.write_files(shard, part, self.backend.encode_part(arrays, rows), extra)

    def write_files(self, shard: int, part: str, files: dict[str, bytes], extra: dict) -> dict:
        """Commit already-encoded files as ``part`` of ``shard``; ``extra`` goes into the commit record."""
        final = layout.part_dir(shard, part)
        self.fs.rm(layout.commit_path(shard, part))  # from here on an older copy is not committed
        self.fs.rm(final)
        # an object store has no rename: files go to their final names, and the commit record
        # written after them is what makes them count
        dest = f"{layout.shard_dir(shard)}/.tmp-{part}-{uuid.uuid4().hex[:8]}" if self.fs.renames else final
        for rel, data in files.items():
            self.fs.write(f"{dest}/{rel}", data)
        if dest != final:
            self.fs.mv(dest, final)
        record = {"shard": shard, "part": part, **extra,
                  "files": {rel: {"bytes": len(data), "sha256": sha256_hex(data)} for rel, data in sorted(files.items())}}
        self.fs.write_atomic(layout.commit_path(shard, part), json.dumps(record).encode())
        return record

    def clean_debris(self, shard: int) -> None:
        """Remove temporary directories a crashed writer left in a shard directory."""
        for name in self.fs.ls(layout.shard_dir(shard)):
            if name.startswith(".tmp-"):
                self.fs.rm(f"{layout.shard_dir(shard)}/{name}")


def sequences_record(seq_hash: np.ndarray, lengths: np.ndarray) -> dict:
    """``{"seq_hash": hex of the [n, 16] hashes, "length": [n] ints}`` for a commit record."""
    return {"seq_hash": np.ascontiguousarray(seq_hash, np.uint8).tobytes().hex(), "length": [int(x) for x in lengths]}


class BackgroundWriter:
    """Runs write jobs on one thread behind a bounded queue, so the producer waits only when
    ``depth`` jobs are already pending. The first job error is re-raised in the producer."""

    def __init__(self, depth: int = 2):
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self.busy_seconds = 0.0
        self._thread = threading.Thread(target=self._loop, name="logitstore-writer", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        import time

        while True:
            job = self._q.get()
            if job is None:
                return
            if self._error is None:
                t0 = time.perf_counter()
                try:
                    job()
                except BaseException as e:  # handed to the producer by submit()/close()
                    self._error = e
                self.busy_seconds += time.perf_counter() - t0

    def submit(self, job: Callable[[], None]) -> None:
        self._raise()
        self._q.put(job)

    def flush(self) -> None:
        """Wait until every job submitted so far has run; re-raise the first job error."""
        done = threading.Event()
        self.submit(done.set)
        while not done.wait(0.2):
            if self._error is not None:  # the jobs after a failed one are skipped, this one too
                break
        self._raise()

    def close(self) -> None:
        self._q.put(None)
        self._thread.join()
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def abort(self) -> None:
        """Stop after the pending jobs without raising (used while another error propagates)."""
        self._q.put(None)
        self._thread.join()


def encode_teacher_part(encoding: Encoding, vocab: int, res: dict, trained: np.ndarray | None = None,
                        absent: bool = False) -> dict[str, np.ndarray]:
    """The arrays of a teacher part from ``ids``/``logprobs`` [n, L, k] (log-probs descending) and
    ``tail_mass``, ``gold_logprob``, ``entropy`` [n, L]; with ``trained`` [n, L] bool, only those
    positions, as ``[P, ...]`` rows in sequence-major order (FORMAT.md, trained-only targets).
    ``hidden_{layer}`` [n, L, dim] arrays in ``res`` (--hidden-layers) are stored alongside, the same rows.
    ``absent``: ``-inf`` log-probs are absent entries (adaptive k, sampled targets). Sampled targets'
    ``counts`` [n, L, k] follow the entries into their stored order; ``log_z`` [n, L] is stored as it is."""
    n, L, k = res["ids"].shape

    def rows(v: np.ndarray) -> np.ndarray:  # [n, L, ...] -> the stored positions, flat
        return v[trained] if trained is not None else v.reshape(n * L, *v.shape[2:])

    enc = encoding.encode(rows(res["ids"]), rows(res["logprobs"]), {s: rows(res[s]) for s in SCALARS}, vocab, absent,
                          rows(res["counts"]) if "counts" in res else None)
    enc.update({name: rows(v) for name, v in res.items() if name.startswith("hidden_")})  # [.., dim] uint16 (--hidden-layers)
    if "log_z" in res:
        enc["log_z"] = rows(res["log_z"]).astype(np.float32)
    if trained is not None:  # trained positions only: [P, ...] rows
        return enc
    return {name: (v if name == "id_order" else v.reshape(n, L, *v.shape[1:])) for name, v in enc.items()}
