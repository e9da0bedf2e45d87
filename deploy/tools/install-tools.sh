#!/usr/bin/env bash
# Build, once, the tools that check the deploy assets, and cache them:
#   helm, kubeconform, promtool  -- `go install` of pinned releases (the Go module proxy)
#   compose-check                -- deploy/tools/composecheck: compose-go, the loader behind `docker compose config`
#   grafana-dashboard.schema.json -- Grafana's dashboard types (@grafana/schema, npm) turned into JSON Schema
#   k8s-schemas/                 -- kubeconform-layout Kubernetes JSON schemas from the kubernetes-validate wheel (PyPI)
#   crd-schemas/                 -- JSON schemas of the prometheus-operator and KEDA CRDs the chart renders, from the CRD
#                                   YAMLs in their Go modules (`go mod download`, no build; deploy/tools/crd_schemas.py)
# None of these downloads anything but packages from their registries, so the checks run offline.
#
# Usage: deploy/tools/install-tools.sh [TOOL...]      (default: all)
# Prints one `name=/absolute/path` line per tool on stdout; progress goes to stderr.
# Cache: $MODERATOR_CACHE_DIR (default ~/.cache/moderator)/bin; names carry the version,
# so bumping a pin below rebuilds and an old cache never answers for a new version.
set -euo pipefail

HELM_VERSION=v3.22.0
KUBECONFORM_VERSION=v0.8.0
PROMETHEUS_VERSION=v0.316.0     # the Go module version of Prometheus 3.16.0 (promtool)
GRAFANA_SCHEMA_VERSION=13.2.3    # npm @grafana/schema
TS_JSON_SCHEMA_GENERATOR_VERSION=2.10.0
K8S_SCHEMA_VERSIONS="1.29.0 1.37.0"   # oldest supported and newest Kubernetes the chart is validated for
PROMETHEUS_OPERATOR_VERSION=v0.85.0   # Go module github.com/prometheus-operator/prometheus-operator (CRDs only)
KEDA_VERSION=v2.21.0                  # Go module github.com/kedacore/keda/v2 (CRDs only)

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cache="${MODERATOR_CACHE_DIR:-$HOME/.cache/moderator}"
bin="$cache/bin"
mkdir -p "$bin"
PYTHON="${PYTHON:-$root/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3

log() { echo "install-tools: $*" >&2; }

# One builder at a time (two test runs, or a test run and a developer).
exec 9>"$bin/.install-tools.lock"
if command -v flock >/dev/null 2>&1; then flock 9; fi

export GOFLAGS="${GOFLAGS:--buildvcs=false}"
export CGO_ENABLED=0

go_tool() {  # name package version [build tags] -> cached binary path
  local name="$1" pkg="$2" version="$3" tags="${4:-}"
  local out="$bin/$name-$version"
  if [ ! -x "$out" ]; then
    command -v go >/dev/null 2>&1 || { log "go is needed to build $name (apt-get install golang-go, or a Go >= 1.24 toolchain)"; exit 1; }
    local tmp start
    tmp="$(mktemp -d)"
    start=$SECONDS
    log "building $name $version with go install (once; cached in $bin)"
    GOBIN="$tmp" go install ${tags:+-tags "$tags"} -trimpath -ldflags="-s -w" "$pkg@$version" >&2
    mv "$tmp/$(basename "${pkg%%@*}")" "$out"
    rm -rf "$tmp"
    log "built $name $version in $((SECONDS - start))s"
  fi
  echo "$name=$out"
}

compose_check() {
  local src="$here/composecheck" key out
  key="$(cat "$src/go.mod" "$src/go.sum" "$src/main.go" | sha256sum | cut -c1-12)"
  out="$bin/compose-check-$key"
  if [ ! -x "$out" ]; then
    command -v go >/dev/null 2>&1 || { log "go is needed to build compose-check"; exit 1; }
    local start=$SECONDS
    log "building compose-check (compose-go) once; cached in $bin"
    (cd "$src" && go build -trimpath -ldflags="-s -w" -o "$out.tmp" .) >&2
    mv "$out.tmp" "$out"
    log "built compose-check in $((SECONDS - start))s"
  fi
  echo "compose-check=$out"
}

grafana_schema() {
  local out="$cache/grafana/dashboard-schema-$GRAFANA_SCHEMA_VERSION.json"
  if [ ! -s "$out" ]; then
    command -v npm >/dev/null 2>&1 || { log "npm is needed to derive Grafana's dashboard schema (apt-get install nodejs npm)"; exit 1; }
    local work start=$SECONDS
    work="$(mktemp -d)"
    log "deriving Grafana's dashboard JSON schema from @grafana/schema@$GRAFANA_SCHEMA_VERSION (once)"
    (
      cd "$work"
      echo '{"name": "moderator-grafana-schema", "private": true}' > package.json
      npm install --no-audit --no-fund --silent --ignore-scripts \
        "@grafana/schema@$GRAFANA_SCHEMA_VERSION" "ts-json-schema-generator@$TS_JSON_SCHEMA_GENERATOR_VERSION"
      # The dashboard model Grafana's own frontend is typed by, generated from its CUE kind.
      ./node_modules/.bin/ts-json-schema-generator \
        --path node_modules/@grafana/schema/dist/types/raw/dashboard/x/types.gen.d.ts \
        --type Dashboard --no-type-check -o dashboard.schema.json
    ) >&2
    mkdir -p "$(dirname "$out")"
    mv "$work/dashboard.schema.json" "$out"
    rm -rf "$work"
    log "derived the Grafana dashboard schema in $((SECONDS - start))s"
  fi
  echo "grafana-dashboard-schema=$out"
}

k8s_schemas() {
  local dir="$cache/k8s-schemas"
  "$PYTHON" "$here/k8s_schemas.py" --out "$dir" $K8S_SCHEMA_VERSIONS >&2
  echo "k8s-schemas=$dir"
}

crd_schemas() {  # the CRD YAMLs from the modules' zips (a few MB each) -> kubeconform CRD layout
  local dir="$cache/crd-schemas/prometheus-operator-$PROMETHEUS_OPERATOR_VERSION-keda-$KEDA_VERSION"
  local key
  key="$(sha256sum "$here/crd_schemas.py" | cut -c1-12)"
  if [ "$(cat "$dir/.source" 2>/dev/null)" != "$key" ]; then
    command -v go >/dev/null 2>&1 || { log "go is needed to fetch the CRDs (go mod download)"; exit 1; }
    local po keda tmp
    po="$(go mod download -json "github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION" \
          | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')"
    keda="$(go mod download -json "github.com/kedacore/keda/v2@$KEDA_VERSION" \
          | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')"
    tmp="$dir.tmp.$$"
    rm -rf "$tmp"
    "$PYTHON" "$here/crd_schemas.py" --out "$tmp" \
      "$po/example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml" \
      "$po/example/prometheus-operator-crd/monitoring.coreos.com_prometheusrules.yaml" \
      "$keda/config/crd/bases/keda.sh_scaledobjects.yaml" \
      "$keda/config/crd/bases/keda.sh_triggerauthentications.yaml" >&2
    echo "$key" > "$tmp/.source"
    rm -rf "$dir"
    mv "$tmp" "$dir"
  fi
  echo "crd-schemas=$dir"
}

tools=("$@")
if [ ${#tools[@]} -eq 0 ]; then
  tools=(helm kubeconform promtool compose-check grafana-dashboard-schema k8s-schemas crd-schemas)
fi
for t in "${tools[@]}"; do
  case "$t" in
    helm) go_tool helm helm.sh/helm/v3/cmd/helm "$HELM_VERSION" ;;
    kubeconform) go_tool kubeconform github.com/yannh/kubeconform/cmd/kubeconform "$KUBECONFORM_VERSION" ;;
    # remove_all_sd: leave out the service-discovery plugins (cloud SDKs, client-go), which
    # promtool's rule checks never use; it cuts the build from tens of minutes to a few.
    promtool) go_tool promtool github.com/prometheus/prometheus/cmd/promtool "$PROMETHEUS_VERSION" remove_all_sd ;;
    compose-check) compose_check ;;
    grafana-dashboard-schema) grafana_schema ;;
    k8s-schemas) k8s_schemas ;;
    crd-schemas) crd_schemas ;;
    *) log "unknown tool: $t"; exit 2 ;;
  esac
done
