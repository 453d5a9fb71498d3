#!/usr/bin/env bash
# Install what the tests need, then run them (offline).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest tests "$@"
