#!/usr/bin/env bash
# The GPU cost check (python -m benchmarks.gpu_check): ViT-B/16 under bf16 autocast, batch 64, every
# method's images/s and peak memory, the selection pass against one epoch, a `train.py fit`, and
# torch.compile; writes benchmarks/results/cost_gpu.{md,json} after every phase, about 8 minutes
# at most (--total), exit status 1 when a phase failed.
#
#   bash scripts/gpu_wheels.sh             # once, where pip reaches an index: .gpu_wheels/
#   bash scripts/gpu_check.sh              # on the GPU machine (with .gpu_wheels/ beside it)
#   SMOKE=1 bash scripts/gpu_check.sh      # or --smoke: the CPU smoke run (test_vit, temporary folder)
#
# Other options go to python -m benchmarks.gpu_check (--help). When the Python here (PYTHON, else
# .venv/bin/python, else python3) cannot import jsonargparse, it is installed from .gpu_wheels/
# (GPU_WHEELS) into a folder put first on PYTHONPATH (GPU_SITE), without an index and without
# dependencies. W&B stays disabled and unimported.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3
fi

NEEDED="import jsonargparse, docstring_parser, typeshed_client"
if ! "$PY" -c "$NEEDED" 2>/dev/null; then
  WHEELS=${GPU_WHEELS:-$ROOT/.gpu_wheels}
  SITE=${GPU_SITE:-${TMPDIR:-/tmp}/grft_gpu_site}
  if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "gpu_check: $PY cannot import jsonargparse and $WHEELS holds no wheels (scripts/gpu_wheels.sh makes them)" >&2
    exit 2
  fi
  echo "gpu_check: installing $(cd "$WHEELS" && echo *.whl) into $SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    --find-links "$WHEELS" jsonargparse docstring-parser typeshed-client || exit 2
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  "$PY" -c "$NEEDED" || exit 2
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1
exec "$PY" -m benchmarks.gpu_check "$@"
