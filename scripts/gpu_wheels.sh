#!/usr/bin/env bash
# The pure-Python wheels that scripts/gpu_check.sh needs on a GPU machine that has torch,
# lightning, timm, peft, torchmetrics and safetensors but no jsonargparse and no package index:
# jsonargparse and the two packages of its `signatures` extra (docstring-parser, typeshed-client),
# at the versions installed here (or JSONARGPARSE_VERSION, DOCSTRING_PARSER_VERSION,
# TYPESHED_CLIENT_VERSION). Run it where pip reaches an index; the wheels go to .gpu_wheels/
# (ignored by git; GPU_WHEELS to change), replacing any there.
#   bash scripts/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
DEST=${GPU_WHEELS:-.gpu_wheels}

installed() { "$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$1" 2>/dev/null || true; }
specs=()
for name in jsonargparse docstring-parser typeshed-client; do
  var=$(echo "$name" | tr 'a-z-' 'A-Z_')_VERSION
  version=${!var:-$(installed "$name")}
  specs+=("$name${version:+==$version}")
done

mkdir -p "$DEST"
rm -f "$DEST"/*.whl  # one version of each: the GPU side installs whatever is here
# pure-Python wheels only (--only-binary, no sdist to build there); --no-deps: torch, lightning and
# typing-extensions are there already. Requires-Python is checked against the GPU machine's Python.
"$PY" -m pip download --only-binary=:all: --no-deps --python-version "${GPU_PYTHON_VERSION:-3.12}" \
  -d "$DEST" "${specs[@]}"
for whl in "$DEST"/*.whl; do
  case "$(basename "$whl")" in
    *-none-any.whl) ;;
    *) echo "gpu_wheels: not a pure-Python wheel: $whl" >&2; exit 1 ;;
  esac
done
ls -l "$DEST"/*.whl
