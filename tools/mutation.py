"""Mutation testing (mutmut 3) of the modules where a silent bug costs the most.

Each module is mutated on its own, in a throw-away copy of the repository (the working tree of the
checkout is never touched), and every mutant is run against the fast tests that guard that module;
mutmut runs, per mutant, only those of them that call the mutated function. Prints a table
(module, mutants, killed, survived, timeout, score) and writes ``tools/results/mutation.json``
with every survivor.

    .venv/bin/pip install 'mutmut>=3.8,<4'
    nice -n 10 .venv/bin/python tools/mutation.py              # every module (~3,500 mutants: hours on 2 cores)
    nice -n 10 .venv/bin/python tools/mutation.py codec losses --sample 40 --seed 8  # a fresh sample of some modules

The code mutated is the last commit (``git archive HEAD``), with the guarding tests as they are in
the working tree; ``--worktree`` takes every tracked and untracked, not ignored, file as it is now.
``--sample N`` runs a fixed random sample of N mutants per module (the score is then an estimate).
Not part of CI.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tools" / "results" / "mutation.json"
KILLS = "tests/test_mutation_kills.py"

#: name: (module or modules, tests that guard them, mutant-name globs to run; None = every mutant).
#: Tests that train a student for many steps or launch torchrun are left out (seconds per mutant, hundreds
#: of mutants); fit's step is checked by one step against a plain reimplementation (tests/test_step.py).
READER = ["logitstore/format/reader.py", "logitstore/format/opening.py", "logitstore/format/index.py",
          "logitstore/format/decode.py", "logitstore/storage/fetch.py"]
GROUPS: dict[str, tuple[str | list[str], list[str], list[str] | None]] = {
    "losses": ("trainer/losses.py", ["tests/test_losses.py", "tests/test_loss_extremes.py", KILLS], None),
    "fusion": ("logitstore/distributions/fusion.py", ["tests/test_fusion.py",
                                     "tests/test_properties.py::test_fused_targets_sum_to_one_and_ignore_teacher_order", KILLS], None),
    "targets": ("logitstore/distributions/targets.py", ["tests/test_fusion.py", "tests/test_losses.py",
                                       "tests/test_properties.py::test_fused_targets_sum_to_one_and_ignore_teacher_order", KILLS], None),
    "codec": ("logitstore/format/codec.py", ["tests/test_codec.py", "tests/test_properties.py::test_compact_round_trip_within_documented_bound",
                                      "tests/test_properties.py::test_lossless_round_trip_is_exact", KILLS], None),
    "reader": (READER, ["tests/test_store.py", "tests/test_manifest.py", "tests/test_s3.py::test_prefetcher_order_and_errors",
                        "tests/test_hostile_files.py", KILLS], None),
    "stream": ("trainer/data.py", ["tests/test_data.py", "tests/test_properties.py::test_stream_covers_every_sequence_once", KILLS], None),
    "schedules": ("trainer/schedules.py", ["tests/test_fit.py::test_temperature_and_lr_schedules", KILLS], None),
    "resume": ("trainer/resume.py", [KILLS], ["trainer.resume.x_setting_changes__mutmut_*"]),
    "fit": ("trainer/fit.py", ["tests/test_step.py", KILLS], ["trainer.fit.xǁRunǁstep__mutmut_*", "trainer.fit.x__clip__mutmut_*",
                                                          "trainer.fit.x_set_schedule_step__mutmut_*"]),
}

STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 36: "timeout",
          24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout", -11: "segfault", -9: "segfault", None: "not checked"}


def copy_repo(dst: Path, worktree: bool) -> None:
    """The last commit (``git archive HEAD``) with the guarding tests as they are now, or with
    ``worktree`` every tracked and untracked, not ignored, file as it is now (edits in flight too)."""
    if not worktree:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", "HEAD"], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dst)], input=archive, check=True)
        for t in sorted({t.split("::")[0] for _, tests, _ in GROUPS.values() for t in tests}):
            if (ROOT / t).is_file():
                shutil.copy2(ROOT / t, dst / t)
        return
    names = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "-c", "-o", "--exclude-standard"],
                           check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, names):
        src = ROOT / name
        if src.is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)


def configure(work: Path, module: str | list[str], tests: list[str]) -> None:
    tests = [t for t in tests if (work / t.split("::")[0]).is_file()]
    modules = [module] if isinstance(module, str) else list(module)
    conf = {"source_paths": ["logitstore", "trainer"], "only_mutate": modules, "also_copy": ["data", "tools"],
            "pytest_add_cli_args": ["-q", "-p", "no:cacheprovider", "-x"], "pytest_add_cli_args_test_selection": tests,
            "use_git_change_detection": False}
    lines = ["", "[tool.mutmut]"] + [f"{k} = {json.dumps(v)}" for k, v in conf.items()]
    with open(work / "pyproject.toml", "a") as f:
        f.write("\n".join(lines) + "\n")


def results(work: Path, module: str | list[str], globs: list[str] | None) -> dict[str, str]:
    import fnmatch

    codes = {}
    for m in [module] if isinstance(module, str) else module:
        meta = work / "mutants" / (m + ".meta")
        if meta.is_file():  # a module with nothing to mutate has none
            codes.update(json.loads(meta.read_text())["exit_code_by_key"])
    if not codes:
        raise FileNotFoundError(f"no mutmut results for {module}")
    keep = {k: v for k, v in codes.items() if globs is None or any(fnmatch.fnmatch(k, g) for g in globs)}
    return {k: STATUS.get(v, "suspicious") for k, v in keep.items()}


def diff_of(work: Path, name: str, env: dict) -> str:
    p = subprocess.run([sys.executable, "-m", "mutmut", "show", name], cwd=work, capture_output=True, text=True, env=env)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(("+", "-")) and not ln.startswith(("+++", "---"))]
    return " | ".join(ln.strip() for ln in lines)[:400]


def run_group(name: str, worktree: bool, children: int, sample: int = 0, seed: int = 0) -> dict:
    module, tests, globs = GROUPS[name]
    t0 = time.time()
    generated = None
    with tempfile.TemporaryDirectory(prefix=f"mutation-{name}-") as tmp:
        work = Path(tmp)
        copy_repo(work, worktree)
        configure(work, module, tests)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "LOGITSTORE_MUTATION_CACHE": str(work / ".mutation-cache")}
        names = list(globs or [])
        if sample:  # generate the mutants, then run a fixed random sample of them
            gen = ("from mutmut.__main__ import copy_src_dir, copy_also_copy_files, create_mutants\n"
                   "copy_src_dir(); copy_also_copy_files(); create_mutants(1)")
            subprocess.run([sys.executable, "-c", gen], cwd=work, env=env, check=True, capture_output=True)
            every = sorted(results(work, module, globs))
            names = sorted(random.Random(f"{name}-{seed}").sample(every, min(sample, len(every))))
            generated = len(every)
        cmd = [sys.executable, "-m", "mutmut", "run", "--max-children", str(children)] + names
        log = work / "mutmut.log"
        with open(log, "w") as f:  # in its own process group: a timed-out mutant's processes go with it
            proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait()
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:  # nothing of the group is left
                    pass
        try:
            status = results(work, module, names if sample else globs)
        except FileNotFoundError:
            sys.exit(f"{name}: mutmut failed (exit {rc}):\n{log.read_text()[-4000:]}")
        survivors = {k: diff_of(work, k, env) for k, v in sorted(status.items()) if v not in ("killed", "timeout")}
    counts = {s: sum(v == s for v in status.values()) for s in sorted(set(status.values()))}
    killed, timeout = counts.get("killed", 0), counts.get("timeout", 0)
    return {"module": module, "tests": tests, "generated": generated or len(status), "mutants": len(status), "killed": killed, "timeout": timeout,
            "survived": len(status) - killed - timeout, "by_status": counts,
            "score": round(100 * (killed + timeout) / max(1, len(status)), 1), "seconds": round(time.time() - t0),
            "survivors": survivors}


def table(groups: dict) -> str:
    rows = ["| module | mutants (run / generated) | killed | survived | timeout | score |", "|---|---|---|---|---|---|"]
    tot = {"mutants": 0, "killed": 0, "survived": 0, "timeout": 0}
    for g in groups.values():
        mod = g["module"] if isinstance(g["module"], str) else ", ".join(g["module"])
        rows.append(f"| `{mod}` | {g['mutants']} / {g.get('generated', g['mutants'])} | {g['killed']} | {g['survived']} | {g['timeout']} | {g['score']:.1f}% |")
        for k in tot:
            tot[k] += g[k]
    score = 100 * (tot["killed"] + tot["timeout"]) / max(1, tot["mutants"])
    rows.append(f"| **all** | {tot['mutants']} | {tot['killed']} | {tot['survived']} | {tot['timeout']} | **{score:.1f}%** |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("groups", nargs="*", help=f"some of {', '.join(GROUPS)} (default: all)")
    ap.add_argument("--worktree", action="store_true", help="mutate the working tree, not the last commit")
    ap.add_argument("--out", type=Path, default=OUT, help=f"results JSON (default {OUT.relative_to(ROOT)})")
    ap.add_argument("--sample", type=int, default=0, help="run a fixed random sample of N mutants per module (0: all)")
    ap.add_argument("--seed", type=int, default=0, help="seed of --sample")
    ap.add_argument("--children", type=int, default=2, help="mutants run in parallel (default 2)")
    args = ap.parse_args()
    if set(args.groups) - set(GROUPS):
        ap.error(f"unknown groups {sorted(set(args.groups) - set(GROUPS))}; choose from {', '.join(GROUPS)}")
    try:
        import mutmut  # noqa: F401
    except ImportError:
        sys.exit("mutmut is not installed: .venv/bin/pip install 'mutmut>=3.8,<4'")
    out = args.out.resolve()
    previous = json.loads(out.read_text())["groups"] if out.is_file() else {}
    groups = {k: previous[k] for k in GROUPS if k in previous}
    for name in args.groups or list(GROUPS):
        g = run_group(name, args.worktree, args.children, args.sample, args.seed)
        groups[name] = g
        print(f"{name}: {g['mutants']} mutants, {g['score']:.1f}% killed, {g['seconds']} s", flush=True)
        groups = {k: groups[k] for k in GROUPS if k in groups}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"tool": "mutmut " + _version(), "groups": groups}, indent=1) + "\n")
    print(table(groups))
    print(f"total: {sum(g['seconds'] for g in groups.values())} s; survivors in {out}")


def _version() -> str:
    from importlib.metadata import version

    return version("mutmut")


if __name__ == "__main__":
    main()
