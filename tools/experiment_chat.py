"""Distilling a chat model on assistant tokens: CE-only vs offline KD, and what storing only the
trained positions saves.

    .venv/bin/python tools/experiment_chat.py            # 3 seeds x 2 arms (~15 min on 2 CPU cores)
    .venv/bin/python tools/experiment_chat.py --smoke    # 1 seed, fewer steps (~3 min)

Data: the chat set built from the bundled Python FAQ (``data/pyfaq-chat-{train,validation}.jsonl``,
see ``data/README.md``), rendered with the chat template of SmolLM2-135M-Instruct (teacher A), which
adds its default system turn to conversations without one. Stores:

- ``assistant``: ``--train-on assistant`` (the default): loss mask on the assistant turns and their
  ``<|im_end|>``, conversations packed whole into windows with document boundaries, teacher
  targets stored only where the mask trains;
- ``all``: the same conversations with ``--train-on all`` (every position stored), for the bytes;
- ``val``: the validation conversations, assistant tokens only.

Arms (same Llama-shaped student, 2 layers x 128, from the same initialisation, same windows in
the same order; seed s fixes both): ``ce`` (``alpha = 0``) and ``kd`` (``alpha = 0.5``, T = 1,
k = 32), both trained on the assistant positions only, evaluated by CE on the validation
assistant tokens. Outputs: tables on stdout, ``OUT/experiment_chat.json`` and
``OUT/val_loss.png``; stores are cached, a second run repeats only the fits.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

from common import ROOT, half_range, machine, print_table, run_jobs, smollm2_dir, write_json, write_student

DATA = ROOT / "data"


def prepare(args, out: Path) -> dict:
    from logitstore import open as open_store
    from logitstore.dump import DumpConfig, dump

    a = smollm2_dir()
    common = dict(teachers=(f"A={a}",), top_k=args.k, seq_len=args.seq_len, batch_size=4, device="cpu", dtype="fp32",
                  progress=False, overlong="truncate")
    stores, info = {}, {}
    for key, data, train_on in (("assistant", "pyfaq-chat-train.jsonl", "assistant"), ("all", "pyfaq-chat-train.jsonl", "all"),
                                ("val", "pyfaq-chat-validation.jsonl", "assistant")):
        path = out / "stores" / f"{key}-k{args.k}-L{args.seq_len}"
        t0 = time.perf_counter()
        r = dump(DumpConfig(data=str(DATA / data), out=str(path), train_on=train_on, **common))
        s = open_store(str(path))
        trained = sum(int(s.load_shard(j, [])["loss_mask"].sum()) for j in range(s.n_shards))
        sm = r.summary
        info[key] = {"windows": sm["sequences"], "tokens": sm["tokens"], "trained positions": trained,
                     "trained share": trained / sm["tokens"], "teacher bytes": round(sm["teachers"]["A"]["bytes_per_token"] * sm["tokens"]),
                     "teacher B/token": sm["teachers"]["A"]["bytes_per_token"], "inputs B/token": sm["inputs_bytes_per_token"],
                     "total bytes": sm["total_bytes"], "dump s (this run)": time.perf_counter() - t0}
        stores[key] = str(path)
        print(f"store {key}: {sm['tokens']:,} tokens, {trained:,} trained, {sm['total_bytes'] / 1e6:.2f} MB", flush=True)
    return {"stores": stores, "info": info}



def run_arm(job: dict) -> dict:
    from trainer.config import FitConfig
    from trainer.fit import fit

    run = Path(job["run_dir"])
    shutil.rmtree(run, ignore_errors=True)
    cfg = FitConfig(logits=(job["stores"]["assistant"],), student=job["student"], out=str(run), eval_logits=job["stores"]["val"],
                    max_steps=job["steps"], batch_size=job["batch_size"], lr=job["lr"], warmup_steps=max(1, job["steps"] // 10),
                    seed=job["seed"], alpha=job["alpha"], eval_every=max(1, job["steps"] // 4), num_workers=0, device="cpu",
                    progress=False)
    t0 = time.perf_counter()
    res = fit(cfg)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    ev = res["eval"]
    return {"arm": job["arm"], "seed": job["seed"], "val_ce": ev["ce"], "kl_to_A": ev["kl"], "top1_agree_A": ev["top1_agreement"]["A"],
            "eval_positions": ev["positions"], "fit_s": time.perf_counter() - t0, "curve": [(r["step"], r["ce"]) for r in rows if r.get("eval")]}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm, kw in (("ce", {"color": "k", "ls": "--"}), ("kd", {"color": "C0"})):
        curves = [r["curve"] for r in results if r["arm"] == arm]
        steps = [s for s, _ in curves[0]]
        ax.plot(steps, [statistics.mean(c[i][1] for c in curves) for i in range(len(steps))], marker="o", label=arm, **kw)
    ax.set(xlabel="optimizer step", ylabel="validation CE on assistant tokens (nats)", title="Chat distillation from SmolLM2-135M-Instruct")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--steps", type=int, default=None, help="default 40; smoke 12")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.steps = args.steps or (12 if args.smoke else 40)
    args.seeds = args.seeds or ([0] if args.smoke else [0, 1, 2])
    out = Path(args.out or ROOT / "runs" / ("experiment_chat_smoke" if args.smoke else "experiment_chat"))
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"machine: {machine()}", flush=True)
    t_all = time.perf_counter()
    prep = prepare(args, out)
    student = write_student(out, prep["stores"]["val"], args.seq_len)
    jobs = [{"arm": arm, "alpha": alpha, "seed": s, "run_dir": str(out / "runs" / f"{arm}-seed{s}"), "stores": prep["stores"],
             "student": str(student), "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr}
            for arm, alpha in (("ce", 0.0), ("kd", 0.5)) for s in args.seeds]
    results = []
    for r in run_jobs(run_arm, jobs, args.jobs):
        print(f"  {r['arm']} seed {r['seed']}: val CE {r['val_ce']:.3f} ({r['fit_s']:.0f} s)", flush=True)
        results.append(r)
    rows = []
    for arm in ("ce", "kd"):
        ces = [r["val_ce"] for r in results if r["arm"] == arm]
        rows.append({"arm": arm, "seeds": len(ces), "val CE (assistant)": statistics.mean(ces), "± (half range)": half_range(ces),
                     "KL(A||student)": statistics.mean(r["kl_to_A"] for r in results if r["arm"] == arm),
                     "top-1 agree A": statistics.mean(r["top1_agree_A"] for r in results if r["arm"] == arm)})
    info = prep["info"]
    sizes = [{"store": k, **{c: v for c, v in info[k].items() if c != "dump s (this run)"}} for k in ("assistant", "all", "val")]
    print()
    print_table(sizes)
    print()
    print_table(rows)
    saved = 1 - info["assistant"]["teacher bytes"] / info["all"]["teacher bytes"]
    print(f"\nstoring assistant positions only: teacher bytes {saved:.1%} smaller than every position "
          f"(trained share {info['assistant']['trained share']:.1%})")
    plot(results, out / "val_loss.png")
    write_json(out / "experiment_chat.json", {"machine": machine(), "args": vars(args), "stores": info, "summary": rows, "runs": results,
                                              "teacher_bytes_saved": saved, "wall_s": time.perf_counter() - t_all})
    print(f"wrote {out / 'experiment_chat.json'} and {out / 'val_loss.png'} ({time.perf_counter() - t_all:.0f} s)")


if __name__ == "__main__":
    main()
