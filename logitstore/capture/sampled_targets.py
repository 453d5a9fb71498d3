"""``--targets sampled|both``: teacher samples at dump time (Random-Sampling KD), next to or instead
of the top-k. The estimator is :mod:`logitstore.distributions.sampled`; the stored layout is
FORMAT.md, "Sampled targets".

Per position the runner's top-``k`` statistics are replaced by ``k_stored`` entries:

- ``both``: the exact top-``k`` (count 0), then the distinct ids of ``S`` draws from the proposal
  ``q ∝ p^(1/tau)`` over the ids *outside* the top-``k`` (count = how often each was drawn);
- ``sampled``: only the distinct ids of ``S`` draws from ``q`` over the whole vocabulary.

Unused slots are absent entries (log-prob ``-inf``). ``log_z`` [N] is ``logsumexp(lp / tau)`` over
the ids the draws came from, so a reader recomputes ``log q_i = lp_i / tau - log_z`` from the stored
log-probs. ``tail_mass`` becomes the exact mass of every id the position does not hold. Draws use a
generator seeded from the runner batch's token ids and the teacher's part, so a dump repeated with
the same ``--batch-size`` (and device) writes the same targets; another batch size draws other,
equally valid samples, and several teachers of one dump draw independently.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from logitstore.distributions.sampled import draw

MODES = ("topk", "sampled", "both")
#: bytes of one float32 [rows, V] copy the sampler works on at a time (see Sampler.__call__)
SAMPLE_BYTES = 256 << 20


@dataclass(frozen=True)
class Sampler:
    mode: str
    samples: int
    proposal_temperature: float = 1.0
    #: mixed into the seed (the teacher's part): several teachers of one dump draw independently
    salt: str = ""

    def entry(self, k: int) -> dict:
        """The teacher's manifest ``sampled`` entry (version 4); ``top_k`` only in the ``both`` mode."""
        return {"mode": self.mode, "samples": self.samples, "proposal_temperature": float(self.proposal_temperature),
                **({"top_k": k} if self.mode == "both" else {})}

    def width(self, k: int) -> int:
        return k + self.samples if self.mode == "both" else self.samples

    def generator(self, input_ids: torch.Tensor) -> torch.Generator:
        seed = zlib.crc32(input_ids.detach().cpu().numpy().tobytes(), zlib.crc32(self.salt.encode()))
        return torch.Generator(device=input_ids.device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor, st: dict, vocab_size: int, gen: torch.Generator) -> dict:
        """``logits`` [n, V_model] of ``n`` positions, ``st`` their top-k statistics; returns ``st`` with
        ``ids``/``logprobs`` [n, width], ``counts`` [n, width] (int32), ``log_z`` [n] and the held tail.
        Memory: drawing holds about six float32 ``[rows, V]`` copies, so rows go ``SAMPLE_BYTES`` of
        one copy at a time (256 MiB: 256 rows of a 262,144-token vocabulary, 1.5 GiB in all)."""
        rows = max(1, SAMPLE_BYTES // (4 * vocab_size))
        if logits.shape[0] <= rows:
            return self._draw(logits, st, vocab_size, gen)
        parts = [self._draw(logits[a:a + rows], {k: v[a:a + rows] for k, v in st.items()}, vocab_size, gen)
                 for a in range(0, logits.shape[0], rows)]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def _draw(self, logits: torch.Tensor, st: dict, vocab_size: int, gen: torch.Generator) -> dict:
        lp = torch.log_softmax(logits[:, :vocab_size].float(), dim=-1)  # [n, V]
        exclude = st["ids"] if self.mode == "both" else None
        d = draw(lp, self.samples, self.proposal_temperature, gen, exclude=exclude)
        if self.mode == "both":
            ids = torch.cat([st["ids"], d["ids"]], -1)
            logprobs = torch.cat([st["logprobs"], d["logprobs"]], -1)
            counts = torch.cat([torch.zeros_like(st["ids"], dtype=torch.int32), d["counts"]], -1)
        else:
            ids, logprobs, counts = d["ids"], d["logprobs"], d["counts"]
        # every held id, summed over the rest directly (no 1 - sum cancellation); padding slots repeat
        # an id, so they scatter into a spare column V instead of overwriting a held one
        spare = torch.full_like(ids, lp.shape[-1])
        held = torch.zeros((lp.shape[0], lp.shape[-1] + 1), dtype=torch.bool, device=lp.device)
        held.scatter_(-1, torch.where(torch.isneginf(logprobs), spare, ids), True)
        tail = torch.where(held[:, :-1], torch.zeros((), device=lp.device), lp.exp()).sum(-1).clamp_(0.0, 1.0)
        return {**st, "ids": ids, "logprobs": logprobs, "counts": counts, "log_z": d["log_z"], "tail_mass": tail}
