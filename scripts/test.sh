#!/usr/bin/env bash
# Set up .venv with the test extras and run the test suite (GPU tests skip without a GPU).
# Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh" test
export HF_HUB_OFFLINE=1
# the Triton interpreter tests must run here: where they cannot (e.g. a Triton/numpy pair whose
# interpreter is broken), they fail instead of skipping (tests/test_kind_linear_triton.py)
export KIND_FAST_REQUIRE_INTERPRETER=1
python -m pytest -q -ra "$@"
