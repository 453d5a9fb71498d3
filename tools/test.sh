#!/usr/bin/env bash
# Install what the tests need, then run them (offline). The suite takes ~11 min on 2 cores; the
# time limit turns a hang (a test, or a process that will not exit) into a failure that says so.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# in a terminal, --foreground keeps pytest in the terminal's process group, so Ctrl-C reaches it
fg=()
if [ -t 0 ]; then fg=(--foreground); fi
status=0
timeout ${fg[@]+"${fg[@]}"} --kill-after=30 2400 .venv/bin/python -m pytest tests "$@" || status=$?
if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
    echo "tools/test.sh: the test run did not finish within 40 minutes (hung test or process that did not exit)" >&2
fi
exit "$status"
