"""``logitstore dump --task classify``: sequence-classification teachers, run once.

Rows of ``--data`` hold a text (``--text-field``) and a label (``--label-field``: a class index in
``[0, C)`` or one of the teachers' label names); each text is tokenised with the tokenizer's own
special tokens (``[CLS] ... [SEP]`` for BERT), one sequence per window, at most ``--seq-len``
tokens (longer texts are truncated unless ``--overlong refuse|drop``; classifiers are routinely
applied to a text's beginning). Every teacher is an ``AutoModelForSequenceClassification`` with a
trained head (a checkpoint whose head would be freshly initialised is refused) and the same labels
(``num_labels`` and ``id2label``); per sequence it stores all ``C`` class logits, float32 (the
store's encoding is ``lossless``), so any temperature, fusion or loss can be applied later.

The store is format version 3 with ``task: "classify"`` (FORMAT.md): inputs ``input_ids``,
``length``, ``seq_hash``, ``label`` (-1: none), ``row``; teacher parts ``logits [S, C]``. The rows
are tokenised into memory (a few bytes per token: classification sets of up to ~10^7 texts), then
written shard by shard; teachers run one at a time and every part commits on its own, so a re-run
resumes. One process (no ``torchrun``): a classification teacher is small and fast.
"""

from __future__ import annotations

import hashlib
import math
import time

import numpy as np
import torch

from logitstore.capture.documents import describe_source, iter_records
from logitstore.capture.hidden import HiddenCapture, hidden_entry
from logitstore.capture.teacher import TeacherSpec
from logitstore.errors import ConfigError, LogitStoreError
from logitstore.format import layout
from logitstore.format.hidden import array_name
from logitstore.format.codec import Encoding, id_dtype
from logitstore.format.commit import CHUNK_TOKENS, build_manifest, check_or_write_plan, refuse_foreign
from logitstore.format.hashing import canonical_json_hash, config_hash, sequence_hashes
from logitstore.format.index import inputs_specs
from logitstore.format.manifest import FORMAT_NAME, MANIFEST, dumps, parse_manifest
from logitstore.format.writer import PartWriter
from logitstore.progress import progress_bar
from logitstore.storage.fsio import StoreFS
from logitstore.storage.lock import store_lock

#: sequences per shard by default (a classify part is C float32 per sequence: small)
SHARD_SEQUENCES = 4096


def load_classifier(spec: TeacherSpec, device: torch.device, dtype: torch.dtype):
    """The teacher as ``AutoModelForSequenceClassification``; refused if its head is not in the checkpoint."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path, kw = spec._load_args()
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype, output_loading_info=True, **kw)
    except Exception as e:  # no sequence-classification class for this config, unreadable weights, ...
        raise LogitStoreError(f"--teacher {spec.source}: cannot load as a sequence classifier ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    fresh = [k for k in info.get("missing_keys", []) if not k.endswith("position_ids")]
    if fresh:
        raise ConfigError(f"--teacher {spec.source}: has no trained classification head (the checkpoint lacks "
                          f"{', '.join(sorted(fresh)[:3])}); fine-tune one first or pick a classifier")
    return model.to(device).eval()


def label_names(config, source: str) -> list[str]:
    n = int(getattr(config, "num_labels", 0) or 0)
    if n < 2:
        raise ConfigError(f"--teacher {source}: declares {n} label(s); --task classify needs a classifier of at least 2 classes")
    id2label = getattr(config, "id2label", None) or {}
    return [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(n)]


def _rows(cfg, tok, names: list[str]) -> tuple[list[np.ndarray], list[int], list[int]]:
    """Every row as ``(ids, label, row index)``; one-line errors naming the row and field."""
    if not cfg.label_field:
        raise ConfigError("--task classify: --label-field is required (the field holding each text's class)")
    index = {n: i for i, n in enumerate(names)}
    C, L = len(names), cfg.seq_len
    by_name = _class_label_names(cfg.data, cfg.label_field)  # a saved dataset's ClassLabel: its ints mean these names
    if by_name is not None:
        unknown = [n for n in by_name if n not in index]
        if unknown:
            raise ConfigError(f"--data {cfg.data}: field {cfg.label_field!r} names classes {unknown} that the teachers do not "
                              f"have ({', '.join(names)})")
    overlong = cfg.overlong or "truncate"
    ids_out, labels, rows = [], [], []
    for r, (_, rec) in enumerate(iter_records(cfg.data, cfg.text_field, (cfg.label_field,))):
        where = f"--data {cfg.data}: row {r}"
        text, label = rec.get(cfg.text_field), rec.get(cfg.label_field)
        if not isinstance(text, str) or not text.strip():
            raise LogitStoreError(f"{where}: field {cfg.text_field!r}: expected a non-empty text")
        if by_name is not None and isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(by_name):
            label = by_name[label]  # the dataset's class, by name, to the teachers' index
        if isinstance(label, str) and label in index:
            label = index[label]
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < C:
            raise LogitStoreError(f"{where}: field {cfg.label_field!r}: {label!r} is not a class of the teachers "
                                  f"(0..{C - 1} or one of {', '.join(names[:6])}{', ...' if C > 6 else ''})")
        ids = tok(text, add_special_tokens=True)["input_ids"]
        if not ids:
            raise LogitStoreError(f"{where}: field {cfg.text_field!r}: tokenises to no token")
        if len(ids) > L:
            if overlong == "refuse":
                raise LogitStoreError(f"{where}: {len(ids)} tokens, longer than --seq-len {L}; raise --seq-len or pass "
                                      "--overlong truncate|drop")
            if overlong == "drop":
                continue
            # the tokenizer's own truncation keeps its closing special tokens ([SEP], EOS)
            ids = tok(text, add_special_tokens=True, truncation=True, max_length=L)["input_ids"]
        ids_out.append(np.asarray(ids, id_dtype(len(tok))))
        labels.append(label)
        rows.append(r)
    if not ids_out:
        raise LogitStoreError(f"--data {cfg.data}: no rows")
    return ids_out, labels, rows


def _class_label_names(path: str, field: str) -> list[str] | None:
    """The names of a saved ``datasets`` dataset's ``ClassLabel`` column ``field``, else None."""
    from pathlib import Path

    from logitstore.capture.documents import _is_saved_dataset

    if not (Path(path).is_dir() and _is_saved_dataset(Path(path))):
        return None
    import datasets

    ds = datasets.load_from_disk(path)
    ds = ds["train"] if isinstance(ds, datasets.DatasetDict) and "train" in ds else ds
    feature = getattr(ds, "features", {}).get(field)
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def dump_classify(cfg, specs: list[TeacherSpec], tokenizers: list, fingerprint: str, device: torch.device,
                  dtype_name: str, dtype: torch.dtype):
    """Write (or resume) the classify store ``cfg.out``; returns the :class:`DumpResult`."""
    from logitstore.capture.dump import DumpResult, _summary

    t0 = time.perf_counter()
    configs = [s.load_config() for s in specs]
    for s, c in zip(specs, configs):  # before any row is read; the weights are checked again when loaded
        arch = getattr(c, "architectures", None) or []
        if arch and not any(a.endswith("ForSequenceClassification") for a in arch):
            raise ConfigError(f"--teacher {s.source}: has no trained classification head (it is a {', '.join(arch)}); "
                              "fine-tune one first or pick a classifier")
    names = label_names(configs[0], specs[0].source)
    for s, c in zip(specs[1:], configs[1:]):
        if label_names(c, s.source) != names:
            raise ConfigError(f"--teacher {s.source}: its labels {label_names(c, s.source)} differ from {specs[0].source}'s "
                              f"{names}; teachers fused per class must share num_labels and id2label")
    tok = tokenizers[0]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids, labels, rows = _rows(cfg, tok, names)
    L, C, V = cfg.seq_len, len(names), len(tok)
    S = cfg.shard_sequences or SHARD_SEQUENCES
    lengths = np.array([a.size for a in ids], np.uint32)
    h = hashlib.sha256()
    for a in ids:
        h.update(a.astype("<u4").tobytes() + b"\xff\xff\xff\xff")
    h.update(np.asarray(labels, "<i8").tobytes())
    teachers = [{**s.identity(t), "dtype": dtype_name, "k": C, "part": layout.teacher_part(i)}
                for i, (s, t) in enumerate(zip(specs, tokenizers))]
    for s, c, t in zip(specs, configs, teachers):  # --hidden-layers: pooled per text (logitstore/capture/hidden.py)
        entry = hidden_entry(cfg, c, s.source, "classify")
        if entry is not None:
            t["hidden"] = entry
    source = describe_source(cfg.data, cfg.text_field)
    source.update({"kind": "classify", "label_field": cfg.label_field, "overlong": cfg.overlong or "truncate"})
    plan = {"format": FORMAT_NAME, "format_version": 3, "backend": cfg.format, "encoding": Encoding("lossless").to_dict(),
            "seq_len": L, "packed": False, "bos": False, "shard_sequences": S, "n_sequences": len(ids), "n_tokens": int(lengths.sum()),
            "tokenizer": {"fingerprint": fingerprint, "vocab_size": V, "eos_token_id": tok.eos_token_id, "pad_token_id": pad},
            "data": {"fingerprint": canonical_json_hash(["classify", L, h.hexdigest()]), "source": source, "max_tokens": None},
            "teachers": teachers, "inputs": ["label", "row"], "targets": "all", "task": "classify", "num_labels": C,
            "label_names": names}
    fs = StoreFS(cfg.out)
    refuse_foreign(fs, cfg.out)
    with store_lock(fs, cfg.out, "dump"):
        check_or_write_plan(fs, plan, cfg.out)
        if fs.exists(MANIFEST):
            m = parse_manifest(fs.read(MANIFEST), f"{cfg.out}/{MANIFEST}")
            return DumpResult(m, time.perf_counter() - t0, 0.0, 0, summary=_summary(cfg.out, m))
        pw = PartWriter(fs, cfg.format, chunk_rows=max(1, CHUNK_TOKENS // L))
        n_shards = math.ceil(len(ids) / S)
        for j in range(n_shards):  # inputs first: every teacher reads them back
            pw.clean_debris(j)
            if not pw.committed(j, layout.INPUTS):
                a, b = j * S, min(len(ids), (j + 1) * S)
                arr = np.full((b - a, L), pad, id_dtype(V))
                for i, x in enumerate(ids[a:b]):
                    arr[i, : x.size] = x
                pw.write(j, layout.INPUTS, {"input_ids": arr, "length": lengths[a:b], "seq_hash": sequence_hashes(arr, lengths[a:b]),
                                            "label": np.asarray(labels[a:b], np.int64), "row": np.asarray(rows[a:b], np.int64)},
                         {"start": a, "n_sequences": b - a, "n_tokens": int(lengths[a:b].sum())})
        forward = 0.0
        for spec, t in zip(specs, teachers):
            todo = [j for j in range(n_shards) if not pw.committed(j, t["part"])]
            if todo:
                forward += _run_classifier(cfg, spec, t["part"], todo, pw, L, V, C, device, dtype, t.get("hidden"))
        manifest = build_manifest(fs, plan, n_shards, cfg.to_dict())
        fs.write_atomic(MANIFEST, dumps(manifest))
    return DumpResult(manifest, time.perf_counter() - t0, forward, int(lengths.sum()), summary=_summary(cfg.out, manifest))


def _run_classifier(cfg, spec: TeacherSpec, part: str, todo: list[int], pw: PartWriter, L: int, V: int, C: int,
                    device, dtype, hidden: dict | None = None) -> float:
    """Run one teacher over shards ``todo``, longest rows first per batch; commit each part.
    ``hidden``: its manifest ``hidden`` entry (pooled hidden states per text, --hidden-layers)."""
    model = load_classifier(spec, device, dtype)
    cap = HiddenCapture(hidden, device) if hidden else None
    # decoder classifiers pool at the last token that is not config.pad_token_id: padding must be that id
    # (without one, each text runs alone); encoders pool at position 0 and ignore what padding holds
    fill = model.config.pad_token_id
    batch_size = cfg.batch_size if fill is not None else 1
    forward = 0.0
    with progress_bar(None, spec.name, enabled=cfg.progress) as bar:
        for j in todo:
            t_shard = time.perf_counter()
            inp = pw.read(j, layout.INPUTS, inputs_specs(_n(pw, j), L, V, ("label", "row")))
            ids, lens = inp["input_ids"], inp["length"].astype(np.int64)
            logits = np.zeros((len(lens), C), np.float32)
            states = {} if cap is None else {array_name(layer): np.zeros((len(lens), hidden["dim"]), np.uint16) for layer in cap.layers}
            order = np.argsort(-lens, kind="stable")
            t = time.perf_counter()
            with torch.inference_mode():
                for s in range(0, len(order), batch_size):
                    rows = order[s:s + batch_size]
                    w = int(lens[rows].max())
                    mask = (torch.arange(w)[None, :] < torch.from_numpy(lens[rows])[:, None]).long()
                    x = torch.from_numpy(ids[rows, :w].astype(np.int64))
                    if fill is not None:
                        x = torch.where(mask.bool(), x, torch.full_like(x, int(fill)))
                    x, mask = x.to(device), mask.to(device)
                    res = model(input_ids=x, attention_mask=mask, **({"output_hidden_states": cap.arg} if cap else {}))
                    out = res.logits.float()
                    if not torch.isfinite(out).all():
                        raise LogitStoreError(f"teacher {spec.name}: non-finite class logits (fp16 overflow? try --dtype fp32)")
                    logits[rows] = out.cpu().numpy()
                    if cap is not None:  # [B, L, n, H] -> pooled [B, n, H] -> projected [B, n, dim]
                        for a, v in cap.bits(cap.project(cap.pool(cap.pick(res.hidden_states), mask))).items():
                            states[a][rows] = v
                    bar.update(int(lens[rows].sum()))
            forward += time.perf_counter() - t
            p = torch.softmax(torch.from_numpy(logits).double(), -1)
            ent = float(-(p * torch.log(p.clamp_min(1e-300))).sum())
            stats = {"n_positions": len(lens), "sum_tail_mass": 0.0, "sum_entropy": ent, "forward_seconds": time.perf_counter() - t,
                     "wall_seconds": time.perf_counter() - t_shard, "lm_head": "classifier",
                     "config_hash": config_hash(model.config), "model_type": getattr(model.config, "model_type", None),
                     "model_vocab_size": int(getattr(model.config, "vocab_size", V) or V),
                     "n_parameters": int(sum(p.numel() for p in model.parameters()))}
            pw.write(j, part, {"logits": logits, **states}, {"stats": stats})
    del model
    return forward


def _n(pw: PartWriter, j: int) -> int:
    return int(pw.committed(j, layout.INPUTS)["n_sequences"])
