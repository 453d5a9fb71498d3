"""Dump -> store -> reader, checked against a direct full-vocabulary computation (both backends)."""

import numpy as np
import torch
import pytest

import logitstore
from logitstore.format.codec import Encoding
from logitstore.dump import DumpConfig, dump
from logitstore.format.hashing import sequence_hash
from logitstore.tools.info import info
from logitstore.tools.verify import verify

from helpers import reference_outputs, store_arrays

K, L = 12, 48


@pytest.fixture(scope="module")
def reference(llama_dir, corpus):
    return reference_outputs(llama_dir, corpus, L)


@pytest.mark.parametrize("fmt", ["zarr", "arrow"])
@pytest.mark.parametrize("encoding", ["lossless", "compact"])
def test_dump_matches_full_vocab_reference(tmp_path, llama_dir, corpus, reference, fmt, encoding):
    packed, ref_lp = reference
    out = tmp_path / "store"
    dump(DumpConfig(teachers=(f"llama={llama_dir}",), data=str(corpus), out=str(out), top_k=K, seq_len=L,
                    batch_size=5, format=fmt, encoding=encoding, shard_sequences=7, progress=False))
    store = logitstore.open(str(out))
    assert len(store) == len(packed.lengths) and store.teachers == ["llama"]
    assert store.manifest["n_tokens"] == packed.n_tokens
    got = store_arrays(store, "llama")
    np.testing.assert_array_equal(got["input_ids"], packed.input_ids)
    np.testing.assert_array_equal(got["length"], packed.lengths)
    enc = Encoding.from_dict(store.manifest["encoding"])
    N = len(packed.lengths)
    for n in range(N):
        ln = int(packed.lengths[n])
        for t in range(ln):
            row = ref_lp[n, t]
            exact_ids = set(np.argsort(-row)[:K].tolist())
            ids, lps = got["ids"][n, t], got["logprobs"][n, t]
            assert set(ids.tolist()) == exact_ids
            err = np.abs(lps - row[ids]).max()
            bound = 2e-4 + (enc.error_bound(row[ids][None].astype(np.float32))[0] if encoding == "compact" else 0)
            assert err <= bound, (n, t, err, bound)
            tail = 1 - np.exp(row[ids]).sum()
            assert abs(got["tail_mass"][n, t] - tail) <= 1e-5 + 1e-3 * tail
            fixed_point = 1 / 512 if encoding == "compact" else 0.0
            ent = -(np.exp(row) * row).sum()
            assert abs(got["entropy"][n, t] - ent) <= 2e-4 + fixed_point
            gold = row[packed.input_ids[n, t + 1]] if t + 1 < ln else 0.0
            assert abs(got["gold_logprob"][n, t] - gold) <= 2e-4 + fixed_point
    assert verify(str(out)) == []


def test_two_teachers_share_inputs_and_reader_api(tmp_path, llama_dir, gpt2_dir, corpus):
    out = tmp_path / "two"
    r = dump(DumpConfig(teachers=(f"a={llama_dir}", f"b={gpt2_dir}"), data=str(corpus), out=str(out), top_k=8,
                        seq_len=32, shard_sequences=10, progress=False))
    store = logitstore.open(str(out))
    assert store.teachers == ["a", "b"]
    # one copy of input_ids, one part per teacher in every shard
    assert all(set(s["parts"]) == {"inputs", "t0", "t1"} for s in store.index.entries())
    assert all(len(s["parts"][p]["files"]) == 1 for s in store.index.entries() for p in s["parts"])  # one file per part
    seq = store[len(store) - 1]
    n = len(seq["input_ids"])
    assert seq["seq_hash"] == sequence_hash(seq["input_ids"])
    for name in ("a", "b"):
        td = seq["teachers"][name]
        assert td["ids"].shape == (n, 8) and td["logprobs"].shape == (n, 8)
        assert td["tail_mass"].shape == td["gold_logprob"].shape == td["entropy"].shape == (n,)
    a, b = seq["teachers"]["a"], seq["teachers"]["b"]
    assert not np.allclose(a["entropy"], b["entropy"])  # different teachers really differ
    # batched iteration covers every sequence once, in order, with padded arrays
    seen = 0
    for batch in store.iter_batches(6, torch=True):
        B = batch["input_ids"].shape[0]
        assert batch["teachers"]["a"]["ids"].dtype == torch.int64  # usable by gather / Embedding as they are
        assert batch["input_ids"].shape == (B, 32)
        assert batch["teachers"]["b"]["logprobs"].shape == (B, 32, 8)
        np.testing.assert_array_equal(batch["input_ids"][0, : int(batch["length"][0])].numpy(),
                                      store[seen]["input_ids"])
        seen += B
    assert seen == len(store)
    assert set(next(store.iter_batches(2, ["b"]))["teachers"]) == {"b"}  # a subset of teachers, decoded alone
    d = info(str(out))
    assert d["tokens"] == store.manifest["n_tokens"] and [t["name"] for t in d["teachers"]] == ["a", "b"]
    # the statistics equal a direct computation over every real position of the stored values
    for t in d["teachers"]:
        arr = [store[i]["teachers"][t["name"]] for i in range(len(store))]
        tails = np.concatenate([x["tail_mass"] for x in arr]).astype(np.float64)
        ents = np.concatenate([x["entropy"] for x in arr]).astype(np.float64)
        assert t["mean_topk_mass"] == pytest.approx(1 - tails.mean(), abs=2e-3)  # stored tails are rounded
        assert t["mean_entropy"] == pytest.approx(ents.mean(), abs=2e-3)
    assert d["bytes_per_token"] == pytest.approx(store.manifest["total_bytes"] / store.manifest["n_tokens"])
    assert r.summary["tokens"] == store.manifest["n_tokens"]


def test_unpacked_windows_do_not_cross_documents(tmp_path, llama_dir, corpus, tokenizer):
    out = tmp_path / "nopack"
    dump(DumpConfig(teachers=(str(llama_dir),), data=str(corpus), out=str(out), top_k=4, seq_len=40, pack=False, progress=False))
    store = logitstore.open(str(out))
    eos = tokenizer.eos_token_id
    for i in range(len(store)):
        ids = store[i]["input_ids"]
        assert eos not in ids[:-1].tolist()  # an EOS may only end a window
    assert store.manifest["packed"] is False


def test_unpacked_windows_sorted_and_cut_per_batch_equal_the_models_own_forward(tmp_path, llama_dir, corpus, tokenizer):
    """--no-pack runs each shard's windows longest first and cuts every batch to its longest window;
    each stored window must equal the model's own forward over that window alone."""
    import torch

    from logitstore.capture.teacher import TeacherSpec

    import json
    import random

    from conftest import corpus_texts

    rng = random.Random(0)
    texts = [t[: rng.randint(10, 260)] for t in corpus_texts(n_docs=6, max_chars=6000) for _ in range(4)]
    data = tmp_path / "short.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = tmp_path / "nopack"
    dump(DumpConfig(teachers=(f"t={llama_dir}",), data=str(data), out=str(out), top_k=6, seq_len=48, pack=False,
                    batch_size=3, shard_sequences=7, encoding="lossless", progress=False))
    store = logitstore.open(str(out))
    lengths = [len(store[i]["input_ids"]) for i in range(len(store))]
    assert len(set(lengths)) > 3  # windows of many lengths, so batches really were cut
    model = TeacherSpec.parse(str(llama_dir)).load_model(torch.device("cpu"), torch.float32)
    vocab = len(tokenizer)
    for i in range(len(store)):
        row = store[i]
        ids = torch.from_numpy(row["input_ids"].astype(np.int64))[None]
        with torch.no_grad():
            ref = torch.log_softmax(model(ids).logits[0, :, :vocab].double(), -1)
        t = row["teachers"]["t"]
        top = torch.topk(ref, 6, dim=-1)
        np.testing.assert_allclose(t["logprobs"], top.values.numpy(), atol=2e-5)
        nxt = ids[0, 1:]
        gold = ref[:-1].gather(-1, nxt[:, None])[:, 0].numpy()
        np.testing.assert_allclose(t["gold_logprob"][:-1], gold, atol=2e-5)
        ent = -(ref.exp() * ref).sum(-1).numpy()
        np.testing.assert_allclose(t["entropy"], ent, atol=1e-4)  # float32 lse - E[x] at logits of ~100


def test_padded_vocab_never_appears(tmp_path, llama_dir, corpus, tokenizer):
    # the llama fixture has 7 extra output rows; k = vocab exercises every real id
    vocab = len(tokenizer)
    out = tmp_path / "full"
    dump(DumpConfig(teachers=(str(llama_dir),), data=str(corpus), out=str(out), top_k=vocab, seq_len=16,
                    max_tokens=64, encoding="lossless", progress=False))
    store = logitstore.open(str(out))
    got = store_arrays(store, store.teachers[0])
    valid = np.arange(16)[None] < got["length"][:, None]
    assert got["ids"][valid].max() == vocab - 1
    assert np.abs(got["tail_mass"][valid]).max() == 0
    np.testing.assert_allclose(np.exp(got["logprobs"][valid].astype(np.float64)).sum(-1), 1, atol=1e-5)


def test_a_missing_store_is_named_as_such(tmp_path):
    from logitstore.errors import FormatError

    with pytest.raises(FormatError, match="no such store"):
        logitstore.open(str(tmp_path / "nowhere"))


# --- the reader's paths beyond one sequential pass: batches across shards, prefetch, file cache ---

@pytest.fixture(scope="module")
def small(tmp_path_factory, llama_dir, corpus):
    out = tmp_path_factory.mktemp("reader") / "s"
    dump(DumpConfig(teachers=(f"a={llama_dir}",), data=str(corpus), out=str(out), top_k=5, seq_len=20, max_tokens=700,
                    shard_sequences=6, progress=False))
    return out


@pytest.mark.parametrize("as_torch", [False, True])
def test_batches_span_shards_and_the_last_one_is_short(small, as_torch):
    store = logitstore.open(str(small))
    n, B = len(store), 4
    assert n % B and n > 6, "the fixture must end in a short batch and hold several shards"
    batches = list(store.iter_batches(B, torch=as_torch))
    assert [len(b["length"]) for b in batches] == [B] * (n // B) + [n % B]
    i = 0
    for b in batches:
        for r in range(len(b["length"])):
            want = store[i]
            m = int(b["length"][r])
            got_ids = np.asarray(b["input_ids"][r, :m])
            np.testing.assert_array_equal(got_ids, want["input_ids"])
            assert bytes(np.asarray(b["seq_hash"][r])) == want["seq_hash"]
            for a in ("ids", "logprobs", "tail_mass", "entropy", "gold_logprob"):
                np.testing.assert_array_equal(np.asarray(b["teachers"]["a"][a][r, :m]), want["teachers"]["a"][a], err_msg=a)
            i += 1
    assert i == n


def test_prefetch_fetches_every_planned_part_ahead_on_its_threads(small):
    import threading

    ref = logitstore.open(str(small))
    store = logitstore.open(str(small), cache_shards=0)
    real, threads = store.fetcher.fetch, []

    def spy(key):
        threads.append((key, threading.current_thread().name))
        return real(key)

    store.fetcher.fetch = spy
    order = list(range(store.n_shards))[::-1]
    store.prefetch(order, depth=1)  # one part in flight at a time still prefetches
    for j in order:
        np.testing.assert_array_equal(store.load_shard(j)["teachers"]["a"]["logprobs"], ref.load_shard(j)["teachers"]["a"]["logprobs"])
    store.close()
    assert [k for k, _ in threads] == [(j, p) for j in order for p in ("inputs", "t0")], "each part once, in plan order"
    assert all(name.startswith("logitstore-prefetch") for _, name in threads), threads
    store.prefetch(order, depth=0)  # depth 0: no prefetching, fetched by the reader itself
    threads.clear()
    store.load_shard(order[0])
    assert threads and all(not name.startswith("logitstore-prefetch") for _, name in threads)


def test_the_file_cache_serves_reads_once_filled(small, tmp_path):
    import shutil

    copy, cache = tmp_path / "copy", tmp_path / "cache"
    shutil.copytree(small, copy)
    first = logitstore.open(str(copy), cache_dir=str(cache))
    ref = store_arrays(first, "a")
    for f in (copy / "shards").rglob("*"):  # every data file damaged: only the cache can serve them now
        if f.is_file() and f.name != "commit.json":
            f.write_bytes(b"\0" * f.stat().st_size)
    again = logitstore.open(str(copy), cache_dir=str(cache))
    np.testing.assert_array_equal(store_arrays(again, "a")["logprobs"], ref["logprobs"])
    assert again.file_cache.misses == 0 and again.file_cache.hits > 0
    with pytest.raises(logitstore.FormatError, match="sha256 mismatch"):  # without the cache they are refused
        store_arrays(logitstore.open(str(copy)), "a")


def test_prefetcher_keeps_exactly_depth_parts_ahead():
    """``depth`` fetches run at once (not fewer), and the next starts only after a take (not more)."""
    import threading
    import time

    from logitstore.storage.prefetch import Prefetcher

    for depth in (1, 2, 3):
        keys = list(range(depth + 3))
        started, release, cond = [], {k: threading.Event() for k in keys}, threading.Condition()

        def fetch(key):
            with cond:
                started.append(key)
                cond.notify_all()
            assert release[key].wait(10)
            return key

        p = Prefetcher(fetch, keys, depth=depth)
        with cond:  # all of the first `depth` start concurrently (each blocks until released)
            assert cond.wait_for(lambda: len(started) == depth, 10), (depth, started)
        release[0].set()
        time.sleep(0.2)  # a finished fetch frees a thread: nothing more may start before a take
        assert sorted(started) == keys[:depth], (depth, started)
        assert p.take(0) == 0
        with cond:
            assert cond.wait_for(lambda: len(started) == depth + 1, 10), (depth, started)
        for e in release.values():
            e.set()
        p.close()


def test_batch_size_is_checked(small):
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        next(logitstore.open(str(small)).iter_batches(0))


def test_stored_lengths_outside_the_window_are_refused_at_either_end():
    from logitstore.format.decode import check_lengths

    check_lengths(np.array([1, 20], np.uint32), 20, "s")
    for bad in ([0, 5], [5, 21]):
        with pytest.raises(logitstore.FormatError, match=r"s/inputs/length: values must lie in \[1, 20\]"):
            check_lengths(np.array(bad, np.uint32), 20, "s")


def test_a_shard_out_of_range_is_named(small):
    store = logitstore.open(str(small))
    with pytest.raises(IndexError, match=rf"shard {store.n_shards} out of range \[0, {store.n_shards}\)"):
        store.load_shard(store.n_shards)


def test_errors_and_repr_name_the_store(small, tmp_path):
    store = logitstore.open(str(small))
    assert str(small) in repr(store)
    with pytest.raises(KeyError, match=f"no teacher 'zz' in {small}"):
        store.teacher("zz")
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("x")
    with pytest.raises(logitstore.FormatError, match=r"no manifest.json; not a complete logitstore store$"):
        logitstore.open(str(stray))


def test_single_sequence_batches_lru_shards_and_errors_that_name_the_part(small, monkeypatch):
    store = logitstore.open(str(small), cache_shards=2)
    assert sum(len(b["length"]) for b in store.iter_batches(1)) == len(store)
    fetched = []
    real = store.fetcher.fetch
    store.fetcher.fetch = lambda key: fetched.append(key) or real(key)
    store._cache.clear()
    for j in (0, 1, 0, 2, 0):  # least recently used is 1 when 2 arrives: 0 stays cached
        store.load_shard(j)
    assert [j for j, p in fetched if p == "inputs"] == [0, 1, 2]
    from logitstore.format.codec import Encoding

    def broken(self, arrays, vocab, absent=False):
        raise logitstore.FormatError("ids: planted")

    monkeypatch.setattr(Encoding, "decode", broken)
    with pytest.raises(logitstore.FormatError, match=r"^shards/000003/t0/ids: planted$"):
        store.load_shard(3)


def test_parts_whose_k_differs_from_the_manifest_are_refused_and_batches_default_to_numpy(small, tmp_path):
    import json
    import shutil

    assert isinstance(next(logitstore.open(str(small)).iter_batches(2))["input_ids"], np.ndarray)
    copy = tmp_path / "copy"
    shutil.copytree(small, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["teachers"][0]["k"] += 1  # the parts hold k = 5 per position; the manifest now promises 6
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(logitstore.FormatError, match=r"shards/000000/t0/ids: expected shape \(6, 20, 6\)"):
        logitstore.open(str(copy)).load_shard(0)
