"""Module paths from before the package was organised by subsystem, kept importable.

``logitstore.dump`` is the public name of :mod:`logitstore.capture.dump` and imports silently.
The other flat names (``logitstore.merge``, ``logitstore.reader``, ...), documented or used before
the package had subsystem folders, now import the module that replaced them with a
:class:`DeprecationWarning` naming it. The module object is the new one
(``logitstore.merge is logitstore.tools.merge``), so monkeypatching either name patches the same
function.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

PUBLIC = {"logitstore.dump": "logitstore.capture.dump"}
DEPRECATED = {
    "logitstore.reader": "logitstore.format.reader", "logitstore.writer": "logitstore.format.writer",
    "logitstore.manifest": "logitstore.format.manifest", "logitstore.codec": "logitstore.format.codec",
    "logitstore.layout": "logitstore.format.layout", "logitstore.hashing": "logitstore.format.hashing",
    "logitstore.backends": "logitstore.format.backends", "logitstore.fsio": "logitstore.storage.fsio",
    "logitstore.cache": "logitstore.storage.cache", "logitstore.prefetch": "logitstore.storage.prefetch",
    "logitstore.lock": "logitstore.storage.lock", "logitstore.teacher": "logitstore.capture.teacher",
    "logitstore.lm_head": "logitstore.capture.lm_head", "logitstore.data": "logitstore.capture.corpus",
    "logitstore.distributed": "logitstore.capture.ranks",
    **{f"logitstore.{t}": f"logitstore.tools.{t}" for t in ("merge", "fuse", "convert", "export", "verify", "info", "stats", "derive")},
}


class _Aliases(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old name to the module that replaced it (the same object, not a copy)."""

    def __init__(self) -> None:
        self._specs: dict = {}

    def find_spec(self, name, path=None, target=None):
        if name in PUBLIC or name in DEPRECATED:
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        new = PUBLIC.get(spec.name) or DEPRECATED[spec.name]
        if spec.name in DEPRECATED:  # stacklevel 2: the importing line (warnings skips importlib's frames)
            warnings.warn(f"{spec.name} is now {new}; the old name will be removed", DeprecationWarning, stacklevel=2)
        module = importlib.import_module(new)
        self._specs[spec.name] = module.__spec__  # importlib overwrites __spec__ with the alias's
        return module

    def exec_module(self, module) -> None:  # the module was executed under its new name: keep that spec
        for alias, spec in list(self._specs.items()):
            if spec.name == module.__name__:
                module.__spec__ = self._specs.pop(alias)



def install() -> None:
    if not any(isinstance(f, _Aliases) for f in sys.meta_path):
        sys.meta_path.append(_Aliases())  # last: real modules of these names, if any, win
