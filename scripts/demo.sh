#!/usr/bin/env bash
# The main job on the embedded default data: set up .venv, then `kind-fast demo`.
# Extra arguments go to the demo (e.g. --steps 100 --out runs/demo).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh" demo
python -m kind_fast demo "$@"
