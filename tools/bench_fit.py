"""Cost of distilling from the cache, side by side on the same student and batches.

    .venv/bin/python tools/bench_fit.py [--steps 6] [--device cpu|cuda] [--out tools/results/bench_fit.json]

On ``--device cuda`` the arms run in bf16 autocast (fp32 master weights) with the step times
synchronised, and the table adds each arm's peak CUDA memory; the CPU-only measures (data wait
with loader workers, resident-set peaks of the losses) are left out there.

Arms (one optimizer step = forward + backward + AdamW on a batch of 4 x 256 tokens):
- CE only: the student trained on hard labels (the floor);
- cached KD: fused top-64 targets from the store, chunked forward KL + CE (what ``trainer fit`` runs);
- online KD: SmolLM2-135M-Instruct runs in the loop and a dense full-vocabulary KL is used.
Also: the share of step time ``trainer fit`` waits on data (one worker), and peak memory of the
losses alone (each in a fresh process: resident-set high-water mark above the inputs) for 4,096 positions x 49,152:
CE on full logits, our chunked KD + CE from hidden states, and a naive dense KD loss.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import DATA_TRAIN, ROOT, machine, print_table, smollm2_dir, write_json

STUDENT = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
           "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 512, "tie_word_embeddings": False}


def bench_store(tmp: Path) -> Path:
    from logitstore.dump import DumpConfig, dump

    out = ROOT / "runs" / "bench_fit_store"
    dump(DumpConfig(teachers=(f"smollm2={smollm2_dir()}",), data=str(DATA_TRAIN), out=str(out), top_k=64, seq_len=256,
                    max_tokens=8192, batch_size=4, progress=False))
    return out


def step_times(store: Path, steps: int, device: str = "cpu") -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM
    from trainer.data import DistillDataset
    from trainer.student import DistillModule
    from logitstore.capture.teacher import TeacherSpec

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    ds = DistillDataset([str(store)], batch_size=4, shuffle=False)
    batches = [_to(ds.make_batch(*x), dev) for x in zip(*ds.rank_batches(0))][: steps + 1]
    cfg = dict(STUDENT)
    teacher = TeacherSpec.parse(str(smollm2_dir())).load_model(dev, torch.bfloat16 if cuda else torch.float32)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    kd = dict(temperature=1.0, teacher_temperatures=[1.0], weights=[1.0], fuse_mode="mean-probs", loss="fkl", tail="bucket", beta=0.5,
              chunk_positions=1024, vocab_size=49152)
    out = {}
    for arm in ("ce", "cached", "online"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg)).to(dev)
        cfg = dict(STUDENT)
        module = DistillModule(model)
        opt = torch.optim.AdamW(module.parameters(), lr=1e-4)
        times = []
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        for i, b in enumerate(batches):
            sync()
            t0 = time.perf_counter()
            ctx = autocast()
            ctx.__enter__()
            if arm == "online":
                with torch.inference_mode():
                    t_lp = torch.log_softmax(teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float(), -1)
                t_lp = t_lp.clone()
                s_lp = torch.log_softmax(module.logits(b["input_ids"], b["attention_mask"]).float(), -1)
                keep = b["labels"] != -100
                kl = (t_lp.exp() * (t_lp - s_lp)).sum(-1)[keep].mean()
                ce = torch.nn.functional.cross_entropy(s_lp.reshape(-1, s_lp.shape[-1]), b["labels"].reshape(-1), ignore_index=-100)
                loss = 0.5 * kl + 0.5 * ce
            else:
                ce_s, kd_s, n = module(b, with_kd=arm == "cached", **kd)
                loss = (0.5 * kd_s + 0.5 * ce_s) / n if arm == "cached" else ce_s / n
            ctx.__exit__(None, None, None)
            loss.backward()
            opt.step()
            opt.zero_grad()
            sync()
            if i:  # the first step warms up
                times.append(time.perf_counter() - t0)
        out[arm] = sum(times) / len(times)
        if cuda:
            out[f"{arm} peak GB"] = torch.cuda.max_memory_allocated() / 1e9
    return out


def _to(batch, dev):
    """A batch (tensors, nested dicts/lists of tensors) on ``dev``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(dev)
    if isinstance(batch, dict):
        return {k: _to(v, dev) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(v, dev) for v in batch)
    if hasattr(batch, "_fields") or hasattr(batch, "__dataclass_fields__"):
        return type(batch)(**{k: _to(getattr(batch, k), dev) for k in getattr(batch, "__dataclass_fields__", batch._fields)})
    return batch


def data_wait(store: Path, steps: int) -> dict:
    from trainer.config import FitConfig
    from trainer.fit import fit

    with tempfile.TemporaryDirectory() as tmp:
        spath = Path(tmp) / "student.json"
        spath.write_text(json.dumps(STUDENT))
        fit(FitConfig(logits=(str(store),), student=str(spath), out=f"{tmp}/run", batch_size=4, max_steps=steps + 1, num_workers=1,
                      device="cpu", progress=False))
        rows = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if not r.get("eval")][1:]  # skip the first step (workers starting)
    wait = sum(r["data_wait_s"] for r in rows)
    total = (rows[-1]["tokens"] - rows[0]["tokens"]) / max(rows[-1]["tokens_per_s"], 1e-9) if len(rows) > 1 else float("nan")
    step_s = rows[-1]["tokens"] / rows[-1]["tokens_per_s"] / rows[-1]["step"]
    return {"data_wait_s_per_step": wait / len(rows), "step_s": step_s, "data_wait_share": wait / len(rows) / step_s}


PEAK_SNIPPET = r"""
import sys, torch, torch.nn.functional as F
sys.path.insert(0, {root!r})
from trainer.losses import kd_ce_loss
from logitstore.distributions.fusion import SparseTarget
torch.manual_seed(0)
N, V, H, K = 4096, 49152, 256, 64
h = torch.randn(N, H, requires_grad=True)
head = torch.nn.Linear(H, V, bias=False)
labels = torch.randint(0, V, (N,))
support = torch.randint(0, V, (N, K))
lp = torch.log_softmax(torch.randn(N, K), -1) - 0.1
t = SparseTarget(support, torch.ones(N, K, dtype=torch.bool), lp, torch.full((N,), -2.3), torch.full((N,), float(V - K)))
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current resident set
base = status("VmRSS")
if {arm!r} == "dense":  # the naive approach materialises the dense teacher distribution too
    dense_t = torch.log_softmax(torch.randn(N, V), -1)
if {arm!r} == "ce":
    loss = F.cross_entropy(head(h), labels)
elif {arm!r} == "chunked":
    ce, kd, n = kd_ce_loss(h, labels, t, head=head, chunk_positions=1024)
    loss = (0.5 * ce + 0.5 * kd) / n
else:
    s = F.log_softmax(head(h), -1)
    loss = 0.5 * F.kl_div(s, dense_t, log_target=True, reduction="batchmean") + 0.5 * F.nll_loss(s, labels)
loss.backward()
print(status("VmHWM") - base)
"""


def peak_memory() -> dict:
    out = {}
    for arm in ("ce", "chunked", "dense"):
        code = PEAK_SNIPPET.format(root=str(ROOT), arm=arm)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        out[arm] = int(r.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(ROOT / "tools" / "results" / "bench_fit.json"))
    args = ap.parse_args()
    print(f"machine: {machine()}")
    store = bench_store(Path(tempfile.gettempdir()))
    st = step_times(store, args.steps, args.device)
    if args.device.startswith("cuda"):
        rows = [{"measure": f"step time {a} (s)", "value": st[a]} for a in ("ce", "cached", "online")]
        rows += [{"measure": "cached KD / CE-only", "value": st["cached"] / st["ce"], "target": "<= 1.10"},
                 {"measure": "online KD / cached KD (speedup)", "value": st["online"] / st["cached"]}]
        rows += [{"measure": f"peak CUDA memory {a} (GB)", "value": st[f"{a} peak GB"]} for a in ("ce", "cached", "online")]
        print_table(rows, ["measure", "value", "target"])
        write_json(Path(args.out), {"machine": machine(), "device": args.device, "dtype": "bf16 autocast", "student": STUDENT,
                                    "batch": "4 x 256", "rows": rows})
        return
    dw = data_wait(store, args.steps)
    mem = peak_memory()
    rows = [
        {"measure": "step time CE-only (s)", "value": st["ce"]},
        {"measure": "step time cached KD (s)", "value": st["cached"]},
        {"measure": "step time online KD (s)", "value": st["online"]},
        {"measure": "cached KD / CE-only", "value": st["cached"] / st["ce"], "target": "<= 1.10"},
        {"measure": "online KD / cached KD (speedup)", "value": st["online"] / st["cached"]},
        {"measure": "fit: data wait per step (s)", "value": dw["data_wait_s_per_step"]},
        {"measure": "fit: data wait share of step", "value": dw["data_wait_share"], "target": "<= 0.02"},
        {"measure": "peak loss memory CE (MB)", "value": mem["ce"] / 1e6},
        {"measure": "peak loss memory chunked KD+CE (MB)", "value": mem["chunked"] / 1e6},
        {"measure": "peak loss memory dense KD (MB)", "value": mem["dense"] / 1e6},
        {"measure": "chunked KD / CE memory", "value": mem["chunked"] / mem["ce"], "target": "<= 1.2"},
    ]
    print()
    print_table(rows, ["measure", "value", "target"])
    write_json(Path(args.out), {"machine": machine(), "student": STUDENT, "batch": "4 x 256", "rows": rows})


if __name__ == "__main__":
    main()
