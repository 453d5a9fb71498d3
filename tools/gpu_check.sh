#!/usr/bin/env bash
# The GPU measurements, in one short run on a CUDA machine (a few minutes on one GPU):
#   bash tools/gpu_check.sh            # writes tools/results/gpu/*.json and prints the tables
# 1. dump vs forward-only in bf16 (SmolLM2-135M-Instruct, 65,536 tokens, seq_len 1024, batch 16, k 64):
#    ratio, tokens/s, peak CUDA memory (tools/bench_dump.py)
# 2. cached-KD vs CE-only step time in bf16 autocast, and online KD, with peak CUDA memory (tools/bench_fit.py)
# 3. the same store written by a plain dump and by --device-map auto (all visible GPUs), compared
#    position by position (tools/gpu_compare.py)
# CI never runs this; everything here also has a CPU path that the tests cover.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash tools/install.sh >/dev/null
PY=.venv/bin/python
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch ' + torch.__version__)"
OUT=tools/results/gpu
mkdir -p "$OUT"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])" | tee "$OUT/machine.txt"
$PY tools/bench_dump.py --device cuda --tokens 65536 --seq-len 1024 --batch-size 16 --rounds 3 --out "$OUT/bench_dump.json"
$PY tools/bench_fit.py --device cuda --steps 10 --out "$OUT/bench_fit.json"
$PY tools/gpu_compare.py --out "$OUT/device_map.json"
echo "gpu_check: results in $OUT"
