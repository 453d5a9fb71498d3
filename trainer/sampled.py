"""What training from sampled targets (``--targets sampled|both`` stores) allows.

The stored draws give an importance-weighted estimate of the teacher's distribution
(:mod:`logitstore.distributions.sampled`) whose expectation is the teacher itself, so any loss that
is *linear in the target* is estimated without bias: forward KL, with the student's full-vocabulary
probabilities (``--tail bucket``), at T = 1, fused by ``mean-probs`` (a weighted sum of unbiased
estimates). Everything else would silently train on a biased target, and is refused: reverse KL and
JSD (not linear in the target), a temperature other than 1 (``p^(1/T)`` needs the teacher's
normaliser at T, which no store holds), ``--tail renorm`` and ``mean-logits`` fusion (both take logs
of the estimate). With ``proposal_temperature`` 1 the per-position weights sum to 1 exactly; with
another, the trainer's normalisation over each position makes it the self-normalised estimator
(consistent, biased by O(1/S): up to 0.05 in probability at S = 8 for a peaked teacher in
tests/test_sampled_dump.py, a third of that or less at S = 64). Keep it at 1 unless the top-k is
stored too. Below 1 the compact codebook's error in a stored log-prob enters a drawn id's weight
multiplied by ``1 - 1/tau`` (it cancels exactly at tau = 1): in one measurement the expected target
was 0.009 (tau = 0.25) and 0.058 (tau = 0.05) from the teacher in total variation, against 0.003
for a plain top-k store; use ``--encoding lossless`` for such proposals.
"""

from __future__ import annotations

from logitstore.errors import ConfigError


def refuse_biased(cfg, sampled: list[dict | None], names: list[str]) -> None:
    """Raise :class:`ConfigError` naming the flag if ``cfg`` would bias training from a sampled teacher."""
    which = [n for n, s in zip(names, sampled) if s]
    if not which:
        return
    why = None
    if cfg.loss != "fkl":
        why = f"--loss {cfg.loss}: not linear in the target (use fkl)"
    elif cfg.tail != "bucket":
        why = f"--tail {cfg.tail}: renormalises the estimate (use bucket)"
    elif cfg.fuse == "mean-logits" and len(sampled) > 1:
        why = "--fuse mean-logits: takes logs of the estimate (use mean-probs)"
    elif cfg.temperature != 1.0 or cfg.temperature_schedule != "constant" or any(t != 1.0 for t in cfg.teacher_temperatures or ()):
        why = "--temperature: the samples estimate the teacher at T = 1 only"
    if why:
        raise ConfigError(f"{why}; teacher(s) {', '.join(which)} hold sampled targets")
