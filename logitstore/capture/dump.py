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
import math
import time
import warnings
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from logitstore.format import layout
from logitstore.format.codec import SCALARS, Encoding
from logitstore.capture.adaptive import truncate_top_p
from logitstore.capture.sampled_targets import Sampler
from logitstore.capture.corpus import adds_bos, resolve_bos
from logitstore.capture.config import DumpConfig, optional_inputs, source_for, window_spec
from logitstore.capture.placement import Parallel, device_map_kwargs, output_device, parse_device_map, parse_max_memory, tp_kwargs
from logitstore.capture.ranks import (Ranks, any_rank_has_work, barrier, process_group, rank_device, ranks_from_env,
                                     share_from_group, share_from_rank0, tp_groups)
from logitstore.capture.shard_inputs import ShardInputs, corpus_plan, record_corpus_plan
from logitstore.capture.windows import CorpusPlan, ShardWindows
from logitstore.errors import ConfigError
from logitstore.storage.fsio import StoreFS
from logitstore.storage.lock import store_lock
from logitstore.format.hashing import tokenizer_fingerprint
from logitstore.format.commit import CHUNK_TOKENS, build_manifest, check_or_write_plan, refuse_foreign, summarize
from logitstore.capture.hidden import HiddenCapture, hidden_entry
from logitstore.format.manifest import FORMAT_NAME, FORMAT_VERSION, MANIFEST, dumps, parse_manifest, written_version
from logitstore.progress import progress_bar
from logitstore.capture.teacher import DTYPES, TeacherRunner, TeacherSpec, model_identity, position_limit, resolve_device
from logitstore.format.decode import position_ids
from logitstore.format.writer import BackgroundWriter, PartWriter, encode_teacher_part

#: default shard size in tokens (``--shard-sequences`` = this / ``seq_len``): at k = 64 a teacher part
#: is ~55 MB and decodes to 210-275 MB (16- or 32-bit ids), and 10^10 tokens are ~19k shards, ~76k objects
#: with one teacher (two data files and two commit records per shard). Larger shards: fewer objects, more
#: memory per loader worker and coarser rank-local reading; see README "Caches at scale".
SHARD_TOKENS = 1 << 19


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
    Parallel(ranks.rank, ranks.world_size, cfg.tp)  # --tp must divide the world before anything starts
    if cfg.tp > 1 and not ranks.distributed:
        raise ConfigError(f"--tp {cfg.tp}: start the dump with torchrun --nproc-per-node {cfg.tp} (or a multiple)")
    if cfg.tp > 1 and ranks.local_world_size % cfg.tp and ranks.is_main:
        warnings.warn(f"--tp {cfg.tp} does not divide the {ranks.local_world_size} processes per node: tensor-parallel "
                      "groups span nodes, and every layer's all-reduce crosses the network", RuntimeWarning, stacklevel=2)
    if ranks.distributed and not ranks.is_main:
        cfg = replace(cfg, progress=False)  # one progress bar and summary, from rank 0
    # tensor parallelism on GPUs needs NCCL for its collectives; barriers stay on gloo
    backend = "cpu:gloo,cuda:nccl" if cfg.tp > 1 and torch.cuda.is_available() and cfg.device != "cpu" else "gloo"
    with process_group(ranks, backend=backend):
        return _dump(cfg, ranks)


def _dump(cfg: DumpConfig, ranks: Ranks) -> DumpResult:
    rank = ranks.rank
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
    if cfg.task == "classify":
        return _classify(cfg, ranks, specs, tokenizers, fps[0])
    source = source_for(cfg, tok)
    if source.kind != "text":  # the template or the user's own rows decide the special tokens
        if cfg.bos == "always":
            raise ConfigError(f"--bos always: rows of {source.kind} are used as the "
                              f"{'chat template renders them' if source.kind == 'messages' else 'user tokenised them'}")
    elif cfg.bos == "auto":
        conventions = [adds_bos(t) for t in tokenizers]
        for s, c in zip(specs[1:], conventions[1:]):
            if c != conventions[0]:
                raise ConfigError(f"--teacher {s.source}: its tokenizer {'adds' if c else 'does not add'} a BOS token and "
                                  f"{specs[0].source}'s {'does' if conventions[0] else 'does not'}; choose with --bos always|never")
    bos = resolve_bos(tok, cfg.bos) if source.kind == "text" else False
    vocab = len(tok)
    if cfg.top_k > vocab:
        raise ConfigError(f"--top-k: {cfg.top_k} is larger than the vocabulary ({vocab} tokens)")
    for s in specs:  # configs only (no weights): a too-long window fails here, before anything is written
        limit = position_limit(s.load_config())
        if limit is not None and cfg.seq_len > limit[0]:
            raise ConfigError(f"--seq-len {cfg.seq_len}: teacher {s.name} ({s.source}) takes at most {limit[0]} positions "
                              f"({limit[1]}); use --seq-len {limit[0]} or less")
    device, dtype_name, dtype = _device_and_dtype(cfg, ranks)

    S = cfg.shard_sequences or max(1, math.ceil(SHARD_TOKENS / cfg.seq_len))
    wspec = window_spec(cfg, source, bos, S)
    fs = StoreFS(cfg.out)

    def planned() -> dict:  # rank 0 only: hashing and tokenising the corpus once, not once per rank
        key = {"source": source.describe(), "tokenizer": fps[0], "window": asdict(wspec)}
        plan, reused = corpus_plan(fs, cfg.out, tok, source, wspec, key, cfg.progress)
        return {"key": key, "plan": plan, "reused": reused}

    shared = share_from_rank0(ranks, planned)
    corpus, described = CorpusPlan.from_dict(shared["plan"]), shared["key"]["source"]
    new_plan_key = None if shared["reused"] else shared["key"]  # a plan to record in the store
    n_seq = corpus.n_sequences
    encoding = Encoding(cfg.encoding, value_bits=cfg.value_bits, codebook=cfg.codebook)
    adaptive = version4_fields(cfg)
    teacher_ids = [{**s.identity(t), "dtype": dtype_name, "k": cfg.top_k, **adaptive, "part": layout.teacher_part(i)} for i, (s, t) in enumerate(zip(specs, tokenizers))]
    for s, t in zip(specs, teacher_ids):  # --hidden-layers: checked against each teacher's config (logitstore/capture/hidden.py)
        entry = hidden_entry(cfg, s.load_config(), s.source, "lm")
        if entry is not None:
            t["hidden"] = entry
    plan = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
        "backend": cfg.format, "encoding": encoding.to_dict(),
        "seq_len": cfg.seq_len, "packed": wspec.packed, "bos": bos, "shard_sequences": S,
        "n_sequences": n_seq, "n_tokens": corpus.n_tokens,
        "tokenizer": {"fingerprint": fps[0], "vocab_size": vocab, "eos_token_id": tok.eos_token_id,
                      "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id},
        "data": {"fingerprint": corpus.fingerprint, "source": described,
                 "max_tokens": cfg.max_tokens},
        "teachers": teacher_ids,
    }
    optional = optional_inputs(wspec)
    if optional or cfg.hidden_layers or adaptive:  # format version 3 (4 with adaptive k) (FORMAT.md): per-token inputs, targets at trained positions only, hidden states
        plan.update({"inputs": list(optional), "targets": "trained" if wspec.masked else "all"})
    plan["format_version"] = written_version(plan)
    if rank == 0:
        refuse_foreign(fs, cfg.out)  # before a lock file is put into someone else's directory
    with store_lock(fs, cfg.out, "dump", enabled=rank == 0):  # one writer per store (logitstore/storage/lock.py)
        windows = ShardWindows(tok, source, wspec, corpus)
        return _write_store(cfg, ranks, fs, plan, t_start, specs, teacher_ids, corpus, windows, encoding, vocab, device, dtype,
                            new_plan_key)


def _device_and_dtype(cfg: DumpConfig, ranks: Ranks) -> tuple[torch.device, str, torch.dtype]:
    """This rank's device and the teachers' dtype (``--dtype auto``: bf16 on CUDA, fp32 on CPU)."""
    device = resolve_device(rank_device(cfg.device, ranks))
    on_gpu = device.type == "cuda" or (bool(cfg.device_map) and torch.cuda.is_available())
    dtype_name = cfg.dtype if cfg.dtype != "auto" else ("bf16" if on_gpu else "fp32")
    return device, dtype_name, DTYPES[dtype_name]


def _classify(cfg: DumpConfig, ranks: Ranks, specs: list, tokenizers: list, fingerprint: str) -> DumpResult:
    from logitstore.capture.classify import dump_classify

    if ranks.distributed:
        raise ConfigError("--task classify: runs in one process (start it without torchrun)")
    result = dump_classify(cfg, specs, tokenizers, fingerprint, *_device_and_dtype(cfg, ranks))
    _log(cfg, format_summary(result))
    return result


def _summary(out: str, manifest: dict) -> dict:
    from logitstore.format.reader import Store

    return summarize(manifest, Store(out).index.part_bytes())


def _write_store(cfg: DumpConfig, ranks: Ranks, fs: StoreFS, plan: dict, t_start: float, specs: list, teacher_ids: list,
                 corpus: CorpusPlan, windows: ShardWindows, encoding: Encoding, vocab: int, device, dtype,
                 new_plan_key: dict | None) -> DumpResult:
    rank = ranks.rank
    par = Parallel(rank, ranks.world_size, cfg.tp)
    if rank == 0:
        resumed = check_or_write_plan(fs, plan, cfg.out)
        if new_plan_key is not None:
            record_corpus_plan(fs, new_plan_key, corpus)
    barrier(ranks)  # the other ranks check the plan rank 0 wrote (or found)
    if rank != 0:
        resumed = check_or_write_plan(fs, plan, cfg.out)
    if fs.exists(MANIFEST):
        manifest = parse_manifest(fs.read(MANIFEST), f"{cfg.out}/{MANIFEST}")
        _log(cfg, f"{cfg.out}: already complete ({manifest['n_tokens']:,} tokens); nothing to do")
        return DumpResult(manifest, time.perf_counter() - t_start, 0.0, 0, summary=_summary(cfg.out, manifest))

    pw = PartWriter(fs, cfg.format, chunk_rows=max(1, CHUNK_TOKENS // cfg.seq_len))
    mine = par.shards(corpus.n_shards)
    inputs = ShardInputs(pw, windows, corpus, cfg.seq_len, vocab, write=par.writer, optional=tuple(plan.get("inputs", ())))
    groups = tp_groups(ranks, par)
    if par.writer:
        for j in mine:  # temporary directories a crashed writer left behind
            pw.clean_debris(j)
    bg = BackgroundWriter(depth=2)
    t_pipeline = time.perf_counter()
    load_seconds = 0.0
    forward_total = 0.0
    tokens_run = 0
    skipped = 0
    try:
        for i, (spec, ident) in enumerate(zip(specs, teacher_ids)):
            if i:
                bg.flush()  # the inputs queued in the first pass are committed: later passes read them back
            # the group's writer decides what is left, so every rank of a tensor-parallel group runs the same shards
            todo = share_from_group(par, groups, lambda: [j for j in mine if not pw.committed(j, ident["part"])])
            skipped += len(mine) - len(todo)
            # loading a tensor-parallel teacher builds its device mesh, a collective of every rank: a
            # group with nothing left loads it too, runs nothing and unloads it (every rank asks)
            if (any_rank_has_work(len(todo)) if par.tp > 1 else bool(todo)):
                t = _run_teacher(cfg, spec, ident["part"], todo, pw, bg, inputs, par, ranks, encoding, vocab, device, dtype,
                                 ident.get("hidden"))
                load_seconds, forward_total, tokens_run = load_seconds + t[0], forward_total + t[1], tokens_run + t[2]
        if par.writer:
            skipped += inputs.write_missing(mine, bg)  # inputs of shards no teacher needed to run
        bg.close()
    except BaseException:
        bg.abort()
        raise
    barrier(ranks)  # every rank's parts are committed before rank 0 collects them
    if rank != 0:
        return DumpResult({}, time.perf_counter() - t_start, forward_total, tokens_run, skipped,
                          pipeline_seconds=time.perf_counter() - t_pipeline - load_seconds)
    manifest = build_manifest(fs, plan, corpus.n_shards, cfg.to_dict())
    fs.write_atomic(MANIFEST, dumps(manifest))
    wall = time.perf_counter() - t_start
    pipeline = time.perf_counter() - t_pipeline - load_seconds
    result = DumpResult(manifest, wall, forward_total, tokens_run, skipped, _summary(cfg.out, manifest), pipeline)
    if resumed and skipped:
        _log(cfg, f"resumed: {skipped} committed part(s) reused")
    _log(cfg, format_summary(result))
    return result


def _run_teacher(cfg: DumpConfig, spec: TeacherSpec, part: str, todo: list[int], pw: PartWriter, bg: BackgroundWriter,
                 inputs: ShardInputs, par: Parallel, ranks: Ranks, encoding: Encoding, vocab: int, device,
                 dtype, hidden: dict | None = None) -> tuple[float, float, int]:
    """Load one teacher, run it over shards ``todo`` and queue their parts (a group's writer only);
    unload it (only one teacher is resident at a time). ``hidden``: its manifest ``hidden`` entry
    (--hidden-layers). Returns (load seconds, forward seconds, tokens run)."""
    t_load = time.perf_counter()
    model = spec.load_model(device, dtype, _placement(cfg, par, ranks))
    smp = sampler(cfg)
    runner = TeacherRunner(model, vocab, cfg.top_k, capture=HiddenCapture(hidden, output_device(model)) if hidden else None,
                           sampler=None if smp is None else replace(smp, salt=part))
    absent = bool(version4_fields(cfg))  # adaptive k and sampled targets hold absent entries
    load_seconds = time.perf_counter() - t_load
    mid = model_identity(model, dtype)
    tokens_run = 0
    total = sum(inputs.corpus.tokens[j] for j in todo)
    with progress_bar(total, f"{spec.name}", enabled=cfg.progress) as bar:
        for j in todo:
            t_shard = time.perf_counter()
            fwd0 = runner.forward_seconds
            arrays = inputs.get(j, bg)
            ids, lens = arrays["input_ids"], arrays["length"]
            pos = position_ids(arrays["doc_start"].astype(bool)) if "doc_start" in arrays else None
            res = _run_shard(runner, ids, lens, cfg.batch_size, bar, pos)
            trained = arrays["loss_mask"].astype(bool) if "loss_mask" in arrays else None
            valid = trained if trained is not None else np.arange(cfg.seq_len)[None, :] < lens[:, None]
            if cfg.top_p is not None:  # adaptive k: the tail takes what the dropped entries held
                res = truncate_top_p(res, cfg.top_p, cfg.min_k, valid)
            stats = {"n_positions": int(valid.sum()), "sum_tail_mass": float(res["tail_mass"][valid].sum(dtype=np.float64)),
                     **({"sum_entries": int(res.pop("n_entries")[valid].sum())} if "n_entries" in res else {}),
                     "sum_entropy": float(res["entropy"][valid].sum(dtype=np.float64)),
                     "forward_seconds": runner.forward_seconds - fwd0, "wall_seconds": time.perf_counter() - t_shard,
                     "lm_head": runner.lm_head_path, **mid}
            if par.writer:
                bg.submit(lambda j=j, res=res, stats=stats, trained=trained:
                          _write_teacher_part(pw, encoding, vocab, j, part, res, stats, trained, absent))
            tokens_run += int(lens.sum())
    forward = runner.forward_seconds
    del model, runner
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return load_seconds, forward, tokens_run


def _placement(cfg: DumpConfig, par: Parallel, ranks: Ranks) -> dict | None:
    """``from_pretrained`` arguments that place the teacher (None: one device)."""
    if cfg.tp > 1:
        return tp_kwargs(par)
    if cfg.device_map:
        return device_map_kwargs(parse_device_map(cfg.device_map), parse_max_memory(cfg.max_memory), cfg.offload_folder,
                                 ranks.local_rank, ranks.local_world_size)
    return None


def _run_shard(runner: TeacherRunner, input_ids: np.ndarray, lengths: np.ndarray, batch_size: int, bar,
               position_ids: np.ndarray | None = None) -> dict:
    """Run a shard's windows through the teacher, longest first, each batch cut to its longest
    window (right padding past it is not computed; causal attention makes the kept positions
    independent of it). ``position_ids`` [n, L]: restarting per document (attention then stays
    inside each document). Returns ``[n, L, ...]`` arrays, zero past each window's length."""
    n, L = input_ids.shape
    k = runner.sampler.width(runner.k) if runner.sampler is not None else runner.k  # --targets both: top-k + samples
    out = {"ids": np.zeros((n, L, k), np.int64), "logprobs": np.zeros((n, L, k), np.float32)}
    for s in SCALARS:
        out[s] = np.zeros((n, L), np.float32)
    order = np.argsort(-lengths.astype(np.int64), kind="stable")
    for s in range(0, n, batch_size):
        rows = order[s:s + batch_size]
        width = int(lengths[rows].max())
        r = runner.run(input_ids[rows, :width], lengths[rows], None if position_ids is None else position_ids[rows, :width])
        for name, v in r.items():
            if name not in out:  # hidden_{layer} (--hidden-layers): [n, L, dim] uint16; counts, log_z (--targets)
                out[name] = np.zeros((n, L, *v.shape[2:]), v.dtype)
            out[name][rows, :width] = v
        bar.update(int(lengths[rows].sum()))
    return out


def _write_teacher_part(pw: PartWriter, encoding: Encoding, vocab: int, j: int, part: str, res: dict, stats: dict,
                        trained: np.ndarray | None = None, absent: bool = False) -> None:
    pw.write(j, part, encode_teacher_part(encoding, vocab, res, trained, absent), {"stats": stats})


def version4_fields(cfg: DumpConfig) -> dict:
    """A teacher entry's adaptive-k (``top_p``, ``min_k``) or sampled-target (``sampled``; ``k`` = the
    entries per position) fields (FORMAT.md, "Version 4"); {} for plain top-k."""
    smp = sampler(cfg)
    if smp is not None:
        return {"k": smp.width(cfg.top_k), "sampled": smp.entry(cfg.top_k)}
    return {} if cfg.top_p is None else {"top_p": float(cfg.top_p), "min_k": cfg.min_k}


def sampler(cfg: DumpConfig) -> Sampler | None:
    return None if cfg.targets == "topk" else Sampler(cfg.targets, cfg.samples, cfg.proposal_temperature)


def format_summary(r: DumpResult) -> str:
    s = r.summary
    share = f"{100 * r.forward_seconds / r.wall_seconds:.0f}%" if r.wall_seconds and r.tokens_this_run else "n/a"
    return (f"dump: {s['tokens']:,} tokens in {s['sequences']:,} sequences, {s['total_bytes'] / 1e6:.2f} MB "
            f"({s['bytes_per_token']:.1f} B/token), wall {r.wall_seconds:.1f}s, teacher forward+top-k {share} of wall"
            + (f", {r.tokens_this_run / r.wall_seconds:,.0f} tokens/s" if r.tokens_this_run and r.wall_seconds else ""))
