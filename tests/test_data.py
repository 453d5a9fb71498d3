"""The streaming dataset: joins, coverage across ranks x workers, exact mid-epoch resume."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import logitstore
from logitstore.dump import DumpConfig, dump
from logitstore.errors import ConfigError, LogitStoreError
from trainer.data import DistillDataset


@pytest.fixture(scope="module")
def stores(tmp_path_factory, llama_dir, gpt2_dir, corpus):
    root = tmp_path_factory.mktemp("data-stores")
    base = dict(data=str(corpus), top_k=5, seq_len=20, max_tokens=700, progress=False)
    a = root / "a"
    dump(DumpConfig(teachers=(f"llama={llama_dir}",), out=str(a), shard_sequences=6, **base))
    b = root / "b"  # another teacher, other shard layout
    dump(DumpConfig(teachers=(f"gpt2={gpt2_dir}",), out=str(b), shard_sequences=11, **base))
    c = root / "c"  # other sequences
    dump(DumpConfig(teachers=(f"gpt2={gpt2_dir}",), out=str(c), shard_sequences=11, **{**base, "seq_len": 20, "max_tokens": 660}))
    return a, b, c


def collect(ds, workers):
    loader = DataLoader(ds, batch_size=None, num_workers=workers)
    return list(loader)


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 2])
def test_every_sequence_once_per_epoch(stores, world, workers):
    a, b, _ = stores
    seen, steps = [], []
    for rank in range(world):
        ds = DistillDataset([a, b], batch_size=4, seed=7, shuffle_buffer=5, rank=rank, world_size=world, num_workers=workers)
        ds.set_epoch(1)
        batches = collect(ds, workers)
        steps.append(len(batches))
        for bt in batches:
            seen += bt["index"][bt["weight"] > 0].tolist()
            # filler rows carry no labels
            assert (bt["labels"][bt["weight"] == 0] == -100).all()
    assert sorted(seen) == list(range(ds.n)), "each sequence exactly once across ranks and workers"
    assert len(set(steps)) == 1, "every rank takes the same number of steps"


def test_epochs_are_shuffled_differently_but_deterministically(stores):
    a, _, _ = stores
    ds = DistillDataset([a], batch_size=4, seed=3)
    assert not np.array_equal(ds.epoch_order(0), ds.epoch_order(1))
    assert np.array_equal(ds.epoch_order(1), DistillDataset([a], batch_size=4, seed=3).epoch_order(1))
    assert sorted(ds.epoch_order(2)) == list(range(ds.n))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_continues_with_the_next_batch(stores, workers):
    a, b, _ = stores
    full = collect(_ds(a, b, workers), workers)
    ds = _ds(a, b, workers)
    ds.consumed = 3  # what the training loop records after taking 3 batches
    state = ds.state_dict()
    resumed = _ds(a, b, workers)
    resumed.load_state_dict(state)
    rest = collect(resumed, workers)
    assert len(rest) == len(full) - 3
    for x, y in zip(full[3:], rest):
        for k in x:
            assert torch.equal(x[k], y[k]), k


def _ds(a, b, workers):
    ds = DistillDataset([a, b], batch_size=3, seed=11, num_workers=workers)
    ds.set_epoch(2)
    return ds


def test_batch_contents_match_the_stores(stores):
    a, b, _ = stores
    ds = DistillDataset([a, b], batch_size=2, shuffle=False)
    assert ds.teacher_names == ["llama", "gpt2"]
    bt = next(iter(ds))
    sa, sb = logitstore.open(str(a)), logitstore.open(str(b))
    L = ds.seq_len
    for row in range(2):
        i = int(bt["index"][row])
        n = len(sa[i]["input_ids"])
        assert torch.equal(bt["input_ids"][row, :n], torch.from_numpy(sa[i]["input_ids"].astype(np.int64)))
        assert bt["labels"][row, n - 1] == -100 and bt["labels"][row, 0] == bt["input_ids"][row, 1]
        for m, (store, name) in enumerate(((sa, "llama"), (sb, "gpt2"))):
            td = store[i]["teachers"][name]
            for t in range(n):
                flat = row * L + t
                sup = bt["support"][flat][bt["valid"][flat]].tolist()
                got = dict(zip(sup, bt["teacher_lp"][m, flat][bt["valid"][flat]].tolist()))
                for tid, lp in zip(td["ids"][t].tolist(), td["logprobs"][t].tolist()):
                    assert got[tid] == pytest.approx(lp, abs=1e-6)


def test_mismatched_stores_are_refused(stores, tmp_path):
    a, _, c = stores
    with pytest.raises(LogitStoreError, match="same sequences"):
        DistillDataset([a, c], batch_size=2)


# --- BOS: documents start with BOS when the tokenizer's own convention is to add one ---------------

def bos_tokenizer():
    """The test tokenizer plus a post-processor that prepends ``<|bos|>``, as Llama 3's does."""
    from tokenizers.processors import TemplateProcessing

    from conftest import build_tokenizer

    tok = build_tokenizer(extra_special="<|bos|>")
    bos = tok.convert_tokens_to_ids("<|bos|>")
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B",
                                                              special_tokens=[("<|bos|>", bos)])
    tok.bos_token = "<|bos|>"
    return tok


@pytest.fixture(scope="module")
def bos_teacher(tmp_path_factory):
    from conftest import save_llama

    return save_llama(tmp_path_factory.mktemp("bos-llama"), bos_tokenizer())


def test_documents_start_with_bos_when_the_tokenizer_adds_one(tmp_path, bos_teacher, corpus):
    from logitstore.capture.documents import load_texts
    from logitstore.capture.teacher import TeacherSpec

    tok = TeacherSpec.parse(str(bos_teacher)).load_tokenizer()  # as a dump loads it
    bos, eos = tok.bos_token_id, tok.eos_token_id
    assert bos != eos and tok("x")["input_ids"][0] == bos
    out = tmp_path / "s"
    m = dump(DumpConfig(teachers=(f"t={bos_teacher}",), data=str(corpus), out=str(out), top_k=4, seq_len=32,
                        progress=False)).manifest
    s = logitstore.open(str(out))
    stream = np.concatenate([s[i]["input_ids"] for i in range(len(s))]).astype(np.int64)
    n_docs = len(load_texts(str(corpus)))
    assert stream[0] == bos
    assert (stream == bos).sum() == n_docs and (stream == eos).sum() == n_docs
    after_eos = np.flatnonzero(stream[:-1] == eos) + 1
    assert (stream[after_eos] == bos).all(), "every document after the first starts with BOS right after the EOS"
    # the same documents without BOS: one token per document fewer
    docs = [tok(t, add_special_tokens=False)["input_ids"] for t in load_texts(str(corpus))]
    assert stream.size == sum(len(d) + 2 for d in docs)
    assert stream[1 : 1 + len(docs[0])].tolist() == docs[0]
    from logitstore.capture.corpus import adds_bos

    assert m["bos"] is True and adds_bos(tok)


def test_bos_choice_is_part_of_the_plan(tmp_path, bos_teacher, corpus):
    out = tmp_path / "s"
    base = dict(teachers=(f"t={bos_teacher}",), data=str(corpus), out=str(out), top_k=4, seq_len=32, max_tokens=200,
                progress=False)
    dump(DumpConfig(**base))
    with pytest.raises(ConfigError, match="different settings.*bos"):
        dump(DumpConfig(**base, bos="never"))
    m = dump(DumpConfig(**{**base, "out": str(tmp_path / "never")}, bos="never")).manifest
    assert m["bos"] is False
    assert bos_tokenizer().bos_token_id not in logitstore.open(str(tmp_path / "never"))[0]["input_ids"].tolist()


def test_tokenizer_without_bos_convention_packs_as_before(tokenizer, corpus, llama_dir, tmp_path):
    """The test tokenizer names a BOS token but does not add it: nothing changes (auto = no BOS)."""
    from logitstore.capture.corpus import adds_bos, pack
    from logitstore.capture.documents import load_texts

    texts = load_texts(str(corpus))
    assert tokenizer.bos_token_id is not None and not adds_bos(tokenizer)
    p = pack(tokenizer, texts, 20)
    expected = np.concatenate([np.asarray(tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
                               for t in texts])
    assert np.array_equal(np.concatenate([w[:n] for w, n in zip(p.input_ids, p.lengths)]), expected)
    m = dump(DumpConfig(teachers=(f"t={llama_dir}",), data=str(corpus), out=str(tmp_path / "s"), top_k=4, seq_len=20,
                        max_tokens=200, progress=False)).manifest
    assert m["bos"] is False and m["data"]["fingerprint"] == pack(tokenizer, texts, 20, max_tokens=200).fingerprint()
    with pytest.raises(ConfigError, match="--bos"):
        DumpConfig(teachers=("t",), data="d", out="o", bos="sometimes")


def test_manifest_without_bos_field_reads_as_no_bos(stores):
    import json

    from logitstore.errors import FormatError
    from logitstore.format.manifest import validate_manifest

    m = json.loads((stores[0] / "manifest.json").read_text())
    m.pop("bos", None)
    validate_manifest(m)  # a store written before the field existed
    with pytest.raises(FormatError, match="bos"):
        validate_manifest({**m, "bos": "yes"})


# --- joins by content hash when stores hold the sequences in another order; pickling; resume -------

@pytest.fixture(scope="module")
def reordered(tmp_path_factory, llama_dir, gpt2_dir, corpus):
    """Store ``ab`` (teacher llama) holds corpus halves 1 then 2; ``ba`` (teacher gpt2) 2 then 1."""
    import json

    from logitstore.tools.merge import merge

    root = tmp_path_factory.mktemp("reordered")
    lines = corpus.read_text().splitlines()
    halves = [root / "h1.jsonl", root / "h2.jsonl"]
    halves[0].write_text("\n".join(lines[: len(lines) // 2]) + "\n")
    halves[1].write_text("\n".join(lines[len(lines) // 2:]) + "\n")
    assert all(json.loads(x) for x in lines)
    base = dict(top_k=5, seq_len=20, max_tokens=300, shard_sequences=4, progress=False)
    parts = {}
    for t, d in (("llama", llama_dir), ("gpt2", gpt2_dir)):
        for h, path in enumerate(halves):
            parts[t, h] = root / f"{t}{h}"
            dump(DumpConfig(teachers=(f"{t}={d}",), data=str(path), out=str(parts[t, h]), **base))
    ab, ba = root / "ab", root / "ba"
    merge([str(parts["llama", 0]), str(parts["llama", 1])], str(ab), progress=False)
    merge([str(parts["gpt2", 1]), str(parts["gpt2", 0])], str(ba), progress=False)
    return ab, ba


def test_stores_holding_the_sequences_in_another_order_are_joined_by_content_hash(reordered):
    ab, ba = reordered
    sa, sb = logitstore.open(str(ab)), logitstore.open(str(ba))
    by_hash = {sb[i]["seq_hash"]: i for i in range(len(sb))}
    assert [by_hash[sa[i]["seq_hash"]] for i in range(len(sa))] != list(range(len(sa))), "the orders must differ"
    ds = DistillDataset([ab, ba], batch_size=3, shuffle=False)
    L, rows = ds.seq_len, 0
    for bt in ds:
        for row in range(len(bt["index"])):
            i = int(bt["index"][row])
            n = len(sa[i]["input_ids"])
            assert torch.equal(bt["input_ids"][row, :n], torch.from_numpy(sa[i]["input_ids"].astype(np.int64)))
            tb = sb[by_hash[sa[i]["seq_hash"]]]["teachers"]["gpt2"]  # the same sequence, wherever it lies in ba
            for t in range(n):
                flat = row * L + t
                sup = bt["support"][flat][bt["valid"][flat]].tolist()
                got = dict(zip(sup, bt["teacher_lp"][1, flat][bt["valid"][flat]].tolist()))
                for tid, lp in zip(tb["ids"][t].tolist(), tb["logprobs"][t].tolist()):
                    assert got[tid] == pytest.approx(lp, abs=1e-6)
            rows += 1
    assert rows == len(sa)


def test_iterating_without_set_epoch_is_epoch_zero(stores):
    a, b, _ = stores
    fresh = [bt["index"].tolist() for bt in DistillDataset([a, b], batch_size=4, seed=5)]
    ds = DistillDataset([a, b], batch_size=4, seed=5)
    ds.set_epoch(0)
    assert fresh == [bt["index"].tolist() for bt in ds]


def test_a_dataset_pickles_without_its_decoded_shards_and_reopens_its_stores(stores):
    import pickle

    a, b, _ = stores
    ds = DistillDataset([a, b], batch_size=4, seed=5, cache_shards=8)
    ref = [bt["index"].tolist() for bt in ds]
    for s in ds.stores:  # fill the stores' shard caches
        for j in range(s.n_shards):
            s.load_shard(j)
    decoded = sum(v.nbytes for s in ds.stores for sh in s._cache.values() for v in sh.values() if isinstance(v, np.ndarray))
    blob = pickle.dumps(ds)  # what a "spawn" DataLoader worker receives
    assert decoded and "stores" not in ds.__getstate__() and len(blob) < 2048, (len(blob), decoded)
    back = pickle.loads(blob)
    assert [bt["index"].tolist() for bt in back] == ref


def test_resume_with_another_seed_is_refused_naming_it(stores):
    a, b, _ = stores
    state = DistillDataset([a, b], batch_size=3, seed=1).state_dict()
    with pytest.raises(LogitStoreError, match=r"seed=1, now 2"):
        DistillDataset([a, b], batch_size=3, seed=2).load_state_dict(state)


def _damage(store_dir, shard: int, part: str) -> None:
    """Flip bytes of every data file of one part (the manifest's sha256 no longer matches)."""
    files = [f for f in (store_dir / "shards" / f"{shard:06d}" / part).rglob("*") if f.is_file() and f.name != "commit.json"]
    assert files, (store_dir, shard, part)
    for f in files:
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))


def test_skip_bad_shards_leaves_out_exactly_the_damaged_sequences(reordered, tmp_path):
    import shutil

    from logitstore.errors import FormatError

    ab, ba = tmp_path / "ab", tmp_path / "ba"
    shutil.copytree(reordered[0], ab)
    shutil.copytree(reordered[1], ba)
    sa, sb = logitstore.open(str(reordered[0])), logitstore.open(str(reordered[1]))  # the undamaged originals
    _damage(ab, 0, "inputs")  # the primary's inputs: its sequences cannot even be named
    _damage(ba, 1, "t0")  # a secondary's teacher part, in a store holding the sequences in another order
    with pytest.raises(FormatError, match="sha256 mismatch"):  # without the flag, damage is an error
        list(DistillDataset([ab, ba], batch_size=3))
    ds = DistillDataset([ab, ba], batch_size=3, skip_bad_shards=True)
    got = sorted((b["store"], b["shard"], b["inputs_ok"]) for b in ds.skipped)
    assert got == sorted([(str(ab), 0, False), (str(ba), 1, True)])
    e0, e1 = sa.index.entries()[0], sb.index.entries()[1]
    lost_a = set(range(e0["start"], e0["start"] + e0["n_sequences"]))
    lost_b = {sb[i]["seq_hash"] for i in range(e1["start"], e1["start"] + e1["n_sequences"])}
    mapped = {i for i in range(len(sa)) if i not in lost_a and sa[i]["seq_hash"] in lost_b}
    assert mapped and mapped != set(range(e1["start"], e1["start"] + e1["n_sequences"])), "positions must differ between stores"
    seen = [int(i) for bt in ds for i, w in zip(bt["index"], bt["weight"]) if w > 0]
    assert sorted(seen) == sorted(set(range(len(sa))) - lost_a - mapped)


def test_prefetch_plans_the_shards_in_the_order_batches_first_read_them(stores, monkeypatch):
    from logitstore.format.reader import Store

    a, b, _ = stores
    planned, loaded = {}, {}
    real_prefetch, real_load = Store.prefetch, Store.decode_shard

    def prefetch(self, shards, teachers=None, depth=4):
        planned[self.url] = (list(shards), depth)
        return real_prefetch(self, shards, teachers, depth)

    def load_shard(self, shard, teachers=None, hidden=False):
        loaded.setdefault(self.url, [])
        if shard not in loaded[self.url]:
            loaded[self.url].append(shard)
        return real_load(self, shard, teachers, hidden)

    monkeypatch.setattr(Store, "prefetch", prefetch)
    monkeypatch.setattr(Store, "decode_shard", load_shard)
    ds = DistillDataset([a, b], batch_size=4, seed=9, prefetch=3)
    ds.set_epoch(1)
    loaded.clear()  # opening read every inputs part; what counts is what the epoch reads
    list(ds)
    for url in (str(a), str(b)):
        assert planned[url] == (loaded[url], 3), url


def test_eval_weights_follow_teacher_identity_and_missing_teachers_are_named(stores):
    from trainer.data import match_teachers

    a, b, _ = stores
    train = DistillDataset([a, b], batch_size=2)
    assert match_teachers(train, DistillDataset([b, a], batch_size=2), [0.25, 0.75], "EV") == [0.75, 0.25]
    with pytest.raises(ConfigError, match=r"--eval-logits EV: lacks training teacher\(s\) gpt2"):
        match_teachers(train, DistillDataset([a], batch_size=2), [0.25, 0.75], "EV")


def test_batch_fields_have_the_dtypes_models_take(stores):
    a, b, _ = stores
    bt = next(iter(DistillDataset([a, b], batch_size=2)))
    assert bt["attention_mask"].dtype == bt["input_ids"].dtype == bt["labels"].dtype == bt["index"].dtype == torch.int64
    assert bt["weight"].dtype == torch.float32


def test_the_same_teacher_given_twice_is_refused_naming_both(stores, tmp_path):
    import shutil

    a, _, _ = stores
    twin = tmp_path / "twin"
    shutil.copytree(a, twin)
    with pytest.raises(LogitStoreError, match=rf"--logits {twin}: teacher 'llama' is the same model as teacher 'llama' of {a}"):
        DistillDataset([a, twin], batch_size=2)


def test_a_shuffle_buffer_of_one_keeps_each_shard_together_and_checksums_can_be_skipped(stores):
    a, b, _ = stores
    ds = DistillDataset([a], batch_size=2, seed=3, shuffle_buffer=1)
    starts = [e["start"] for e in ds.stores[0].index.entries()]
    shard_of = np.searchsorted(starts, ds.epoch_order(0), side="right") - 1
    runs = [int(s) for i, s in enumerate(shard_of) if i == 0 or s != shard_of[i - 1]]
    assert len(runs) == len(starts) == len(set(runs)), "a buffer of 1 only permutes shards and rows within them"
    assert all(not s.verify_checksums for s in DistillDataset([a, b], batch_size=2, verify_checksums=False).stores)
    assert all(s.verify_checksums for s in DistillDataset([a, b], batch_size=2).stores)


def test_a_ce_only_dataset_prefetches_inputs_only(stores, monkeypatch):
    from logitstore.format.reader import Store

    a, b, _ = stores
    asked = []
    real = Store.prefetch
    monkeypatch.setattr(Store, "prefetch", lambda self, shards, teachers=None, depth=4: asked.append(teachers) or real(self, shards, teachers, depth))
    list(DistillDataset([a, b], batch_size=4, with_targets=False))
    assert asked and all(t == [] for t in asked)
    asked.clear()
    list(DistillDataset([a, b], batch_size=4))
    assert sorted(map(tuple, asked)) == [("gpt2",), ("llama",)]


def test_eval_teachers_match_across_k_the_cache_dir_reaches_the_stores_and_idle_workers_are_fine(stores, llama_dir, corpus, tmp_path):
    a, b, _ = stores
    k3 = tmp_path / "k3"  # the same teacher at another k, on other data: the same teacher for evaluation
    dump(DumpConfig(teachers=(f"llama={llama_dir}",), data=str(corpus), out=str(k3), top_k=3, seq_len=20, max_tokens=200, progress=False))
    from trainer.data import match_teachers

    assert match_teachers(DistillDataset([a], batch_size=2), DistillDataset([k3], batch_size=2), [1.0], "EV") == [1.0]
    ds = DistillDataset([a, b], batch_size=2, cache_dir=str(tmp_path / "cache"))
    assert all(s.file_cache is not None and s.file_cache.root == tmp_path / "cache" for s in ds.stores)
    n = DistillDataset([a], batch_size=2).n
    one = DistillDataset([a], batch_size=n, num_workers=3, n_streams=6)  # each worker: one partly filled batch
    got = list(DataLoader(one, batch_size=None, num_workers=3))
    assert len(got) == 3 and sorted(i for bt in got for i, w in zip(bt["index"].tolist(), bt["weight"]) if w > 0) == list(range(n))
    few = DistillDataset([a], batch_size=2, num_workers=3, n_streams=3 * n)  # more streams than sequences: idle slots
    got = list(DataLoader(few, batch_size=None, num_workers=3))
    assert sorted(i for bt in got for i, w in zip(bt["index"].tolist(), bt["weight"]) if w > 0) == list(range(n))


def test_skip_bad_shards_aligns_a_secondary_store_with_damaged_inputs_through_its_sequence_index(reordered, tmp_path):
    """The sequence index names a damaged shard's sequences, so they are left out of the primary's too."""
    import shutil

    ab, ba = tmp_path / "ab", tmp_path / "ba"
    shutil.copytree(reordered[0], ab)
    shutil.copytree(reordered[1], ba)
    _damage(ba, 0, "inputs")
    ds = DistillDataset([ab, ba], batch_size=2, skip_bad_shards=True)
    assert [(b["store"], b["shard"], b["inputs_ok"]) for b in ds.skipped] == [(str(ba), 0, False)]
    sa, sb = logitstore.open(str(reordered[0])), logitstore.open(str(reordered[1]))
    lost = {sb[i]["seq_hash"] for i in range(int(sb.index.sizes[0]))}
    seen = [int(i) for bt in ds for i, w in zip(bt["index"], bt["weight"]) if w > 0]
    assert sorted(seen) == [i for i in range(len(sa)) if sa[i]["seq_hash"] not in lost]
