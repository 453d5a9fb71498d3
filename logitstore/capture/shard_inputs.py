"""What one rank of a dump works on: the corpus plan (planned once, kept in the store for resumes)
and the windows of its shards (read back where committed, else rebuilt from the corpus)."""

from __future__ import annotations

import json

import numpy as np

from logitstore.capture.sources import Source
from logitstore.capture.windows import CorpusPlan, ShardWindows, WindowSpec, scan
from logitstore.format import layout
from logitstore.format.hashing import sequence_hashes
from logitstore.format.index import inputs_specs
from logitstore.format.writer import BackgroundWriter, PartWriter
from logitstore.progress import progress_bar
from logitstore.storage.fsio import StoreFS

#: a started store's corpus plan (logitstore/capture/windows.py), so that a resume skips the tokenising pass
CORPUS_PLAN = "corpus_plan.json"


def _log(enabled: bool, msg: str) -> None:
    if enabled:
        print(msg, flush=True)


def corpus_plan(fs: StoreFS, out: str, tok, source: Source, wspec: WindowSpec, key: dict,
                progress: bool) -> tuple[dict, bool]:
    """The corpus plan (rank 0 only): the one a started store recorded for the same corpus file(s)
    (same sha256), tokenizer and window settings, else one tokenising pass, with a progress bar.
    Returns the plan (``CorpusPlan.to_dict``) and whether it was reused."""
    if key["source"]["sha256"] is not None and fs.exists(CORPUS_PLAN):
        try:
            d = json.loads(fs.read(CORPUS_PLAN))
            if isinstance(d, dict) and d.get("key") == key:
                plan = CorpusPlan.from_dict(d)
                _log(progress, f"corpus plan: reused from {out}/{CORPUS_PLAN} ({plan.n_tokens:,} tokens, {plan.n_shards:,} shards)")
                return plan.to_dict(), True
        except (ValueError, KeyError, TypeError):  # unreadable: plan again (the result is checked against plan.json)
            _log(progress, f"corpus plan: {out}/{CORPUS_PLAN} is unreadable; tokenising the corpus again")
    with progress_bar(None, "tokenising", enabled=progress) as bar:
        return scan(tok, source, wspec, progress=bar.update).to_dict(), False


def record_corpus_plan(fs: StoreFS, key: dict, plan: CorpusPlan) -> None:
    """Keep ``plan`` in the store for a resume (a corpus of files only: a saved dataset has no
    sha256); replaces a recorded plan of another corpus or an unreadable one."""
    if key["source"]["sha256"] is not None:
        fs.write_atomic(CORPUS_PLAN, json.dumps({"key": key, **plan.to_dict()}).encode())


class ShardInputs:
    """The windows of this rank's shards: read back from the store where the ``inputs`` part is
    committed, else rebuilt from the corpus (:class:`ShardWindows`) and, by a writer, queued for
    writing. Shards are asked for in increasing order within one pass; the writer is flushed
    between passes, so a later teacher's pass reads the inputs back (a pass that went back to a
    shard not committed would re-read the corpus from its start)."""

    def __init__(self, pw: PartWriter, windows: ShardWindows, corpus: CorpusPlan, seq_len: int, vocab: int, *, write: bool,
                 optional: tuple[str, ...] = ()):
        self.pw, self.windows, self.corpus = pw, windows, corpus
        self.seq_len, self.vocab, self.write = seq_len, vocab, write
        self.optional = optional  # the store's optional inputs arrays (loss_mask, doc_start, row)
        self.queued: set[int] = set()  # inputs this run submitted (maybe not yet committed)

    def get(self, j: int, bg: BackgroundWriter) -> dict[str, np.ndarray]:
        """Shard ``j``'s inputs arrays: ``input_ids``, ``length`` and the store's optional ones."""
        if self.pw.committed(j, layout.INPUTS):  # queued ones too: a pass starts after the writer is flushed
            return self.pw.read(j, layout.INPUTS, inputs_specs(self.corpus.sizes[j], self.seq_len, self.vocab, self.optional))
        if j <= self.windows.last:
            self.windows = self.windows.restarted()
        arrays = self.windows.arrays(j)
        if self.write and j not in self.queued:
            self.queued.add(j)
            start = j * self.corpus.sizes[0]  # every shard but the last holds sizes[0] windows
            lens = arrays["length"]
            arrays = {**arrays, "seq_hash": sequence_hashes(arrays["input_ids"], lens)}
            bg.submit(lambda j=j, arrays=arrays, start=start, lens=lens: self.pw.write(
                j, layout.INPUTS, arrays, {"start": start, "n_sequences": len(lens), "n_tokens": int(lens.sum())}))
        return arrays

    def write_missing(self, shards: list[int], bg: BackgroundWriter) -> int:
        """Queue the inputs of ``shards`` not committed or queued; return how many were committed."""
        skipped = 0
        for j in shards:
            if j in self.queued:
                continue
            if self.pw.committed(j, layout.INPUTS):
                skipped += 1
                continue
            self.get(j, bg)
        return skipped
