"""``--hidden-layers``: the teachers' hidden states at some layers, captured in the same forward
that gives their outputs (FORMAT.md "Hidden states", :mod:`logitstore.format.hidden`).

Layer ``l`` is ``output_hidden_states[l]`` of the model (0: the embeddings' output; the last one
after the final norm, as transformers returns it). transformers >= 5 keeps only the requested
layers (``output_hidden_states=[...]``); older versions keep every layer until the forward
returns (``n_layers x B x L x H`` elements), which bounds the batch on wide models.

Per token (LM stores) or pooled per text (classify stores: ``mean`` over its real tokens, its
``first`` or ``last`` real token), optionally multiplied by the recorded projection
(``--hidden-dim d``) in float32, then rounded to ``--hidden-dtype`` (bf16 by default: fp16's
range, 65504, is exceeded by the outlier activations of large LMs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from logitstore.errors import ConfigError
from logitstore.format.hidden import POOLINGS as STORED_POOLINGS
from logitstore.format.hidden import PROJECTION_KIND, array_name, projection_matrix, projection_sha256, to_bits

HIDDEN_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}
#: the per-text poolings of a classify store (FORMAT.md's, less ``token``)
POOLINGS = tuple(p for p in STORED_POOLINGS if p != "token")


def parse_layers(value: str | tuple | list | None) -> tuple[int, ...]:
    """``"2,4"`` (or a sequence of ints) -> ``(2, 4)``, sorted and distinct."""
    if value is None or value == "" or value == ():
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        layers = sorted({int(str(x).strip()) for x in items})
    except ValueError:
        raise ConfigError(f"--hidden-layers: expected comma-separated layer indices (0 = embeddings), got {value!r}") from None
    if layers[0] < 0:
        raise ConfigError(f"--hidden-layers: layer indices start at 0 (the embeddings' output), got {layers[0]}")
    return tuple(layers)


def model_depth(config, source: str) -> tuple[int, int]:
    """``(n_layers, hidden_size)`` of a teacher's config (its text model's, for multimodal ones)."""
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    n, h = getattr(c, "num_hidden_layers", None), getattr(c, "hidden_size", None)
    if not isinstance(n, int) or not isinstance(h, int):
        raise ConfigError(f"--teacher {source}: its config names no num_hidden_layers/hidden_size; --hidden-layers needs them")
    return n, h


def hidden_entry(cfg, config, source: str, task: str) -> dict | None:
    """The manifest ``hidden`` entry for one teacher (None without ``--hidden-layers``); refuses
    layers past the model's depth and a ``--hidden-dim`` above its width."""
    layers = parse_layers(cfg.hidden_layers)
    if not layers:
        return None
    n, width = model_depth(config, source)
    if layers[-1] > n:
        raise ConfigError(f"--hidden-layers {layers[-1]}: teacher {source} has {n} layers (hidden states 0..{n}, 0 = embeddings)")
    dim = cfg.hidden_dim or width
    if not 1 <= dim <= width:
        raise ConfigError(f"--hidden-dim {dim}: expected 1..{width} (teacher {source}'s hidden size)")
    entry = {"layers": list(layers), "dim": dim, "model_dim": width, "dtype": HIDDEN_DTYPES[cfg.hidden_dtype],
             "pooling": "token" if task == "lm" else cfg.hidden_pooling, "projection": None}
    if dim < width:
        m = projection_matrix(width, dim, cfg.hidden_seed)
        entry["projection"] = {"kind": PROJECTION_KIND, "seed": cfg.hidden_seed, "sha256": projection_sha256(m)}
    return entry


def output_hidden_states_arg(layers: tuple[int, ...]):
    """What to pass as ``output_hidden_states``: the layers (transformers >= 5 keeps only those) or True."""
    try:
        from transformers.utils.output_capturing import selected_hidden_states  # noqa: F401
    except ImportError:
        return True
    return list(layers)


@dataclass
class HiddenCapture:
    """Turns a forward's ``hidden_states`` into the stored arrays of one teacher part."""

    entry: dict
    device: torch.device

    def __post_init__(self) -> None:
        self.layers = tuple(self.entry["layers"])
        p = self.entry["projection"]
        self.R = (torch.from_numpy(projection_matrix(self.entry["model_dim"], self.entry["dim"], p["seed"])).to(self.device)
                  if p is not None else None)

    @property
    def arg(self):
        return output_hidden_states_arg(self.layers)

    def pick(self, hidden_states) -> torch.Tensor:
        """The requested layers of a forward's ``hidden_states`` stacked: [B, L, n, H]."""
        if hidden_states is None or len(hidden_states) <= self.layers[-1]:
            got = 0 if hidden_states is None else len(hidden_states)
            raise ConfigError(f"--hidden-layers: the teacher returned {got} hidden states, fewer than layer {self.layers[-1]} needs")
        # under an accelerate device map each layer's output stays on its own GPU: gather them here
        return torch.stack([hidden_states[i].to(self.device) for i in self.layers], dim=2)

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """[..., H] -> [..., dim] float32 (through the recorded projection, if any)."""
        h = h.float()
        if h.shape[-1] != self.entry["model_dim"]:
            raise ConfigError(f"--hidden-layers: the teacher's hidden states have width {h.shape[-1]}, its config says "
                              f"{self.entry['model_dim']}")
        return h @ self.R.to(h.device) if self.R is not None else h

    def pool(self, stacked: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, L, n, H] with ``mask`` [B, L] -> one vector per text and layer [B, n, H] (the entry's pooling)."""
        return pool(stacked.float(), mask.to(stacked.device), self.entry["pooling"])

    def bits(self, projected: torch.Tensor) -> dict[str, np.ndarray]:
        """[..., n, dim] float32 -> ``{hidden_{layer}: uint16 [..., dim]}``."""
        b = to_bits(projected, self.entry["dtype"])
        return {array_name(layer): np.ascontiguousarray(b[..., i, :]) for i, layer in enumerate(self.layers)}


def pool(h: torch.Tensor, mask: torch.Tensor, kind: str) -> torch.Tensor:
    """``h`` [B, L, ...] with ``mask`` [B, L] -> [B, ...]: ``mean`` over the masked positions, or the
    ``first`` / ``last`` masked one. The dump pools the teacher's states with it and the trainer the
    student's, so both sides of a feature loss are pooled alike."""
    if kind == "first":
        return h[:, 0]
    if kind == "last":
        last = mask.long().sum(1).clamp_min(1) - 1
        return h[torch.arange(h.shape[0], device=h.device), last]
    w = mask.to(h.dtype).reshape(*mask.shape, *(1,) * (h.ndim - 2))
    return (h * w).sum(1) / w.sum(1).clamp_min(1.0)
