"""Peak RSS of a dump rank against corpus size: this version (streaming corpus) against the
previous one (the whole corpus tokenised and packed in RAM on every rank), side by side.

    .venv/bin/python tools/bench_dump_memory.py [--sizes 1e6,1e7,1e8] [--old-ref 09a0f12] [--out ...]

Model of the measurement. A corpus of T tokens is dumped by W = T / 10^6 ranks, so each rank runs
the teacher over ~10^6 tokens whatever T is and only the corpus-dependent memory changes. The rank
measured is rank 0 of W (the one that also plans the corpus), run alone in a subprocess: its
process group is a 1-process gloo group (barriers return at once), it writes its own shards, and
the final manifest step, which needs every rank's parts, fails as expected and is not counted.
Peak RSS is the subprocess's ``ru_maxrss``. The teacher is a tiny Llama (hidden 32, 2 layers) over
a 1,024-token BPE tokenizer trained on the bundled corpus, so the teacher's own memory is small and
what grows is visible; the corpus is the bundled documents repeated (jsonl), top-k 8, seq_len 512.
The previous version is run from ``git archive <old-ref>`` with PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import DATA_TRAIN, ROOT, machine, print_table, tiny_bpe_tokenizer, write_json

PER_RANK = 10**6


def build_teacher(path: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (path / "config.json").exists():
        return path
    texts = [json.loads(line)["text"] for line in DATA_TRAIN.read_text(encoding="utf-8").splitlines()]
    hf = tiny_bpe_tokenizer(texts, 1024)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(hf), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=1024, eos_token_id=hf.eos_token_id,
                      bos_token_id=hf.bos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    hf.save_pretrained(path)
    return path


def build_corpus(path: Path, tokens: int, tokenizer) -> Path:
    """The bundled documents repeated until ~``tokens`` tokens (counted on the first pass)."""
    if path.exists():
        return path
    texts = [json.loads(line)["text"] for line in DATA_TRAIN.read_text(encoding="utf-8").splitlines()]
    per = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts]
    total = 0
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        while total < tokens:
            for t, n in zip(texts, per):
                f.write(json.dumps({"text": t}) + "\n")
                total += n
                if total >= tokens:
                    break
    tmp.rename(path)
    return path


def child(args) -> None:
    """One rank-0-of-W dump; prints a JSON line with peak RSS and times."""
    import torch.distributed as dist

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29500 + os.getpid() % 1000)})
    dist.init_process_group("gloo", rank=0, world_size=1)
    from logitstore.capture.ranks import Ranks
    from logitstore.dump import DumpConfig, dump
    from logitstore.errors import LogitStoreError

    t0 = time.perf_counter()
    err = ""
    try:
        dump(DumpConfig(teachers=(f"tiny={args.teacher}",), data=args.corpus, out=args.store, top_k=8, seq_len=512,
                        batch_size=8, device="cpu", progress=False), ranks=Ranks(rank=0, world_size=args.world))
    except LogitStoreError as e:  # the manifest needs the other ranks' parts
        err = str(e)[:160]
    wall = time.perf_counter() - t0
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "wall_s": wall,
                      "expected_stop": err}))


def measure(code_root: Path, teacher: Path, corpus: Path, world: int, store: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{code_root}:{ROOT / 'tools'}", "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run([sys.executable, __file__, "--child", "--teacher", str(teacher), "--corpus", str(corpus),
                        "--store", str(store), "--world", str(world)], env=env, capture_output=True, text=True,
                       cwd=str(code_root))
    if r.returncode:
        raise SystemExit(f"child failed ({code_root}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1e6,1e7,1e8")
    ap.add_argument("--old-ref", default="09a0f12", help="the previous version, to compare with (empty: skip)")
    ap.add_argument("--old-max", type=float, default=1e7, help="largest corpus the previous version is run on")
    ap.add_argument("--work", default=None, help="directory for corpora and the teacher (default: a temporary one)")
    ap.add_argument("--out", default=str(ROOT / "tools" / "results" / "bench_dump_memory.json"))
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--teacher")
    ap.add_argument("--corpus")
    ap.add_argument("--store")
    ap.add_argument("--world", type=int)
    args = ap.parse_args()
    if args.child:
        return child(args)
    from transformers import AutoTokenizer

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-dump-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    teacher = build_teacher(work / "teacher")
    tok = AutoTokenizer.from_pretrained(teacher)
    old_root = None
    if args.old_ref:
        old_root = work / f"code-{args.old_ref}"
        if not old_root.exists():
            old_root.mkdir()
            subprocess.run(f"git -C {ROOT} archive {args.old_ref} | tar -x -C {old_root}", shell=True, check=True)
    rows = []
    for size in [int(float(x)) for x in args.sizes.split(",")]:
        corpus = build_corpus(work / f"corpus-{size:.0e}.jsonl", size, tok)
        world = max(1, size // PER_RANK)
        for label, root in (("streaming (this version)", ROOT), ("in RAM (previous)", old_root)):
            if root is None or (root is old_root and size > args.old_max):
                continue
            store = work / f"store-{label[:4]}-{size:.0e}"
            subprocess.run(["rm", "-rf", str(store)], check=True)
            m = measure(root, teacher, corpus, world, store)
            row = {"corpus tokens": size, "ranks W": world, "version": label, "peak RSS MB": round(m["peak_rss_mb"], 1),
                   "wall s": round(m["wall_s"], 1), "corpus MB": round(corpus.stat().st_size / 1e6, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"machine: {machine()}")
    print_table(rows)
    write_json(Path(args.out), {"machine": machine(), "per_rank_tokens": PER_RANK, "rows": rows,
                          "model": __doc__.split("Model of the measurement.")[1].strip()})


if __name__ == "__main__":
    main()
