"""The student: loading, vocabulary checks, and the module that computes the loss inside forward.

Putting the chunked loss inside ``forward`` keeps ``DistributedDataParallel`` exact (everything that
needs gradients runs in the wrapped forward) and, for Hugging Face causal LMs, lets the loss apply
the LM head chunk by chunk to the final hidden states, so ``[B, L, V]`` logits never exist.
"""

from __future__ import annotations

from pathlib import Path

import torch

from logitstore.errors import ConfigError, LogitStoreError
from logitstore.capture.lm_head import forward_logits, head_for

from logitstore.distributions.fusion import fuse, position_weights
from .losses import kd_ce_loss
from .positions import choose


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_student(spec: str, *, trust_remote_code: bool = False, classify: bool = False, **config) -> torch.nn.Module:
    """A directory or hub id (``from_pretrained``), or a model config file (.json/.yaml: a fresh model).

    ``classify``: an ``AutoModelForSequenceClassification`` (else ``AutoModelForCausalLM``);
    ``config``: settings that override the file's or the checkpoint's (a classifier's labels).
    The weights come back in the checkpoint's own dtype (``dtype="auto"``), recorded as
    ``model.checkpoint_dtype`` (float32 for a fresh model), so the caller chooses the training dtype
    with :func:`cast_parameters` and the saved dtype with it in mind."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if classify else AutoModelForCausalLM
    what = " as a sequence classifier" if classify else ""
    p = Path(spec)
    if p.suffix in (".json", ".yaml", ".yml") and p.is_file():
        import yaml

        d = yaml.safe_load(p.read_text())
        if not isinstance(d, dict) or "model_type" not in d:
            raise ConfigError(f"--student {spec}: a model config needs a 'model_type' (e.g. {'bert' if classify else 'llama'})")
        d = {**d, **config}
        try:
            model = auto.from_config(AutoConfig.for_model(d.pop("model_type"), **d), trust_remote_code=trust_remote_code)
        except (ValueError, KeyError) as e:  # an unknown model type, or one without this kind of head
            raise ConfigError(f"--student {spec}: cannot build a model{what} from it ({type(e).__name__}: {_first_line(e)})") from None
        model.checkpoint_dtype = torch.float32
        return model
    if (spec.startswith((".", "/", "~")) or spec.count("/") > 1) and not p.exists():
        raise LogitStoreError(f"--student {spec}: no such file or directory")
    try:
        model = auto.from_pretrained(spec, dtype="auto", trust_remote_code=trust_remote_code, **config)
    except Exception as e:  # transformers raises OSError/ValueError/... for unusable sources
        raise LogitStoreError(f"--student {spec}: cannot load{what} ({type(e).__name__}: {_first_line(e)})") from e
    model.checkpoint_dtype = parameter_dtype(model)
    return model


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else ""


def parameter_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of most of ``model``'s floating-point parameters (float32 if it has none)."""
    counts: dict[torch.dtype, int] = {}
    for prm in model.parameters():
        if prm.is_floating_point():
            counts[prm.dtype] = counts.get(prm.dtype, 0) + prm.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast the floating-point *parameters* to ``dtype`` in place (tied weights stay tied). Buffers
    are only ever raised to float32, never lowered: RoPE's ``inv_freq`` and similar tables are kept
    in float32 by ``from_pretrained`` whatever the weights' dtype, and ``model.to(bf16)`` would
    round them (positions then drift)."""
    for prm in model.parameters():
        if prm.is_floating_point() and prm.dtype != dtype:
            prm.data = prm.data.to(dtype)
    if dtype == torch.float32:
        for mod in model.modules():
            for name, buf in list(mod._buffers.items()):
                if buf is not None and buf.dtype in (torch.float16, torch.bfloat16):
                    mod._buffers[name] = buf.float()
    return model


def adopt_special_ids(model: torch.nn.Module, tokenizer_entry: dict) -> None:
    """A student built from a config takes EOS/PAD (and BOS, where known) from the store's tokenizer
    instead of its architecture's defaults (GPT-2's 50256 in a 1,000-token vocabulary), in its
    config and generation config, so ``final/`` generates and stops as the data was tokenised."""
    vocab = int(tokenizer_entry["vocab_size"])
    ids = {"eos_token_id": tokenizer_entry.get("eos_token_id"), "pad_token_id": tokenizer_entry.get("pad_token_id")}
    bos = tokenizer_entry.get("bos_token_id")
    cfg = getattr(model, "config", None)
    if cfg is None:
        return
    old_bos = getattr(cfg, "bos_token_id", None)
    ids["bos_token_id"] = bos if bos is not None else (old_bos if isinstance(old_bos, int) and 0 <= old_bos < vocab else None)
    for target in (cfg, getattr(model, "generation_config", None)):
        if target is not None:
            for k, v in ids.items():
                setattr(target, k, v)


def output_vocab(model: torch.nn.Module) -> int | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return int(head.weight.shape[0]) if head is not None else None


class DistillModule(torch.nn.Module):
    """Wraps a student; ``forward(batch, ...)`` returns ``(ce_sum, kd_sum, n_positions)`` (and the
    top-1 ids with ``return_argmax``).

    ``batch`` holds ``input_ids``/``attention_mask``/``labels`` [B, L] and, for KD, either the target
    fields of :mod:`logitstore.distributions.fusion` flattened over ``B * L`` positions or (online KD)
    ``teacher_logits`` [B, L, V].
    """

    def __init__(self, student: torch.nn.Module):
        super().__init__()
        self.student = student
        # The LM head runs per chunk inside the loss only for families whose forward is known to be
        # ``transform(lm_head(last_hidden_state))`` (logitstore.capture.lm_head's allow-list, with the
        # family's transform); any other student gives full logits through its own forward.
        self._head = head_for(student)
        self.fused_head = self._head is not None
        #: feature / relation KD (trainer/features.py), set by ``trainer fit`` when asked for
        self.features = None

    def logits(self, input_ids, attention_mask, position_ids=None, capture=None):
        """[B, L, V]; with ``capture`` (:class:`trainer.features.StudentLayers`) ``(logits, layers [B, L, n, H])``."""
        if position_ids is not None and takes_position_ids(self.student):
            # no KV cache (with one, transformers builds a plain causal mask and documents would mix);
            # flash kernels get the rows flattened (logitstore.capture.lm_head.packed_call)
            return forward_logits(self.student, input_ids, attention_mask, position_ids, capture=capture)
        extra = {"output_hidden_states": capture.arg} if capture is not None else {}
        out = self.student(input_ids=input_ids, attention_mask=attention_mask, **extra)
        logits = out.logits if hasattr(out, "logits") else out
        return logits if capture is None else (logits, capture.pick(getattr(out, "hidden_states", None)))

    def forward(self, batch: dict, *, temperature: float, teacher_temperatures: list[float], weights: list[float], fuse_mode: str,
                loss: str, tail: str, beta: float, chunk_positions: int, vocab_size: int, with_kd: bool = True,
                return_argmax: bool = False, with_aux: bool = False, fuse_weights: str = "fixed", fuse_tau: float = 1.0,
                kd_positions: tuple[str, float] = ("all", 1.0)):
        """``return_argmax`` (evaluation): also the student's top-1 id per position [B * L], from the
        same chunked pass (see :func:`trainer.losses.kd_ce_loss`). ``with_aux`` (training): also the
        feature and relation terms of :attr:`features` (a dict of weighted sums), from the same forward."""
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        pos = batch.get("position_ids")  # packed documents (a store with doc_start): attention stays in each
        B, L = ids.shape
        cap = self.features.layers if self.features is not None and with_aux else None
        aux = {}
        if self._head is not None:
            x = self._head.hidden(ids, mask, pos, capture=cap)
            head = self._head
        else:
            x = self.logits(ids, mask, pos, capture=cap)
            head = None
        if cap is not None:
            x, stacked = x
            aux.update(self.features(cap.split(stacked), batch, labels != -100, None))
        x = x.reshape(B * L, -1)
        if head is None:
            if x.shape[-1] < vocab_size:
                raise ConfigError(f"--student: outputs {x.shape[-1]} logits per position, fewer than the store's vocabulary of "
                                  f"{vocab_size}")
        target, t_logits = None, batch.get("teacher_logits")
        if t_logits is not None:  # online KD: [B, L, V_teacher] from a teacher run on this batch
            t_logits = t_logits.reshape(B * L, -1)[:, :vocab_size]
        elif with_kd:
            pw = position_weights(fuse_weights, weights, batch.get("teacher_entropy"), batch.get("teacher_gold_logprob"), fuse_tau)
            target = fuse(batch["teacher_lp"], batch["rest_lp"], batch["support"], batch["valid"], batch["n_out"],
                          temperatures=teacher_temperatures, weights=weights, mode=fuse_mode, position_weights=pw)
        chosen, scale = None, 1.0
        if with_kd and kd_positions[0] != "all":  # trainer/positions.py
            chosen, scale = choose(*kd_positions, labels.reshape(-1), teacher_entropy=batch.get("teacher_entropy"), weights=weights,
                                   x=x, head=head, vocab_size=vocab_size, chunk=chunk_positions)
        out = kd_ce_loss(x, labels.reshape(-1), target, head=head, temperature=temperature, loss=loss, tail=tail, beta=beta,
                         chunk_positions=chunk_positions, vocab_size=vocab_size, teacher_logits=t_logits, return_argmax=return_argmax,
                         kd_positions=chosen)
        if scale != 1.0:
            out = (out[0], out[1] * scale, *out[2:])
        return (*out, aux) if with_aux else out


def takes_position_ids(model: torch.nn.Module) -> bool:
    """Whether ``model`` takes ``position_ids``: a transformers model, or a module whose ``forward``
    names them or passes keyword arguments on (PEFT wrappers, ``torch.compile``). Any other module
    is called with ``input_ids`` and ``attention_mask`` only."""
    import inspect

    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        return True
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "position_ids" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def check_document_separation(model: torch.nn.Module, vocab_size: int, seed: int = 0) -> str | None:
    """Whether ``model`` keeps packed documents apart when given restarting ``position_ids``: two
    random documents packed into one row must give the second the log-probs it has alone.
    Returns None if so, else why not (for a warning or an error). Runs in eval mode, no gradients."""
    if not takes_position_ids(model):
        return "the student's forward takes no position_ids, so packed documents attend to each other"
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    a, b = torch.randint(0, vocab_size, (1, 7), generator=g), torch.randint(0, vocab_size, (1, 9), generator=g)
    ids = torch.cat([a, b], 1).repeat(2, 1).to(device)  # two rows: some kernels keep documents apart in one row only
    pos = torch.cat([torch.arange(7), torch.arange(9)])[None].repeat(2, 1).to(device)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed = forward_logits(model, ids, torch.ones_like(ids), pos)[1, 7:].float().log_softmax(-1)
            alone = forward_logits(model, b.to(device), torch.ones_like(b).to(device))[0].float().log_softmax(-1)
    finally:
        model.train(was)
    d = float((packed - alone).abs().max())
    tol = 1e-3 if next(model.parameters()).dtype == torch.float32 else 0.25
    return None if d <= tol else f"its attention mixes packed documents ({d:.3g} nats between a document packed and alone)"


def load_online_teacher(source: str, train, device: torch.device, trust_remote_code: bool = False) -> torch.nn.Module:
    """The ``--online-teacher`` model (float32 on CPU, bf16 on GPU), after checking its tokenizer
    against the stores'."""
    from logitstore.format.hashing import tokenizer_fingerprint
    from logitstore.capture.teacher import TeacherSpec

    spec = TeacherSpec.parse(source, trust_remote_code=trust_remote_code)
    if tokenizer_fingerprint(spec.load_tokenizer()) != train.stores[0].manifest["tokenizer"]["fingerprint"]:
        raise ConfigError(f"--online-teacher {source}: its tokenizer differs from the stores'")
    model = spec.load_model(device, torch.float32 if device.type == "cpu" else torch.bfloat16)
    model.requires_grad_(False)
    return model


def check_student_tokenizer(spec: str, train) -> None:
    """A student that ships a tokenizer must use the stores' (the same ids for the same text)."""
    from transformers import AutoTokenizer

    from logitstore.format.hashing import tokenizer_fingerprint

    p = Path(spec)
    if not (p.is_dir() and any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))):
        return
    try:
        tok = AutoTokenizer.from_pretrained(str(p))
    except (OSError, ValueError) as e:
        raise ConfigError(f"--student {spec}: cannot load its tokenizer ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if tokenizer_fingerprint(tok) != train.stores[0].manifest["tokenizer"]["fingerprint"]:
        raise ConfigError(f"--student {spec}: its tokenizer differs from the stores' (the teachers'); a student must read "
                          f"the same token ids the targets are over")


def find_tokenizer(student_spec: str, train):
    """The student's own tokenizer if it has one, else the first teacher's (checked against the store)."""
    from transformers import AutoTokenizer

    from logitstore.format.hashing import tokenizer_fingerprint

    want = train.stores[0].manifest["tokenizer"]["fingerprint"]
    candidates = [student_spec] + [t["source"] for s in train.stores for t in s.manifest["teachers"]]
    for c in candidates:
        if not Path(c).is_dir():
            continue
        try:
            tok = AutoTokenizer.from_pretrained(c)
        except (OSError, ValueError):
            continue
        if tokenizer_fingerprint(tok) == want:
            return tok
    return None
