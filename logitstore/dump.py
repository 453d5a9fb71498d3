"""``logitstore dump``: run teachers once over a corpus and write their top-k distributions.

Work is committed part by part (the shared ``inputs`` of a shard, then one part per teacher), so a
re-run of the same command after a crash skips what was committed and ends with the same content
as an uninterrupted run. Teachers run one at a time, so only one is ever resident on the device.
Under ``torchrun`` (``WORLD_SIZE`` = W > 1) rank ``r`` writes shards ``r, r + W, ...``; rank 0 writes
the plan before the others start and the manifest after every rank has finished. A rank that
crashed resumes its own shards when the command is run again (with any number of processes:
what is committed is skipped, whoever owns it now).
"""

from __future__ import annotations

import gc
import json
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import torch

from . import __version__, layout
from .codec import ENCODINGS, SCALARS, Encoding
from .data import BOS_MODES, adds_bos, describe_source, load_texts, pack, resolve_bos
from .distributed import Ranks, barrier, process_group, rank_device, ranks_from_env
from .errors import ConfigError, FormatError, LogitStoreError
from .fsio import StoreFS
from .lock import LOCK, store_lock
from .hashing import sequence_hashes, tokenizer_fingerprint
from .manifest import FORMAT_NAME, FORMAT_VERSION, MANIFEST, PLAN, dumps, parse_manifest, validate_manifest
from .progress import progress_bar
from .teacher import DTYPES, TeacherRunner, TeacherSpec, model_identity, position_limit, resolve_device
from .writer import BackgroundWriter, PartWriter

SHARD_TOKENS = 1 << 18
CHUNK_TOKENS = 1 << 15


@dataclass(frozen=True)
class DumpConfig:
    """Everything ``logitstore dump`` needs. ``teachers`` entries are ``[NAME=]PATH_OR_ID``."""

    teachers: tuple[str, ...]
    data: str
    out: str
    top_k: int = 64
    seq_len: int = 512
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "auto"
    format: str = "zarr"
    encoding: str = "compact"
    max_tokens: int | None = None
    text_field: str = "text"
    pack: bool = True
    shard_sequences: int | None = None
    trust_remote_code: bool = False
    progress: bool = True
    #: start each document with BOS: ``auto`` (if the tokenizer adds one itself), ``always``, ``never``
    bos: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "teachers", tuple(self.teachers))
        if not self.teachers:
            raise ConfigError("--teacher: at least one teacher is required")
        if not isinstance(self.top_k, int) or self.top_k <= 0:
            raise ConfigError(f"--top-k: expected a positive integer, got {self.top_k}")
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
        if self.dtype not in ("auto", *DTYPES):
            raise ConfigError(f"--dtype: expected auto, {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise ConfigError(f"--max-tokens: expected a positive integer, got {self.max_tokens}")
        if self.shard_sequences is not None and self.shard_sequences <= 0:
            raise ConfigError(f"--shard-sequences: expected a positive integer, got {self.shard_sequences}")
        if self.bos not in BOS_MODES:
            raise ConfigError(f"--bos: expected one of {', '.join(BOS_MODES)}, got {self.bos!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DumpConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"dump config: unknown keys {sorted(unknown)}")
        return cls(**d)


@dataclass
class DumpResult:
    manifest: dict
    wall_seconds: float
    forward_seconds: float
    tokens_this_run: int
    resumed_parts: int = 0
    summary: dict = field(default_factory=dict)
    #: wall time of the teacher loop and writes, without model loading or corpus preparation
    pipeline_seconds: float = 0.0


def _log(cfg: DumpConfig, msg: str) -> None:
    if cfg.progress:
        print(msg, flush=True)


def dump(cfg: DumpConfig, ranks: Ranks | None = None) -> DumpResult:
    """Run the dump described by ``cfg``; return the manifest and timings. Idempotent.

    ``ranks``: this process's place among several (default: from ``torchrun``'s environment). With
    more than one, a gloo process group is set up for the barriers unless one exists already. Only
    rank 0's result holds the manifest."""
    ranks = ranks or ranks_from_env()
    if ranks.distributed and not ranks.is_main:
        cfg = replace(cfg, progress=False)  # one progress bar and summary, from rank 0
    with process_group(ranks):
        return _dump(cfg, ranks)


def _dump(cfg: DumpConfig, ranks: Ranks) -> DumpResult:
    rank, world_size = ranks.rank, ranks.world_size
    t_start = time.perf_counter()
    specs = [TeacherSpec.parse(t, trust_remote_code=cfg.trust_remote_code) for t in cfg.teachers]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"--teacher: duplicate teacher names {names}; name them with NAME=PATH")

    # Everything that can fail cheaply fails before any teacher runs.
    tokenizers = [s.load_tokenizer() for s in specs]
    fps = [tokenizer_fingerprint(t) for t in tokenizers]
    for s, fp in zip(specs[1:], fps[1:]):
        if fp != fps[0]:
            raise ConfigError(f"--teacher {s.source}: tokenizer differs from {specs[0].source}'s (fingerprints {fp[:12]} vs {fps[0][:12]}); all teachers in one store must share a tokenizer")
    tok = tokenizers[0]
    if cfg.bos == "auto":
        conventions = [adds_bos(t) for t in tokenizers]
        for s, c in zip(specs[1:], conventions[1:]):
            if c != conventions[0]:
                raise ConfigError(f"--teacher {s.source}: its tokenizer {'adds' if c else 'does not add'} a BOS token and "
                                  f"{specs[0].source}'s {'does' if conventions[0] else 'does not'}; choose with --bos always|never")
    bos = resolve_bos(tok, cfg.bos)
    vocab = len(tok)
    if cfg.top_k > vocab:
        raise ConfigError(f"--top-k: {cfg.top_k} is larger than the vocabulary ({vocab} tokens)")
    for s in specs:  # configs only (no weights): a too-long window fails here, before anything is written
        limit = position_limit(s.load_config())
        if limit is not None and cfg.seq_len > limit[0]:
            raise ConfigError(f"--seq-len {cfg.seq_len}: teacher {s.name} ({s.source}) takes at most {limit[0]} positions "
                              f"({limit[1]}); use --seq-len {limit[0]} or less")
    device = resolve_device(rank_device(cfg.device, ranks))
    dtype_name = cfg.dtype if cfg.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    dtype = DTYPES[dtype_name]

    texts = load_texts(cfg.data, cfg.text_field)
    packed = pack(tok, texts, cfg.seq_len, packed=cfg.pack, max_tokens=cfg.max_tokens, bos=bos)
    del texts
    n_seq = len(packed.lengths)
    S = cfg.shard_sequences or max(1, math.ceil(SHARD_TOKENS / cfg.seq_len))
    n_shards = math.ceil(n_seq / S)
    encoding = Encoding(cfg.encoding)
    teacher_ids = [{**s.identity(t), "dtype": dtype_name, "k": cfg.top_k, "part": layout.teacher_part(i)}
                   for i, (s, t) in enumerate(zip(specs, tokenizers))]
    plan = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
        "backend": cfg.format, "encoding": encoding.to_dict(),
        "seq_len": cfg.seq_len, "packed": cfg.pack, "bos": bos, "shard_sequences": S,
        "n_sequences": n_seq, "n_tokens": packed.n_tokens,
        "tokenizer": {"fingerprint": fps[0], "vocab_size": vocab, "eos_token_id": tok.eos_token_id,
                      "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id},
        "data": {"fingerprint": packed.fingerprint(), "source": describe_source(cfg.data, cfg.text_field),
                 "max_tokens": cfg.max_tokens},
        "teachers": teacher_ids,
    }
    fs = StoreFS(cfg.out)
    if rank == 0:
        refuse_foreign(fs, cfg.out)  # before a lock file is put into someone else's directory
    with store_lock(fs, cfg.out, "dump", enabled=rank == 0):  # one writer per store (logitstore/lock.py)
        return _write_store(cfg, ranks, fs, plan, t_start, specs, teacher_ids, packed, S, n_shards, encoding, vocab,
                            device, dtype)


def _write_store(cfg: DumpConfig, ranks: Ranks, fs: StoreFS, plan: dict, t_start: float, specs: list, teacher_ids: list,
                 packed, S: int, n_shards: int, encoding: Encoding, vocab: int, device, dtype) -> DumpResult:
    rank, world_size = ranks.rank, ranks.world_size
    n_seq = len(packed.lengths)
    if rank == 0:
        resumed = check_or_write_plan(fs, plan, cfg.out)
    barrier(ranks)  # the other ranks check the plan rank 0 wrote (or found)
    if rank != 0:
        resumed = check_or_write_plan(fs, plan, cfg.out)
    if fs.exists(MANIFEST):
        manifest = parse_manifest(fs.read(MANIFEST), f"{cfg.out}/{MANIFEST}")
        _log(cfg, f"{cfg.out}: already complete ({manifest['n_tokens']:,} tokens); nothing to do")
        return DumpResult(manifest, time.perf_counter() - t_start, 0.0, 0, summary=summarize(manifest))

    pw = PartWriter(fs, cfg.format, chunk_rows=max(1, CHUNK_TOKENS // cfg.seq_len))
    mine = list(range(rank, n_shards, world_size))
    bg = BackgroundWriter(depth=2)
    t_pipeline = time.perf_counter()
    load_seconds = 0.0
    forward_total = 0.0
    tokens_run = 0
    skipped = 0
    try:
        for j in mine:
            pw.clean_debris(j)
            if pw.committed(j, layout.INPUTS):
                skipped += 1
                continue
            a, b = j * S, min(n_seq, (j + 1) * S)
            ids, lens = packed.input_ids[a:b], packed.lengths[a:b]
            arrays = {"input_ids": ids, "length": lens, "seq_hash": sequence_hashes(ids, lens)}
            bg.submit(lambda j=j, arrays=arrays, a=a, lens=lens: pw.write(
                j, layout.INPUTS, arrays, {"start": a, "n_sequences": len(lens), "n_tokens": int(lens.sum())}))
        for ti, (spec, ident) in enumerate(zip(specs, teacher_ids)):
            part = ident["part"]
            todo = [j for j in mine if not pw.committed(j, part)]
            skipped += len(mine) - len(todo)
            if not todo:
                continue
            t_load = time.perf_counter()
            model = spec.load_model(device, dtype)
            runner = TeacherRunner(model, vocab, cfg.top_k)
            load_seconds += time.perf_counter() - t_load
            mid = model_identity(model, dtype)
            total = sum(int(packed.lengths[j * S:(j + 1) * S].sum()) for j in todo)
            with progress_bar(total, f"{spec.name}", enabled=cfg.progress) as bar:
                for j in todo:
                    t_shard = time.perf_counter()
                    fwd0 = runner.forward_seconds
                    a, b = j * S, min(n_seq, (j + 1) * S)
                    res = _run_shard(runner, packed.input_ids[a:b], packed.lengths[a:b], cfg.batch_size, bar)
                    lens = packed.lengths[a:b]
                    valid = np.arange(cfg.seq_len)[None, :] < lens[:, None]
                    stats = {"n_positions": int(valid.sum()), "sum_tail_mass": float(res["tail_mass"][valid].sum(dtype=np.float64)),
                             "sum_entropy": float(res["entropy"][valid].sum(dtype=np.float64)),
                             "forward_seconds": runner.forward_seconds - fwd0, "wall_seconds": time.perf_counter() - t_shard,
                             **mid}
                    bg.submit(lambda j=j, res=res, part=part, stats=stats: _write_teacher_part(pw, encoding, vocab, j, part, res, stats))
                    tokens_run += int(lens.sum())
            forward_total += runner.forward_seconds
            del model, runner
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        bg.close()
    except BaseException:
        bg.abort()
        raise
    barrier(ranks)  # every rank's parts are committed before rank 0 collects them
    if rank != 0:
        return DumpResult({}, time.perf_counter() - t_start, forward_total, tokens_run, skipped,
                          pipeline_seconds=time.perf_counter() - t_pipeline - load_seconds)
    manifest = build_manifest(fs, plan, n_shards, cfg)
    fs.write_atomic(MANIFEST, dumps(manifest))
    wall = time.perf_counter() - t_start
    pipeline = time.perf_counter() - t_pipeline - load_seconds
    result = DumpResult(manifest, wall, forward_total, tokens_run, skipped, summarize(manifest), pipeline)
    if resumed and skipped:
        _log(cfg, f"resumed: {skipped} committed part(s) reused")
    _log(cfg, format_summary(result))
    return result


def check_or_write_plan(fs: StoreFS, plan: dict, out: str) -> bool:
    """Refuse to mix settings in one store; return True if the store was already started."""
    if fs.exists(PLAN):
        try:
            old = json.loads(fs.read(PLAN))
        except ValueError:
            raise FormatError(f"{out}/{PLAN}: not valid JSON; remove the store or choose another --out") from None
        if isinstance(old, dict):  # a plan written before "bos" existed holds no BOS
            old, plan = {"bos": False, **old}, {"bos": False, **plan}
        if old != plan:
            diff = plan_differences(old, plan)
            hint = f" (it was dumped with --bos {'always' if old.get('bos') else 'never'})" if old.get("bos") != plan.get("bos") else ""
            shown = "; ".join(diff[:3]) + (f"; and {len(diff) - 3} more" if len(diff) > 3 else "")
            raise ConfigError(f"--out {out}: holds a store made with different settings ({shown}){hint}; "
                              f"choose another --out or remove it")
        return True
    refuse_foreign(fs, out)
    fs.write_atomic(PLAN, dumps(plan))
    return False


def refuse_foreign(fs: StoreFS, out: str) -> None:
    """Refuse an ``--out`` that holds something other than a (started) store."""
    if not fs.exists(PLAN) and fs.exists() and [n for n in fs.ls("") if n != LOCK]:
        raise ConfigError(f"--out {out}: exists, is not empty and is not a logitstore store; choose another --out")


def plan_differences(old, new, where: str = "") -> list[str]:
    """What differs between two plans, as ``path: old -> new`` (``teachers[0].k: 8 -> 16``)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += plan_differences(old.get(key), new.get(key), f"{where}.{key}" if where else str(key))
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in plan_differences(a, b, f"{where}[{i}]")]
    if old == new:
        return []

    def short(v) -> str:
        r = json.dumps(v) if not isinstance(v, str) else v
        return r if len(r) <= 40 else r[:16] + "..." + r[-8:]

    if isinstance(old, list) and isinstance(new, list):
        return [f"{where}: {len(old)} -> {len(new)} entries"]
    return [f"{where}: {short(old)} -> {short(new)}"]


def _run_shard(runner: TeacherRunner, input_ids: np.ndarray, lengths: np.ndarray, batch_size: int, bar) -> dict:
    n, L = input_ids.shape
    k = runner.k
    out = {"ids": np.zeros((n, L, k), np.int64), "logprobs": np.zeros((n, L, k), np.float32)}
    for s in SCALARS:
        out[s] = np.zeros((n, L), np.float32)
    for s in range(0, n, batch_size):
        r = runner.run(input_ids[s:s + batch_size], lengths[s:s + batch_size])
        for name, v in r.items():
            out[name][s:s + batch_size] = v
        bar.update(int(lengths[s:s + batch_size].sum()))
    return out


def _write_teacher_part(pw: PartWriter, encoding: Encoding, vocab: int, j: int, part: str, res: dict, stats: dict) -> None:
    pw.write(j, part, encode_teacher_part(encoding, vocab, res), {"stats": stats})


def encode_teacher_part(encoding: Encoding, vocab: int, res: dict) -> dict[str, np.ndarray]:
    """The arrays of a teacher part from ``ids``/``logprobs`` [n, L, k] (log-probs descending) and
    ``tail_mass``, ``gold_logprob``, ``entropy`` [n, L]."""
    n, L, k = res["ids"].shape
    scal = {s: res[s].reshape(-1) for s in SCALARS}
    enc = encoding.encode(res["ids"].reshape(n * L, k), res["logprobs"].reshape(n * L, k), scal, vocab)
    return {name: (v if name == "id_order" else v.reshape(n, L, *v.shape[1:])) for name, v in enc.items()}


def build_manifest(fs: StoreFS, plan: dict, n_shards: int, cfg: DumpConfig | None = None) -> dict:
    """Collect every part's commit record into the manifest; fail if any part is missing."""
    shards = []
    agg = {t["part"]: {"n_positions": 0, "sum_tail_mass": 0.0, "sum_entropy": 0.0, "forward_seconds": 0.0, "wall_seconds": 0.0}
           for t in plan["teachers"]}
    model_info: dict = {}
    for j in range(n_shards):
        parts = {}
        for part in [layout.INPUTS] + [t["part"] for t in plan["teachers"]]:
            rel = layout.commit_path(j, part)
            if not fs.exists(rel):
                raise LogitStoreError(f"{cfg.out if cfg else fs.url}: part {layout.part_dir(j, part)} was never committed (a writer is unfinished)")
            rec = json.loads(fs.read(rel))
            parts[part] = {"files": rec["files"]}
            if part == layout.INPUTS:
                start, n, tokens = rec["start"], rec["n_sequences"], rec["n_tokens"]
            else:
                st = rec["stats"]
                for key in agg[part]:
                    agg[part][key] += st[key]
                model_info[part] = {k: st[k] for k in ("config_hash", "model_type", "model_vocab_size", "n_parameters")}
        shards.append({"index": j, "path": layout.shard_dir(j), "start": start, "n_sequences": n, "n_tokens": tokens, "parts": parts})
    teachers = []
    for t in plan["teachers"]:
        a = agg[t["part"]]
        npos = max(a["n_positions"], 1)
        teachers.append({**t, **model_info.get(t["part"], {}),
                         "stats": {"mean_topk_mass": 1.0 - a["sum_tail_mass"] / npos, "mean_entropy": a["sum_entropy"] / npos},
                         "timings": {"forward_seconds": a["forward_seconds"], "wall_seconds": a["wall_seconds"],
                                     "tokens_per_second": a["n_positions"] / a["wall_seconds"] if a["wall_seconds"] else None}})
    total_bytes = sum(m["bytes"] for s in shards for p in s["parts"].values() for m in p["files"].values())
    manifest = {
        **{k: v for k, v in plan.items() if k != "teachers"},
        "created_by": f"logitstore {__version__}",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "teachers": teachers,
        "dump": {k: v for k, v in (cfg.to_dict() if cfg else {}).items() if k not in ("teachers", "out", "progress")},
        "total_bytes": total_bytes,
        "shards": shards,
    }
    return validate_manifest(manifest)


def summarize(manifest: dict) -> dict:
    """Per-store and per-teacher sizes derived from a manifest."""
    tokens = max(manifest["n_tokens"], 1)
    part_bytes: dict[str, int] = {}
    for s in manifest["shards"]:
        for p, meta in s["parts"].items():
            part_bytes[p] = part_bytes.get(p, 0) + sum(f["bytes"] for f in meta["files"].values())
    return {
        "sequences": manifest["n_sequences"], "tokens": manifest["n_tokens"],
        "total_bytes": sum(part_bytes.values()), "bytes_per_token": sum(part_bytes.values()) / tokens,
        "inputs_bytes_per_token": part_bytes.get(layout.INPUTS, 0) / tokens,
        "teachers": {t["name"]: {"k": t["k"], "bytes_per_token": part_bytes.get(t["part"], 0) / tokens, **t["stats"]}
                     for t in manifest["teachers"]},
    }


def format_summary(r: DumpResult) -> str:
    s = r.summary
    share = f"{100 * r.forward_seconds / r.wall_seconds:.0f}%" if r.wall_seconds and r.tokens_this_run else "n/a"
    return (f"dump: {s['tokens']:,} tokens in {s['sequences']:,} sequences, {s['total_bytes'] / 1e6:.2f} MB "
            f"({s['bytes_per_token']:.1f} B/token), wall {r.wall_seconds:.1f}s, teacher forward+top-k {share} of wall"
            + (f", {r.tokens_this_run / r.wall_seconds:,.0f} tokens/s" if r.tokens_this_run and r.wall_seconds else ""))
