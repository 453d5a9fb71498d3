"""What ``--data`` rows are and how each becomes tokens: text, conversations or token ids.

- ``text``: a document per row (or file); tokenised without special tokens, BOS before it if the
  store's ``bos`` says so, EOS after it (:mod:`logitstore.capture.corpus`). Every token is trained.
- ``messages``: a conversation per row (``--messages-field``, default ``messages``), rendered with
  the chat template (:mod:`logitstore.capture.chat`); no BOS or EOS is added (the template writes
  its own). Trained tokens: ``--train-on``.
- ``tokens``: a row already tokenised by the user's own pipeline: ``input_ids`` and, optionally,
  ``labels`` (``-100`` = not trained; otherwise equal to ``input_ids``, unshifted as Hugging Face
  models take them), ``attention_mask`` (1 = a real token; the real tokens must be one contiguous
  run, i.e. left or right padding, which is removed) and ``loss_mask`` (1 = trained; with
  ``labels`` both must agree to train a token). Used as they are: no special tokens are added.

``auto`` picks ``messages`` if the rows have the messages field, else ``tokens`` if they have
``input_ids``, else ``text``. A conversation or token row longer than ``--seq-len`` is refused by
default with its row named (``--overlong truncate`` keeps its first ``seq_len`` tokens, ``drop``
leaves it out with one warning counting them); rows are never split across windows, so a
window never starts inside one. A text document longer than a window is cut into several, as always.

Every encoder returns, per row, a ``[2, n]`` array: token ids, and 1 where the token is trained.
Rows are numbered from 0 in reading order (the ``row`` the store records); errors name them so.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from logitstore.capture.chat import DATE_STRING, ChatSpec, check_chat_tokenizer, render
from logitstore.capture.documents import describe_source, iter_positioned, iter_records
from logitstore.errors import ConfigError, LogitStoreError
from logitstore.format.codec import id_dtype

INPUT_KINDS = ("auto", "text", "messages", "tokens")
OVERLONG = ("refuse", "truncate", "drop")
TOKEN_FIELDS = ("labels", "attention_mask", "loss_mask")
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Source:
    """``--data`` and how to read it. ``kind`` is resolved (never ``auto``)."""

    path: str
    kind: str = "text"
    text_field: str = "text"
    chat: ChatSpec = ChatSpec()
    overlong: str = "refuse"
    #: sha256 of the chat template in use (the given one, else the tokenizer's): in the plan key and
    #: the manifest, so a corpus plan made with another template is never reused
    template_sha: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in INPUT_KINDS[1:]:
            raise ConfigError(f"--input: expected one of {', '.join(INPUT_KINDS)}, got {self.kind!r}")
        if self.overlong not in OVERLONG:
            raise ConfigError(f"--overlong: expected one of {', '.join(OVERLONG)}, got {self.overlong!r}")

    @property
    def whole_rows(self) -> bool:
        """Rows are kept whole (conversations, token rows): never split across windows."""
        return self.kind != "text"

    def items(self, start=None, warn: bool = True) -> Iterator[tuple[object, object]]:
        """``(position, value)`` per row: a text, a list of messages or a dict of token fields."""
        if self.kind == "text":
            yield from iter_positioned(self.path, self.text_field, warn=warn, start=start)
        elif self.kind == "messages":
            f = self.chat.messages_field
            for pos, rec in iter_records(self.path, f, start=start):
                yield pos, rec[f]
        else:
            yield from iter_records(self.path, "input_ids", TOKEN_FIELDS, start=start)

    def describe(self) -> dict:
        """The manifest's ``data.source``: files and their sha256, plus how rows were read."""
        d = describe_source(self.path, self.text_field)
        if self.kind == "text":
            return d
        d.pop("text_field", None)
        d["kind"] = self.kind
        if self.kind == "messages":
            d.update({"messages_field": self.chat.messages_field, "train_on": self.chat.train_on,
                      "chat_template": self.template_sha, "date_string": DATE_STRING})
        d["overlong"] = self.overlong
        return d


def resolve_kind(path: str, kind: str, text_field: str, messages_field: str) -> str:
    """``--input auto``: what the first row of ``--data`` holds (see the module docstring)."""
    if kind != "auto":
        return kind
    from logitstore.capture.documents import data_files

    files = data_files(path)
    if (files is not None and files[0] == ".txt") or path.lower().endswith(".txt"):
        return "text"
    for field, found in ((messages_field, "messages"), ("input_ids", "tokens")):
        try:
            next(iter_records(path, field), None)
            return found
        except LogitStoreError as e:
            if "no field" not in str(e):
                raise
    return "text"


class Encoder:
    """Rows to ``[2, n]`` arrays (ids, trained), a batch at a time (see the module docstring)."""

    def __init__(self, tokenizer, source: Source, seq_len: int, bos: bool):
        self.tokenizer, self.source, self.seq_len = tokenizer, source, seq_len
        self.vocab = len(tokenizer)
        self.dtype = id_dtype(self.vocab)
        eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        if source.kind == "text":
            if eos is None:
                raise ConfigError("tokenizer: has no EOS token to separate documents")
            if bos and tokenizer.bos_token_id is None:
                raise ConfigError("tokenizer: has no BOS token to start documents with")
            self.head = [tokenizer.bos_token_id] if bos else []
            self.eos = eos
        elif source.kind == "messages":
            check_chat_tokenizer(tokenizer, source.chat)
        if self.pad is None:
            raise ConfigError("tokenizer: has neither a pad nor an EOS token to pad windows with")
        self.dropped = 0

    def encode(self, rows: list[tuple[int, object]]) -> list[np.ndarray]:
        """``rows``: ``(row index, value)``. A dropped overlong row gives an empty ``[2, 0]`` array."""
        if self.source.kind == "text":
            enc = self.tokenizer([t for _, t in rows], add_special_tokens=False)["input_ids"]
            return [np.stack([np.asarray(self.head + ids + [self.eos], self.dtype), np.ones(len(ids) + len(self.head) + 1, self.dtype)])
                    for ids in enc]
        out = []
        for d, value in rows:
            where = f"--data {self.source.path}: row {d}"
            if self.source.kind == "messages":
                ids, trained = render(self.tokenizer, value, self.source.chat, f"{where}: field {self.source.chat.messages_field!r}")
            else:
                ids, trained = self._token_row(value, where)
            out.append(self._fit(np.stack([ids.astype(self.dtype), trained.astype(self.dtype)]), where))
        return out

    def _fit(self, arr: np.ndarray, where: str) -> np.ndarray:
        n, L = arr.shape[1], self.seq_len
        if n <= L:
            return arr
        if self.source.overlong == "truncate":
            return arr[:, :L]
        if self.source.overlong == "drop":
            self.dropped += 1
            return arr[:, :0]
        raise LogitStoreError(f"{where}: {n} tokens, longer than --seq-len {L}; raise --seq-len or pass --overlong truncate|drop")

    def _token_row(self, rec: dict, where: str) -> tuple[np.ndarray, np.ndarray]:
        ids = _int_list(rec.get("input_ids"), f"{where}: field 'input_ids'")
        if not ids.size:
            raise LogitStoreError(f"{where}: field 'input_ids': empty")
        bad = np.flatnonzero((ids < 0) | (ids >= self.vocab))
        if bad.size:
            raise LogitStoreError(f"{where}: field 'input_ids': id {int(ids[bad[0]])} at position {int(bad[0])} is outside "
                                  f"the tokenizer's vocabulary [0, {self.vocab})")
        fields = {f: _int_list(rec[f], f"{where}: field {f!r}") for f in TOKEN_FIELDS if rec.get(f) is not None}
        for f, v in fields.items():
            if v.size != ids.size:
                raise LogitStoreError(f"{where}: field {f!r}: {v.size} values for {ids.size} input_ids")
        trained = np.ones(ids.size, bool)
        if "labels" in fields:
            lab = fields["labels"]
            off = np.flatnonzero((lab != IGNORE_INDEX) & (lab != ids))
            if off.size:
                t = int(off[0])
                raise LogitStoreError(f"{where}: field 'labels': {int(lab[t])} at position {t} is neither -100 nor the "
                                      f"input id {int(ids[t])} (labels are the inputs, unshifted, with -100 where not trained)")
            trained &= lab != IGNORE_INDEX
        if "loss_mask" in fields:
            if np.any((fields["loss_mask"] != 0) & (fields["loss_mask"] != 1)):
                raise LogitStoreError(f"{where}: field 'loss_mask': expected 0/1 (or booleans)")
            trained &= fields["loss_mask"] == 1
        if "attention_mask" in fields:
            real = np.flatnonzero(fields["attention_mask"] != 0)
            if not real.size:
                raise LogitStoreError(f"{where}: field 'attention_mask': no real token (all 0)")
            if real[-1] - real[0] + 1 != real.size:
                raise LogitStoreError(f"{where}: field 'attention_mask': the real tokens (1) are not one contiguous run")
            ids, trained = ids[real[0]: real[-1] + 1], trained[real[0]: real[-1] + 1]
        return ids, trained

    def warn_dropped(self) -> None:
        if self.dropped:
            print(f"warning: --data {self.source.path}: left out {self.dropped} row(s) longer than --seq-len {self.seq_len} "
                  "(--overlong drop)", file=sys.stderr, flush=True)


def _int_list(v, where: str) -> np.ndarray:
    if isinstance(v, np.ndarray):
        v = v.tolist()
    if not isinstance(v, (list, tuple)) or not all(isinstance(x, (int, bool)) for x in v):
        raise LogitStoreError(f"{where}: expected a list of integers, got {'null' if v is None else type(v).__name__}")
    return np.asarray(v, dtype=np.int64)
