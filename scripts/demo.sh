#!/usr/bin/env bash
# Set everything up, then fine-tune ImageNet MobileNetV2 on 1,000 MNIST digits with GRFT (CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/python train.py fit --config configs/demo.yaml "$@"
