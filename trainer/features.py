"""Feature and relation KD from cached teacher hidden states (``logitstore dump --hidden-layers``).

**Feature KD** (``--feature-weight w --feature-map S:T,... --feature-loss mse|cosine``): the
student's hidden state at layer ``S`` (``output_hidden_states[S]``, 0 = embeddings) goes through a
learned linear projection ``W_{m,S,T}`` [H_student -> dim] and is compared with teacher ``m``'s
stored state at layer ``T``, per trained position for LM stores (the positions whose labels are
trained, after the store's loss mask) or per labelled text for classify stores (the student's
states pooled as the store's were: ``mean``, ``first`` or ``last`` real token)::

    mse:    mean_d (LN(W h_s) - LN(h_t))^2          cosine: 1 - cos(W h_s, h_t)

``LN`` is a layer norm without affine parameters (``--feature-norm layer``, the default; ``none``
compares the raw vectors). Raw MSE is dominated by the massive activations of LLM residual
streams: SmolLM2-135M's layer 15 has an RMS of 284 with entries up to 4,032 (through the
recorded projection too, which spreads them over every stored dimension), so an unnormalised
feature term of ~35,000 per position swamped CE and KD (~10) in ``tools/experiment_features.py``.

summed over positions (or texts) and pairs' mean, over teachers with the fusion weights, and
normalised like CE and KD (by the step's global count), so the term is the mean per target
position. The projections are trained with the student (AdamW, same LR) and saved with the run
(in checkpoints, and ``final/feature_projections.safetensors``). A projected store's states are
``h_t R`` for the store's fixed ``R`` (:meth:`logitstore.Store.hidden_projection`); the learned
``W`` then maps into that space, which is all the loss needs.

**Relation KD** (RKD, Park et al. 2019; ``--rkd-distance w_d --rkd-angle w_a --rkd-map S:T``): on
one vector per sequence of the micro-batch (LM: the mean of the states over the trained
positions; classify: the pooled state), with ``N`` the batch's sequences that have one:

- distance: ``psi(i, j) = |x_i - x_j| / mu`` with ``mu`` the mean of ``|x_i - x_j|`` over the
  ``N (N - 1)`` ordered pairs ``i != j``; loss = mean over those pairs of
  ``smooth_l1(psi_student, psi_teacher)`` (Huber, delta 1);
- angle: ``psi(i, j, k) = <(x_i - x_j) / |x_i - x_j|, (x_k - x_j) / |x_k - x_j|>``; loss = mean over
  the ``N (N - 1) (N - 2)`` ordered triplets of distinct ``i, j, k`` of the smooth-L1 difference.

No projection is needed (distances and angles do not depend on the width). The relation is
computed at train time between whatever the micro-batch holds, so it is exact for any batch,
shuffle or cached store; it is per micro-batch and per rank (sequences on other ranks or in other
micro-batches are not related). Its value is weighted by the micro-batch's target count, so after
the step's normalisation it is the count-weighted mean of the micro-batches' RKD losses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from logitstore.capture.hidden import pool
from logitstore.errors import ConfigError

FEATURE_LOSSES = ("mse", "cosine")
#: ``layer``: MSE between layer-normalised vectors (default), ``none``: between the raw ones
FEATURE_NORMS = ("layer", "none")


def parse_layer_map(value: str | None, flag: str) -> list[tuple[int, int]]:
    """``"2:4,3:6"`` -> ``[(2, 4), (3, 6)]`` (student layer, teacher layer)."""
    if not value:
        return []
    pairs = []
    for item in str(value).split(","):
        s, sep, t = item.strip().partition(":")
        try:
            if not sep:
                raise ValueError
            pairs.append((int(s), int(t)))
        except ValueError:
            raise ConfigError(f"{flag}: expected STUDENT_LAYER:TEACHER_LAYER pairs separated by commas (e.g. 2:4,4:8), "
                              f"got {value!r}") from None
        if pairs[-1][0] < 0 or pairs[-1][1] < 0:
            raise ConfigError(f"{flag}: layer indices start at 0 (the embeddings' output), got {item.strip()!r}")
    if len(set(pairs)) != len(pairs):
        raise ConfigError(f"{flag}: a pair appears twice in {value!r}")
    return pairs


class StudentLayers:
    """What :func:`logitstore.capture.lm_head.forward_logits` / ``ChunkedHead.hidden`` take as
    ``capture``: the student's layers to return, stacked ``[B, L, n, H]``."""

    def __init__(self, layers: list[int]):
        self.layers = sorted(set(layers))

    @property
    def arg(self):
        from logitstore.capture.hidden import output_hidden_states_arg

        return output_hidden_states_arg(tuple(self.layers))

    def pick(self, hidden_states) -> torch.Tensor:
        if hidden_states is None:
            raise ConfigError("--feature-map/--rkd-map: the student returns no hidden_states (it must accept "
                              "output_hidden_states=True and return an object with .hidden_states, as transformers models do)")
        if len(hidden_states) <= self.layers[-1]:
            raise ConfigError(f"--feature-map/--rkd-map: student layer {self.layers[-1]} does not exist (the student has "
                              f"hidden states 0..{len(hidden_states) - 1})")
        device = hidden_states[self.layers[-1]].device  # a device map may leave layers on several devices
        return torch.stack([hidden_states[i].to(device) for i in self.layers], dim=-2)

    def split(self, stacked: torch.Tensor) -> dict[int, torch.Tensor]:
        return {layer: stacked[..., i, :] for i, layer in enumerate(self.layers)}


def feature_loss(pred: torch.Tensor, target: torch.Tensor, kind: str, norm: str = "none") -> torch.Tensor:
    """Per row loss [N] between ``pred`` and ``target`` [N, d] (float32); ``norm="layer"``: both
    layer-normalised (no affine) before the MSE."""
    pred, target = pred.float(), target.float()
    if kind == "mse":
        if norm == "layer":
            pred, target = F.layer_norm(pred, pred.shape[-1:]), F.layer_norm(target, target.shape[-1:])
        return (pred - target).pow(2).mean(-1)
    return 1.0 - F.cosine_similarity(pred, target, dim=-1, eps=1e-8)


def _pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    """|x_i - x_j| [N, N], with a gradient that stays finite where two rows coincide."""
    d2 = (x[:, None, :] - x[None, :, :]).pow(2).sum(-1)
    return d2.clamp_min(1e-12).sqrt()


def rkd_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD distance loss between ``student`` [N, Hs] and ``teacher`` [N, Ht] (see the module docstring); 0 for N < 2."""
    N = student.shape[0]
    if N < 2:
        return student.sum() * 0.0
    off = ~torch.eye(N, dtype=torch.bool, device=student.device)
    ds, dt = _pairwise_distances(student.float())[off], _pairwise_distances(teacher.float())[off]
    return F.smooth_l1_loss(ds / ds.mean().clamp_min(1e-12), dt / dt.mean().clamp_min(1e-12), reduction="mean")


def _angles(x: torch.Tensor) -> torch.Tensor:
    """psi[j, i, k] = cos of the angle at x_j between x_i and x_k [N, N, N]."""
    e = F.normalize(x[None, :, :] - x[:, None, :], p=2, dim=-1, eps=1e-12)  # e[j, i] = unit(x_i - x_j)
    return torch.bmm(e, e.transpose(1, 2))


def rkd_angle(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD angle loss over ordered triplets of distinct sequences; 0 for N < 3."""
    N = student.shape[0]
    if N < 3:
        return student.sum() * 0.0
    i = torch.arange(N, device=student.device)
    distinct = (i[:, None, None] != i[None, :, None]) & (i[:, None, None] != i[None, None, :]) & (i[None, :, None] != i[None, None, :])
    return F.smooth_l1_loss(_angles(student.float())[distinct], _angles(teacher.float())[distinct], reduction="mean")


class FeatureKD(torch.nn.Module):
    """The feature and relation terms of the loss, with their learned projections.

    ``teachers``: ``[(m, weight, entry)]`` for the teachers whose stored hidden states are used
    (``m`` their index among the run's teachers, ``entry`` their manifest ``hidden`` entry);
    ``widths``: the student's hidden size at each of its mapped layers."""

    def __init__(self, *, feature_map: list[tuple[int, int]], loss: str, weight: float, rkd_map: tuple[int, int] | None,
                 rkd_distance: float, rkd_angle: float, teachers: list[tuple[int, float, dict]], widths: dict[int, int],
                 norm: str = "layer"):
        super().__init__()
        self.feature_map, self.loss, self.weight, self.norm = feature_map, loss, weight, norm
        self.rkd_map, self.w_distance, self.w_angle = rkd_map, rkd_distance, rkd_angle
        total = sum(w for _, w, _ in teachers) or 1.0
        self.teachers = [(m, w / total, e) for m, w, e in teachers]
        self.projections = torch.nn.ModuleDict({
            key(m, s, t): torch.nn.Linear(widths[s], e["dim"]) for m, _, e in self.teachers for s, t in feature_map})
        self.layers = StudentLayers([s for s, _ in feature_map] + ([rkd_map[0]] if rkd_map else []))

    def batch_keys(self) -> list[str]:
        """The batch fields of teacher hidden states this needs (``hidden_{m}_{layer}``)."""
        ts = {t for _, t in self.feature_map} | ({self.rkd_map[1]} if self.rkd_map else set())
        return sorted(f"hidden_{m}_{t}" for m, _, _ in self.teachers for t in ts)

    def forward(self, student: dict[int, torch.Tensor], batch: dict, keep: torch.Tensor, pooling: str | None,
                mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``student`` {layer: [B, L, H]}; ``keep``: the trained positions [B, L] (LM, ``pooling``
        None) or the labelled texts [B] (classify: the student's states pooled by ``pooling`` over
        ``mask`` [B, L]). Returns ``{"feature", "rkd_distance", "rkd_angle"}`` sums (see the module
        docstring), each already times its weight."""
        any_t = next(iter(student.values()))
        zero = any_t.sum() * 0.0
        out = {"feature": zero, "rkd_distance": zero, "rkd_angle": zero}
        if pooling is not None:
            student = {s: pool(h, mask, pooling) for s, h in student.items()}  # [B, H]
        n_keep = keep.sum()
        for m, w, _ in self.teachers:
            for s, t in self.feature_map:
                target = batch[f"hidden_{m}_{t}"]
                pred = self.projections[key(m, s, t)](student[s][keep].to(self.projections[key(m, s, t)].weight.dtype))
                out["feature"] = out["feature"] + self.weight * w * feature_loss(pred, target[keep], self.loss, self.norm).sum() / len(self.feature_map)
            if self.rkd_map is not None and (self.w_distance or self.w_angle):
                s, t = self.rkd_map
                hs, ht = student[s], batch[f"hidden_{m}_{t}"]
                if pooling is None:  # one vector per sequence: the mean over its trained positions
                    rows = keep.any(1)
                    hs, ht = pool(hs.float(), keep, "mean")[rows], pool(ht.float(), keep, "mean")[rows]
                else:
                    hs, ht = hs[keep], ht[keep]
                if self.w_distance:
                    out["rkd_distance"] = out["rkd_distance"] + self.w_distance * w * rkd_distance(hs, ht) * n_keep
                if self.w_angle:
                    out["rkd_angle"] = out["rkd_angle"] + self.w_angle * w * rkd_angle(hs, ht) * n_keep
        return out


def key(m: int, s: int, t: int) -> str:
    """The projection of teacher ``m``'s layer ``t`` from student layer ``s``."""
    return f"t{m}_s{s}_t{t}"


def build_feature_kd(cfg, student: torch.nn.Module, train, weights: list[float], task: str) -> tuple[FeatureKD, str | None]:
    """The :class:`FeatureKD` of a run (``cfg.uses_hidden``) and the stores' pooling (classify; None
    for LM stores), after checking, in one line each, that the teachers store the mapped layers and
    the student has them; asks ``train`` for the hidden states its batches must carry."""
    fmap = parse_layer_map(cfg.feature_map, "--feature-map") if cfg.feature_weight else []
    rkd = parse_layer_map(cfg.rkd_map, "--rkd-map")[0] if (cfg.rkd_distance or cfg.rkd_angle) else None
    wanted = sorted({t for _, t in fmap} | ({rkd[1]} if rkd else set()))
    teachers = []
    for m, (si, name) in enumerate(train.teachers):
        entry = train.stores[si].teacher(name).get("hidden")
        if entry is None:
            continue
        missing = [t for t in wanted if t not in entry["layers"]]
        if missing:
            raise ConfigError(f"--feature-map/--rkd-map: teacher {train.teacher_names[m]} stores hidden states at layers "
                              f"{entry['layers']}, not {missing}")
        train.stores[si].hidden_projection(name)  # the recorded projection rebuilt and checked (FormatError if not)
        teachers.append((m, weights[m], entry))
    if not teachers:
        raise ConfigError(f"--feature-weight/--rkd-*: no teacher of --logits {train.urls[0]} stores hidden states "
                          "(dump with --hidden-layers)")
    poolings = {e["pooling"] for _, _, e in teachers}
    if len(poolings) > 1:
        raise ConfigError(f"--feature-weight/--rkd-*: the teachers' hidden states are pooled differently ({sorted(poolings)})")
    layers = StudentLayers([s for s, _ in fmap] + ([rkd[0]] if rkd else []))
    widths = student_widths(student, layers, train.vocab_size)
    fk = FeatureKD(feature_map=fmap, loss=cfg.feature_loss, weight=cfg.feature_weight, rkd_map=rkd, rkd_distance=cfg.rkd_distance,
                   rkd_angle=cfg.rkd_angle, teachers=teachers, widths=widths, norm=cfg.feature_norm)
    train.request_hidden([(m, t) for m, _, _ in teachers for t in wanted], {m: e["dim"] for m, _, e in teachers})
    pooling = poolings.pop()
    return fk, (None if task == "lm" else pooling)


@torch.no_grad()
def student_widths(student: torch.nn.Module, layers: StudentLayers, vocab_size: int) -> dict[int, int]:
    """The student's hidden size at each of ``layers``, from one forward over two tokens (any
    module that returns ``hidden_states`` for ``output_hidden_states=True``)."""
    p = next(student.parameters())
    ids = torch.zeros(1, 2, dtype=torch.long, device=p.device)
    was = student.training
    student.eval()
    try:
        out = student(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
    except TypeError as e:
        raise ConfigError(f"--feature-map/--rkd-map: the student does not take output_hidden_states ({e}); a module of your "
                          "own must accept it and return an object with .hidden_states") from None
    finally:
        student.train(was)
    stacked = layers.pick(getattr(out, "hidden_states", None))
    return {layer: int(stacked.shape[-1]) for layer in layers.layers}


def save_projections(fk: FeatureKD, out) -> None:
    """``out/feature_projections.safetensors`` (the learned projections, float32) and
    ``out/feature_projections.json`` (which teacher, student layer and teacher layer each maps)."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in fk.projections.state_dict().items()},
              str(out / "feature_projections.safetensors"))
    meta = {"feature_map": fk.feature_map, "loss": fk.loss, "norm": fk.norm, "weight": fk.weight,
            "projections": {key(m, s, t): {"teacher": m, "student_layer": s, "teacher_layer": t, "dim": e["dim"],
                                           "projection": e["projection"]}
                            for m, _, e in fk.teachers for s, t in fk.feature_map}}
    (out / "feature_projections.json").write_text(json.dumps(meta, indent=1))
