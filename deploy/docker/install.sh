#!/bin/sh
# The serving install: one virtualenv with moderator and its pinned runtime dependencies
# (ONNX Runtime, no torch). The Dockerfile runs exactly this script, and
# tests/test_deploy_image.py runs it in a fresh venv, so what the image installs is tested here.
#
# Usage: install.sh cpu|gpu VENV SRC
#   SRC holds pyproject.toml, constraints.txt, README.md and moderator/ (the image's build context).
#   gpu installs moderator[gpu]: onnxruntime-gpu (CUDA 13, cuDNN 9) instead of onnxruntime.
set -eu
variant="$1" venv="$2" src="$3"
case "$variant" in cpu|gpu) ;; *) echo "install.sh: variant must be cpu or gpu, not $variant" >&2; exit 2 ;; esac
python="${PYTHON:-python3}"

"$python" -m venv "$venv"
# The extra picks the ONNX Runtime build: moderator[cpu] (onnxruntime) or moderator[gpu] (onnxruntime-gpu).
"$venv/bin/python" -m pip install --prefer-binary -c "$src/constraints.txt" "$src[$variant]"

# The serving image must not carry the training stack.
if "$venv/bin/python" -c 'import importlib.util as u, sys; sys.exit(0 if any(u.find_spec(m) for m in ("torch", "open_clip", "torchvision")) else 1)'; then
  echo "install.sh: torch/open_clip ended up in the serving environment" >&2
  exit 1
fi
"$venv/bin/moderator" --version
"$venv/bin/python" -c 'import onnxruntime as ort; print("onnxruntime", ort.__version__, ort.get_available_providers())'
