"""The algebra of the format's distributions, below both users (``trainer`` and the store tools).

A stored teacher distribution is its top-k log-probs plus the exact tail mass spread evenly over
the other tokens (FORMAT.md). :mod:`.targets` aligns several teachers' top-k sets on one support
(numpy, in data-loader workers) and fixes how a tail is read (the floor for zero tails);
:mod:`.fusion` tempers and fuses them into one sparse target (torch). ``trainer`` trains against
these targets; ``logitstore fuse`` writes them as a store. Nothing here imports either user.
"""

from logitstore.distributions.fusion import MODES, SparseTarget, fuse, normalize_weights, temper
from logitstore.distributions.targets import TAIL_FLOOR, build_targets, rest_logprob

__all__ = ["MODES", "SparseTarget", "fuse", "normalize_weights", "temper", "TAIL_FLOOR", "build_targets", "rest_logprob"]
