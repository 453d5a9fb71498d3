"""Datasets the user tokenised already (``input_ids`` + ``labels``/``attention_mask``/``loss_mask``):
used as they are, one row per window, and the targets joined back onto the user's rows."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import logitstore
from logitstore.dump import DumpConfig, dump
from logitstore.errors import LogitStoreError
from logitstore.tools.export import join_targets


def _rows(tokenizer, n=9, seed=0):
    """Rows as an SFT pipeline makes them: a prompt not trained (-100), a response trained, right padding."""
    rng = np.random.default_rng(seed)
    V = len(tokenizer)
    rows = []
    for i in range(n):
        prompt, answer, pad = int(rng.integers(3, 12)), int(rng.integers(2, 15)), int(rng.integers(0, 5))
        ids = rng.integers(1, V, prompt + answer).tolist()
        labels = [-100] * prompt + ids[prompt:]
        rows.append({"input_ids": ids + [0] * pad, "labels": labels + [-100] * pad,
                     "attention_mask": [1] * (prompt + answer) + [0] * pad, "id": f"ex{i}"})
    return rows


def _write(rows, path, kind):
    import datasets

    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif kind == "parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    else:
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "saved"])
def test_token_rows_round_trip_with_targets_joined_back(tmp_path, tokenizer, llama_dir, kind):
    import datasets
    from transformers import AutoModelForCausalLM

    rows = _rows(tokenizer)
    data = _write(rows, tmp_path / (f"rows.{kind}" if kind != "saved" else "rows"), kind)
    out = tmp_path / "s"
    m = dump(DumpConfig(teachers=(f"t={llama_dir}",), data=str(data), out=str(out), top_k=8, seq_len=32, encoding="lossless",
                        progress=False, shard_sequences=4)).manifest
    assert m["packed"] is False and m["data"]["source"]["kind"] == "tokens" and m["n_sequences"] == len(rows)
    store = logitstore.open(str(out))
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    for i, r in enumerate(rows):
        s = store[i]
        real = int(sum(r["attention_mask"]))
        assert s["row"] == i
        np.testing.assert_array_equal(s["input_ids"], r["input_ids"][:real])  # as given: no BOS/EOS, no re-tokenising
        np.testing.assert_array_equal(s["loss_mask"], np.array(r["labels"][1:real] + [-100]) != -100)
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([r["input_ids"][:real]])).logits[0, :, :len(tokenizer)], -1).numpy()
        t = np.flatnonzero(s["loss_mask"])
        got = s["teachers"]["t"]
        np.testing.assert_allclose(got["logprobs"][t], np.take_along_axis(ref[t], got["ids"][t], 1), atol=1e-4)
    joined = join_targets(datasets.Dataset.from_list(rows), str(out))
    assert joined.column_names[:4] == ["input_ids", "labels", "attention_mask", "id"] and joined["id"] == [r["id"] for r in rows]
    for i in (0, 5):
        np.testing.assert_allclose(np.array(joined[i]["t.logprobs"]), store[i]["teachers"]["t"]["logprobs"])
        assert joined[i]["loss_mask"] == store[i]["loss_mask"].tolist()
    changed = datasets.Dataset.from_list(rows[1:] + rows[:1])
    with pytest.raises(LogitStoreError, match="row 0 of the dataset differs"):
        join_targets(changed, str(out))


@pytest.mark.parametrize("bad, match", [
    ({"labels": [-100, 5]}, "row 1: field 'labels': 2 values for 4 input_ids"),
    ({"input_ids": [1, 2, 99999, 3]}, "row 1: field 'input_ids': id 99999 at position 2 is outside the tokenizer's vocabulary"),
    ({"labels": [-100, 7, 3, 4]}, "row 1: field 'labels': 7 at position 1 is neither -100 nor the input id 2"),
    ({"attention_mask": [1, 0, 1, 1]}, "row 1: field 'attention_mask': the real tokens \\(1\\) are not one contiguous run"),
    ({"input_ids": list(range(1, 40)), "labels": None}, "row 1: 39 tokens, longer than --seq-len 32"),
    ({"input_ids": "1 2 3"}, "row 1: field 'input_ids': expected a list of integers, got str"),
])
def test_bad_token_rows_name_the_row_and_field(tmp_path, llama_dir, bad, match):
    good = {"input_ids": [1, 2, 3, 4], "labels": [-100, 2, 3, 4]}
    rows = [good, {**good, **bad}]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(LogitStoreError, match=match):
        dump(DumpConfig(teachers=(f"t={llama_dir}",), data=str(data), out=str(tmp_path / "s"), top_k=4, seq_len=32, progress=False))
    assert not (tmp_path / "s" / "manifest.json").exists()


@pytest.mark.parametrize("fmt", ["zarr", "arrow"])
@pytest.mark.parametrize("encoding", ["compact", "lossless"])
def test_a_shard_that_trains_nothing_reads_back(tmp_path, llama_dir, fmt, encoding):
    """Rows whose labels are all -100 store no teacher position: an empty part, written and read."""
    rows = [{"input_ids": [1, 2, 3, 4], "labels": [-100, 2, 3, 4]}, {"input_ids": [5, 6, 7], "labels": [-100] * 3},
            {"input_ids": [8, 9], "labels": [-100, -100]}]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "s"
    dump(DumpConfig(teachers=(f"t={llama_dir}",), data=str(data), out=str(out), top_k=4, seq_len=8, progress=False,
                    shard_sequences=1, format=fmt, encoding=encoding))
    from logitstore.tools.verify import verify

    assert verify(str(out)) == []
    s = logitstore.open(str(out))
    assert [int(s[i]["loss_mask"].sum()) for i in range(3)] == [3, 0, 0]
    assert (s[1]["teachers"]["t"]["logprobs"] == 0).all() and (s[0]["teachers"]["t"]["logprobs"][:3] < 0).all()
