#!/usr/bin/env bash
# Image-encoder throughput on a GPU host (speed only: random weights).
# Exports ViT-B-32 with random weights, then benchmarks the torch backend
# (fp16 + CUDA graphs, fp16 eager, fp32 eager) and ONNX Runtime on the same
# inputs in one process, so the rows compare as ratios.
# Usage: deploy/bench/gpu-encoder.sh [MODEL_DIR] (needs `pip install moderator[train]`)
set -euo pipefail
MODEL_DIR=${1:-/tmp/moderator-vit-b-32-random}
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
if [ ! -f "$MODEL_DIR/manifest.json" ]; then
  $PY -m moderator.cli export --model ViT-B-32 --seed 0 --out "$MODEL_DIR" --overwrite
fi
$PY -m moderator.cli bench-encoder "$MODEL_DIR" --batch-sizes 1 32 256 --seconds 3 \
  --backends torch torch-eager torch-fp32 onnx
