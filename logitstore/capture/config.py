"""``DumpConfig``: everything ``logitstore dump`` needs, validated, and what follows from it before
any teacher runs: how ``--data`` rows are read (:func:`source_for`) and cut into windows
(:func:`window_spec`), and which optional inputs arrays the store holds (:func:`optional_inputs`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from logitstore.capture.chat import TRAIN_ON, ChatSpec
from logitstore.capture.corpus import BOS_MODES
from logitstore.capture.placement import parse_device_map, parse_max_memory
from logitstore.capture.sources import INPUT_KINDS, OVERLONG, Source, resolve_kind
from logitstore.capture.teacher import DTYPES
from logitstore.capture.windows import WindowSpec
from logitstore.errors import ConfigError
from logitstore.format.codebook import BITS
from logitstore.format.codec import CODEBOOKS, ENCODINGS
from logitstore.format.hashing import sha256_hex


@dataclass(frozen=True)
class DumpConfig:
    """Everything ``logitstore dump`` needs. ``teachers`` entries are ``[NAME=]PATH_OR_ID``."""

    teachers: tuple[str, ...]
    data: str
    out: str
    top_k: int = 64
    #: adaptive k (logitstore/capture/adaptive.py): per position the fewest entries whose mass reaches
    #: ``top_p``, at least ``min_k``, at most ``top_k``; None: always ``top_k``
    top_p: float | None = None
    min_k: int = 1
    #: sampled targets (logitstore/capture/sampled_targets.py): ``topk``, ``sampled`` or ``both``,
    #: ``samples`` draws per position from ``p^(1 / proposal_temperature)``
    targets: str = "topk"
    samples: int = 12
    proposal_temperature: float = 1.0
    seq_len: int = 512
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "auto"
    format: str = "zarr"
    encoding: str = "compact"
    #: compact only: precision of the log-prob codes (6, 7 or 8; the uniform codebook takes 2..8) and
    #: the codebook (``companded``, or ``uniform`` for stores older readers can open): FORMAT.md
    value_bits: int = 8
    codebook: str = "companded"
    max_tokens: int | None = None
    text_field: str = "text"
    #: None: pack text and conversations, keep one row per window for token rows (``--pack/--no-pack``)
    pack: bool | None = None
    shard_sequences: int | None = None
    trust_remote_code: bool = False
    progress: bool = True
    #: start each document with BOS: ``auto`` (if the tokenizer adds one itself), ``always``, ``never``
    bos: str = "auto"
    #: accelerate placement over this process's GPUs, then CPU, then disk (logitstore/capture/placement.py)
    device_map: str | None = None
    max_memory: str | None = None
    offload_folder: str | None = None
    #: tensor-parallel ranks per copy of the teacher (under torchrun; WORLD_SIZE = dp x tp)
    tp: int = 1
    #: what ``--data`` rows hold: auto, text, messages or tokens (logitstore/capture/sources.py)
    input: str = "auto"
    messages_field: str = "messages"
    #: a Jinja chat template file replacing the tokenizer's
    chat_template: str | None = None
    #: which tokens of a conversation are trained: assistant or all (logitstore/capture/chat.py)
    train_on: str = "assistant"
    #: a conversation, token row or classified text longer than seq_len: refuse, truncate or drop
    #: (None: refuse, except a classified text, which is truncated)
    overlong: str | None = None
    #: packed windows record where each document starts, and teacher and student attend within it:
    #: auto (for conversations and token rows, not for text), on or off
    doc_boundaries: str = "auto"
    #: ``lm`` (causal LM teachers: next-token distributions) or ``classify`` (sequence classifiers:
    #: class logits per text, logitstore/capture/classify.py), with the row field holding the label
    task: str = "lm"
    label_field: str | None = None
    #: hidden states to store per teacher (``"2,4"``: ``output_hidden_states`` indices, 0 = embeddings;
    #: logitstore/capture/hidden.py), through a recorded random projection to ``hidden_dim`` if set
    hidden_layers: str | None = None
    hidden_dim: int | None = None
    #: bf16 or fp16; a classify store's pooling per text: mean, first or last (real token)
    hidden_dtype: str = "bf16"
    hidden_pooling: str = "mean"
    hidden_seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "teachers", tuple(self.teachers))
        if not self.teachers:
            raise ConfigError("--teacher: at least one teacher is required")
        if not isinstance(self.top_k, int) or self.top_k <= 0:
            raise ConfigError(f"--top-k: expected a positive integer, got {self.top_k}")
        if self.top_p is not None and not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ConfigError(f"--top-p: expected a probability in (0, 1], got {self.top_p!r}")
        if self.targets not in ("topk", "sampled", "both"):
            raise ConfigError(f"--targets: expected topk, sampled or both, got {self.targets!r}")
        if self.targets != "topk" and (self.top_p is not None or self.tp > 1):
            raise ConfigError(f"--targets {self.targets}: not with --top-p or --tp (the samples need the full distribution on one device)")
        if not isinstance(self.samples, int) or not 1 <= self.samples <= 255:
            raise ConfigError(f"--samples: expected an integer in [1, 255], got {self.samples!r}")
        if not (isinstance(self.proposal_temperature, (int, float)) and self.proposal_temperature > 0):
            raise ConfigError(f"--proposal-temperature: expected > 0, got {self.proposal_temperature!r}")
        if not isinstance(self.min_k, int) or not 1 <= self.min_k <= self.top_k:
            raise ConfigError(f"--min-k: expected an integer in [1, --top-k = {self.top_k}], got {self.min_k!r}")
        if not isinstance(self.seq_len, int) or self.seq_len <= 0:
            raise ConfigError(f"--seq-len: expected a positive integer, got {self.seq_len}")
        if self.seq_len < 2:  # position t describes token t + 1: a 1-token window has no target
            raise ConfigError(f"--seq-len: expected at least 2 (a window of {self.seq_len} token has no next token to learn), got {self.seq_len}")
        if self.batch_size <= 0:
            raise ConfigError(f"--batch-size: expected a positive integer, got {self.batch_size}")
        if self.format == "parquet":  # the arrow backend writes Parquet files; both names mean it
            object.__setattr__(self, "format", "arrow")
        if self.format not in ("zarr", "arrow"):
            raise ConfigError(f"--format: expected zarr, arrow or parquet (= arrow), got {self.format!r}")
        if self.encoding not in ENCODINGS:
            raise ConfigError(f"--encoding: expected one of {', '.join(ENCODINGS)}, got {self.encoding!r}")
        if self.codebook not in CODEBOOKS:
            raise ConfigError(f"--codebook: expected one of {', '.join(CODEBOOKS)}, got {self.codebook!r}")
        allowed = BITS if self.codebook == "companded" else tuple(range(2, 9))
        if self.encoding == "compact" and self.value_bits not in allowed:  # lossless stores float32 values
            raise ConfigError(f"--value-bits: the {self.codebook} codebook takes {', '.join(map(str, allowed))}, got {self.value_bits!r}")
        if self.dtype not in ("auto", *DTYPES):
            raise ConfigError(f"--dtype: expected auto, {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise ConfigError(f"--max-tokens: expected a positive integer, got {self.max_tokens}")
        if self.shard_sequences is not None and self.shard_sequences <= 0:
            raise ConfigError(f"--shard-sequences: expected a positive integer, got {self.shard_sequences}")
        if self.bos not in BOS_MODES:
            raise ConfigError(f"--bos: expected one of {', '.join(BOS_MODES)}, got {self.bos!r}")
        if not isinstance(self.tp, int) or self.tp < 1:
            raise ConfigError(f"--tp: expected a positive integer, got {self.tp}")
        parse_device_map(self.device_map)  # refuses a bad strategy or map file now
        parse_max_memory(self.max_memory)
        if self.tp > 1 and self.device_map:
            raise ConfigError("--tp and --device-map: choose one (tensor parallelism places the teacher itself)")
        if (self.max_memory or self.offload_folder) and not self.device_map:
            raise ConfigError("--max-memory/--offload-folder: only with --device-map")
        if self.input not in INPUT_KINDS:
            raise ConfigError(f"--input: expected one of {', '.join(INPUT_KINDS)}, got {self.input!r}")
        if self.train_on not in TRAIN_ON:
            raise ConfigError(f"--train-on: expected one of {', '.join(TRAIN_ON)}, got {self.train_on!r}")
        if self.overlong is not None and self.overlong not in OVERLONG:
            raise ConfigError(f"--overlong: expected one of {', '.join(OVERLONG)}, got {self.overlong!r}")
        if self.task not in ("lm", "classify"):
            raise ConfigError(f"--task: expected lm or classify, got {self.task!r}")
        if self.label_field is not None and self.task != "classify":
            raise ConfigError("--label-field: only with --task classify")
        from logitstore.capture.hidden import HIDDEN_DTYPES, POOLINGS, parse_layers

        layers = parse_layers(self.hidden_layers)  # refuses a malformed list now
        if self.hidden_dtype not in HIDDEN_DTYPES:
            raise ConfigError(f"--hidden-dtype: expected one of {', '.join(HIDDEN_DTYPES)}, got {self.hidden_dtype!r}")
        if self.hidden_pooling not in POOLINGS:
            raise ConfigError(f"--hidden-pooling: expected one of {', '.join(POOLINGS)}, got {self.hidden_pooling!r}")
        if self.hidden_dim is not None and (not isinstance(self.hidden_dim, int) or self.hidden_dim < 1):
            raise ConfigError(f"--hidden-dim: expected a positive integer, got {self.hidden_dim}")
        if not isinstance(self.hidden_seed, int) or not 0 <= self.hidden_seed < 1 << 63:
            raise ConfigError(f"--hidden-seed: expected an integer >= 0, got {self.hidden_seed}")
        if self.hidden_dim is not None and not layers:
            raise ConfigError("--hidden-dim: only with --hidden-layers")
        if layers and self.tp > 1:
            raise ConfigError("--hidden-layers: not with --tp (hidden states of a tensor-parallel teacher are not captured); "
                              "dump them with one process per copy, or --device-map")
        if self.doc_boundaries not in ("auto", "on", "off"):
            raise ConfigError(f"--doc-boundaries: expected auto, on or off, got {self.doc_boundaries!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DumpConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"dump config: unknown keys {sorted(unknown)}")
        return cls(**d)


def source_for(cfg: DumpConfig, tok) -> Source:
    template = None
    if cfg.chat_template is not None:
        try:
            with open(cfg.chat_template, encoding="utf-8") as f:
                template = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--chat-template {cfg.chat_template}: cannot read ({type(e).__name__}: {e})") from None
    kind = resolve_kind(cfg.data, cfg.input, cfg.text_field, cfg.messages_field)
    if kind != "messages" and (cfg.chat_template or cfg.train_on != "assistant"):
        raise ConfigError(f"--chat-template/--train-on: only for conversations; --data {cfg.data} holds {kind}")
    used = template if template is not None else getattr(tok, "chat_template", None)
    sha = sha256_hex(used.encode()) if kind == "messages" and isinstance(used, str) else None
    return Source(cfg.data, kind, cfg.text_field, ChatSpec(cfg.messages_field, template, cfg.train_on), cfg.overlong or "refuse", sha)


def window_spec(cfg: DumpConfig, source: Source, bos: bool, shard_sequences: int) -> WindowSpec:
    """How this dump cuts windows (see :class:`WindowSpec`): token rows stay one per window unless
    ``--pack``; packed conversations and token rows record document starts unless ``--doc-boundaries off``."""
    packed = cfg.pack if cfg.pack is not None else source.kind != "tokens"
    segments = packed and (cfg.doc_boundaries == "on" or (cfg.doc_boundaries == "auto" and source.whole_rows))
    masked = source.kind != "text" or segments
    return WindowSpec(cfg.seq_len, packed, cfg.max_tokens, bos, shard_sequences, whole=source.whole_rows,
                      segments=segments, masked=masked, rows=source.kind != "text")


def optional_inputs(wspec: WindowSpec) -> tuple[str, ...]:
    """The optional inputs arrays a store of these windows holds (manifest ``inputs``)."""
    return tuple(a for a, on in (("loss_mask", wspec.masked), ("doc_start", wspec.segments), ("row", wspec.rows)) if on)
