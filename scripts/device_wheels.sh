#!/usr/bin/env bash
# Fetch, here (where PyPI is reachable), the wheels a GPU machine without network needs on top of its own image
# (PyTorch CUDA, accelerate, onnx, onnxruntime, ... are there): the transformers/tokenizers/optimum versions this
# project pins (the image's transformers 5.x is outside our range) for its Python (3.12, x86_64).
# Carry the folder to the device and scripts/device_check.sh installs them into a venv over the system packages.
#   scripts/device_wheels.sh [DIR=.device-wheels] [PYTHON_VERSION=3.12]
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.device-wheels}
PYV=${2:-3.12}
PY=${PY:-.venv/bin/python}
mkdir -p "$DIR"
# Same versions as the CI venv, so the device runs what CI tested.
pins=$("$PY" - <<'PYEOF'
from importlib.metadata import version
print(" ".join(f"{n}=={version(n)}" for n in ["transformers", "tokenizers", "optimum", "optimum-onnx", "huggingface-hub"]))
PYEOF
)
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYV" \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DIR" $pins
ls -1 "$DIR"
