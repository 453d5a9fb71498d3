"""Rank-local reading: each rank (and worker) decodes only the shards holding its own sequences,
each once per epoch; every sequence is read exactly once per epoch, also across a resume on
another number of ranks, workers or batch size; and a store still being written trains as its
committed shards."""

import shutil

import numpy as np
import pytest

import logitstore
from logitstore.dump import DumpConfig, dump
from trainer.data import DistillDataset


@pytest.fixture(scope="module")
def many(tmp_path_factory, llama_dir, gpt2_dir, corpus):
    base = tmp_path_factory.mktemp("many")
    kw = dict(data=str(corpus), top_k=4, seq_len=16, max_tokens=2400, shard_sequences=4, progress=False)
    dump(DumpConfig(teachers=(f"llama={llama_dir}",), out=str(base / "a"), **kw))
    dump(DumpConfig(teachers=(f"gpt2={gpt2_dir}",), out=str(base / "b"), **kw))
    return base / "a", base / "b"


def _real(batches):
    return [int(i) for b in batches for i, w in zip(b["index"], b["weight"]) if w > 0]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_each_rank_decodes_only_its_share_each_shard_once(many, world):
    a, b = many
    n_shards = logitstore.open(str(a)).n_shards
    assert n_shards >= 30
    seen, shards_of_rank = [], []
    for r in range(world):
        ds = DistillDataset([a, b], batch_size=3, rank=r, world_size=world, seed=7)  # mixing spans many small shards
        batches = list(ds)
        seen += _real(batches)
        assert all(n == 1 for n in ds.decodes.values()), ds.decodes  # each shard of each store: once
        mine = {j for (si, j) in ds.decodes if si == 0}
        assert {j for (si, j) in ds.decodes if si == 1} == mine  # the second store: the same shards
        shards_of_rank.append(mine)
        assert len({len(x["index"]) for x in batches}) == 1
    assert sorted(seen) == list(range(len(logitstore.open(str(a)))))
    for mine in shards_of_rank:
        assert len(mine) <= n_shards / world + 2  # about 1/W of the store, plus shared boundary shards
    if world > 1:
        counts = np.bincount([j for m in shards_of_rank for j in m], minlength=n_shards)
        assert counts.max() <= 2 and (counts == 2).sum() <= 2 * world


def test_the_steps_do_not_depend_on_the_number_of_ranks(many):
    a, _ = many
    steps = {}
    for world in (1, 2, 4):
        per_rank = [list(DistillDataset([a], batch_size=8 // world, rank=r, world_size=world, seed=3, n_streams=4))
                    for r in range(world)]
        assert len({len(p) for p in per_rank}) == 1  # DDP: equal steps on every rank
        steps[world] = [sorted(_real([p[t] for p in per_rank])) for t in range(len(per_rank[0]))]
    assert steps[1] == steps[2] == steps[4]


def _consume(ds, k):
    """The first ``k`` batches a training loop would take (in-process, one worker)."""
    out = []
    for b in ds:
        out.append(b)
        if len(out) == k:
            break
    ds.consumed += len(out)
    return out


@pytest.mark.parametrize("before,after", [((2, 3), (4, 2)), ((4, 2), (1, 5)), ((1, 4), (2, 4))])
def test_a_resume_on_another_layout_reads_every_sequence_exactly_once(many, before, after):
    a, b = many
    (w0, b0), (w1, b1) = before, after
    first = [DistillDataset([a, b], batch_size=b0, rank=r, world_size=w0, seed=11, n_streams=4) for r in range(w0)]
    seen = []
    for ds in first:
        seen += _real(_consume(ds, 3))
    state = first[0].state_dict()
    assert all(ds.state_dict() == state for ds in first)
    second = [DistillDataset([a, b], batch_size=b1, rank=r, world_size=w1, seed=11) for r in range(w1)]
    for ds in second:
        ds.load_state_dict(state)
        seen += _real(list(ds))
    n = len(logitstore.open(str(a)))
    assert sorted(seen) == list(range(n))
    assert second[0].n_streams == 4  # the checkpoint's order, not the new layout's default


def test_a_resume_on_the_same_layout_continues_batch_for_batch(many):
    a, _ = many
    ref = [x["index"].tolist() for x in DistillDataset([a], batch_size=3, world_size=2, rank=1, seed=2)]
    ds = DistillDataset([a], batch_size=3, world_size=2, rank=1, seed=2)
    got = [x["index"].tolist() for x in _consume(ds, 5)]
    again = DistillDataset([a], batch_size=3, world_size=2, rank=1, seed=2)
    again.load_state_dict(ds.state_dict())
    assert got + [x["index"].tolist() for x in again] == ref


def test_too_few_streams_for_the_layout_is_a_clear_error(many):
    a, _ = many
    from logitstore.errors import ConfigError, LogitStoreError

    with pytest.raises(ConfigError, match=r"--streams: 2 streams cannot be split evenly over 2 process\(es\) x 2 loader worker\(s\); use a multiple of 4"):
        DistillDataset([a], batch_size=2, world_size=2, num_workers=2, n_streams=2)
    with pytest.raises(ConfigError, match="use a multiple of 4"):
        DistillDataset([a], batch_size=2, world_size=2, num_workers=2, n_streams=6)
    state = DistillDataset([a], batch_size=2, world_size=2, n_streams=2).state_dict()
    big = DistillDataset([a], batch_size=2, world_size=4)
    with pytest.raises(LogitStoreError, match="checkpoint's data order: 2 streams cannot be split evenly over 4 .*; resume with ranks x workers dividing 2"):
        big.load_state_dict({**state, "consumed": 1})


def test_follow_trains_on_the_committed_shards_and_takes_in_more_each_epoch(many, tmp_path):
    a, _ = many
    s = tmp_path / "s"
    shutil.copytree(a, s)
    full = logitstore.open(str(s))
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (s / "manifest.json").rename(hidden / "manifest.json")
    for j in range(5, full.n_shards):
        (s / f"shards/{j:06d}/t0.commit.json").rename(hidden / f"{j}.json")
    ds = DistillDataset([s], batch_size=2, follow=True, seed=1)
    first = int(full.index.sizes[:5].sum())
    assert ds.n == first and sorted(_real(list(ds))) == list(range(first))
    mid = ds.state_dict()
    for j in range(5, full.n_shards):
        (hidden / f"{j}.json").rename(s / f"shards/{j:06d}/t0.commit.json")
    back = DistillDataset([s], batch_size=2, follow=True, seed=1)
    back.load_state_dict(mid)  # the checkpoint's epoch keeps the shards it started with
    assert back.n == first
    back.set_epoch(1)  # the next epoch takes in every shard committed by now
    assert back.n == len(full) and sorted(_real(list(back))) == list(range(len(full)))


READ_LOG = '''
import json, os, sys
from logitstore.storage.fsio import StoreFS
real = StoreFS.read
def read(self, rel, size=None):
    data = real(self, rel, size)
    with open(os.path.join(sys.argv[1], f"reads-{os.environ.get('RANK', '0')}.jsonl"), "a") as f:
        f.write(json.dumps([self.url, rel, len(data)]) + "\\n")
    return data
StoreFS.read = read
from trainer.cli import app
app(sys.argv[2:])
'''


def test_two_torchrun_processes_each_read_only_their_share_of_the_store_once(many, tmp_path, tokenizer):
    """One epoch of `trainer fit` on 2 processes (DDP, gloo, one loader worker each)."""
    import json
    import os
    import subprocess
    import sys

    a, b = many
    student = tmp_path / "student.json"
    student.write_text(json.dumps({"model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 32,
                                   "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
                                   "max_position_embeddings": 32}))
    steps = DistillDataset([a, b], batch_size=4, world_size=2, num_workers=1).batches_per_epoch()
    script = tmp_path / "traced_fit.py"
    script.write_text(READ_LOG)
    logs = tmp_path / "logs"
    logs.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script), str(logs),
                        "fit", "--logits", str(a), "--logits", str(b), "--student", str(student), "--out", str(tmp_path / "run"),
                        "--max-steps", str(steps), "--batch-size", "4", "--num-workers", "1", "--device", "cpu",
                        "--checkpoint-every", "0", "-q"], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    total = sum(f.stat().st_size for s in (a, b) for f in (s / "shards").rglob("*") if f.is_file() and not f.name.endswith(".commit.json"))
    per_rank = []
    for r in (0, 1):
        reads = [json.loads(line) for line in (logs / f"reads-{r}.jsonl").read_text().splitlines()]
        data = [(u, rel, n) for u, rel, n in reads if rel.startswith("shards/")]
        files = [(u, rel) for u, rel, _ in data]
        assert len(files) == len(set(files)), "a shard file was fetched twice by one rank"
        assert sum(n for *_, n in data) <= 0.6 * total, (sum(n for *_, n in data), total)
        per_rank.append(set(files))
    everything = {(str(s), str(f.relative_to(s))) for s in (a, b) for f in (s / "shards").rglob("*")
                  if f.is_file() and not f.name.endswith(".commit.json")}
    assert per_rank[0] | per_rank[1] == everything  # together the ranks read the whole store


def test_fit_follow_trains_on_a_store_being_written_and_says_when_there_is_nothing(many, tmp_path, tokenizer):
    import json

    from typer.testing import CliRunner

    from trainer.cli import app

    a, _ = many
    s = tmp_path / "s"
    shutil.copytree(a, s)
    (s / "manifest.json").unlink()
    n_shards = logitstore.open(str(a)).n_shards
    for j in range(6, n_shards):
        (s / f"shards/{j:06d}/t0.commit.json").unlink()
    student = tmp_path / "student.json"
    student.write_text(json.dumps({"model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 32,
                                   "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
                                   "max_position_embeddings": 32}))
    common = ["fit", "--logits", str(s), "--student", str(student), "--batch-size", "4", "--device", "cpu", "-q"]
    r = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "r0"), "--follow"])
    assert r.exit_code != 0 and "--follow: needs --max-steps" in r.output
    r = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "r1"), "--follow", "--max-steps", "12"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in (tmp_path / "r1" / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in rows if not x.get("eval")]
    assert steps[-1]["step"] == 12 and steps[-1]["epoch"] >= 1  # several passes over the six committed shards
    empty = tmp_path / "empty"
    shutil.copytree(s, empty)
    for rec in (empty / "shards").glob("*/t0.commit.json"):
        rec.unlink()
    r = CliRunner().invoke(app, [*common[:2], str(empty), *common[3:], "--out", str(tmp_path / "r2"), "--follow", "--max-steps", "2"])
    assert r.exit_code != 0 and "has no committed shard and no dump is writing it" in r.output, r.output


def test_a_resume_that_would_change_the_runs_length_is_refused_unless_max_steps_fixes_it(many):
    from logitstore.errors import ConfigError
    from trainer.config import FitConfig
    from trainer.resume import planned_total

    a, _ = many
    cfg = FitConfig(logits=(str(a),), student="x", out="y", epochs=3, batch_size=2)
    before = DistillDataset([a], batch_size=2, world_size=2, n_streams=4)
    total = planned_total({}, cfg, before)
    assert total == 3 * before.batches_per_epoch()
    after = DistillDataset([a], batch_size=2, world_size=4)
    after.load_state_dict({**before.state_dict(), "consumed": 2})
    assert after.batches_per_epoch() != before.batches_per_epoch()
    with pytest.raises(ConfigError, match=rf"--epochs 3 is {3 * after.batches_per_epoch()} steps, the run was planned as {total}"):
        planned_total({"total": total}, cfg, after)
    fixed = FitConfig(logits=(str(a),), student="x", out="y", max_steps=50, batch_size=2)
    assert planned_total({"total": 50}, fixed, after) == 50
    same = DistillDataset([a], batch_size=2, world_size=2, n_streams=4)
    assert planned_total({"total": total}, cfg, same) == total
