"""Moved to :mod:`logitstore.distributions.fusion` (shared with the store's ``fuse`` tool)."""

from logitstore.distributions.fusion import MODES, SparseTarget, fuse, normalize_weights, temper

__all__ = ["MODES", "SparseTarget", "fuse", "normalize_weights", "temper"]
