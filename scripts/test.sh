#!/usr/bin/env bash
# Set everything up, then run the whole test suite (fast and slow tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 WANDB_MODE=offline
exec .venv/bin/python -m pytest -m "slow or not slow" -q "$@"
