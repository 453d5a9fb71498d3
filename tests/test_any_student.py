"""Any student: modules of your own (an LSTM) trained by ``trainer fit`` from an LM store and from a
classify store, saved with their config and rebuilt by ``trainer.checkpoint.load_module``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from logitstore.dump import DumpConfig, dump
from trainer.checkpoint import load_module
from trainer.config import FitConfig
from trainer.fit import fit


class LSTMLM(torch.nn.Module):
    """token ids [B, L] -> next-token logits [B, L, V]."""

    def __init__(self, vocab_size: int, hidden: int = 32):
        super().__init__()
        self.config = {"vocab_size": vocab_size, "hidden": hidden}  # what load_module rebuilds it from
        self.emb = torch.nn.Embedding(vocab_size, hidden)
        self.lstm = torch.nn.LSTM(hidden, hidden, batch_first=True)
        self.out = torch.nn.Linear(hidden, vocab_size)

    def forward(self, input_ids, attention_mask=None):
        return self.out(self.lstm(self.emb(input_ids))[0])


class LSTMClassifier(torch.nn.Module):
    """token ids [B, L] -> class logits [B, C], from the LSTM state at each text's last real token."""

    def __init__(self, vocab_size: int, num_labels: int, hidden: int = 32):
        super().__init__()
        self.config = {"vocab_size": vocab_size, "num_labels": num_labels, "hidden": hidden}
        self.emb = torch.nn.Embedding(vocab_size, hidden)
        self.lstm = torch.nn.LSTM(hidden, hidden, batch_first=True)
        self.out = torch.nn.Linear(hidden, num_labels)

    def forward(self, input_ids, attention_mask):
        h = self.lstm(self.emb(input_ids))[0]
        last = attention_mask.sum(1).clamp_min(1) - 1
        return self.out(h[torch.arange(h.shape[0]), last])


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_an_lstm_language_model_distils_from_an_lm_store_and_reloads(tmp_path, llama_dir, corpus, tokenizer):
    store = tmp_path / "s"
    dump(DumpConfig(teachers=(f"t={llama_dir}",), data=str(corpus), out=str(store), top_k=8, seq_len=32, max_tokens=2048,
                    progress=False))
    torch.manual_seed(0)
    model = LSTMLM(len(tokenizer))
    res = fit(FitConfig(logits=(str(store),), out=str(tmp_path / "run"), eval_logits=str(store), max_steps=12, batch_size=8, lr=1e-2,
                        alpha=0.5, num_workers=0, device="cpu", progress=False), model=model, tokenizer=tokenizer)
    losses = [r["loss"] for r in _rows(tmp_path / "run" / "metrics.jsonl") if not r.get("eval")]
    assert np.isfinite(losses).all() and np.mean(losses[-3:]) < np.mean(losses[:3])  # it learns
    back = load_module(res["final"])
    x = torch.randint(0, len(tokenizer), (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x))
    assert isinstance(back, LSTMLM) and back.config == model.config


def test_an_lstm_classifier_distils_from_a_classify_store_and_reloads(tmp_path):
    import copy

    from conftest import build_tokenizer
    from test_classify import _classifier

    tok = build_tokenizer(300)
    tok.pad_token = tok.eos_token
    teacher = _classifier(tmp_path / "bert", copy.deepcopy(tok), seed=3)
    data = tmp_path / "rows.jsonl"
    rng = np.random.default_rng(1)
    words = "the a list tuple dict loop class import error file string number".split()
    data.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, int(rng.integers(3, 12)))), "label": int(i % 3)}) + "\n"
                            for i in range(40)), encoding="utf-8")
    store = tmp_path / "s"
    dump(DumpConfig(teachers=(f"bert={teacher}",), data=str(data), out=str(store), seq_len=32, task="classify", label_field="label",
                    progress=False))
    torch.manual_seed(0)
    model = LSTMClassifier(len(tok), 3)
    res = fit(FitConfig(logits=(str(store),), out=str(tmp_path / "run"), eval_logits=str(store), max_steps=8, batch_size=8, lr=1e-2,
                        alpha=0.5, temperature=2.0, num_workers=0, device="cpu", progress=False), model=model, tokenizer=tok)
    assert 0 <= res["eval"]["accuracy"] <= 1 and np.isfinite(res["eval"]["ce"])
    back = load_module(res["final"])
    x, m = torch.randint(0, len(tok), (3, 10)), torch.ones(3, 10, dtype=torch.long)
    with torch.no_grad():
        torch.testing.assert_close(back(x, m), model(x, m))


def test_a_module_without_a_config_saves_its_weights_only(tmp_path):
    from logitstore.errors import ConfigError
    from trainer.checkpoint import save_final

    m = torch.nn.Linear(3, 2)
    save_final(m, tmp_path / "final", None)
    assert (tmp_path / "final" / "model.safetensors").is_file()
    with pytest.raises(ConfigError, match="no module.json"):
        load_module(tmp_path / "final")


SCRIPT = '''
import sys
import torch
from trainer.config import FitConfig
from trainer.fit import fit


class ScriptLM(torch.nn.Module):
    def __init__(self, vocab_size, hidden=8):
        super().__init__()
        self.config = {"vocab_size": vocab_size, "hidden": hidden}
        self.emb, self.out = torch.nn.Embedding(vocab_size, hidden), torch.nn.Linear(hidden, vocab_size)

    def forward(self, input_ids, attention_mask=None):
        return self.out(self.emb(input_ids))


if __name__ == "__main__":
    store, run, vocab = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.manual_seed(0)
    m = ScriptLM(vocab)
    fit(FitConfig(logits=(store,), out=run, max_steps=2, batch_size=4, num_workers=0, device="cpu", progress=False,
                  save_dtype="bf16"), model=m)
'''


def test_a_module_of_a_script_reloads_in_another_process(tmp_path, llama_dir, corpus, tokenizer):
    import subprocess
    import sys

    store = tmp_path / "s"
    dump(DumpConfig(teachers=(f"t={llama_dir}",), data=str(corpus), out=str(store), top_k=8, seq_len=32, max_tokens=512,
                    progress=False))
    script = tmp_path / "my_train.py"
    script.write_text(SCRIPT)
    r = subprocess.run([sys.executable, str(script), str(store), str(tmp_path / "run"), str(len(tokenizer))], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.loads((tmp_path / "run" / "final" / "module.json").read_text())
    assert rec["class"] == "my_train:ScriptLM" and rec["file"] == str(script.resolve()) and rec["dtype"] == "bfloat16"
    model = load_module(tmp_path / "run" / "final")  # this process never imported the script
    assert type(model).__name__ == "ScriptLM" and next(model.parameters()).dtype == torch.bfloat16


def test_modules_that_could_not_be_reloaded_are_refused_before_training(tmp_path, llama_dir, corpus, tokenizer):
    from logitstore.errors import ConfigError

    store = tmp_path / "s"
    dump(DumpConfig(teachers=(f"t={llama_dir}",), data=str(corpus), out=str(store), top_k=8, seq_len=32, max_tokens=512,
                    progress=False))

    class Local(LSTMLM):
        pass

    base = dict(logits=(str(store),), max_steps=1, batch_size=4, num_workers=0, device="cpu", progress=False)
    with pytest.raises(ConfigError, match="defined inside a function"):
        fit(FitConfig(**base, out=str(tmp_path / "a")), model=Local(len(tokenizer)), tokenizer=tokenizer)
    bad = LSTMLM(len(tokenizer))
    bad.config = {**bad.config, "dtype": torch.float32}
    with pytest.raises(ConfigError, match="config dict is not JSON"):
        fit(FitConfig(**base, out=str(tmp_path / "b")), model=bad, tokenizer=tokenizer)
    assert not (tmp_path / "a").exists() or not (tmp_path / "a" / "final").exists()
