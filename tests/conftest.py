"""Shared fixtures: tiny tokenizers and teachers built and saved locally (no network)."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "data" / "pydocs-train.jsonl"


def corpus_texts(n_docs: int = 6, max_chars: int = 6000) -> list[str]:
    texts = []
    with open(TRAIN, encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)["text"][:max_chars])
            if len(texts) == n_docs:
                break
    return texts


def build_tokenizer(vocab_size: int = 320, seed_texts: list[str] | None = None, extra_special: str | None = None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>"] + ([extra_special] if extra_special else [])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(seed_texts or corpus_texts(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def save_llama(path: Path, tokenizer, *, seed: int = 0, padded_vocab: int = 0, hidden: int = 32) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer) + padded_vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                      eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # sharper than the default init, so top-k is not flat
        model.lm_head.weight.mul_(40.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_gpt2(path: Path, tokenizer, *, seed: int = 1) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=512,
                     eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    model = GPT2LMHeadModel(cfg)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, tokenizer) -> Path:
    return save_llama(tmp_path_factory.mktemp("llama"), tokenizer, padded_vocab=7)


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory, tokenizer) -> Path:
    return save_gpt2(tmp_path_factory.mktemp("gpt2"), tokenizer)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A small .jsonl corpus from the bundled data."""
    p = tmp_path_factory.mktemp("data") / "corpus.jsonl"
    with open(p, "w", encoding="utf-8") as f:
        for t in corpus_texts(n_docs=4, max_chars=2500):
            f.write(json.dumps({"text": t}) + "\n")
    return p


#: runs moto's server in a child process on a port the OS picks (port 0) and prints that port, so
#: no other process can take the port between choosing and binding it
_MOTO_LAUNCHER = (
    "import sys, threading\n"
    "from moto.server import ThreadedMotoServer\n"
    "s = ThreadedMotoServer(ip_address='127.0.0.1', port=0, verbose=False)\n"
    "s.start()\n"
    "print(s.get_host_and_port()[1], flush=True)\n"
    "sys.stdin.read()\n"  # until the parent closes our stdin (or kills us)
)


@pytest.fixture(scope="session")
def s3_bucket():
    """A real S3-protocol server (moto's) on loopback for the session; yields ``s3://BUCKET``.

    The AWS environment variables point every client (in this process and in subprocesses) at it,
    the standard way (``AWS_ENDPOINT_URL``). The server is stopped by its PID afterwards."""
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    proc = subprocess.Popen([sys.executable, "-c", _MOTO_LAUNCHER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline().strip()
    if not line.isdigit():
        proc.kill()
        proc.wait()
        raise RuntimeError(f"moto server did not start (said {line!r})")
    port = int(line)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=1)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start on {endpoint}") from None
                time.sleep(0.2)
        import boto3

        boto3.client("s3").create_bucket(Bucket="logitstore-test")
        yield "s3://logitstore-test"
    finally:
        proc.stdin.close()
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def memory_url(request):
    """A ``memory://`` prefix of this test alone, removed afterwards: fsspec's memory filesystem is
    one per process, so fixed names would carry state from one test (or a re-run) into another."""
    import uuid

    import fsspec

    prefix = f"memory://{request.node.name.split('[')[0]}-{uuid.uuid4().hex[:8]}"
    yield prefix
    fs, root = fsspec.core.url_to_fs(prefix)
    if fs.exists(root):
        fs.rm(root, recursive=True)
