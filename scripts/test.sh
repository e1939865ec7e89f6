#!/usr/bin/env bash
# Set up .venv with the test extras and run the test suite (GPU tests skip without a GPU).
# Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh" test
export HF_HUB_OFFLINE=1
python -m pytest -q -ra "$@"
