"""Conversations (``--data`` rows with a ``messages`` field) as tokens and a per-token training mask.

A conversation is rendered with the teacher tokenizer's chat template (or ``--chat-template``)
into one string and tokenised with ``add_special_tokens=False`` (the template writes its own BOS
and turn markers). Which tokens are trained:

- ``train_on="assistant"``: the tokens of every assistant turn's content and what the template
  writes after it up to the turn's end (the end-of-turn token, e.g. ``<|im_end|>``; whitespace
  after it, such as ChatML's newline, is not trained); never the turn's header
  (``<|im_start|>assistant\\n``), the system or user turns.
- ``train_on="all"``: every token.

The assistant spans do not depend on ``{% generation %}`` markers, which most templates lack. For
assistant turn ``i`` the template renders the conversation up to turn ``i - 1`` with the generation
prompt (``pre``) and up to turn ``i`` (``upto``). Each ``pre`` must be a prefix of its ``upto`` and
each ``upto`` a prefix of the full rendering, so the pieces re-join to exactly the string that is
tokenised; a template for which they do not (one that rewrites earlier turns, such as templates
that drop the reasoning of earlier assistant turns) is refused with the row named. The one
tolerated difference is an EOS the template writes only after the last turn (Phi-3): ``upto`` may
end with it where the full rendering goes on. The turn's span starts where its
content (stripped) appears in ``upto`` after ``pre`` (so a header the template writes without the
generation prompt, a default system turn or a BOS before an opening assistant turn are never
trained; a template that rewrites the content itself is refused) and ends at the end of ``upto``
with trailing whitespace removed. A token is trained when its characters overlap a span (a token
that straddles a span boundary is trained). Roles ``assistant`` and ``model`` (Gemma's) are trained.

Templates that print today's date (Llama 3.1/3.2: ``strftime_now``) get a fixed ``date_string``
(:data:`DATE_STRING`, the Llama templates' own fallback), so a dump renders the same tokens on any
day and a resume or a second dump of the same corpus joins by hash.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from logitstore.errors import ConfigError, LogitStoreError

TRAIN_ON = ("assistant", "all")
ROLES_TRAINED = ("assistant", "model")
#: the date templates that print one are given (see the module docstring)
DATE_STRING = "26 Jul 2024"


@dataclass(frozen=True)
class ChatSpec:
    """How conversations become tokens: the row field holding them, an optional template (Jinja
    text) replacing the tokenizer's, and which tokens are trained."""

    messages_field: str = "messages"
    template: str | None = None
    train_on: str = "assistant"

    def __post_init__(self) -> None:
        if self.train_on not in TRAIN_ON:
            raise ConfigError(f"--train-on: expected one of {', '.join(TRAIN_ON)}, got {self.train_on!r}")


def check_chat_tokenizer(tokenizer, spec: ChatSpec) -> None:
    """Refuse, before anything runs, a tokenizer that cannot render or locate conversations."""
    if spec.template is None and not getattr(tokenizer, "chat_template", None):
        raise ConfigError("--data: rows hold conversations but the teacher tokenizer has no chat template; "
                          "pass --chat-template PATH")
    if not getattr(tokenizer, "is_fast", True):
        raise ConfigError("--data: conversations need a fast tokenizer (token offsets locate the assistant turns)")


def _messages(value, where: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise LogitStoreError(f"{where}: expected a non-empty list of messages, got {_kind(value)}")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise LogitStoreError(f"{where}[{i}]: expected an object with string 'role' and 'content', got {_kind(m)}")
        if m["role"] in ROLES_TRAINED and not m["content"].strip():
            raise LogitStoreError(f"{where}[{i}]: an empty {m['role']} turn (nothing to train on)")
    return value


def _kind(v) -> str:
    if v is None:
        return "null (no messages)"
    if isinstance(v, (list, dict, str)):
        return f"a {type(v).__name__} of {len(v)}"
    return type(v).__name__


def render(tokenizer, messages, spec: ChatSpec, where: str) -> tuple[np.ndarray, np.ndarray]:
    """``(ids [n] int64, trained [n] bool)`` of one conversation; ``where`` names the row in errors.

    Raises :class:`LogitStoreError` for a malformed row, a role the template rejects, an empty
    assistant turn, or a template whose growing prefixes do not re-join (see the module docstring)."""
    messages = _messages(messages, where)

    def apply(msgs, gen: bool) -> str:
        try:
            out = tokenizer.apply_chat_template(msgs, chat_template=spec.template, tokenize=False,
                                                add_generation_prompt=gen, date_string=DATE_STRING)
        except Exception as e:  # jinja's TemplateError / raise_exception(...) for roles or orders it rejects
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise LogitStoreError(f"{where}: the chat template refuses this conversation ({msg})") from None
        if not isinstance(out, str):
            raise LogitStoreError(f"{where}: the chat template did not render a string")
        return out

    full = apply(messages, False)
    spans: list[tuple[int, int]] = []
    if spec.train_on == "all":
        spans = [(0, len(full))]
    else:
        for i, m in enumerate(messages):
            if m["role"] not in ROLES_TRAINED:
                continue
            pre = apply(messages[:i], True) if i else ""
            upto = _joined(apply(messages[: i + 1], False), full, getattr(tokenizer, "eos_token", None))
            if upto is None or not upto.startswith(pre):
                raise LogitStoreError(f"{where}: turn {i}: the chat template does not render the conversation's beginning "
                                      "as a prefix of the whole (it rewrites earlier turns), so the assistant tokens "
                                      "cannot be located; use --train-on all or another --chat-template")
            start = upto.find(m["content"].strip(), len(pre))
            if start < 0:
                raise LogitStoreError(f"{where}: turn {i}: the chat template rewrites the assistant's content (it does not "
                                      "appear in the rendering), so its tokens cannot be located; use --train-on all")
            spans.append((start, len(upto.rstrip())))
        if not spans:
            raise LogitStoreError(f"{where}: no assistant turn to train on (--train-on assistant)")
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    trained = np.zeros(ids.size, bool)
    for a, b in spans:
        trained |= (offsets[:, 1] > a) & (offsets[:, 0] < b)
    return ids, trained


def _joined(upto: str, full: str, eos: str | None) -> str | None:
    """``upto`` as a prefix of ``full``: itself, or without the EOS (and whitespace) a template
    writes only after the last turn; None if neither."""
    if full.startswith(upto):
        return upto
    t = upto.rstrip()
    while eos and t.endswith(eos):
        t = t[: -len(eos)].rstrip()
        if full.startswith(t):
            return t
    return None
