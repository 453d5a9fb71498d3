"""Rebuild the bundled corpus in ``data/`` from Debian's ``python3.11-doc`` package.

The slice is the reST sources of the Python tutorial, HOWTOs and FAQ (English prose with
code samples, PSF licence). Every tenth document (sorted by path) goes to validation.

    apt-get download python3.11-doc && dpkg -x python3.11-doc_*.deb /tmp/pydoc
    python tools/make_data.py /tmp/pydoc/usr/share/doc/python3.11/html/_sources
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SECTIONS = ("tutorial", "howto", "faq")


def main(sources: str, out: str = "data") -> None:
    root = Path(sources)
    docs = []
    for section in SECTIONS:
        for path in sorted((root / section).glob("*.rst.txt")):
            text = path.read_text(encoding="utf-8").strip()
            if text:
                docs.append({"source": f"{section}/{path.name[: -len('.txt')]}", "text": text})
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = {"train": [], "validation": []}
    for i, doc in enumerate(docs):
        splits["validation" if i % 10 == 9 else "train"].append(doc)
    for name, rows in splits.items():
        with open(out_dir / f"pydocs-{name}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"{name}: {len(rows)} documents, {sum(len(r['text']) for r in rows):,} characters")


if __name__ == "__main__":
    main(*sys.argv[1:])
