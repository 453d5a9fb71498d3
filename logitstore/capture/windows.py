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

from logitstore.capture.documents import iter_positioned
from logitstore.errors import ConfigError, LogitStoreError
from logitstore.format.codec import id_dtype
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
    at most ``max_tokens`` tokens of corpus, BOS before each document, ``shard_sequences`` per shard."""

    seq_len: int
    packed: bool = True
    max_tokens: int | None = None
    bos: bool = False
    shard_sequences: int = 1

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


class _Tokens:
    """Documents as token arrays (BOS + ids + EOS), tokenised a batch at a time."""

    def __init__(self, tokenizer, spec: WindowSpec):
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ConfigError("tokenizer: has no EOS token to separate documents")
        if spec.bos and tokenizer.bos_token_id is None:
            raise ConfigError("tokenizer: has no BOS token to start documents with")
        self.tokenizer, self.eos = tokenizer, eos
        self.head = [tokenizer.bos_token_id] if spec.bos else []
        self.dtype = id_dtype(len(tokenizer))
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        enc = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [np.asarray(self.head + ids + [self.eos], dtype=self.dtype) for ids in enc]


def _doc_stream(tokens: _Tokens, docs: Iterable[tuple[int, str]], limit: int | None,
                batch_docs: int = TOKENIZE_BATCH) -> Iterator[tuple[int, np.ndarray]]:
    """``(document index, tokens)`` for each document, the running total cut at ``limit`` tokens;
    ``batch_docs`` documents per call of the tokenizer."""
    total, batch, chars = 0, [], 0

    def flush():
        nonlocal total
        for (d, _), arr in zip(batch, tokens.encode([t for _, t in batch])):
            if limit is not None and total + arr.size > limit:
                arr = arr[: limit - total]
            if arr.size:
                total += arr.size
                yield d, arr
            if limit is not None and total >= limit:
                return

    for item in docs:
        batch.append(item)
        chars += len(item[1])
        if len(batch) == batch_docs or chars >= TOKENIZE_CHARS:
            yield from flush()
            batch, chars = [], 0
            if limit is not None and total >= limit:
                return
    if batch:
        yield from flush()


def _windows(stream: Iterable[tuple[int, np.ndarray]], seq_len: int, packed: bool,
             first_offset: int = 0) -> Iterator[tuple[int, int, np.ndarray]]:
    """``(document, offset, window tokens)`` of each window, ``(document, offset)`` being where its
    first token is; ``first_offset`` skips that many tokens of the first document."""
    pending: list[np.ndarray] = []  # packed: pieces of the window being filled
    have, at = 0, None
    for d, arr in stream:
        o = first_offset
        first_offset = 0
        while o < arr.size:
            if not packed:
                yield d, o, arr[o : o + seq_len]
                o += seq_len
                continue
            if at is None:
                at = (d, o)
            piece = arr[o : o + seq_len - have]
            pending.append(piece)
            have += piece.size
            o += piece.size
            if have == seq_len:
                yield at[0], at[1], pending[0] if len(pending) == 1 else np.concatenate(pending)
                pending, have, at = [], 0, None
    if packed and have:
        yield at[0], at[1], np.concatenate(pending)


def scan(tokenizer, path: str, text_field: str, spec: WindowSpec, progress=None) -> CorpusPlan:
    """One pass over ``--data`` (see the module docstring). ``progress(tokens)`` is called per window."""
    tokens = _Tokens(tokenizer, spec)
    L, S = spec.seq_len, spec.shard_sequences
    h_ids, h_len = hashlib.sha256(), hashlib.sha256()
    starts, sizes, counts, positions = [], [], [], []
    n, total = 0, 0
    row = np.empty(L, "<u4")
    recent: deque = deque()  # (document, position) read but not yet past: a window starts in one of them
    seekable = True

    def docs():
        nonlocal seekable
        for d, (pos, t) in enumerate(iter_positioned(path, text_field)):
            seekable = seekable and pos is not None
            recent.append((d, pos))
            yield d, t

    for d, o, w in _windows(_doc_stream(tokens, docs(), spec.max_tokens), L, spec.packed):
        if n % S == 0:
            while recent[0][0] < d:
                recent.popleft()
            starts.append((d, o))
            positions.append(recent[0][1])
            sizes.append(0)
            counts.append(0)
        row[: w.size] = w
        row[w.size :] = tokens.pad
        h_ids.update(row.tobytes())
        h_len.update(np.uint32(w.size).astype("<u4").tobytes())
        sizes[-1] += 1
        counts[-1] += int(w.size)
        n += 1
        total += int(w.size)
        if progress is not None:
            progress(int(w.size))
    if total == 0:
        raise LogitStoreError("--data: tokenised to zero tokens")
    fingerprint = canonical_json_hash([L, h_ids.hexdigest(), h_len.hexdigest()])
    return CorpusPlan(n, total, fingerprint, starts, sizes, counts, positions if seekable else None)


class ShardWindows:
    """The windows of the shards one rank asks for, in increasing order (see the module docstring).

    ``get(j)`` -> ``(input_ids [n, seq_len], lengths [n] uint32)``, padded with the pad id, equal to
    rows ``j * S .. j * S + n`` of ``pack(...)``. Shards must be asked for in increasing order."""

    def __init__(self, tokenizer, path: str, text_field: str, spec: WindowSpec, plan: CorpusPlan):
        self.tokens = _Tokens(tokenizer, spec)
        self.spec, self.plan = spec, plan
        self.source = (tokenizer, path, text_field)
        self._docs = self._open(0, None)
        self._next = 0  # index of the next document self._docs yields
        self._cache: list[tuple[int, np.ndarray]] = []  # tokenised documents of the last shard and after
        self.last = -1

    def restarted(self) -> "ShardWindows":
        """A new reader from the corpus's start (to go back to an earlier shard)."""
        tokenizer, path, text_field = self.source
        return ShardWindows(tokenizer, path, text_field, self.spec, self.plan)

    def _open(self, d0: int, position) -> Iterator[tuple[int, str]]:
        _, path, text_field = self.source
        for d, (_, t) in enumerate(iter_positioned(path, text_field, warn=False, start=position), d0):
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
            self._cache.extend((d, arr) for (d, _), arr in zip(batch, self.tokens.encode([t for _, t in batch])))

    def get(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= j < self.plan.n_shards or j <= self.last:
            raise ValueError(f"shard {j}: expected increasing shards in [0, {self.plan.n_shards}), after {self.last}")
        self.last = j
        (d0, o0), n, budget = self.plan.starts[j], self.plan.sizes[j], self.plan.tokens[j]
        L = self.spec.seq_len
        ids = np.full((n, L), self.tokens.pad, dtype=self.tokens.dtype)
        lengths = np.zeros(n, dtype=np.uint32)
        got, i = 0, 0
        position = None if self.plan.positions is None else self.plan.positions[j]
        for _, _, w in _windows(_budget(self._token_docs(d0, position), o0, budget), L, self.spec.packed, o0):
            ids[i, : w.size] = w
            lengths[i] = w.size
            got += int(w.size)
            i += 1
            if i == n:
                break
        if i != n or got != budget:
            raise LogitStoreError(f"--data: shard {j} has {i} windows and {got} tokens now, the plan says {n} and {budget}; "
                                  "the corpus changed while it was read")
        return ids, lengths


def _budget(stream: Iterator[tuple[int, np.ndarray]], first_offset: int, budget: int) -> Iterator[tuple[int, np.ndarray]]:
    """``stream`` cut so that, after skipping ``first_offset`` tokens of its first document, it
    holds ``budget`` tokens."""
    left = budget + first_offset
    for d, arr in stream:
        if arr.size >= left:
            yield d, arr[:left]
            return
        left -= arr.size
        yield d, arr
