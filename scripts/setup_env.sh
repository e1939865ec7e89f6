#!/usr/bin/env bash
# Create (or reuse) .venv in the repository root with torch and kind_fast installed.
# Usage: source scripts/setup_env.sh [extras]      (extras default: demo)
# KIND_FAST_TORCH overrides the torch requirement (default: the CPU build torch==2.13.0;
# on a GPU machine use e.g. KIND_FAST_TORCH=torch). An already installed torch is kept.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "${KIND_FAST_TORCH:-torch==2.13.0}"
python -m pip install -q -e ".[${1:-demo}]"
