"""The code teacher: SmolLM2-135M-Instruct fine-tuned once on the bundled Python-stdlib corpus.

    .venv/bin/python tools/train_code_teacher.py [--steps 90] [--force]

A second real teacher for a second domain, sharing teacher A's tokenizer (it *is* teacher A,
fine-tuned), so both fit in one store and can be fused: teacher A stays the better one on prose
(the Python docs), the code teacher is the better one on Python source. It is trained once per
machine (fp32 on CPU, packed 256-token windows of ``data/pystdlib-train.jsonl``, AdamW, linear
warm-up then cosine decay) and cached under ``~/.cache/logitstore/code-teacher-<key>/``
(``save_pretrained`` + tokenizer; the key hashes this script, the data and the settings), written
to a ``.tmp`` directory first and renamed when complete. ``code_teacher_dir()`` is what callers use.

Run as a script it then measures the validation cross-entropy (mean nats per predicted token over
packed 256-token windows, the first ~16k tokens of each split) of the base and the fine-tuned model
on the prose (``pydocs-validation``) and code (``pystdlib-validation``) splits, prints a table and
writes ``tools/results/code_teacher.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import time
from pathlib import Path

from common import DATA_VAL, ROOT, cache_dir, machine, print_table, smollm2_dir, write_json

CODE_TRAIN = ROOT / "data" / "pystdlib-train.jsonl"
CODE_VAL = ROOT / "data" / "pystdlib-validation.jsonl"
SEQ, BATCH, LR, WARMUP, WEIGHT_DECAY = 256, 4, 5e-5, 10, 0.01
EVAL_TOKENS = 16384
STEPS = 90


def _settings(steps: int) -> dict:
    return {"seq_len": SEQ, "batch_size": BATCH, "lr": LR, "warmup": WARMUP, "weight_decay": WEIGHT_DECAY,
            "steps": steps, "schedule": "linear warm-up, cosine to 10%", "dtype": "float32"}


def _key(steps: int) -> str:
    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(CODE_TRAIN.read_bytes())
    h.update(json.dumps(_settings(steps), sort_keys=True).encode())
    return h.hexdigest()[:12]


def _lr(step: int, steps: int) -> float:
    """Linear warm-up over ``WARMUP`` steps, then cosine from ``LR`` down to 10% of it."""
    if step <= WARMUP:
        return LR * step / WARMUP
    frac = (step - WARMUP) / max(1, steps - WARMUP)
    return LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def _train(model, ids, lens, steps: int) -> tuple[float, float]:
    """``steps`` AdamW steps on random batches of the packed windows; (final loss, seconds)."""
    import numpy as np
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    rng = np.random.default_rng(0)
    order, seen = rng.permutation(len(ids)), 0
    model.train()
    t0, loss = time.perf_counter(), float("nan")
    for step in range(1, steps + 1):
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps)
        if seen + BATCH > len(order):
            order, seen = rng.permutation(len(ids)), 0
        b = order[seen : seen + BATCH]
        seen += BATCH
        mask = (torch.arange(SEQ)[None] < lens[b][:, None]).long()
        labels = ids[b].masked_fill(mask == 0, -100)
        out = model(input_ids=ids[b], attention_mask=mask, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = float(out.loss.detach())
        if step % 5 == 0 or step == 1:
            elapsed = time.perf_counter() - t0
            print(f"  step {step}/{steps}  loss {loss:.3f}  lr {_lr(step, steps):.2e}  "
                  f"{step * BATCH * SEQ / elapsed:.0f} tok/s  ETA {elapsed / step * (steps - step):.0f} s", flush=True)
    return loss, time.perf_counter() - t0


def code_teacher_dir(steps: int = STEPS, force: bool = False) -> Path:
    """The cached code-teacher directory, fine-tuning it first if this machine has none."""
    out = cache_dir() / f"code-teacher-{_key(steps)}"
    if (out / "config.json").is_file() and (out / "training.json").is_file() and not force:
        return out
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from logitstore.capture.corpus import pack
    from logitstore.capture.documents import load_texts

    base = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(base)
    packed = pack(tok, load_texts(str(CODE_TRAIN)), SEQ)
    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    ids = torch.from_numpy(packed.input_ids.astype(np.int64))
    lens = torch.from_numpy(packed.lengths.astype(np.int64))
    print(f"fine-tuning SmolLM2-135M-Instruct on {CODE_TRAIN.name} ({packed.n_tokens:,} tokens in {len(ids)} windows) "
          f"for {steps} steps of {BATCH} x {SEQ} tokens ...", flush=True)
    loss, seconds = _train(model, ids, lens, steps)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    info = {**_settings(steps), "seconds": seconds, "final_loss": loss, "train_tokens": packed.n_tokens,
            "tokens_seen": steps * BATCH * SEQ, "base": str(base), "data": CODE_TRAIN.name}
    (tmp / "training.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"code teacher: {steps} steps in {seconds:.0f} s, final train loss {loss:.3f} -> {out}", flush=True)
    return out


def validation_ce(model_dir: Path, data: Path, max_tokens: int = EVAL_TOKENS, batch: int = 8) -> tuple[float, int]:
    """Mean nats per predicted token of ``model_dir`` over packed ``SEQ``-token windows of the
    first ``max_tokens`` tokens of ``data``; (CE, number of predicted tokens)."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from logitstore.capture.corpus import pack
    from logitstore.capture.documents import load_texts

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    packed = pack(tok, load_texts(str(data)), SEQ, max_tokens=max_tokens)
    ids = torch.from_numpy(packed.input_ids.astype(np.int64))
    lens = torch.from_numpy(packed.lengths.astype(np.int64))
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids), batch):
            x, n = ids[i : i + batch], lens[i : i + batch]
            mask = (torch.arange(x.shape[1])[None] < n[:, None]).long()
            logp = torch.log_softmax(model(input_ids=x, attention_mask=mask).logits[:, :-1].float(), dim=-1)
            nll = -logp.gather(-1, x[:, 1:, None])[..., 0]
            valid = mask[:, 1:].bool()
            total += float(nll[valid].sum())
            count += int(valid.sum())
    return total / count, count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--force", action="store_true", help="train again even if a cached teacher exists")
    ap.add_argument("--eval-tokens", type=int, default=EVAL_TOKENS)
    args = ap.parse_args()
    tuned = code_teacher_dir(args.steps, args.force)
    training = json.loads((tuned / "training.json").read_text())
    rows, ce = [], {}
    for label, name, model_dir in (("base", "base (SmolLM2-135M-Instruct)", smollm2_dir()), ("tuned", "code teacher", tuned)):
        row = {"model": name}
        for split, data in (("prose", DATA_VAL), ("code", CODE_VAL)):
            t0 = time.perf_counter()
            row[f"{split} CE"], n = validation_ce(model_dir, data, args.eval_tokens)
            print(f"  {name} on {data.name}: CE {row[f'{split} CE']:.4f} over {n:,} tokens "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
            ce[f"{label}_{split}"] = row[f"{split} CE"]
            ce[f"{split}_tokens"] = n
        rows.append(row)
    print_table(rows)
    print(f"code: {ce['base_code'] - ce['tuned_code']:+.3f} nats/token for the code teacher; "
          f"prose: {ce['tuned_prose'] - ce['base_prose']:+.3f} nats/token for it vs the base")
    write_json(ROOT / "tools" / "results" / "code_teacher.json", {
        "machine": machine(), "teacher_dir": tuned.name, "steps": training["steps"], "train_seconds": training["seconds"],
        "final_train_loss": training["final_loss"], "settings": _settings(training["steps"]),
        "train_tokens": training["train_tokens"], "ce_nats_per_token": ce,
        "prose_data": DATA_VAL.name, "code_data": CODE_VAL.name})


if __name__ == "__main__":
    main()
