#!/usr/bin/env bash
# The worker's pipeline on one NVIDIA GPU: decisions/s with GPU (nvJPEG) decode, for JSON records
# (base64 inside) and raw records (the JPEG is the value), optionally with CPU decode; the bare
# encoder in the same run, and p50/p99 at half the measured maximum rate.
# No Kafka, no Redis, no internet needed: memory source, model exported here with random
# weights (speed does not depend on weight values). Needs `pip install moderator[train]`
# (torch, torchvision, open_clip). Runs ../shared/bench/gpu_anchor.py (or $ANCHOR) first when
# present, so the figures compare as ratios to the anchors measured in the same call.
#
# Usage: deploy/bench/gpu-worker.sh [OUT_DIR]
#   MODEL_NAME (ViT-B-32)  EVENTS (4000)  SIZE (1024x768)  MAX_BATCH (256)  ANCHOR (path or "skip")
#   UNIQUE (64: distinct images; drawing a 1024x768 photo takes ~0.1 s)  CPU_DECODE (0; 1 adds a
#   run with Pillow decode, slow to prepare: the encoder-with-preprocessing reference runs at ~100/s)
# On a machine without CUDA it runs the same commands on the CPU path with the torch backend
# (no GPU decode) -- what the test suite does with a tiny model to keep this script working.
set -euo pipefail
OUT_DIR=${1:-${OUT:-/tmp/moderator-gpu-worker}}
PY=${PYTHON:-python3}
MODEL_NAME=${MODEL_NAME:-ViT-B-32}
EVENTS=${EVENTS:-4000}
SIZE=${SIZE:-1024x768}
MAX_BATCH=${MAX_BATCH:-256}
MAX_WAIT_MS=${MAX_WAIT_MS:-20}
ENCODER_SECONDS=${ENCODER_SECONDS:-2}
UNIQUE=${UNIQUE:-64}
CPU_DECODE=${CPU_DECODE:-0}
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
ANCHOR=${ANCHOR:-$REPO/../shared/bench/gpu_anchor.py}
POLICY=${POLICY:-$REPO/moderator/data/policies/default.yaml}
MODEL_DIR="$OUT_DIR/model-$MODEL_NAME"
mkdir -p "$OUT_DIR"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
CUDA=$($PY -c "import torch; print('1' if torch.cuda.is_available() else '0')")
$PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())"

if [ "$CUDA" = 1 ] && [ "$ANCHOR" != skip ] && [ -f "$ANCHOR" ]; then
  echo "== anchors ($ANCHOR)"
  OUT="$OUT_DIR" BUDGET_S=${ANCHOR_BUDGET_S:-200} $PY "$ANCHOR" | tail -n 30
fi

if [ ! -f "$MODEL_DIR/manifest.json" ]; then
  echo "== export $MODEL_NAME (random weights) -> $MODEL_DIR"
  $PY -m moderator.cli export --model "$MODEL_NAME" --seed 0 --out "$MODEL_DIR" --overwrite >/dev/null
fi

run() {  # name, extra bench-worker flags...
  local name=$1; shift
  echo "== $name"
  $PY -m moderator.cli bench-worker --model "$MODEL_DIR" --policy "$POLICY" --source memory --backend torch \
    --image jpeg --size "$SIZE" --events "$EVENTS" --unique-images "$UNIQUE" --max-batch "$MAX_BATCH" --max-wait-ms "$MAX_WAIT_MS" \
    --encoder-seconds "$ENCODER_SECONDS" --latency "$@" | tee "$OUT_DIR/$name.json"
}
if [ "$CUDA" = 1 ]; then
  run gpu-decode --gpu-decode
  run gpu-decode-raw --gpu-decode --envelope raw
  if [ "$CPU_DECODE" = 1 ]; then run cpu-decode --no-gpu-decode; fi
else
  echo "no CUDA device: CPU path only (torch backend, CPU decode)"
  run cpu-decode --no-gpu-decode
fi
$PY - "$OUT_DIR" <<'PYEOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
rows = {p.stem: json.loads(p.read_text().splitlines()[-1]) for p in sorted(out.glob("*-decode*.json"))}
print(f"{'run':15} {'decisions/s':>12} {'encoder img/s':>14} {'ratio':>6} {'p50 ms':>7} {'p99 ms':>7}")
for name, r in rows.items():
    lat = r.get("latency_at_half_rate", {})
    print(f"{name:15} {r['worker_decisions_per_s']:>12} {r['encoder_images_per_s']:>14} "
          f"{r['ratio_worker_to_encoder']:>6} {lat.get('p50_ms', '-'):>7} {lat.get('p99_ms', '-'):>7}")
PYEOF
