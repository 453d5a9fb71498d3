"""``logitstore fuse``: the fused targets of several teachers, written as a single-teacher store.

It runs the trainer's own fusion (:func:`logitstore.distributions.targets.build_targets` + :func:`logitstore.distributions.fusion.fuse`),
so training on the fused store with one teacher gives the targets ``trainer fit --fuse`` would build
on the fly, up to the top-``k`` cut: the fused distribution lives on the union of the teachers' ids
(up to ``sum k_m`` of them) and the new store keeps its ``k`` most probable ids (default: the largest
teacher ``k``) plus the exact rest of the mass as ``tail_mass``. ``entropy`` and ``gold_logprob`` are
those of the fused distribution, under the fusion's reading of each teacher (its tail spread evenly
over the tokens outside its top-k; see :mod:`logitstore.distributions.fusion`).

Teachers may come from one store or from several stores of the same data (equal tokenizer and data
fingerprints, ``seq_len`` and packing; sequences are checked to match by ``seq_hash``).

Temperature: a fused store holds, like any store, log-probs at T = 1 (FORMAT.md), and a trainer
applies its own temperature to whatever it reads. Fusing tempered teachers would store tempered
values that a trainer then tempers a second time, so ``temperatures`` other than 1 are refused.
Tempered fusion is what ``trainer fit`` does on the fly from the teachers' own store(s)
(``--temperature``, or ``teacher_temperatures=[...]`` per teacher); for ``mean-logits`` with one
common temperature, fusing at T = 1 and training at T is the same thing. ``fusion.temperatures`` in
the manifest stays (all 1) for the store id; a store written by an older version with other values
holds the fusion of the tempered teachers.
"""

from __future__ import annotations

import numpy as np
import torch

from logitstore.format import layout
from logitstore.format.codec import SCALARS, Encoding
from logitstore.tools.derive import ShardJob, check_out, header_of, source_ref, write_derived
from logitstore.format.writer import encode_teacher_part
from logitstore.errors import ConfigError, FormatError
from logitstore.format.manifest import teacher_identity, written_version
from logitstore.format.reader import Store

BLOCK_POSITIONS = 1 << 14  # positions fused at once; bounds the [M, N, sum k] working set


def _rows(store: Store, a: int, b: int, names: list[str]) -> dict:
    """Sequences ``a:b`` of ``store`` as one shard-like dict (they may span several shards)."""
    out = []
    j = store.index.locate(a)[0]
    while a < b:
        sh = store.load_shard(j, names)
        s0 = int(store.index.starts[j])
        lo, hi = a - s0, min(b - s0, len(sh["length"]))
        out.append({"seq_hash": sh["seq_hash"][lo:hi], "input_ids": sh["input_ids"][lo:hi], "length": sh["length"][lo:hi],
                    "loss_mask": sh["loss_mask"][lo:hi],
                    "teachers": {n: {k: v[lo:hi] for k, v in sh["teachers"][n].items()} for n in names}})
        a += hi - lo
        j += 1
    if len(out) == 1:
        return out[0]
    return {"seq_hash": np.concatenate([o["seq_hash"] for o in out]), "input_ids": np.concatenate([o["input_ids"] for o in out]),
            "length": np.concatenate([o["length"] for o in out]), "loss_mask": np.concatenate([o["loss_mask"] for o in out]),
            "teachers": {n: {k: np.concatenate([o["teachers"][n][k] for o in out]) for k in out[0]["teachers"][n]} for n in names}}


def fuse_positions(teachers: list[dict], next_ids: np.ndarray, vocab: int, k: int, *, weights: list[float],
                   temperatures: list[float], mode: str) -> dict[str, np.ndarray]:
    """Fuse ``N`` positions. ``teachers``: per teacher ``ids``, ``logprobs`` [N, k_m], ``tail_mass`` [N];
    ``next_ids`` [N] the actual next token (negative: none). Returns ``ids``, ``logprobs`` [N, k]
    (descending) and ``tail_mass``, ``entropy``, ``gold_logprob`` [N] of the fused distribution."""
    from logitstore.distributions.fusion import fuse
    from logitstore.distributions.targets import build_targets

    f = build_targets(teachers, vocab)
    t = {name: torch.from_numpy(v) for name, v in f.items()}
    tgt = fuse(t["teacher_lp"], t["rest_lp"], t["support"], t["valid"], t["n_out"],
               temperatures=temperatures, weights=weights, mode=mode)
    lp = tgt.lp.double()
    top_lp, top_at = torch.topk(lp, k, dim=-1)  # invalid entries are -inf, so never chosen before valid ones
    ids = torch.gather(tgt.support, 1, top_at)
    p = torch.where(tgt.valid, lp.exp(), torch.zeros_like(lp))
    chosen = torch.zeros_like(tgt.valid).scatter_(1, top_at, True)
    out_p = tgt.out_lp.double().exp()
    tail = (p * ~chosen).sum(-1) + out_p  # the rest of the mass, summed directly (no 1 - x cancellation)
    log_n = torch.log(tgt.n_out.double().clamp(min=1))
    out_each = tgt.out_lp.double() - log_n  # log-prob of one off-support token
    plogp = torch.where(tgt.valid & (p > 0), p * lp, torch.zeros_like(lp)).sum(-1)
    entropy = -plogp - torch.where(out_p > 0, out_p * out_each, torch.zeros_like(out_p))
    nxt = torch.from_numpy(next_ids.astype(np.int64))
    hit = (tgt.support == nxt[:, None]) & tgt.valid
    gold = torch.where(hit.any(-1), torch.where(hit, lp, torch.zeros_like(lp)).sum(-1), out_each)
    gold = torch.where(nxt >= 0, gold, torch.zeros_like(gold))
    return {"ids": ids.numpy(), "logprobs": top_lp.float().numpy(), "tail_mass": tail.float().numpy(),
            "entropy": entropy.clamp(min=0).float().numpy(), "gold_logprob": gold.clamp(max=0).float().numpy()}


def _refuse_adaptive(chosen: list) -> None:
    adaptive = [t["name"] for _, t in chosen if "top_p" in t or "sampled" in t]
    if adaptive:
        raise ConfigError(f"fuse: teacher(s) {', '.join(adaptive)} have adaptive k (--top-p) or sampled targets (--targets); "
                          f"fusing them into a store is not supported yet: train from the teachers' stores with trainer fit, "
                          f"which fuses them per batch")


def fuse_store(sources: list[str], out: str, *, teachers: list[str] | None = None, weights: list[float] | None = None,
               temperatures: list[float] | None = None, mode: str = "mean-probs", top_k: int | None = None,
               name: str = "fused", progress: bool = True) -> dict:
    """Fuse the teachers of ``sources`` (all of them, or those named in ``teachers``) into a new
    single-teacher store at ``out``; return its manifest."""
    from logitstore.distributions.fusion import MODES, normalize_weights

    if mode not in MODES:
        raise ConfigError(f"--mode: expected one of {', '.join(MODES)}, got {mode!r}")
    stores = [Store(u) for u in sources]
    for st in stores:
        if st.task != "lm":
            raise ConfigError(f"{st.url}: a {st.task} store: its teachers' class logits are fused when training, "
                              "not into a store")
    first = stores[0]
    m0 = first.manifest
    for s in stores[1:]:
        for key in ("seq_len", "packed", "n_sequences"):
            if s.manifest[key] != m0[key]:
                raise ConfigError(f"{s.url}: {key} differs from {first.url}'s; fused teachers must cover the same data")
        if s.manifest["tokenizer"]["fingerprint"] != m0["tokenizer"]["fingerprint"]:
            raise ConfigError(f"{s.url}: tokenizer differs from {first.url}'s; teachers can be fused only over one vocabulary")
        if s.manifest["data"]["fingerprint"] != m0["data"]["fingerprint"]:
            raise ConfigError(f"{s.url}: holds different data from {first.url} (data fingerprints differ)")
    chosen: list[tuple[Store, dict]] = [(s, t) for s in stores for t in s.manifest["teachers"]]
    if teachers:
        by_name = {}
        for s, t in chosen:
            by_name.setdefault(t["name"], (s, t))
        missing = [n for n in teachers if n not in by_name]
        if missing:
            raise ConfigError(f"--teacher: no teacher {missing[0]!r} in {', '.join(sources)} (teachers: {', '.join(by_name)})")
        chosen = [by_name[n] for n in teachers]
    if len(chosen) < 2:
        raise ConfigError("fuse: needs at least two teachers")
    _refuse_adaptive(chosen)
    try:
        w = normalize_weights(weights, len(chosen))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    temps = [1.0] * len(chosen) if temperatures is None else [float(x) for x in temperatures]
    if len(temps) != len(chosen) or any(not x > 0 for x in temps):
        raise ConfigError(f"--temperature: expected {len(chosen)} positive value(s), got {temps}")
    if any(x != 1.0 for x in temps):
        raise ConfigError(f"--temperature {','.join(f'{x:g}' for x in temps)}: a store holds T = 1 log-probs and the trainer applies "
                          "its own temperature, so fuse writes untempered targets only; train from the teachers' store with "
                          "trainer fit --temperature (or teacher_temperatures=[...]) for tempered fusion")
    k = top_k or max(t["k"] for _, t in chosen)
    vocab = first.vocab_size
    if not 1 <= k <= max(t["k"] for _, t in chosen):
        raise ConfigError(f"--top-k: expected 1..{max(t['k'] for _, t in chosen)} (the largest teacher k), got {k}")
    check_out(out, sources)
    fusion = {"mode": mode, "weights": w, "temperatures": temps,
              "teachers": [{"name": t["name"], "store": source_ref(s.url, s.manifest)["id"], **teacher_identity(t)} for s, t in chosen]}
    teacher = {"name": name, "part": layout.teacher_part(0), "source": "fused:" + "+".join(t["name"] for _, t in chosen),
               "revision": None, "weights_hash": None, "tokenizer_fingerprint": m0["tokenizer"]["fingerprint"],
               "dtype": "fp32", "k": k, "config_hash": None, "model_type": "fused", "model_vocab_size": vocab,
               "n_parameters": None, "fusion": fusion, "stats": {"mean_topk_mass": 0.0, "mean_entropy": 0.0}, "timings": {}}
    header = {**header_of(m0), "teachers": [teacher],
              "derived": {"op": "fuse", "sources": [source_ref(s.url, s.manifest) for s in stores]}}
    encoding = Encoding.from_dict(m0["encoding"])

    def produce(part: str, j: int):
        if part == layout.INPUTS:
            if first.format_version == written_version(first.manifest) and first.manifest["backend"] == header["backend"]:
                return "files", first.part_files(j, layout.INPUTS), None
            return "arrays", first.read_part(j, layout.INPUTS), None
        a, b = int(first.index.starts[j]), int(first.index.starts[j] + first.index.sizes[j])
        rows = {id(s): _rows(s, a, b, [t["name"] for s2, t in chosen if s2 is s]) for s in stores}
        base = rows[id(first)]
        for s in stores[1:]:
            if not np.array_equal(rows[id(s)]["seq_hash"], base["seq_hash"]):
                raise FormatError(f"{s.url}: sequences {a}..{b} differ from {first.url}'s (seq_hash); the stores do not hold the same data")
        return "arrays", *_fuse_rows(base, [rows[id(s)]["teachers"][t["name"]] for s, t in chosen], vocab, k, w, temps, mode, encoding,
                                     first.index.trained_only)

    ix = first.index
    jobs = [ShardJob(int(ix.starts[j]), int(ix.sizes[j]), int(ix.tokens[j]), lambda part, j=j: produce(part, j)) for j in range(len(ix))]
    return write_derived(out, header, jobs, progress=progress, desc="fuse")


def _fuse_rows(base: dict, tds: list[dict], vocab: int, k: int, w, temps, mode, encoding: Encoding, trained_only: bool = False):
    n, L = base["input_ids"].shape
    real = np.arange(L)[None, :] < base["length"][:, None]  # [n, L]
    valid = np.asarray(base["loss_mask"]) if trained_only else real  # a trained-only store has targets there alone
    nxt = np.full((n, L), -1, np.int64)
    nxt[:, :-1] = base["input_ids"][:, 1:]
    nxt[~np.concatenate([real[:, 1:], np.zeros((n, 1), bool)], axis=1)] = -1  # no next token at a window's end
    flat_idx = np.flatnonzero(valid.ravel())
    res = {"ids": np.zeros((n * L, k), np.int64), "logprobs": np.zeros((n * L, k), np.float32)}
    for s in SCALARS:
        res[s] = np.zeros(n * L, np.float32)
    for s0 in range(0, flat_idx.size, BLOCK_POSITIONS):
        at = flat_idx[s0:s0 + BLOCK_POSITIONS]
        ts = [{key: td[key].reshape(n * L, *td[key].shape[2:])[at] for key in ("ids", "logprobs", "tail_mass")} for td in tds]
        r = fuse_positions(ts, nxt.ravel()[at], vocab, k, weights=w, temperatures=temps, mode=mode)
        for key, v in r.items():
            res[key][at] = v
    stats = {"n_positions": int(flat_idx.size), "sum_tail_mass": float(res["tail_mass"].sum(dtype=np.float64)),
             "sum_entropy": float(res["entropy"].sum(dtype=np.float64))}
    res = {key: v.reshape(n, L, *v.shape[1:]) for key, v in res.items()}
    return encode_teacher_part(encoding, vocab, res, valid if trained_only else None), stats
