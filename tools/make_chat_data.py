"""Build a small chat dataset from the Python FAQ shipped in ``data/pydocs-*.jsonl``.

Input: ``pydocs-train.jsonl`` and ``pydocs-validation.jsonl`` (see ``data/README.md``), one
``{"source": ..., "text": <reStructuredText>}`` object per line.  Only the documents whose
``source`` starts with ``faq/`` are used; the other documents are read only to resolve
``:ref:`` labels to section titles.

Every section title of a FAQ document (other than the document title) is a question and the
body text under it, up to the next title, is its answer.  Titles whose body is empty (section
headings such as "Core Language") give no pair.  The answer is lightly cleaned:

* ``.. _label:`` targets, comments (``.. XXX ...``) and the ``only``/``contents``/``index``/
  ``highlight``/``testsetup``/``toctree`` directives are dropped with their bodies;
* ``code-block``/``testcode``/``doctest`` directives become plain indented code blocks, and a
  trailing ``::`` that introduces a literal block becomes ``:`` (or disappears when it stands
  alone or after a space), the indented code is kept verbatim;
* ``note``/``seealso``/``versionchanged``/``versionadded``/``warning`` become paragraphs
  starting "Note:", "See also:", "Changed in version X:" ...;
* roles are turned into the text Sphinx would show: ``:func:`len``` -> ``len()`` (Sphinx adds
  the parentheses to function and method roles), ``:ref:`text <label>``` -> ``text``,
  ``:ref:`label``` -> the title of the labelled section, ``:pep:`8``` -> ``PEP 8``,
  ``~a.b.c`` -> ``c``; hyperlinks ```text <url>`_`` become ``text (url)``; inline literals
  ````x```` become Markdown ```x```; ``*emphasis*`` and ``**strong**`` are kept as they are
  (they are valid Markdown); escaped spaces (backslash-space) are removed.

Paragraph line breaks are kept as in the source.  An answer longer than ``MAX_ANSWER``
(1500) characters is truncated at a paragraph boundary (preferring a boundary before a
prose paragraph, so code blocks are not cut in the middle).

Consecutive questions under the same parent section are grouped into conversations of 1 to 3
user/assistant turns; the group sizes come from ``random.Random(0)``, and about one
conversation in four (same generator) starts with a system turn picked from
``SYSTEM_PROMPTS``.  Output, one JSON object per line (OpenAI / Hugging Face chat format)::

    {"messages": [{"role": "system", "content": ...},      # optional
                  {"role": "user", "content": <question>},
                  {"role": "assistant", "content": <answer>}, ...],
     "source": "faq/programming.rst",
     "questions": [<question>, ...]}

Split: conversations from documents in ``pydocs-validation.jsonl`` go to
``pyfaq-chat-validation.jsonl``; if that gives fewer than ``MIN_VALIDATION`` (30)
conversations, every 10th train conversation (index 9, 19, ...) is moved there as well.
Everything else goes to ``pyfaq-chat-train.jsonl``.  The output is deterministic.

    python tools/make_chat_data.py [--data-dir data] [--out-dir data]
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

MAX_ANSWER = 1500
MIN_VALIDATION = 30
SEED = 0
SYSTEM_SHARE = 0.25
SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a knowledgeable Python expert. Answer questions about Python clearly and accurately.",
    "You answer questions from the Python FAQ. Be concise and include code examples where useful.",
)

ADORNMENT = re.compile(r"([=\-~^#*+\"'`:.])\1{2,}")
DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([A-Za-z][\w:-]*)::(.*)$")
EXPLICIT = re.compile(r"^(\s*)\.\.(\s|$)")  # label, comment, footnote, substitution ...
CODE_DIRECTIVES = {"code-block", "sourcecode", "code", "testcode", "doctest"}
DROP_DIRECTIVES = {"only", "contents", "index", "highlight", "testsetup", "testcleanup",
                   "toctree", "tabularcolumns", "sectionauthor", "moduleauthor"}
ADMONITIONS = {"note": "Note", "seealso": "See also", "warning": "Warning",
               "important": "Important", "tip": "Tip", "hint": "Hint",
               "versionchanged": "Changed in version", "versionadded": "New in version",
               "deprecated": "Deprecated since version"}
# :ref: targets that are not defined in the bundled documents (titles from the 3.11 docs).
EXTERNAL_LABELS = {
    "library-index": "The Python Standard Library",
    "extending-index": "Extending and Embedding the Python Interpreter",
    "tkinter-file-handlers": "File Handlers",
    "internet": "Internet Protocols and Support",
    "netdata": "Internet Data Handling",
    "f-strings": "Formatted string literals",
    "formatstrings": "Format String Syntax",
    "bltin-types": "Built-in Types",
    "subprocess-replacements": "Replacing Older Functions with the subprocess Module",
}
PAREN_ROLES = {"func", "meth", "c:func", "c:macro"}

ROLE = re.compile(r":([a-z]+(?::[a-z]+)?):`([^`]+)`")
LINK = re.compile(r"`([^`<]*?)\s*<([^<>`]+)>`__?")
NAMED_REF = re.compile(r"`([^`]+)`__?(?![\w`])")
LITERAL = re.compile(r"``(.+?)``", re.S)


# ---------------------------------------------------------------------------- parsing


def split_sections(text: str) -> list[dict]:
    """Section titles of a reST document: dicts with title, level and body lines."""
    lines = text.split("\n")
    styles: list[tuple[str, bool]] = []  # heading styles in order of first appearance
    sections: list[dict] = []
    body: list[str] = []  # lines before the first title are dropped
    i = 0
    while i < len(lines):
        line = lines[i]
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        over = None
        if ADORNMENT.fullmatch(line) and i + 2 < len(lines) and lines[i + 2] == line \
                and lines[i + 1].strip():
            over, title, under, step = line, lines[i + 1].strip(), line, 3
        elif (line.strip() and not line[0].isspace() and ADORNMENT.fullmatch(nxt)
              and len(nxt) >= len(line.rstrip()) - 2 and (i == 0 or not lines[i - 1].strip())):
            title, under, step = line.strip(), nxt, 2
        else:
            body.append(line)
            i += 1
            continue
        style = (under[0], over is not None)
        if style not in styles:
            styles.append(style)
        body = []
        sections.append({"title": title, "level": styles.index(style), "body": body})
        i += step
    return sections


def _block(lines: list[str], start: int, indent: int) -> int:
    """Index just past the block of lines after ``start`` indented deeper than ``indent``."""
    j = start + 1
    while j < len(lines) and (not lines[j].strip() or _indent(lines[j]) > indent):
        j += 1
    while j > start + 1 and not lines[j - 1].strip():  # leave trailing blanks outside
        j -= 1
    return j


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _reindent(lines: list[str], indent: int) -> list[str]:
    """Dedent ``lines`` to their common indentation and indent them by ``indent`` spaces."""
    text = [ln for ln in lines if ln.strip()]
    if not text:
        return []
    common = min(_indent(ln) for ln in text)
    out = [(" " * indent + ln[common:]) if ln.strip() else "" for ln in lines]
    while out and not out[0]:
        out.pop(0)
    return out


def clean_body(lines: list[str]) -> list[tuple[str, str]]:
    """Strip explicit markup from body lines; returns (kind, line), kind 'prose' or 'code'."""
    out: list[tuple[str, str]] = []
    i = 0
    literal_after = False  # the previous paragraph ended with "::"
    while i < len(lines):
        line = lines[i]
        ind = _indent(line)
        m = DIRECTIVE.match(line)
        if m:
            name, arg = m.group(2), m.group(3).strip()
            end = _block(lines, i, ind)
            content = lines[i + 1:end]
            opts = 0  # directive options (":options: +ELLIPSIS") come first
            while opts < len(content) and re.match(r"\s*:[\w-]+:", content[opts]):
                opts += 1
            content = content[opts:]
            if name in CODE_DIRECTIVES:
                _blank(out)
                out += [("code", ln) for ln in _reindent(content, ind + 4)]
            elif name in ADMONITIONS:
                inner = clean_body(_reindent(content, ind))
                label = ADMONITIONS[name]
                if name.startswith(("version", "deprecated")):
                    label, arg = f"{label} {arg}", ""
                head = f"{' ' * ind}{label}:"
                if arg:
                    head += " " + arg
                elif inner and inner[0][0] == "prose":
                    head += " " + inner.pop(0)[1].lstrip()
                _blank(out)
                out.append(("prose", head))
                out += inner
            elif name not in DROP_DIRECTIVES:
                raise ValueError(f"unhandled directive {name!r}: {line!r}")
            i = end
            continue
        if EXPLICIT.match(line):  # label target or comment: drop with its indented body
            i = _block(lines, i, ind)
            continue
        if not line.strip():
            out.append(("prose", ""))
            i += 1
            continue
        # a paragraph: lines up to the next blank line
        j = i
        while j < len(lines) and lines[j].strip() and not DIRECTIVE.match(lines[j]) \
                and not (j > i and EXPLICIT.match(lines[j])):
            j += 1
        para = lines[i:j]
        if literal_after and ind > literal_after - 1:
            # literal block: everything indented deeper than the introducing paragraph
            k = i
            while k < len(lines) and (not lines[k].strip() or _indent(lines[k]) >= ind):
                k += 1
            while k > i and not lines[k - 1].strip():
                k -= 1
            out += [("code", ln) for ln in lines[i:k]]
            literal_after = False
            i = k
            continue
        literal_after = False
        if para[0].lstrip().startswith(">>>"):  # doctest block
            out += [("code", ln) for ln in para]
            i = j
            continue
        last = para[-1].rstrip()
        if last.endswith("::"):
            literal_after = ind + 1  # store indent + 1 so that 0 means "no"
            stripped = last[:-2].rstrip()
            if not stripped.strip():
                para = para[:-1]
            elif last[:-2].endswith((" ", "\t")):
                para = para[:-1] + [stripped]
            else:
                para = para[:-1] + [last[:-1]]
        out += [("prose", ln) for ln in para]
        i = j
    return out


def _blank(out: list[tuple[str, str]]) -> None:
    if out and out[-1][1]:
        out.append(("prose", ""))


# ---------------------------------------------------------------------------- inline markup


def _role(match: re.Match, labels: dict[str, str]) -> str:
    role, content = match.group(1), match.group(2)
    explicit = re.fullmatch(r"(.*?)\s*<([^<>]+)>", content, re.S)
    if explicit and explicit.group(1):
        text = explicit.group(1)
    else:
        target = content.lstrip("!")
        if role == "ref":
            text = labels.get(target.lower()) or EXTERNAL_LABELS.get(target.lower()) \
                or target.replace("-", " ")
        elif role == "pep":
            text = f"PEP {target.split('#')[0]}"
        elif role == "rfc":
            text = f"RFC {target.split('#')[0]}"
        elif role in ("file", "samp"):
            text = re.sub(r"\{([^}]*)\}", r"\1", target)
        elif role == "menuselection":
            text = re.sub(r"\s*-->\s*", " > ", target)
        else:
            if target.startswith("~"):
                target = re.split(r"[.]", target[1:])[-1]
            text = target
            if role in PAREN_ROLES and not text.endswith(")"):
                text += "()"
    return re.sub(r"\s*\n\s*", " ", text)


def inline(text: str, labels: dict[str, str]) -> str:
    """Turn reST inline markup of a prose chunk into plain text / Markdown."""
    # protect inline literals first: nothing inside them is markup
    literals: list[str] = []

    def keep(m: re.Match) -> str:
        literals.append(m.group(1))
        return f"\x00{len(literals) - 1}\x00"

    text = LITERAL.sub(keep, text)
    text = ROLE.sub(lambda m: _role(m, labels), text)

    def link(m: re.Match) -> str:
        label, url = m.group(1).strip(), m.group(2).strip()
        return f"{label} ({url})" if label else url

    text = LINK.sub(link, text)
    text = NAMED_REF.sub(lambda m: m.group(1), text)
    text = re.sub(r"\\ ", "", text)  # escaped (zero-width) space
    text = re.sub(r"\\([*`|_\\])", r"\1", text)
    return re.sub("\x00(\\d+)\x00", lambda m: f"`{literals[int(m.group(1))]}`", text)


def render(tagged: list[tuple[str, str]], labels: dict[str, str]) -> str:
    """Join tagged lines; inline markup is converted in prose chunks only."""
    chunks: list[tuple[str, list[str]]] = []
    for kind, line in tagged:
        if chunks and chunks[-1][0] == kind:
            chunks[-1][1].append(line)
        else:
            chunks.append((kind, [line]))
    parts = []
    for kind, lines in chunks:
        text = "\n".join(ln.rstrip() for ln in lines)
        parts.append(inline(text, labels) if kind == "prose" else text)
    text = "\n".join(parts)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip("\n").rstrip()


def truncate(answer: str, limit: int = MAX_ANSWER) -> str:
    """Cut ``answer`` to at most ``limit`` characters at a paragraph boundary."""
    if len(answer) <= limit:
        return answer
    cuts = [m.start() for m in re.finditer(r"\n\n+", answer) if m.start() <= limit]

    def before_prose(pos: int) -> bool:
        return not answer[pos:].lstrip("\n")[:1].isspace()

    def good(pos: int) -> bool:  # before prose, and not right after "... for example:"
        return before_prose(pos) and not answer[:pos].rstrip().endswith(":")

    for pool in ([c for c in cuts if good(c)], [c for c in cuts if before_prose(c)], cuts):
        if pool:
            return answer[:max(pool)].rstrip()
    return answer[:answer.rfind("\n", 0, limit)].rstrip()  # one giant paragraph


# ---------------------------------------------------------------------------- dataset


def collect_labels(docs: list[dict]) -> dict[str, str]:
    """``.. _label:`` targets followed by a section title, over all documents."""
    labels: dict[str, str] = {}
    for doc in docs:
        lines = doc["text"].split("\n")
        pending: list[str] = []
        for i, line in enumerate(lines):
            m = re.match(r"\.\. _([^:]+):\s*$", line)
            if m:
                pending.append(m.group(1).lower())
                continue
            if not line.strip() or ADORNMENT.fullmatch(line):
                continue
            nxt = lines[i + 1] if i + 1 < len(lines) else ""
            if pending and ADORNMENT.fullmatch(nxt):
                for label in pending:
                    labels.setdefault(label, line.strip())
            pending = []
    return labels


def extract_pairs(doc: dict, labels: dict[str, str]) -> list[dict]:
    """(question, answer) pairs of one FAQ document, with the parent section of each."""
    sections = split_sections(doc["text"])
    if not sections:
        return []
    top = min(s["level"] for s in sections)
    pairs, parents = [], {}
    for idx, sec in enumerate(sections):
        parents = {lv: t for lv, t in parents.items() if lv < sec["level"]}
        parent = parents.get(max(parents)) if parents else None
        parents[sec["level"]] = idx
        if sec["level"] == top:
            continue  # the document title
        answer = render(clean_body(sec["body"]), labels)
        if not answer.strip():
            continue
        question = inline(sec["title"], labels).strip()
        pairs.append({"question": question, "answer": truncate(answer), "parent": parent,
                      "truncated": len(answer) > MAX_ANSWER})
    return pairs


def conversations(doc: dict, labels: dict[str, str], rng: random.Random) -> list[dict]:
    pairs = extract_pairs(doc, labels)
    # runs of consecutive pairs under the same parent section
    runs: list[list[dict]] = []
    for p in pairs:
        if runs and runs[-1][-1]["parent"] == p["parent"]:
            runs[-1].append(p)
        else:
            runs.append([p])
    convs = []
    for run in runs:
        i = 0
        while i < len(run):
            size = rng.choice((1, 2, 3))
            group = run[i:i + size]
            i += size
            messages = []
            if rng.random() < SYSTEM_SHARE:
                messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
            for p in group:
                messages.append({"role": "user", "content": p["question"]})
                messages.append({"role": "assistant", "content": p["answer"]})
            convs.append({"messages": messages, "source": doc["source"],
                          "questions": [p["question"] for p in group]})
    return convs


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def build(data_dir: Path) -> dict[str, list[dict]]:
    train_docs = read_jsonl(data_dir / "pydocs-train.jsonl")
    val_docs = read_jsonl(data_dir / "pydocs-validation.jsonl")
    labels = collect_labels(train_docs + val_docs)
    rng = random.Random(SEED)
    splits: dict[str, list[dict]] = {"train": [], "validation": []}
    for name, docs in (("train", train_docs), ("validation", val_docs)):
        for doc in docs:
            if doc["source"].startswith("faq/"):
                splits[name] += conversations(doc, labels, rng)
    if len(splits["validation"]) < MIN_VALIDATION:
        train = splits["train"]
        splits["validation"] += [c for i, c in enumerate(train) if i % 10 == 9]
        splits["train"] = [c for i, c in enumerate(train) if i % 10 != 9]
    return splits


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="data", type=Path,
                        help="directory holding pydocs-{train,validation}.jsonl")
    parser.add_argument("--out-dir", default="data", type=Path,
                        help="directory for pyfaq-chat-{train,validation}.jsonl")
    args = parser.parse_args(argv)
    splits = build(args.data_dir)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        with open(args.out_dir / f"pyfaq-chat-{name}.jsonl", "w", encoding="utf-8",
                  newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        turns = sum(sum(m["role"] == "assistant" for m in r["messages"]) for r in rows)
        chars = sum(len(m["content"]) for r in rows for m in r["messages"])
        system = sum(r["messages"][0]["role"] == "system" for r in rows)
        print(f"{name}: {len(rows)} conversations, {turns} user/assistant turns, "
              f"{chars:,} characters, {system} with a system turn")


if __name__ == "__main__":
    main()
