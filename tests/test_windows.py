"""Streaming windows (logitstore/capture/windows.py) against the list-based definition (corpus.pack)."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest

from conftest import corpus_texts
from logitstore.capture.corpus import pack
from logitstore.capture.sources import Source
from logitstore.capture.windows import CorpusPlan, ShardWindows, WindowSpec, scan
from logitstore.errors import LogitStoreError


def _write(tmp_path, texts, name="c.jsonl"):
    p = tmp_path / name
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return p


def _mixed_texts(seed: int, n: int = 60) -> list[str]:
    """Documents from 1 character to several windows long, so windows start anywhere in a document."""
    rng = random.Random(seed)
    base = corpus_texts(n_docs=8, max_chars=4000)
    return [rng.choice(base)[: rng.choice([1, 3, 10, 40, 200, 1500, 4000])] or "x" for _ in range(n)]


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("seq_len,S,max_tokens,bos", [(16, 3, None, False), (7, 5, 1234, True), (64, 1, None, True),
                                                      (33, 8, 2000, False), (512, 2, None, False)])
def test_every_rank_gets_the_windows_pack_makes(tmp_path, tokenizer, packed, seq_len, S, max_tokens, bos):
    texts = _mixed_texts(seq_len + S)
    path = _write(tmp_path, texts)
    ref = pack(tokenizer, texts, seq_len, packed=packed, max_tokens=max_tokens, bos=bos)
    spec = WindowSpec(seq_len, packed, max_tokens, bos, S)
    plan = scan(tokenizer, Source(str(path)), spec)
    assert plan.n_sequences == len(ref.lengths) and plan.n_tokens == ref.n_tokens
    assert plan.fingerprint == ref.fingerprint()
    assert plan.n_shards == -(-len(ref.lengths) // S) and sum(plan.sizes) == plan.n_sequences
    assert CorpusPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    for world in (1, 2, 3, 7):
        for rank in range(world):
            sw = ShardWindows(tokenizer, Source(str(path)), spec, plan)
            for j in range(rank, plan.n_shards, world):
                ids, lens = sw.get(j)
                np.testing.assert_array_equal(ids, ref.input_ids[j * S:(j + 1) * S])
                np.testing.assert_array_equal(lens, ref.lengths[j * S:(j + 1) * S])
                assert ids.dtype == ref.input_ids.dtype


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "json", "txt-dir"])
def test_ranks_enter_the_source_at_their_shards(tmp_path, tokenizer, kind):
    """JSON Lines (byte offsets), Parquet (rows; row groups before are not read) and .txt files
    (file index) are entered at a shard's first document; .json is read through. Same windows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(11)
    base = corpus_texts(n_docs=8, max_chars=4000)
    texts = [rng.choice(base)[: rng.randint(20, 120)] for _ in range(400)]
    if kind == "jsonl":
        path = tmp_path / "c.jsonl"  # with blank lines and rows that are not documents in between
        rows = [json.dumps({"text": t}) + "\n" + ("\n" if i % 3 == 0 else "") + (json.dumps({"text": None}) + "\n" if i % 5 == 0 else "")
                for i, t in enumerate(texts)]
        path.write_text("".join(rows), encoding="utf-8")
    elif kind == "parquet":
        path = tmp_path / "c.parquet"
        pq.write_table(pa.table({"text": texts}), path, row_group_size=7)
    elif kind == "json":
        path = tmp_path / "c.json"
        path.write_text(json.dumps([{"text": t} for t in texts]), encoding="utf-8")
    else:
        path = tmp_path / "docs"
        path.mkdir()
        for i, t in enumerate(texts):
            (path / f"{i:04d}.txt").write_text(t, encoding="utf-8")
    ref = pack(tokenizer, texts, 24, packed=False)
    spec = WindowSpec(24, False, None, False, 5)
    plan = scan(tokenizer, Source(str(path)), spec)
    assert (plan.positions is None) == (kind == "json")
    sw = ShardWindows(tokenizer, Source(str(path)), spec, plan)
    opened = []
    real_open = sw._open
    sw._open = lambda d0, position: opened.append(d0) or real_open(d0, position)
    shards = list(range(2, plan.n_shards, 25))  # far apart: each one entered directly
    for j in shards:
        ids, lens = sw.get(j)
        np.testing.assert_array_equal(ids, ref.input_ids[j * 5:(j + 1) * 5])
        np.testing.assert_array_equal(lens, ref.lengths[j * 5:(j + 1) * 5])
    assert (opened == []) if kind == "json" else (len(opened) >= len(shards) - 1), (opened, len(shards))  # the first may be read through


def test_shards_must_be_asked_for_in_order(tmp_path, tokenizer):
    path = _write(tmp_path, _mixed_texts(1))
    spec = WindowSpec(16, True, None, False, 2)
    sw = ShardWindows(tokenizer, Source(str(path)), spec, scan(tokenizer, Source(str(path)), spec))
    sw.get(3)
    with pytest.raises(ValueError, match="increasing"):
        sw.get(1)


def test_a_corpus_that_changes_between_passes_is_refused(tmp_path, tokenizer):
    texts = _mixed_texts(2)
    path = _write(tmp_path, texts)
    spec = WindowSpec(16, True, None, False, 2)
    plan = scan(tokenizer, Source(str(path)), spec)
    _write(tmp_path, texts[: len(texts) // 2])
    sw = ShardWindows(tokenizer, Source(str(path)), spec, plan)
    with pytest.raises(LogitStoreError, match="the corpus changed"):
        for j in range(plan.n_shards):
            sw.get(j)


def test_the_plan_does_not_tokenise_other_ranks_shards(tmp_path, tokenizer):
    """Rank 3 of 4 tokenises its own shards' documents (plus at most a batch after each), not the corpus."""
    rng = random.Random(3)
    base = corpus_texts(n_docs=8, max_chars=4000)
    texts = [rng.choice(base)[: rng.randint(40, 200)] for _ in range(2000)]
    path = _write(tmp_path, texts)
    spec = WindowSpec(32, True, None, False, 64)  # ~50 documents per shard
    plan = scan(tokenizer, Source(str(path)), spec)
    calls = []

    class Counting:
        def __init__(self, tok):
            self.tok = tok

        def __getattr__(self, name):
            return getattr(self.tok, name)

        def __len__(self):
            return len(self.tok)

        def __call__(self, batch, **kw):
            calls.append(len(batch))
            return self.tok(batch, **kw)

    sw = ShardWindows(Counting(tokenizer), Source(str(path)), spec, plan)
    for j in range(3, plan.n_shards, 4):
        sw.get(j)
    assert sum(calls) < 0.4 * len(texts), (sum(calls), len(texts))


def test_every_source_kind_yields_the_same_documents(tmp_path):
    """jsonl (read line by line), json (datasets), parquet (pyarrow), a saved dataset and .txt files agree."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from logitstore.capture.documents import load_texts

    texts = corpus_texts(n_docs=5, max_chars=500) + ["  ", "last one\r\nwith a CRLF"]
    want = [t for t in texts if t.strip()]
    _write(tmp_path, texts, "a.jsonl")
    (tmp_path / "a.json").write_text(json.dumps([{"text": t} for t in texts]), encoding="utf-8")
    pq.write_table(pa.table({"text": texts, "other": list(range(len(texts)))}), tmp_path / "a.parquet", row_group_size=2)
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "saved"))
    for name in ("a.jsonl", "a.json", "a.parquet", "saved"):
        assert load_texts(str(tmp_path / name)) == want, name


@pytest.mark.parametrize("content,needle", [
    ('{"text": "a"}\n{"text": \n', "line 2 is not valid JSON"),
    ('{"text": "a"}\n[1, 2]\n', "line 2 is a JSON list, expected an object"),
    ('{"body": "a"}\n', "no field 'text' (fields: body)"),
    ('\n{"body": "a"}\n{"body": "b"}\n', "no field 'text' (fields: body)"),
])
def test_bad_jsonl_is_named_by_line(tmp_path, content, needle):
    from logitstore.capture.documents import load_texts

    p = tmp_path / "bad.jsonl"
    p.write_text(content)
    with pytest.raises(LogitStoreError, match=re.escape(needle)):
        load_texts(str(p))


def test_parquet_without_the_field_or_not_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from logitstore.capture.documents import load_texts

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "a.parquet")
    with pytest.raises(LogitStoreError, match=re.escape("no field 'text' (fields: body)")):
        load_texts(str(tmp_path / "a.parquet"))
    (tmp_path / "b.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(LogitStoreError, match="cannot read as Parquet"):
        load_texts(str(tmp_path / "b.parquet"))
