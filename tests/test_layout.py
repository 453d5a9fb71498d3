"""The package layout is an architecture: which subsystem may import which. Read from the source
(every ``import`` statement, at any depth), so a lazy import inside a function counts too."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: subpackage -> what its modules may import from this repository (besides themselves)
ALLOWED = {
    "logitstore.distributions": {"logitstore.errors"},
    "logitstore.sampling": {"logitstore.errors"},
    "logitstore.storage": {"logitstore.errors", "logitstore.progress"},
    "logitstore.format": {"logitstore.errors", "logitstore.version", "logitstore.storage"},
    # capture draws sampled targets with the estimator's own sampler (logitstore.distributions.sampled)
    "logitstore.capture": {"logitstore.errors", "logitstore.version", "logitstore.progress", "logitstore.storage",
                           "logitstore.format", "logitstore.distributions"},
    "logitstore.tools": {"logitstore.errors", "logitstore.version", "logitstore.progress", "logitstore.storage",
                         "logitstore.format", "logitstore.distributions", "logitstore"},
}
READER_SIDE = ["logitstore/format/reader.py", "logitstore/format/opening.py", "logitstore/format/index.py",
               "logitstore/format/index_files.py", "logitstore/format/live.py", "logitstore/format/backends/container.py",
               "logitstore/format/decode.py", "logitstore/storage/fetch.py"]
WRITER_SIDE = {"logitstore.format.writer", "logitstore.format.commit", "logitstore.capture", "logitstore.tools"}


def imports_of(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative imports are not used in logitstore; say so if one appears
                out.add("." * node.level + (node.module or ""))
            else:  # from pkg import x: x may be a module of pkg, so both count
                out.add(node.module)
                out |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in out if m.startswith(("logitstore", "trainer", "."))}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def inside(mod: str, prefix: str) -> bool:
    return mod == prefix or mod.startswith(prefix + ".")


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_each_subsystem_imports_only_what_lies_below_it(package):
    bad = []
    for path in sorted((ROOT / package.replace(".", "/")).rglob("*.py")):
        for mod in imports_of(path):
            ok = inside(mod, package) or any(inside(mod, a) if a != "logitstore" else mod == "logitstore"
                                             for a in ALLOWED[package])
            if not ok:
                bad.append(f"{path.relative_to(ROOT)} imports {mod}")
    assert not bad, "\n".join(bad)


#: the top-level modules: the leaves everything may use, and what lies above the subsystems
TOP = {
    "logitstore/errors.py": set(), "logitstore/version.py": set(), "logitstore/progress.py": set(),
    "logitstore/moved.py": set(),  # resolves old names at import time, imports nothing of them itself
}


@pytest.mark.parametrize("rel", sorted(TOP))
def test_the_leaf_modules_import_nothing_of_this_repository(rel):
    bad = sorted(m for m in imports_of(ROOT / rel) if m not in TOP[rel])
    assert not bad, f"{rel} imports {bad}"


def test_no_module_of_logitstore_imports_trainer():
    bad = [f"{p.relative_to(ROOT)} imports {m}" for p in (ROOT / "logitstore").rglob("*.py")
           for m in imports_of(p) if inside(m, "trainer")]
    assert not bad, "\n".join(bad)


def test_the_reading_side_never_imports_the_writing_side():
    bad = [f"{rel} imports {m}" for rel in READER_SIDE for m in imports_of(ROOT / rel)
           if any(inside(m, w) for w in WRITER_SIDE)]
    assert not bad, "\n".join(bad)


def test_no_module_over_400_lines_and_no_function_over_80():
    long = []
    for path in sorted(list((ROOT / "logitstore").rglob("*.py")) + list((ROOT / "trainer").rglob("*.py"))):
        src = path.read_text()
        if src.count("\n") > 400:
            long.append(f"{path.relative_to(ROOT)}: {src.count(chr(10))} lines")
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long, "\n".join(long)


def test_the_public_api_keeps_its_names():
    import logitstore
    from logitstore.dump import DumpConfig, dump, summarize
    from trainer.fit import fit

    assert callable(logitstore.open) and logitstore.Store.__module__ == "logitstore.format.reader"
    assert DumpConfig.__module__ == "logitstore.capture.config" and callable(dump) and callable(fit) and callable(summarize)


@pytest.mark.parametrize("old, new, name", [
    ("logitstore.merge", "logitstore.tools.merge", "merge"), ("logitstore.fuse", "logitstore.tools.fuse", "fuse_store"),
    ("logitstore.export", "logitstore.tools.export", "export"), ("logitstore.convert", "logitstore.tools.convert", "convert"),
    ("logitstore.reader", "logitstore.format.reader", "Store"), ("logitstore.verify", "logitstore.tools.verify", "verify"),
])
def test_earlier_module_names_still_import_the_same_objects_with_a_warning(old, new, name):
    import importlib
    import sys

    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} is now {new}"):
        mod = importlib.import_module(old)
    assert mod is importlib.import_module(new) and mod.__spec__.name == new
    assert getattr(mod, name) is getattr(importlib.import_module(new), name)
