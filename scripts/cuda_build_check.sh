#!/usr/bin/env bash
# Prove that the CUDA extension (csrc/ -> kind_fast._C) compiles and links, on a machine
# without a GPU: a separate venv with a CUDA-enabled torch and ninja, `pip install
# --no-build-isolation .` for one architecture, then check that kind_fast._C imports and
# registers its ops with the reference's schemas. It cannot run the kernels (no GPU).
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
from kind_fast._ext import EXPECTED_OPS, load_extension

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
echo "cuda_build_check: OK (venv+torch $((t1 - t0)) s, build $((t2 - t1)) s, check $((t3 - t2)) s, total $((t3 - t0)) s)"
