"""logitstore.sampling: the epoch plan against a brute-force reference, and its properties
(coverage, determinism, elastic resume, locality, mixing bound, edge cases)."""

from __future__ import annotations

import ast
import math
import time
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from logitstore.errors import ConfigError
from logitstore.sampling import EpochPlan, Layout

ROOT = Path(__file__).resolve().parents[1]


# -- brute-force reference (materialises everything) ----------------------------------------------

def ref_q(sizes, seed, epoch, shuffle, excluded=()):
    sizes = np.asarray(sizes, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]) if sizes.size else sizes
    order = np.random.default_rng([seed, epoch]).permutation(sizes.size) if shuffle else range(sizes.size)
    excl = set(int(e) for e in excluded)
    q = []
    for j in order:
        local = np.random.default_rng([seed, epoch, 1, int(j)]).permutation(sizes[j]) if shuffle else range(sizes[j])
        q += [int(starts[j] + x) for x in local if int(starts[j] + x) not in excl]
    return q


def ref_streams(sizes, c_count, seed=0, epoch=0, shuffle=True, mix=1, excluded=()):
    q = ref_q(sizes, seed, epoch, shuffle, excluded)
    n, out, at = len(q), [], 0
    for c in range(c_count):
        block = np.array(q[at:at + n // c_count + (c < n % c_count)], dtype=np.int64)
        at += block.size
        if shuffle and mix > 1:
            rng = np.random.default_rng([seed, epoch, 2, c])
            block = block[np.argsort(np.arange(block.size) + rng.uniform(0, mix, block.size), kind="stable")]
        out.append(block)
    return out


def ref_slot_list(streams, layout, rank, worker, pos):
    """[(key, stream, p, index)] of a slot's remaining elements, sorted by key."""
    c_count, w_count = len(streams), layout.world_size
    items = [(p * c_count + c, c, p, int(streams[c][p])) for c in range(c_count)
             if c % w_count == rank and (c // w_count) % layout.num_workers == worker
             for p in range(int(pos[c]), len(streams[c]))]
    return sorted(items)


def ref_advance(streams, layout, consumed, pos):
    pos = np.array(pos, dtype=np.int64)
    new = pos.copy()
    nw, b = layout.num_workers, layout.batch_size
    for r in range(layout.world_size):
        for w in range(nw):
            k_w = max(0, math.ceil((consumed - w) / nw))
            for _, c, _, _ in ref_slot_list(streams, layout, r, w, pos)[:k_w * b]:
                new[c] += 1
    return new


def real_rows(indices, weights):
    return [int(i) for i, x in zip(np.ravel(indices), np.ravel(weights)) if x > 0]


def sizes_for(seed, n_shards=23, low=0, high=17):
    return np.random.default_rng(seed).integers(low, high, n_shards)


def all_real(plan, layout, pos=None, upto=None):
    out = []
    for r in range(layout.world_size):
        idx, wts = plan.rank_batches(layout, r, pos)
        for i, w in list(zip(idx, wts))[:upto]:
            out += real_rows(i, w)
    return out


LAYOUTS = [Layout(1, 1, 4), Layout(2, 1, 3), Layout(3, 2, 5), Layout(2, 3, 1), Layout(4, 2, 7)]


# -- agreement with the reference ---------------------------------------------------------------

@pytest.mark.parametrize("shuffle, mix", [(True, 1), (True, 5), (False, 1), (False, 4)])
@pytest.mark.parametrize("seed", [0, 3])
def test_streams_match_the_materialised_reference(shuffle, mix, seed):
    sizes = sizes_for(seed)
    excluded = np.sort(np.random.default_rng(seed + 9).choice(int(sizes.sum()), 20, replace=False))
    plan = EpochPlan(sizes, seed=seed, epoch=2, shuffle=shuffle, mix=mix, n_streams=7, excluded=excluded)
    ref = ref_streams(sizes, 7, seed, 2, shuffle, mix, excluded)
    assert plan.n_sequences == int(sizes.sum()) - 20
    assert plan.stream_lengths.tolist() == [len(s) for s in ref]
    for c in range(7):
        assert plan.stream(c).dtype == np.int64 and np.array_equal(plan.stream(c), ref[c])


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_slot_batches_match_the_reference_and_pad_with_weight_zero_fillers(layout):
    sizes = sizes_for(5)
    plan = EpochPlan(sizes, seed=5, mix=3, n_streams=9)
    streams = ref_streams(sizes, 9, 5, 0, True, 3)
    pos = np.random.default_rng(1).integers(0, plan.stream_lengths + 1)
    k = plan.n_batches(layout, pos)
    rem = [len(ref_slot_list(streams, layout, r, w, pos)) for r in range(layout.world_size)
           for w in range(layout.num_workers)]
    assert k == max(math.ceil(x / layout.batch_size) for x in rem)
    for r in range(layout.world_size):
        for w in range(layout.num_workers):
            idx, wts = plan.slot_batches(layout, r, w, pos)
            assert idx.shape == wts.shape == (k, layout.batch_size)
            assert idx.dtype == np.int64 and wts.dtype == np.float32
            ref = [t[3] for t in ref_slot_list(streams, layout, r, w, pos)]
            flat, fw = idx.ravel(), wts.ravel()
            assert flat[:len(ref)].tolist() == ref and (fw[:len(ref)] == 1).all() and (fw[len(ref):] == 0).all()
            if ref:
                assert (flat[len(ref):] == ref[-1]).all()


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_advance_equals_brute_force(layout):
    sizes = sizes_for(11)
    plan = EpochPlan(sizes, seed=11, mix=4, n_streams=10)
    streams = ref_streams(sizes, 10, 11, 0, True, 4)
    rng = np.random.default_rng(2)
    for trial in range(6):
        pos = np.zeros(10, np.int64) if trial == 0 else rng.integers(0, plan.stream_lengths + 1)
        total = plan.n_batches(layout, pos) * layout.num_workers
        for consumed in sorted({0, 1, total // 3, total // 2 + 1, max(total - 1, 0), total}):
            got = plan.advance(layout, consumed, pos)
            assert got.dtype == np.int64 and got.tolist() == ref_advance(streams, layout, consumed, pos).tolist()


# -- coverage and determinism -------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("seed", [1, 2])
def test_an_epoch_reads_every_kept_sequence_exactly_once(layout, seed):
    sizes = sizes_for(seed, n_shards=31)
    excluded = np.sort(np.random.default_rng(seed).choice(int(sizes.sum()), 15, replace=False))
    plan = EpochPlan(sizes, seed=seed, mix=6, n_streams=17, excluded=excluded)
    rows = all_real(plan, layout)
    assert sorted(rows) == sorted(set(range(int(sizes.sum()))) - set(excluded.tolist()))
    k = plan.n_batches(layout)
    for r in range(layout.world_size):
        idx, wts = plan.rank_batches(layout, r)
        assert len(idx) == len(wts) == k * layout.num_workers
        for i, (a, b) in enumerate(zip(idx, wts)):
            ref_i, ref_w = plan.slot_batches(layout, r, i % layout.num_workers)
            assert np.array_equal(a, ref_i[i // layout.num_workers]) and np.array_equal(b, ref_w[i // layout.num_workers])


def test_the_plan_is_a_pure_function_of_its_inputs():
    sizes = sizes_for(4, n_shards=40)
    layout = Layout(3, 2, 4)

    def plan(**kw):
        return EpochPlan(sizes, **{"seed": 4, "epoch": 1, "mix": 5, "n_streams": 12, **kw})

    def batches(p):
        return [np.concatenate(p.rank_batches(layout, r)[0] + p.rank_batches(layout, r)[1]) for r in range(3)]

    same = batches(plan())
    assert all(np.array_equal(a, b) for a, b in zip(same, batches(plan())))
    for other in (plan(epoch=2), plan(seed=5)):
        assert not all(np.array_equal(a, b) for a, b in zip(same, batches(other)))
        assert sorted(all_real(other, layout)) == list(range(int(sizes.sum())))


@pytest.mark.parametrize("n_shards, excluded", [(29, 0), (40, 13)])
def test_global_steps_hold_the_same_sequences_for_any_world_size(n_shards, excluded):
    sizes = sizes_for(8, n_shards=n_shards, low=1)
    excl = np.random.default_rng(3).choice(int(sizes.sum()), excluded, replace=False)
    plan = EpochPlan(sizes, seed=8, mix=4, n_streams=8, excluded=excl)
    steps = {}
    for w in (1, 2, 4):
        layout = Layout(w, 1, 12 // w)
        per_rank = [plan.rank_batches(layout, r) for r in range(w)]
        steps[w] = [Counter(x for idx, wts in per_rank for x in real_rows(idx[t], wts[t]))
                    for t in range(plan.n_batches(layout))]
    assert steps[1] == steps[2] == steps[4] and sum(map(len, steps[1])) == plan.n_sequences


# -- resume -------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", [Layout(2, 1, 3), Layout(3, 2, 4), Layout(2, 3, 5)], ids=str)
def test_resume_on_the_same_layout_continues_the_uninterrupted_run(layout):
    sizes = sizes_for(6, n_shards=30)
    plan = EpochPlan(sizes, seed=6, mix=3, n_streams=12)
    nw, total = layout.num_workers, plan.n_batches(layout) * layout.num_workers
    full = [plan.rank_batches(layout, r) for r in range(layout.world_size)]
    for consumed in range(total + 1):
        pos = plan.advance(layout, consumed)
        for r in range(layout.world_size):
            if consumed % nw == 0:  # a whole DataLoader round: the rest of the run, batch for batch
                idx, wts = plan.rank_batches(layout, r, pos)
                assert len(idx) == total - consumed
                assert all(np.array_equal(a, b) for a, b in zip(idx + wts, full[r][0][consumed:] + full[r][1][consumed:]))
            for w in range(nw):  # per worker always: the slot's remaining batches
                k_w = max(0, math.ceil((consumed - w) / nw))
                idx, wts = plan.slot_batches(layout, r, w, pos)
                before_i, before_w = plan.slot_batches(layout, r, w)
                assert real_rows(idx, wts) == real_rows(before_i[k_w:], before_w[k_w:])
        rest = all_real(plan, layout, pos)
        done = all_real(plan, layout, upto=consumed)
        assert sorted(done + rest) == list(range(plan.n_sequences))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_resume_on_other_layouts_reads_every_sequence_once(seed):
    sizes = sizes_for(seed, n_shards=37, low=1, high=23)
    excluded = np.sort(np.random.default_rng(seed).choice(int(sizes.sum()), 9, replace=False))
    plan = EpochPlan(sizes, seed=seed, mix=7, n_streams=24, excluded=excluded)
    chain = [Layout(4, 2, 3), Layout(2, 3, 5), Layout(3, 1, 2), Layout(1, 4, 6)]
    rng = np.random.default_rng(seed + 100)
    pos, seen = None, []
    for i, layout in enumerate(chain):
        total = plan.n_batches(layout, pos) * layout.num_workers
        consumed = total if i == len(chain) - 1 else int(rng.integers(1, total))
        seen += all_real(plan, layout, pos, upto=consumed)
        pos = plan.advance(layout, consumed, pos)
    assert np.array_equal(pos, plan.stream_lengths)
    assert sorted(seen) == sorted(set(range(int(sizes.sum()))) - set(excluded.tolist()))


def test_an_epoch_that_is_fully_consumed_has_nothing_left():
    plan = EpochPlan(sizes_for(3), seed=3, n_streams=6)
    layout = Layout(2, 3, 2)
    pos = plan.advance(layout, plan.n_batches(layout) * 3)
    assert np.array_equal(pos, plan.stream_lengths) and plan.n_batches(Layout(1, 1, 4), pos) == 0
    assert plan.rank_batches(Layout(1, 1, 4), 0, pos) == ([], [])


# -- locality and mixing ------------------------------------------------------------------------

def shards_touched(indices, sizes):
    ends = np.cumsum(sizes)
    return set(np.searchsorted(ends, np.asarray(indices), side="right").tolist())


@pytest.mark.parametrize("seed, n_streams", [(0, 5), (1, 13), (2, 40)])
def test_each_stream_touches_only_the_shards_of_its_block(seed, n_streams):
    sizes = sizes_for(seed, n_shards=50, low=1, high=30)
    plan = EpochPlan(sizes, seed=seed, mix=9, n_streams=n_streams)
    for c in range(n_streams):
        s = plan.stream(c)
        assert len(shards_touched(s, sizes)) <= math.ceil(s.size / sizes.min()) + 2


def test_a_rank_touches_about_one_over_world_size_of_the_shards():
    sizes = np.full(64, 50)
    plan = EpochPlan(sizes, seed=1, mix=16, n_streams=16)
    layout = Layout(8, 1, 4)
    for r in range(8):
        idx, wts = plan.rank_batches(layout, r)
        assert len(shards_touched(real_rows(idx, wts), sizes)) <= 64 // 8 + 2


@pytest.mark.parametrize("mix", [2, 5, 33])
def test_mixing_moves_each_element_fewer_than_mix_places(mix):
    sizes = sizes_for(7, n_shards=20, low=5)
    plain = EpochPlan(sizes, seed=7, mix=1, n_streams=3)
    mixed = EpochPlan(sizes, seed=7, mix=mix, n_streams=3)
    for c in range(3):
        a, b = plain.stream(c), mixed.stream(c)
        where = {int(x): i for i, x in enumerate(b)}
        moves = np.array([where[int(x)] - i for i, x in enumerate(a)])
        assert np.abs(moves).max() < mix and (moves != 0).any()


def test_without_shuffle_every_stream_is_in_store_order():
    sizes = sizes_for(2, n_shards=15)
    excluded = [0, 5, 6, 7, 40]
    plan = EpochPlan(sizes, shuffle=False, mix=8, n_streams=4, excluded=excluded)
    whole = np.concatenate([plan.stream(c) for c in range(4)])
    assert whole.tolist() == [i for i in range(int(sizes.sum())) if i not in excluded]


# -- edge cases ---------------------------------------------------------------------------------

@pytest.mark.parametrize("sizes", [[], [0], [0, 0, 0]])
def test_an_empty_store_has_no_batches(sizes):
    plan = EpochPlan(sizes, n_streams=4, mix=3)
    layout = Layout(2, 2, 3)
    assert plan.n_sequences == 0 and plan.stream_lengths.tolist() == [0] * 4 and plan.n_batches(layout) == 0
    idx, wts = plan.slot_batches(layout, 1, 1)
    assert idx.shape == wts.shape == (0, 3)
    assert plan.rank_batches(layout, 0) == ([], []) and plan.advance(layout, 0).tolist() == [0] * 4
    assert plan.stream(3).size == 0


@pytest.mark.parametrize("sizes, n_streams, layout", [
    ([10], 4, Layout(2, 2, 2)),            # one shard
    ([3, 2], 9, Layout(3, 2, 2)),          # more streams than shards and than sequences
    ([1] * 13, 5, Layout(2, 2, 3)),        # shards of one sequence
    ([4, 6, 5], 4, Layout(2, 1, 64)),      # batch larger than any slot
])
def test_small_and_degenerate_stores(sizes, n_streams, layout):
    plan = EpochPlan(sizes, seed=2, mix=3, n_streams=n_streams)
    rows = all_real(plan, layout)
    assert sorted(rows) == list(range(sum(sizes)))
    for r in range(layout.world_size):
        for w in range(layout.num_workers):
            idx, wts = plan.slot_batches(layout, r, w)
            assert idx.shape[0] == plan.n_batches(layout) >= 1
            assert ((idx >= 0) & (idx < sum(sizes))).all()  # fillers are valid indices too


def test_a_slot_with_no_sequences_pads_with_q0_and_a_drained_slot_with_its_last_read():
    plan = EpochPlan([3, 2], seed=2, n_streams=9)  # 5 sequences: streams 5..8 are empty
    layout = Layout(3, 3, 2)
    q0 = plan.stream(0)[0]
    idx, wts = plan.slot_batches(layout, 2, 2)  # stream 8 only
    assert (wts == 0).all() and (idx == q0).all()
    pos = plan.advance(layout, 1)  # worker 0 slots drained
    idx, wts = plan.slot_batches(layout, 0, 0, pos)
    assert (wts == 0).all() and (idx == plan.stream(0)[-1]).all()


def test_a_fully_excluded_shard_is_skipped():
    sizes = [4, 5, 3, 6]
    excluded = np.arange(4, 9)  # all of shard 1
    plan = EpochPlan(sizes, seed=1, n_streams=3, excluded=excluded)
    rows = all_real(plan, Layout(3, 1, 2))
    assert plan.n_sequences == 13 and sorted(rows) == [i for i in range(18) if not 4 <= i < 9]
    ref = ref_streams(sizes, 3, 1, 0, True, 1, excluded)
    assert all(np.array_equal(plan.stream(c), ref[c]) for c in range(3))


def test_excluded_may_come_unsorted_and_with_duplicates():
    sizes = sizes_for(4)
    excluded = np.sort(np.random.default_rng(4).choice(int(sizes.sum()), 12, replace=False))
    messy = np.random.default_rng(5).permutation(np.concatenate([excluded, excluded[:4]]))
    a, b = (EpochPlan(sizes, seed=4, n_streams=5, excluded=e) for e in (excluded, messy))
    assert a.n_sequences == b.n_sequences and all(np.array_equal(a.stream(c), b.stream(c)) for c in range(5))


def test_explicit_starts_that_tile_are_accepted():
    plan = EpochPlan([2, 0, 3], starts=[0, 2, 2], n_streams=2)
    assert plan.n_sequences == 5


# -- validation ---------------------------------------------------------------------------------

def test_layout_validates_and_maps_zero_workers_to_one():
    assert Layout(2, 0, 4) == Layout(2, 1, 4) and Layout(2, 0, 4).num_workers == 1
    for bad in [(0, 1, 1), (1, -1, 1), (1, 1, 0), (1.5, 1, 1), (True, 1, 1), ("2", 1, 1)]:
        with pytest.raises(ConfigError):
            Layout(*bad)


def test_too_few_streams_for_the_layout_is_refused_with_one_line():
    plan = EpochPlan([10, 10], n_streams=5)
    for call in (lambda: plan.n_batches(Layout(3, 2, 1)), lambda: plan.slot_batches(Layout(3, 2, 1), 0, 0),
                 lambda: plan.advance(Layout(3, 2, 1), 0), lambda: plan.slot_streams(Layout(6, 1, 1), 0, 0)):
        with pytest.raises(ConfigError, match="n_streams") as err:
            call()
        msg = str(err.value)
        assert "\n" not in msg and "world size" in msg and "workers" in msg and "raise n_streams" in msg
    assert plan.n_batches(Layout(5, 1, 1)) == 4  # C need not be a multiple of W * nw
    assert plan.slot_streams(Layout(2, 2, 1), 0, 0) == [0, 4] and plan.slot_streams(Layout(2, 2, 1), 1, 1) == [3]


@pytest.mark.parametrize("kwargs", [
    {"sizes": [3, -1]}, {"sizes": [[1, 2]]}, {"sizes": [1.5, 2]}, {"sizes": [3, 4], "starts": [0, 4]},
    {"sizes": [3, 4], "starts": [0]}, {"sizes": [3, 4], "excluded": [7]}, {"sizes": [3, 4], "excluded": [-1]},
    {"sizes": [3], "mix": 0}, {"sizes": [3], "n_streams": 0}, {"sizes": [3], "seed": -1}, {"sizes": [3], "epoch": -2},
])
def test_bad_plan_settings_are_config_errors(kwargs):
    kwargs = dict(kwargs)
    with pytest.raises(ConfigError):
        EpochPlan(kwargs.pop("sizes"), **kwargs)


def test_bad_positions_streams_ranks_and_consumed_counts_are_config_errors():
    plan = EpochPlan([5, 6], n_streams=3)
    layout = Layout(1, 1, 2)
    for pos in ([0, 0], [0, 0, -1], [0, 0, 5], [[0, 0, 0]]):
        with pytest.raises(ConfigError):
            plan.n_batches(layout, pos)
    for call in (lambda: plan.stream(3), lambda: plan.stream(-1), lambda: plan.slot_batches(layout, 1, 0),
                 lambda: plan.slot_batches(layout, 0, 1), lambda: plan.advance(layout, -1),
                 lambda: plan.advance(layout, plan.n_batches(layout) + 1), lambda: plan.n_batches("layout")):
        with pytest.raises(ConfigError):
            call()


# -- scale and dependencies ---------------------------------------------------------------------

def test_one_slot_of_a_large_store_allocates_only_its_share():
    """5e7 sequences in 5e4 shards, 64 ranks x 4 workers: a slot's work stays near its own share."""
    plan = EpochPlan(np.full(50_000, 1_000), seed=1, epoch=3, mix=64, n_streams=256)
    layout = Layout(64, 4, 8)
    tracemalloc.start()
    idx, wts = plan.slot_batches(layout, 17, 3)
    pos = plan.advance(layout, 1234)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    share = 50_000_000 // 256
    assert (wts == 1).sum() == share and pos.shape == (256,)
    assert peak < 40 * share * 8  # O(share), far below one O(n) int64 array (400 MB)


def test_the_package_imports_only_numpy_and_logitstore_errors():
    for path in (ROOT / "logitstore" / "sampling").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert name.split(".")[0] in {"__future__", "dataclasses", "numpy"} or name in {
                    "logitstore.errors", "logitstore.sampling.plan", "logitstore.sampling.canonical"}, (path, name)


if __name__ == "__main__":  # timing of the large case (not asserted)
    t0 = time.perf_counter()
    big = EpochPlan(np.full(50_000, 1_000), seed=1, epoch=3, mix=64, n_streams=256)
    t1 = time.perf_counter()
    big.slot_batches(Layout(64, 4, 8), 17, 3)
    t2 = time.perf_counter()
    big.advance(Layout(64, 4, 8), 1234)
    t3 = time.perf_counter()
    print(f"n=5e7, 5e4 shards, W=64, nw=4, C=256: plan {1e3 * (t1 - t0):.1f} ms, "
          f"one slot's batches {1e3 * (t2 - t1):.1f} ms, advance {1e3 * (t3 - t2):.1f} ms")
