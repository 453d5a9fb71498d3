"""Teacher B: a small Llama trained from scratch on the bundled corpus with SmolLM2's tokenizer.

    .venv/bin/python tools/train_teacher.py [--steps 40] [--force]

A second teacher that shares teacher A's tokenizer (so both fit in one store and can be fused)
but not its knowledge: it has seen only the bundled Python-docs training split. It is trained once
per machine and cached under ``~/.cache/logitstore/teacher-b-<key>/`` (``save_pretrained`` +
tokenizer), where the key hashes this script, the data and the settings; ``teacher_b_dir()`` is
what the demo and the experiment call.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import time
from pathlib import Path

from common import DATA_TRAIN, cache_dir, smollm2_dir

CONFIG = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 256, "tie_word_embeddings": True}
SEQ, BATCH, LR = 256, 8, 3e-3


def _key(steps: int) -> str:
    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(DATA_TRAIN.read_bytes())
    h.update(json.dumps([CONFIG, SEQ, BATCH, LR, steps]).encode())
    return h.hexdigest()[:12]


def teacher_b_dir(steps: int = 40, force: bool = False) -> Path:
    """The cached teacher B directory, training it first if this machine has none."""
    out = cache_dir() / f"teacher-b-{_key(steps)}"
    if (out / "config.json").is_file() and not force:
        return out
    import numpy as np
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from logitstore.capture.corpus import pack
    from logitstore.capture.documents import load_texts

    tok = AutoTokenizer.from_pretrained(smollm2_dir())
    packed = pack(tok, load_texts(str(DATA_TRAIN)), SEQ)
    torch.manual_seed(1234)
    cfg = dict(CONFIG)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), vocab_size=len(tok), **cfg))
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    ids = torch.from_numpy(packed.input_ids.astype(np.int64))
    lens = torch.from_numpy(packed.lengths.astype(np.int64))
    print(f"training teacher B ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters) for {steps} steps "
          f"on {int(lens.sum())} tokens ...", flush=True)
    rng = np.random.default_rng(0)
    t0, seen = time.perf_counter(), 0
    order = rng.permutation(len(ids))
    for step in range(1, steps + 1):
        frac = (step - 1) / steps
        for g in opt.param_groups:  # warm-up over the first 5% of the steps, then cosine to 10%
            g["lr"] = LR * min(1.0, (step) / max(1, steps * 0.05)) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        if seen + BATCH > len(order):
            order, seen = rng.permutation(len(ids)), 0
        b = order[seen : seen + BATCH]
        seen += BATCH
        mask = (torch.arange(SEQ)[None] < lens[b][:, None]).long()
        labels = ids[b].masked_fill(mask == 0, -100)
        loss = model(input_ids=ids[b], attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0:
            elapsed = time.perf_counter() - t0
            print(f"  step {step}/{steps}  loss {float(loss):.3f}  {step * BATCH * SEQ / elapsed:.0f} tok/s  "
                  f"ETA {elapsed / step * (steps - step):.0f} s", flush=True)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "training.json").write_text(json.dumps({"steps": steps, "seconds": time.perf_counter() - t0, "final_loss": float(loss), "config": CONFIG,
                                                   "seq_len": SEQ, "batch_size": BATCH, "lr": LR}, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"teacher B: {steps} steps, final train loss {float(loss):.3f} -> {out}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--force", action="store_true", help="train again even if a cached teacher exists")
    args = ap.parse_args()
    print(teacher_b_dir(args.steps, args.force))


if __name__ == "__main__":
    main()
