"""Build the bundled code corpus ``data/pystdlib-{train,validation}.jsonl`` from the Python 3.11
standard library's pure-Python sources on this machine (plain stdlib, deterministic).

    python tools/make_code_data.py [--stdlib /usr/lib/python3.11] [--out-dir data]

Candidates are the top-level modules: ``*.py`` directly in the stdlib directory and the
``__init__.py`` of each top-level package (``json/__init__.py``), without ``test/``, ``idlelib/``,
empty files, files over 60 KiB, symlinks, and files that are not upstream source (the
build-generated ``_sysconfigdata_*.py``, Debian's ``_distutils_system_mod.py`` and
``sitecustomize.py``). In path order every tenth
candidate is a validation candidate, the rest train candidates. Each split then takes its
candidates in a fixed pseudo-random order (``random.Random(0)``, so it spans the whole alphabet,
not just ``a``-``f``), keeping every file that still fits its character budget, and is written in
path order. The text is the file as is, decoded as UTF-8 (undecodable bytes, if any, become U+FFFD).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import sysconfig
from pathlib import Path

BUDGETS = {"train": 900_000, "validation": 250_000}  # characters
MAX_BYTES = 60 * 1024
SKIP_DIRS = {"test", "idlelib", "site-packages", "dist-packages"}
NOT_UPSTREAM = ("_sysconfigdata_", "_distutils_system_mod.py", "sitecustomize.py")


def candidates(root: Path) -> list[Path]:
    files = list(root.glob("*.py")) + [p for p in root.glob("*/__init__.py") if p.parent.name not in SKIP_DIRS]
    keep = [p for p in files if not p.is_symlink() and 0 < p.stat().st_size <= MAX_BYTES and not p.name.startswith(NOT_UPSTREAM)]
    return sorted(keep, key=lambda p: p.relative_to(root).as_posix())


def select(root: Path) -> dict[str, list[dict]]:
    pools = {"train": [], "validation": []}
    for i, path in enumerate(candidates(root)):
        text = path.read_bytes().decode("utf-8", errors="replace")
        pools["validation" if i % 10 == 9 else "train"].append({"source": path.relative_to(root).as_posix(), "text": text})
    splits = {}
    for name, pool in pools.items():
        order = list(range(len(pool)))
        random.Random(0).shuffle(order)
        chosen, total = [], 0
        for j in order:
            n = len(pool[j]["text"])
            if total + n <= BUDGETS[name]:
                chosen.append(j)
                total += n
        splits[name] = [pool[j] for j in sorted(chosen)]
    return splits


def provenance(root: Path) -> str:
    """What the files came from: the interpreter (if it is the one owning ``root``) and the Debian package."""
    lines = [f"source directory: {root}"]
    if Path(sysconfig.get_path("stdlib")).resolve() == root.resolve():
        lines.append(f"sys.version: {sys.version}")
    else:
        lines.append(f"(this interpreter's stdlib is {sysconfig.get_path('stdlib')}; run /usr/bin/python3.11 for its sys.version)")
    status = Path("/var/lib/dpkg/status")
    if status.is_file():
        for block in status.read_text(encoding="utf-8", errors="replace").split("\n\n"):
            fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and not line.startswith(" "))
            if fields.get("Package") == f"libpython{root.name[len('python'):]}-stdlib":
                lines.append(f"Debian package: {fields['Package']} {fields.get('Version')}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stdlib", default="/usr/lib/python3.11")
    ap.add_argument("--out-dir", default=str(Path(__file__).resolve().parents[1] / "data"))
    args = ap.parse_args()
    root = Path(args.stdlib)
    if not root.is_dir():
        raise SystemExit(f"{root}: no such directory")
    print(provenance(root))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in select(root).items():
        path = out_dir / f"pystdlib-{name}.jsonl"
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"{name}: {len(rows)} documents, {sum(len(r['text']) for r in rows):,} characters, "
              f"{path.stat().st_size:,} bytes -> {path}")


if __name__ == "__main__":
    main()
