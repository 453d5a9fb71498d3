#!/usr/bin/env bash
# Install, then run the main job end to end on the bundled data (see tools/demo.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python tools/demo.py "$@"
