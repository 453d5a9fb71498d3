"""``logitstore.dump``: the public name of :mod:`logitstore.capture.dump` (``DumpConfig``, ``dump``)."""

from logitstore.capture.dump import DumpConfig, DumpResult, dump

__all__ = ["DumpConfig", "DumpResult", "dump"]
