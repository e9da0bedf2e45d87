#!/usr/bin/env bash
# Everything worth measuring in one short call on a lent GPU machine (torch, torchvision, no
# registry access): anchors (subset of gpu_anchor.py), ViT-B/32 export, the worker with GPU decode
# for JSON and raw records, raw records on PROCESSES (4) worker processes side by side (+ a py-spy
# profiled run when time allows), the GPU self-check.
# ~4.5 min on an H100. Writes JSON/log files to $OUT (at most 8).
#
#   WHEELS (.whl): a folder of wheels for what the machine lacks (pydantic, pydantic-settings,
#     pydantic-core, annotated-types, typing-inspection, python-dotenv, open_clip_torch, ftfy,
#     wcwidth, kafka-python, crc32c, redis, pybase64, py-spy), installed with --no-deps
#   ANCHOR (../shared/bench/gpu_anchor.py or .dev/gpu_anchor.py)  ARCH (ViT-B-32)  EVENTS (4000)
#   PROFILE_IF_BEFORE_S (215): the profiled run only starts before this many seconds
set -uo pipefail
export PYTHONUNBUFFERED=1
T0=$(date +%s)
el() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
OUT=${OUT:-/tmp/moderator-gpu-lease}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
WHEELS=${WHEELS:-$REPO/.whl}
if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 3
  export PYTHONPATH=/tmp/site:$REPO PATH=/tmp/site/bin:$PATH
else
  export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
fi
exec > >(tee -a "$OUT/lease-log.txt") 2>&1
el "start"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
$PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())" || exit 4
CUDA=$($PY -c "import torch; print(int(torch.cuda.is_available()))")
ARCH=${ARCH:-ViT-B-32}; EVENTS=${EVENTS:-4000}; ENC_S=${ENCODER_SECONDS:-2}; LATENCY_EVENTS=${LATENCY_EVENTS:-2000}
WORK=$(mktemp -d); MODEL_DIR=$WORK/model
ANCHOR=${ANCHOR:-$REPO/../shared/bench/gpu_anchor.py}
[ -f "$ANCHOR" ] || ANCHOR=$REPO/.dev/gpu_anchor.py
if [ "$CUDA" = 1 ] && [ -f "$ANCHOR" ]; then
  el "== anchors: ViT-B/32 tower at 32 and 256, JPEG decode ($ANCHOR)"
  OUT=$WORK timeout 60 $PY -c "
import json, sys; sys.path.insert(0, '$(dirname "$ANCHOR")'); import gpu_anchor as g
g.bench_tower('vit_base_patch32_clip_224', [32, 256]); g.bench_decode()
for r in g.rows: print(r['what'][:60], r.get('batch'), round(r['img_s']))
json.dump(g.rows, open('$OUT/anchor.json', 'w'), indent=1)" 2>&1 | grep -v '^\['
fi
el "== export $ARCH (random weights)"
timeout 150 $PY -m moderator.cli export --model "$ARCH" --seed 0 --out "$MODEL_DIR" --overwrite > "$WORK/export.log" 2>&1 \
  || { tail -20 "$WORK/export.log"; exit 5; }
bw() {  # name, flags...
  local name=$1; shift
  el "== worker $name"
  timeout 100 $PY -m moderator.cli bench-worker --model "$MODEL_DIR" --policy "$REPO/moderator/data/policies/default.yaml" \
    --source memory --backend torch --image jpeg --size 1024x768 --events "$EVENTS" --unique-images 64 \
    --max-batch 256 --max-wait-ms 20 --encoder-seconds "$ENC_S" "$@" > "$OUT/$name.json" 2> "$WORK/$name.err"
  el "rc=$?"; grep -iE "error|Traceback" "$WORK/$name.err" | tail -3
  $PY -c "import json,sys; r=json.loads(open(sys.argv[1]).read().splitlines()[0]); print(json.dumps({k: r.get(k) for k in ('worker_decisions_per_s','cpu_seconds_per_event_ms','stage_ms_per_event','latency_at_half_rate','encoder_images_per_s','dead_letters','profile')}))" "$OUT/$name.json" 2>/dev/null
}
GPU_FLAG=--gpu-decode; [ "$CUDA" = 1 ] || GPU_FLAG=--no-gpu-decode
bw worker-json $GPU_FLAG --latency --latency-events "$LATENCY_EVENTS"
bw worker-raw $GPU_FLAG --envelope raw --latency --latency-events "$LATENCY_EVENTS"
# several worker processes on the one GPU, each its own CUDA context: past one process's GIL?
bw worker-raw-procs $GPU_FLAG --envelope raw --processes "${PROCESSES:-4}" --events $(( EVENTS * 2 ))
el "== self-check"
timeout 90 $PY "$REPO/deploy/bench/gpu_selfcheck.py" --model-dir "$MODEL_DIR" --seconds 0 > "$OUT/selfcheck.json" 2> "$WORK/selfcheck.err"
el "self-check rc=$?"
$PY -c "import json,sys; r=json.load(open(sys.argv[1])); print(r['checks']); print(r['fallback']); print({k: r['pixels'][k] for k in ('mean_abs','max_levels')})" "$OUT/selfcheck.json" 2>/dev/null \
  || tail -5 "$WORK/selfcheck.err"
if [ $(( $(date +%s) - T0 )) -lt "${PROFILE_IF_BEFORE_S:-215}" ] && command -v py-spy >/dev/null; then
  bw worker-json-profiled $GPU_FLAG --profile "$OUT/worker-json.collapsed.txt"
fi
el "done"
