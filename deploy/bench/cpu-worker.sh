#!/usr/bin/env bash
# The CPU figures of the README's Performance section, in one run on one machine (rows compare
# as ratios; the machines are noisy). Needs `pip install moderator[train,dev]` (export, quantize,
# the demo model, py-spy) and what the tests need for a local Kafka (Java, Maven).
#
# Usage: deploy/bench/cpu-worker.sh [OUT_DIR]    EVENTS (4000)  VIT_EVENTS (300)  SKIP_VIT (unset)
set -euo pipefail
OUT_DIR=${1:-/tmp/moderator-cpu-worker}
PY=${PYTHON:-python3}
EVENTS=${EVENTS:-4000}
VIT_EVENTS=${VIT_EVENTS:-300}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$OUT_DIR"
cd "$REPO"
DEMO=$($PY -c "from moderator.model.demo import ensure_demo_model; print(ensure_demo_model(progress=False).model_dir)")
bw() {  # name, bench-worker flags...
  local name=$1; shift
  echo "== $name" >&2
  $PY -m moderator.cli bench-worker "$@" 2>>"$OUT_DIR/log.txt" | tee "$OUT_DIR/$name.json"
}
bw demo-kafka --model "$DEMO" --policy moderator/data/policies/demo.yaml --source kafka --events "$EVENTS" --latency \
  --profile "$OUT_DIR/demo-kafka.profile.txt"
bw demo-memory --model "$DEMO" --policy moderator/data/policies/demo.yaml --source memory --events "$EVENTS" --latency
# `moderator run` itself through Kafka, as 1 process and as 2 (--processes: one per core here)
bw demo-kafka-processes --model "$DEMO" --policy moderator/data/policies/demo.yaml --source kafka --processes 2 \
  --events $((EVENTS * 3 / 2)) --partitions 4
bw demo-memory-jpeg --model "$DEMO" --policy moderator/data/policies/demo.yaml --source memory --events 1000 \
  --image jpeg --size 1024x768
bw demo-memory-jpeg-nodraft --model "$DEMO" --policy moderator/data/policies/demo.yaml --source memory --events 1000 \
  --image jpeg --size 1024x768 --no-jpeg-draft
echo "== draft" >&2
$PY -m moderator.cli bench-draft --model "$DEMO" | tee "$OUT_DIR/draft.json"
if [ -z "${SKIP_VIT:-}" ]; then
  VIT="$OUT_DIR/vit-b-32"; VIT8="$OUT_DIR/vit-b-32-int8"; CAL="$OUT_DIR/calibration"
  [ -f "$VIT/manifest.json" ] || $PY -m moderator.cli export --model ViT-B-32 --seed 0 --out "$VIT" --overwrite >/dev/null
  [ -d "$CAL/train" ] || $PY -m moderator.cli synth --out "$CAL" --train 48 --heldout 0 --size 256 >/dev/null
  [ -f "$VIT8/manifest.json" ] || $PY -c "
from moderator.model.quantize import quantize_model_dir
quantize_model_dir('$VIT', '$VIT8', '$CAL/train', overwrite=True)"
  bw vit-fp32-kafka --model "$VIT" --policy moderator/data/policies/default.yaml --events "$VIT_EVENTS" --size 256
  bw vit-int8-kafka --model "$VIT8" --policy moderator/data/policies/default.yaml --events $((VIT_EVENTS * 2)) --size 256 \
    --seed-loop-model "$VIT"
fi
$PY - "$OUT_DIR" <<'PYEOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print(f"{'run':26} {'decisions/s':>11} {'encoder':>9} {'enc+pre':>9} {'ratio':>6} {'ratio+pre':>9} {'cpu ms/ev':>9} {'p99 ms':>7} {'x seed':>7}")
for p in sorted(out.glob("*.json")):
    if p.stem == "draft":
        continue
    if "runs" in json.loads(p.read_text().splitlines()[0]):  # --processes through Kafka: one row per run
        r = json.loads(p.read_text().splitlines()[0])
        for n, run in r["runs"].items():
            print(f"{p.stem + ' x' + n:26} {run['worker_decisions_per_s']:>11} {r['encoder_images_per_s']:>9} "
                  f"{r['encoder_with_preprocess_images_per_s']:>9} {'-':>6} "
                  f"{run['ratio_worker_to_encoder_with_preprocess']:>9} {run['cpu_seconds_per_event_ms']:>9} {'-':>7} {'-':>7}")
        continue
    r = json.loads(p.read_text().splitlines()[0])
    lat = r.get("latency_at_half_rate", {})
    print(f"{p.stem:26} {r['worker_decisions_per_s']:>11} {r['encoder_images_per_s']:>9} "
          f"{r['encoder_with_preprocess_images_per_s']:>9} {r['ratio_worker_to_encoder']:>6} "
          f"{r['ratio_worker_to_encoder_with_preprocess']:>9} {r['cpu_seconds_per_event_ms']:>9} "
          f"{lat.get('p99_ms', '-'):>7} {r.get('ratio_worker_to_seed_loop', '-'):>7}")
PYEOF
