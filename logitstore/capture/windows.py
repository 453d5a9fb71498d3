"""Windows of a corpus as a stream: a plan from one pass, then each rank's shards on their own.

The windows are those :func:`logitstore.capture.corpus.pack` makes (its docstring says how
documents become windows); here they are produced a batch of documents at a time, so memory does
not grow with the corpus:

- :func:`scan` (one pass, rank 0): tokenises every document and returns a :class:`CorpusPlan`:
  the number of windows and tokens, the data fingerprint (the same value ``pack(...).fingerprint()``
  gives, hashed as the windows stream by), and where each shard starts: ``(document index, token
  offset in that document)`` and its window and token counts. It depends on the corpus, the
  tokenizer and the window settings only, never on the number of ranks.
- :class:`ShardWindows` (every rank): the windows of shards ``j0 < j1 < ...`` in turn; documents
  before a shard's start are read but not tokenised, so a rank tokenises only its own shards.

Memory: one batch of documents and one shard's windows (``S x seq_len`` ids), whatever the corpus.
"""

from __future__ import annotations

import hashlib
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from logitstore.capture.sources import Encoder, Source
from logitstore.errors import ConfigError, LogitStoreError
from logitstore.format.hashing import canonical_json_hash

#: documents tokenised per call of the tokenizer in a full pass, and when one shard is prepared (smaller:
#: a shard may need a few long documents, and what a batch reads past the shard is tokenised for nothing)
TOKENIZE_BATCH = 512
#: ... or fewer, up to this many characters: the tokenizer's output (Python lists, offsets) is tens of
#: bytes per token, so a batch is bounded by its text, not only by its number of documents
TOKENIZE_CHARS = 1 << 20
SHARD_BATCH = 16


@dataclass(frozen=True)
class WindowSpec:
    """How documents become windows: ``seq_len`` tokens, packed or one document per window,
    at most ``max_tokens`` tokens of corpus, BOS before each document, ``shard_sequences`` per shard.

    ``whole``: documents are never split (conversations, token rows: a packed window takes the
    next one only if it fits whole, else it is closed and padded). What each window records besides
    its tokens: ``segments`` where each document starts (``doc_start``), ``masked`` which positions
    are trained (``loss_mask``), ``rows`` the row of its first document (``row``)."""

    seq_len: int
    packed: bool = True
    max_tokens: int | None = None
    bos: bool = False
    shard_sequences: int = 1
    whole: bool = False
    segments: bool = False
    masked: bool = False
    rows: bool = False

    def __post_init__(self) -> None:
        if self.seq_len <= 0:
            raise ConfigError(f"--seq-len: expected a positive integer, got {self.seq_len}")
        if self.shard_sequences <= 0:
            raise ConfigError(f"--shard-sequences: expected a positive integer, got {self.shard_sequences}")


@dataclass
class CorpusPlan:
    """The windows of a corpus, without the windows: counts, fingerprint and shard starts."""

    n_sequences: int
    n_tokens: int
    fingerprint: str
    #: per shard ``(document index, token offset in the document's tokens)`` of its first window
    starts: list[tuple[int, int]]
    #: per shard, windows and tokens
    sizes: list[int]
    tokens: list[int]
    #: per shard, where its first document is in the source (documents.iter_positioned), or None
    #: for a source that cannot be entered in the middle
    positions: list | None = None

    @property
    def n_shards(self) -> int:
        return len(self.starts)

    def to_dict(self) -> dict:
        return {"n_sequences": self.n_sequences, "n_tokens": self.n_tokens, "fingerprint": self.fingerprint,
                "starts": [list(s) for s in self.starts], "sizes": self.sizes, "tokens": self.tokens,
                "positions": None if self.positions is None else [list(p) for p in self.positions]}

    @classmethod
    def from_dict(cls, d: dict) -> "CorpusPlan":
        """Raises ValueError for a plan whose parts do not add up."""
        pos = d.get("positions")
        plan = cls(int(d["n_sequences"]), int(d["n_tokens"]), str(d["fingerprint"]),
                   [(int(a), int(b)) for a, b in d["starts"]], [int(x) for x in d["sizes"]], [int(x) for x in d["tokens"]],
                   None if pos is None else [(int(a), int(b)) for a, b in pos])
        if not (len(plan.starts) == len(plan.sizes) == len(plan.tokens)) or sum(plan.sizes) != plan.n_sequences or \
                sum(plan.tokens) != plan.n_tokens or min(plan.sizes, default=0) < 1 or \
                (plan.positions is not None and len(plan.positions) != len(plan.starts)):
            raise ValueError("corpus plan: shard starts, sizes and tokens do not add up")
        return plan


def _doc_stream(tokens: Encoder, docs: Iterable[tuple[int, object]], limit: int | None,
                batch_docs: int = TOKENIZE_BATCH) -> Iterator[tuple[int, np.ndarray]]:
    """``(document index, [2, n] ids and trained flags)`` for each document, the running total cut
    at ``limit`` tokens; ``batch_docs`` documents per call of the tokenizer."""
    total, batch, chars = 0, [], 0

    def flush():
        nonlocal total
        for (d, _), arr in zip(batch, tokens.encode(batch)):
            n = arr.shape[1]
            if limit is not None and total + n > limit:
                arr, n = arr[:, : limit - total], limit - total
            if n:
                total += n
                yield d, arr
            if limit is not None and total >= limit:
                return

    for item in docs:
        batch.append(item)
        chars += len(item[1]) if isinstance(item[1], str) else 1024
        if len(batch) == batch_docs or chars >= TOKENIZE_CHARS:
            yield from flush()
            batch, chars = [], 0
            if limit is not None and total >= limit:
                return
    if batch:
        yield from flush()


def _windows(stream: Iterable[tuple[int, np.ndarray]], seq_len: int, packed: bool, first_offset: int = 0,
             whole: bool = False) -> Iterator[tuple[int, int, np.ndarray, list[int]]]:
    """``(document, offset, window [2, m], document starts)`` of each window, ``(document, offset)``
    being where its first token is and the starts the window positions where a document's first
    token lies; ``first_offset`` skips that many tokens of the first document. ``whole``: a
    document goes into a packed window only whole (documents are at most ``seq_len`` long), and
    only right after the previous document (so a window's documents are consecutive rows)."""
    pending: list[np.ndarray] = []  # packed: pieces of the window being filled
    starts: list[int] = []
    have, at = 0, None

    def emit():
        return at[0], at[1], pending[0] if len(pending) == 1 else np.concatenate(pending, axis=1), starts

    last = None
    for d, arr in stream:
        o = first_offset
        first_offset = 0
        n = arr.shape[1]
        # a window of whole rows holds consecutive rows only (its documents are rows row, row + 1, ...):
        # it closes before a row that does not fit, and after a gap left by a dropped row
        if packed and whole and have and (have + n > seq_len or d != last + 1):
            yield emit()
            pending, starts, have, at = [], [], 0, None
        last = d
        while o < n:
            if not packed:
                yield d, o, arr[:, o : o + seq_len], [0] if o == 0 else []
                o += seq_len
                continue
            if at is None:
                at = (d, o)
            if o == 0:
                starts.append(have)
            piece = arr[:, o : o + seq_len - have]
            pending.append(piece)
            have += piece.shape[1]
            o += piece.shape[1]
            if have == seq_len:
                yield emit()
                pending, starts, have, at = [], [], 0, None
    if packed and have:
        yield emit()


class _Rows:
    """Fills the arrays of a run of windows (what :func:`scan` hashes and a shard holds)."""

    def __init__(self, spec: WindowSpec, pad: int, dtype, n: int):
        L = spec.seq_len
        self.spec = spec
        self.input_ids = np.full((n, L), pad, dtype=dtype)
        self.length = np.zeros(n, dtype=np.uint32)
        if spec.masked:
            self.loss_mask = np.zeros((n, L), np.uint8)
        if spec.segments:
            self.doc_start = np.zeros((n, L), np.uint8)
        if spec.rows:
            self.row = np.zeros(n, np.int64)

    def set(self, i: int, d: int, w: np.ndarray, starts: list[int]) -> None:
        m = w.shape[1]
        self.input_ids[i, :m] = w[0]
        self.length[i] = m
        if self.spec.segments:
            self.doc_start[i, starts] = 1
            self.doc_start[i, 0] = 1
        if self.spec.masked:
            # position t trains token t + 1 if that token is trained and does not start a document
            # (the previous document's last token does not predict the next document's first)
            nxt = w[1, 1:].astype(bool)
            if starts:
                nxt[[s - 1 for s in starts if s > 0]] = False
            self.loss_mask[i, : m - 1] = nxt
        if self.spec.rows:
            self.row[i] = d

    def arrays(self, n: int | None = None) -> dict[str, np.ndarray]:
        names = ["input_ids", "length"] + [a for a, on in (("loss_mask", self.spec.masked), ("doc_start", self.spec.segments),
                                                            ("row", self.spec.rows)) if on]
        return {a: getattr(self, a)[:n] for a in names}


def _encoder(tokenizer, source: Source, spec: WindowSpec) -> Encoder:
    return Encoder(tokenizer, source, spec.seq_len, spec.bos)


def scan(tokenizer, source: Source, spec: WindowSpec, progress=None) -> CorpusPlan:
    """One pass over ``--data`` (see the module docstring). ``progress(tokens)`` is called per window."""
    tokens = _encoder(tokenizer, source, spec)
    L, S = spec.seq_len, spec.shard_sequences
    h_ids, h_len, h_extra = hashlib.sha256(), hashlib.sha256(), hashlib.sha256()
    extra = spec.masked or spec.segments or spec.rows
    starts, sizes, counts, positions = [], [], [], []
    n, total = 0, 0
    row = _Rows(spec, tokens.pad, "<u4", 1)
    recent: deque = deque()  # (document, position) read but not yet past: a window starts in one of them
    seekable = True

    def docs():
        nonlocal seekable
        for d, (pos, t) in enumerate(source.items()):
            seekable = seekable and pos is not None
            recent.append((d, pos))
            yield d, t

    for d, o, w, doc_starts in _windows(_doc_stream(tokens, docs(), spec.max_tokens), L, spec.packed, whole=spec.whole):
        if n % S == 0:
            while recent[0][0] < d:
                recent.popleft()
            starts.append((d, o))
            positions.append(recent[0][1])
            sizes.append(0)
            counts.append(0)
        row.input_ids[0] = tokens.pad
        row.set(0, d, w, doc_starts)
        m = int(w.shape[1])
        h_ids.update(row.input_ids[0].tobytes())
        h_len.update(np.uint32(m).astype("<u4").tobytes())
        if extra:
            for a in row.arrays().values():
                if a.dtype != np.uint32:
                    h_extra.update(a[0].astype("<i8").tobytes())
            if spec.masked:
                row.loss_mask[0] = 0
            if spec.segments:
                row.doc_start[0] = 0
        sizes[-1] += 1
        counts[-1] += m
        n += 1
        total += m
        if progress is not None:
            progress(m)
    tokens.warn_dropped()
    if total == 0:
        raise LogitStoreError("--data: tokenised to zero tokens")
    parts = [L, h_ids.hexdigest(), h_len.hexdigest()] + ([h_extra.hexdigest()] if extra else [])
    return CorpusPlan(n, total, canonical_json_hash(parts), starts, sizes, counts, positions if seekable else None)


class ShardWindows:
    """The windows of the shards one rank asks for, in increasing order (see the module docstring).

    ``get(j)`` -> ``(input_ids [n, seq_len], lengths [n] uint32)``, padded with the pad id, equal to
    rows ``j * S .. j * S + n`` of ``pack(...)``; :meth:`arrays` also gives the recorded extras
    (``loss_mask``, ``doc_start``, ``row``). Shards must be asked for in increasing order."""

    def __init__(self, tokenizer, source: Source, spec: WindowSpec, plan: CorpusPlan):
        self.tokens = _encoder(tokenizer, source, spec)
        self.spec, self.plan = spec, plan
        self.source = (tokenizer, source)
        self._docs = self._open(0, None)
        self._next = 0  # index of the next document self._docs yields
        self._cache: list[tuple[int, np.ndarray]] = []  # tokenised documents of the last shard and after
        self.last = -1

    def restarted(self) -> "ShardWindows":
        """A new reader from the corpus's start (to go back to an earlier shard)."""
        tokenizer, source = self.source
        return ShardWindows(tokenizer, source, self.spec, self.plan)

    def _open(self, d0: int, position) -> Iterator[tuple[int, object]]:
        for d, (_, t) in enumerate(self.source[1].items(start=position, warn=False), d0):
            self._next = d + 1
            yield d, t

    def _token_docs(self, d0: int, position) -> Iterator[tuple[int, np.ndarray]]:
        """``(index, tokens)`` of documents ``d0, d0 + 1, ...``; earlier ones are not tokenised, and
        not even read where the source can be entered at a shard's first document."""
        self._cache = [x for x in self._cache if x[0] >= d0]
        if not self._cache and d0 > self._next + SHARD_BATCH and position is not None:
            self._docs = self._open(d0, position)  # jump there instead of reading the documents between
        i = 0
        while True:
            if i < len(self._cache):
                yield self._cache[i]
                i += 1
                continue
            batch = []
            for item in self._docs:
                if item[0] >= d0:
                    batch.append(item)
                    if len(batch) == SHARD_BATCH:
                        break
            if not batch:
                return
            self._cache.extend((d, arr) for (d, _), arr in zip(batch, self.tokens.encode(batch)) if arr.shape[1])

    def get(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        a = self.arrays(j)
        return a["input_ids"], a["length"]

    def arrays(self, j: int) -> dict[str, np.ndarray]:
        """Shard ``j``'s ``input_ids`` [n, L], ``length`` [n] and the extras its spec records."""
        if not 0 <= j < self.plan.n_shards or j <= self.last:
            raise ValueError(f"shard {j}: expected increasing shards in [0, {self.plan.n_shards}), after {self.last}")
        self.last = j
        (d0, o0), n, budget = self.plan.starts[j], self.plan.sizes[j], self.plan.tokens[j]
        L = self.spec.seq_len
        rows = _Rows(self.spec, self.tokens.pad, self.tokens.dtype, n)
        got, i = 0, 0
        position = None if self.plan.positions is None else self.plan.positions[j]
        for d, _, w, starts in _windows(_budget(self._token_docs(d0, position), o0, budget), L, self.spec.packed, o0,
                                        whole=self.spec.whole):
            rows.set(i, d, w, starts)
            got += int(w.shape[1])
            i += 1
            if i == n:
                break
        if i != n or got != budget:
            raise LogitStoreError(f"--data: shard {j} has {i} windows and {got} tokens now, the plan says {n} and {budget}; "
                                  "the corpus changed while it was read")
        return rows.arrays()


def _budget(stream: Iterator[tuple[int, np.ndarray]], first_offset: int, budget: int) -> Iterator[tuple[int, np.ndarray]]:
    """``stream`` cut so that, after skipping ``first_offset`` tokens of its first document, it
    holds ``budget`` tokens."""
    left = budget + first_offset
    for d, arr in stream:
        if arr.shape[1] >= left:
            yield d, arr[:, :left]
            return
        left -= arr.shape[1]
        yield d, arr
