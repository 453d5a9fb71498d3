"""Master weights, compute precision and the saved dtype of a student checkpoint stored in bf16."""

import json

import pytest
import torch
from safetensors import safe_open

from logitstore.dump import DumpConfig, dump
from trainer.config import FitConfig
from trainer.fit import fit


@pytest.fixture(scope="module")
def bf16_setup(tmp_path_factory, llama_dir, corpus, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("precision")
    store = root / "store"
    dump(DumpConfig(teachers=(f"a={llama_dir}",), data=str(corpus), out=str(store), top_k=8, seq_len=32, max_tokens=600,
                    shard_sequences=8, progress=False))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    student = root / "student-bf16"
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(student)
    tokenizer.save_pretrained(student)
    return {"root": root, "store": store, "student": student}


def optimizer_dtypes(monkeypatch) -> dict:
    """Record the dtypes of the parameters AdamW updates (under ``"dtypes"``)."""
    seen = {}
    real_step = torch.optim.AdamW.step

    def spy(self, *a, **k):
        seen["dtypes"] = {p.dtype for g in self.param_groups for p in g["params"]}
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    return seen


def weights(path):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def run(setup, name, **kw):
    out = setup["root"] / name
    base = dict(logits=(str(setup["store"]),), student=str(setup["student"]), out=str(out), max_steps=1, batch_size=2,
                num_workers=0, progress=False, grad_clip=0.0, weight_decay=0.0, device="cpu")
    fit(FitConfig(**{**base, **kw}))
    return out


def test_bf16_checkpoint_trains_fp32_master_weights_and_tiny_updates_survive(bf16_setup, monkeypatch):
    seen = optimizer_dtypes(monkeypatch)
    # lr 1e-6: AdamW's first update is ~lr per weight, far below half a bf16 ulp at |w| ~ 0.02 (6e-5)
    out = run(bf16_setup, "fp32-master", lr=1e-6, save_dtype="fp32")
    assert seen["dtypes"] == {torch.float32}
    before = weights(bf16_setup["student"])
    after = weights(out / "final")
    changed = [k for k in before if not torch.equal(before[k].float(), after[k].float())]
    assert set(changed) == set(before), f"unchanged after a 1e-6 step: {sorted(set(before) - set(changed))}"
    assert all(v.dtype == torch.float32 for v in after.values())
    assert json.loads((out / "final" / "config.json").read_text())["dtype"] == "float32"


def test_saved_dtype_defaults_to_the_checkpoints(bf16_setup):
    out = run(bf16_setup, "default-save", lr=1e-3)
    after = weights(out / "final")
    assert {v.dtype for v in after.values()} == {torch.bfloat16}
    assert set(after) == set(weights(bf16_setup["student"]))  # tied embeddings saved once, as in the checkpoint
    assert json.loads((out / "final" / "config.json").read_text())["dtype"] == "bfloat16"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "final")  # loads back


def test_low_precision_weights_only_when_asked(bf16_setup, monkeypatch):
    seen = optimizer_dtypes(monkeypatch)
    out = run(bf16_setup, "bf16-weights", lr=1e-6, param_dtype="bf16")
    assert seen["dtypes"] == {torch.bfloat16}
    # the documented cost: most tiny updates are lost in bf16 weights
    before, after = weights(bf16_setup["student"]), weights(out / "final")
    same = sum(int((before[k] == after[k]).sum()) for k in before)
    assert same > 0.5 * sum(v.numel() for v in before.values())


def test_bf16_autocast_on_cpu_keeps_fp32_weights(bf16_setup):
    """``--precision bf16`` (autocast) with the default fp32 master weights, through the CLI in its own
    process (accelerate fixes the precision once per process): a 1e-6 step changes every weight."""
    import os
    import subprocess
    import sys

    out = bf16_setup["root"] / "bf16-autocast"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "trainer", "fit", "--logits", str(bf16_setup["store"]), "--student", str(bf16_setup["student"]),
                        "--out", str(out), "--max-steps", "1", "--batch-size", "2", "--num-workers", "0", "--device", "cpu", "--lr", "1e-6",
                        "--precision", "bf16", "--save-dtype", "fp32", "-q", "grad_clip=0.0", "weight_decay=0.0"],
                       env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and torch.isfinite(torch.tensor(rows[0]["loss"]))
    before, after = weights(bf16_setup["student"]), weights(out / "final")
    assert all(not torch.equal(before[k].float(), after[k]) for k in before)


@pytest.mark.parametrize("kw,needle", [({"param_dtype": "fp8"}, "--param-dtype"), ({"save_dtype": "int8"}, "--save-dtype"),
                                       ({"param_dtype": "fp16", "precision": "fp16"}, "cannot unscale fp16 gradients")])
def test_bad_dtype_settings_are_refused(kw, needle):
    from logitstore.errors import ConfigError

    with pytest.raises(ConfigError, match=needle):
        FitConfig(logits=("x",), student="s", out="o", **kw)
