#!/usr/bin/env bash
# Prove that the CUDA extension (csrc/ -> kind_fast._C) compiles and links, on a machine
# without a GPU, both ways a user gets it: a separate venv with a CUDA-enabled torch and ninja,
# (1) `pip install --no-build-isolation .` for one architecture, then check that kind_fast._C
# imports and registers its ops with the reference's schemas; (2) a plain `pip install .`
# (isolated: builds nothing), then `kind-fast build-ext` compiles the sources the wheel ships,
# and a new process loads the cached build. It cannot run the kernels (no GPU).
#
#   KIND_FAST_CUDA_VENV    venv folder (default .venv-cuda; reused when present)
#   KIND_FAST_CUDA_TORCH   torch requirement (default: torch, a CUDA build; pip's cap applies)
#   TORCH_CUDA_ARCH_LIST   default 9.0 (one architecture keeps the build short)
#   MAX_JOBS               default 2
# Fails with a clear message when there is no CUDA toolkit (nvcc).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
VENV=${KIND_FAST_CUDA_VENV:-.venv-cuda}
PY=${PYTHON:-python3}
t0=$(date +%s)

# --- the CUDA toolkit: CUDA_HOME, else the folder above nvcc's real path, else /usr/local/cuda
is_toolkit() { [ -n "${1:-}" ] && [ -x "$1/bin/nvcc" ] && [ -f "$1/include/cuda_runtime_api.h" ]; }
if ! is_toolkit "${CUDA_HOME:-}"; then
    CUDA_HOME=
    if command -v nvcc >/dev/null; then
        cand=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
        is_toolkit "$cand" && CUDA_HOME=$cand
        if [ -z "$CUDA_HOME" ]; then  # a wrapper script that execs the real nvcc
            real=$(grep -o '/[^" ]*/bin/nvcc' "$(command -v nvcc)" | head -n1 || true)
            [ -n "$real" ] && is_toolkit "$(dirname "$(dirname "$real")")" && CUDA_HOME=$(dirname "$(dirname "$real")")
        fi
    fi
    [ -z "$CUDA_HOME" ] && is_toolkit /usr/local/cuda && CUDA_HOME=/usr/local/cuda
fi
if [ -z "$CUDA_HOME" ]; then
    echo "cuda_build_check: FAILED: no CUDA toolkit found (nvcc); set CUDA_HOME to the toolkit folder" >&2
    exit 1
fi
export CUDA_HOME TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-2}
echo "cuda_build_check: CUDA_HOME=$CUDA_HOME ($("$CUDA_HOME/bin/nvcc" --version | tail -n1))" \
     "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"

# --- a separate venv with a CUDA-enabled torch (the main .venv has the CPU build)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
VENV=$(cd "$VENV" && pwd)  # absolute: the check below runs from another folder
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -c "import torch, sys; sys.exit(torch.version.cuda is None)" 2>/dev/null \
    || "$VENV/bin/python" -m pip install -q "${KIND_FAST_CUDA_TORCH:-torch}"
"$VENV/bin/python" -m pip install -q ninja setuptools wheel
t1=$(date +%s)

# --- build: forced, so a missing toolchain is an error, not a silent pure-Python install
export PATH="$VENV/bin:$PATH"  # the venv's ninja
KIND_FAST_BUILD_CUDA=1 "$VENV/bin/python" -m pip install -q --no-build-isolation "$ROOT"
t2=$(date +%s)

# --- check, from outside the source tree (so the installed package is imported)
cd "$(mktemp -d)"
"$VENV/bin/python" - <<'EOF'
import torch

import kind_fast  # noqa: F401  (registers the reference ops)
from kind_fast.ops._ext import EXPECTED_OPS, load_extension

mod, why = load_extension()
assert mod is not None, f"kind_fast._C did not load: {why}"
print(f"kind_fast._C: {mod.__file__}")
print(f"  archs {mod.ARCH_LIST}, CUDA {mod.CUDA_VERSION}, built with torch {mod.TORCH_VERSION}, ops {mod.OPS}")
assert tuple(mod.OPS) == EXPECTED_OPS, mod.OPS


def args_of(schema):
    return [(a.name, str(a.type)) for a in schema.arguments], [str(r.type) for r in schema.returns]


ops = torch.ops.kind_fast
for mine, ref in (("kind_linear_cuda", "kind_linear"), ("kind_linear_cuda_backward", "kind_linear_backward"),
                  ("kind_linear_cuda_merged", "kind_linear_merged"),
                  ("kind_linear_cuda_merged_gemm", "kind_linear_merged_gemm"),
                  ("kind_linear_cuda_merged_gemm_backward", "kind_linear_merged_gemm_backward")):
    a, b = getattr(ops, mine).default._schema, getattr(ops, ref).default._schema
    assert args_of(a) == args_of(b), f"schema of {mine} differs from {ref}:\n  {a}\n  {b}"
    print(f"  {a}")
from kind_fast.ops import kind_linear_cuda as backend

ok, why = backend.status()
assert ok, why
assert backend.OP is ops.kind_linear_cuda
assert backend.MERGED_GEMM_OP is ops.kind_linear_cuda_merged_gemm and backend.MERGED_OP is ops.kind_linear_cuda_merged
print(f"backend status: {why}")
EOF
t3=$(date +%s)

# --- (2) after installation: a plain pip install (build isolation hides torch) builds nothing;
# `kind-fast build-ext` compiles the CUDA sources the wheel ships into a cache folder
"$VENV/bin/python" -m pip uninstall -q -y kind_fast
"$VENV/bin/python" -m pip install -q --no-deps "$ROOT"
KIND_FAST_CACHE_DIR=$(mktemp -d)
export KIND_FAST_CACHE_DIR
"$VENV/bin/python" -m kind_fast info > info.txt
grep -q "kind-fast build-ext : can build it here" info.txt && grep -q "status .*: not built; to get it" info.txt \
    || { cat info.txt; echo "cuda_build_check: FAILED: info does not offer kind-fast build-ext" >&2; exit 1; }
"$VENV/bin/kind-fast" build-ext
# a new process, without the toolkit on PATH or CUDA_HOME, loads the cached build
env -u CUDA_HOME PATH=/usr/bin:/bin "$VENV/bin/python" - <<'EOF'
import glob
import json
import os

from kind_fast.ops._ext import EXPECTED_OPS, load_extension, origin

mod, why = load_extension()
assert mod is not None, f"the cached build did not load: {why}"
assert tuple(mod.OPS) == EXPECTED_OPS and "built after installation" in origin(), origin()
meta = json.load(open(glob.glob(os.path.join(os.environ["KIND_FAST_CACHE_DIR"], "ext", "*", "build.json"))[0]))
assert meta["sources"].endswith(os.path.join("kind_fast", "csrc")), meta  # the wheel's copy, not the checkout's
print(f"kind_fast._C from the cache: {mod.__file__} ({origin()}; built in {meta['seconds']} s)")
EOF
t4=$(date +%s)
echo "cuda_build_check: OK (venv+torch $((t1 - t0)) s, build $((t2 - t1)) s, check $((t3 - t2)) s," \
     "build-ext $((t4 - t3)) s, total $((t4 - t0)) s)"
