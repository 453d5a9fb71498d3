"""Moved to :mod:`logitstore.distributions.targets` (shared with the store's ``fuse`` tool)."""

from logitstore.distributions.targets import TAIL_FLOOR, build_targets, rest_logprob

__all__ = ["TAIL_FLOOR", "build_targets", "rest_logprob"]
