#!/usr/bin/env bash
# Idempotent set-up: a .venv with CPU torch pinned and this package (editable) with the extras asked for.
#   bash scripts/setup.sh            # what the main job needs: the package and its `train` extra
#   bash scripts/setup.sh dev,app    # what the tests need (scripts/test.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${1:-train}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=".venv/.superlora-installed-${EXTRAS//,/-}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first, exactly this version: the local CPU wheel (see constraints.txt).
  .venv/bin/python -m pip install -q torch==2.13.0
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[$EXTRAS]"
  touch "$stamp"
fi
