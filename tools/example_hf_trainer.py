"""Distil a student with ``transformers.Trainer`` from a logitstore cache (trainer/hf.py).

    .venv/bin/python tools/example_hf_trainer.py                      # builds a tiny store first (CPU, offline, ~20 s)
    .venv/bin/python tools/example_hf_trainer.py --logits cache/ --student student/ --steps 20

1. The store: ``--logits`` or, without it, a tiny one made here (a BPE tokenizer trained on the bundled
   corpus, a random 2-layer Llama teacher, ``logitstore.dump`` of ~1k tokens in 32-token windows).
2. The dataset: the store's own windows (``store[i]["input_ids"]``) as a ``datasets.Dataset``, the
   only rows whose content hash is in the store (a re-tokenised corpus must reproduce them exactly).
3. Step 1 over every row: ``trainer fit`` (one step, batch = the whole store) and ``KDTrainer``
   (one step of ``--batch-size`` x gradient accumulation covering the whole store, rows in random
   order) from the same initial student; both losses are the mean over the step's target positions,
   so they agree to float rounding.
4. ``--steps`` optimizer steps with ``KDTrainer`` (``--batch-size``, ``--grad-accum``), printing
   ``loss``, ``kd_loss`` and ``ce_loss`` of each.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

DATA = ROOT / "data" / "pydocs-train.jsonl"


def tiny_store(work: Path) -> Path:
    """A tiny store: one random Llama teacher over ~1k tokens of the bundled corpus, in 32-token windows."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from common import tiny_bpe_tokenizer
    from logitstore.dump import DumpConfig, dump

    out = work / "store"
    if (out / "manifest.json").is_file():
        return out
    texts = [json.loads(line)["text"][:3000] for line, _ in zip(open(DATA, encoding="utf-8"), range(4))]
    tokenizer = tiny_bpe_tokenizer(texts, 320)
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                                           eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id))
    with torch.no_grad():
        teacher.lm_head.weight.mul_(40.0)  # a sharper random teacher, so its top-k is not flat
    tdir = work / "teacher"
    teacher.save_pretrained(tdir)
    tokenizer.save_pretrained(tdir)
    corpus = work / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    dump(DumpConfig(teachers=(f"teacher={tdir}",), data=str(corpus), out=str(out), top_k=16, seq_len=32, max_tokens=1000,
                    shard_sequences=16, progress=False))
    return out


def fresh_student(store, path: Path, seed: int = 3) -> Path:
    """A random 2-layer Llama student over the store's vocabulary, saved to ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = store.manifest["tokenizer"]
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=int(tok["vocab_size"]), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=max(64, store.seq_len), tie_word_embeddings=False))
    model.save_pretrained(path)
    return path


def training_args(out: Path, batch_size: int, grad_accum: int, steps: int, lr: float):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(out), per_device_train_batch_size=batch_size, gradient_accumulation_steps=grad_accum,
                             max_steps=steps, learning_rate=lr, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                             report_to=[], use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, disable_tqdm=True,
                             seed=0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--logits", help="a store (path or URL); default: a tiny one built under --work")
    ap.add_argument("--student", help="a student model directory (default: a random 2-layer Llama over the store's vocabulary)")
    ap.add_argument("--work", help="working directory (default: a new temporary one)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--max-rows", type=int, default=512, help="rows of the store in the dataset (the first ones)")
    a = ap.parse_args(argv)

    import datasets
    from transformers import AutoModelForCausalLM
    from transformers.trainer_callback import PrinterCallback

    import logitstore
    from logitstore.progress import quiet_libraries
    from trainer.config import FitConfig
    from trainer.fit import fit
    from trainer.hf import KDDataCollator, KDTrainer, TeacherTargets

    quiet_libraries()
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="example-hf-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    url = a.logits or str(tiny_store(work))
    store = logitstore.open(url)
    student = Path(a.student) if a.student else fresh_student(store, work / "student")
    n = min(len(store), a.max_rows)
    rows = [store[i]["input_ids"].tolist() for i in range(n)]
    ds = datasets.Dataset.from_dict({"input_ids": rows})
    targets = TeacherTargets([url])
    pad = store.manifest["tokenizer"].get("pad_token_id")
    pad = pad if pad is not None else (store.manifest["tokenizer"].get("eos_token_id") or 0)
    collator = KDDataCollator(targets, pad_token_id=int(pad))
    kd = dict(kd_alpha=a.alpha, temperature=a.temperature, kd_loss="fkl", tail="bucket", fuse="mean-probs")
    print(f"store {url}: {len(store)} sequences, teachers {targets.teacher_names}, seq_len {store.seq_len}, "
          f"vocab {targets.vocab_size}; dataset of {n} rows; student {student}")

    # --- step 1 over the whole dataset: trainer fit and KDTrainer from the same initial weights
    if n == len(store):
        run = work / "fit-one-step"
        fit(FitConfig(logits=(url,), student=str(student), out=str(run), max_steps=1, batch_size=n, num_workers=0, alpha=a.alpha,
                      temperature=a.temperature, lr=a.lr, progress=False, checkpoint_every=0))
        fit_loss = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["loss"]
        per = math.ceil(n / a.grad_accum)
        one = KDTrainer(model=AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32), train_dataset=ds,
                        data_collator=collator, args=training_args(work / "hf-one-step", per, a.grad_accum, 1, a.lr), **kd)
        one.remove_callback(PrinterCallback)
        one.train()
        hf_loss = next(h["loss"] for h in one.state.log_history if "loss" in h)
        print(f"step 1 over all {n} rows: trainer fit loss {fit_loss:.6f}, KDTrainer loss {hf_loss:.6f} "
              f"({per} rows x {a.grad_accum} accumulated); relative difference {abs(hf_loss - fit_loss) / abs(fit_loss):.1e}")
    else:
        print(f"(the step-1 comparison with trainer fit needs the whole store in the dataset: --max-rows >= {len(store)})")

    # --- a short run
    trainer = KDTrainer(model=AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32), train_dataset=ds,
                        data_collator=collator, args=training_args(work / "hf-run", a.batch_size, a.grad_accum, a.steps, a.lr), **kd)
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    print(f"{'step':>4}  {'loss':>8}  {'kd_loss':>8}  {'ce_loss':>8}")
    for h in trainer.state.log_history:
        if "loss" in h:
            print(f"{h['step']:>4}  {h['loss']:8.4f}  {h['kd_loss']:8.4f}  {h['ce_loss']:8.4f}")
    print(f"done in {time.perf_counter() - t0:.1f} s (work dir {work})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
