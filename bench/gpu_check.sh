#!/usr/bin/env bash
# The GPU check (docs/design.md §6): one call of at most 8 minutes on one H100/H200 with torch
# (2.11+), Triton (3.6+), nvcc, ninja, pytest preinstalled and NO network (nothing is installed
# from an index: the package runs from this tree through PYTHONPATH, the CUDA extension is built
# in place). It builds csrc/, runs the GPU tests, benchmarks the DiT-XL/2 layer passes, training
# steps and a guided sampling step (bench/gpu_check.py), writes bench/results/<date>-<card>/
# and prints a ratio table last.
#
#   bash bench/gpu_check.sh [--dry-run] [RESULTS_DIR]
#
# Time budget (seconds from the start; KIND_FAST_CHECK_SECONDS scales it, default 450):
#   0     environment; the extension build starts in the background (limit 240 s; nvcc uses a
#         few of the 16 cores while the first GPU sections run)
#   36 %  section "layers" starts no more rows (Triton self-check, then Triton, reference,
#         torch.compile of two reference rows, F.linear / nn.Linear); 48 %: section "steps"
#         (DiT-XL/2 train steps, peak memory); 58 %: section "sampling" (dense vs KIND-DiT
#         guided sampling step, M3 as the cost model picks it, M1 beside it)
#   60 %  the build must be done (else the CUDA rows are skipped, with the build log)
#   80 %  the GPU tests are stopped (pytest -m gpu; a stopped run still reports its counts)
#   97 %  section "cuda" starts no more rows (self-check, M3 layer rows and the sampling step on
#         the CUDA backend, then its M1 rows)
#   then  summary.md, results.json; the table is printed last
# Each section skips what no longer fits, with the reason; a failed step never stops the others.
# --dry-run: no GPU, no build; every section runs on the CPU with tiny shapes and the reference
# backend, the GPU tests are only collected (tests/test_gpu_check.py runs this).
# Env: PYTHON (default python3), KIND_FAST_CHECK_SECONDS, KIND_FAST_BENCH_COMPILE=0 (no
# torch.compile rows), MAX_JOBS (default 16). When $OUT is set (the lent device machine), the
# result files are copied there too (flat, at most 8).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$(pwd)
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
PY=${PYTHON:-python3}
[[ "$PY" == */* ]] && PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PIP_NO_INDEX=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
T0=$(date +%s)
TOTAL=${KIND_FAST_CHECK_SECONDS:-450}
at() { echo $((T0 + TOTAL * $1 / 100)); }  # absolute deadline at $1 % of the budget
left() { local d=$(( $1 - $(date +%s) )); [ "$d" -lt 1 ] && d=1; echo "$d"; }

if [ "$DRY" = 1 ]; then
    card=dry-run
else
    card=$( { nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || true; } | head -1 \
            | tr -c 'A-Za-z0-9._-' '_' | sed 's/_*$//')
    card=${card:-nogpu}
fi
RES=${1:-${KIND_FAST_RESULTS:-bench/results/$(date +%F)-$card}}
mkdir -p "$RES"
RES=$(cd "$RES" && pwd)
FLAGS=()
[ "$DRY" = 1 ] && FLAGS+=(--dry-run)

copy_out() {  # the device tool brings back at most 8 files from $OUT
    if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
        for f in summary.md results.json bench_a.log bench_b.log gpu_tests.log build.log info.log env.md; do
            [ -f "$RES/$f" ] && cp "$RES/$f" "$OUT/" 2>/dev/null
        done
    fi
    return 0
}
say() { echo "== [$(( $(date +%s) - T0 ))s] $*"; }

# ---- 1. environment --------------------------------------------------------------------------
{
    echo "# kind_fast GPU check, $(date -u '+%F %T UTC')$([ "$DRY" = 1 ] && echo ' (DRY RUN on the CPU)')"
    echo
    echo "- commit: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$REPO" diff --quiet HEAD 2>/dev/null || echo ' (+ local changes)')"
    if [ "$DRY" = 0 ]; then
        echo "- card / driver / memory: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo 'nvidia-smi unavailable')"
        echo "- clocks (sm, mem, max sm): $(nvidia-smi --query-gpu=clocks.sm,clocks.mem,clocks.max.sm --format=csv,noheader 2>/dev/null || echo '?')"
        echo "- nvcc: $( { nvcc --version 2>/dev/null || true; } | tail -n1)"
    fi
    "$PY" - <<'EOF' 2>&1
import sys, torch
try:
    import triton; tv = triton.__version__
except Exception as e:  # noqa: BLE001
    tv = f"not importable ({e})"
print(f"- python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {tv}")
EOF
} >"$RES/env.md"
cat "$RES/env.md"

# ---- 2. the CUDA extension, built in place in the background --------------------------------
if [ "$DRY" = 1 ]; then
    echo "dry run: the CUDA extension is not built" >"$RES/build.log"
    echo skipped >"$RES/build.rc"
else
    if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
        TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo 9.0)
    fi
    rm -f "$RES/build.rc"
    ( export KIND_FAST_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST MAX_JOBS=${MAX_JOBS:-16}
      timeout -k 10 240 "$PY" setup.py -q build_ext --inplace >"$RES/build.log" 2>&1
      echo $? >"$RES/build.rc" ) &
    BUILD_PID=$!
    say "building kind_fast._C in the background (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
fi

# ---- 3. layers, training steps, sampling (the extension is not loaded while it is being built)
say "sections layers, steps, sampling"
KIND_FAST_DISABLE_CUDA_EXT=1 timeout -k 10 "$(left "$(at 60)")" "$PY" bench/gpu_check.py "${FLAGS[@]}" \
    --out "$RES" --sections layers,steps,sampling --deadline "layers=$(at 36),steps=$(at 48),sampling=$(at 58)" \
    >"$RES/bench_a.log" 2>&1
say "layers, steps, sampling: rc=$? ($(grep -c '^layers ' "$RES/bench_a.log") layer rows logged)"
copy_out

# ---- 4. the build's result ---------------------------------------------------------------------
if [ "$DRY" = 0 ]; then
    while [ ! -f "$RES/build.rc" ] && [ "$(date +%s)" -lt "$(at 60)" ]; do sleep 2; done
    if [ ! -f "$RES/build.rc" ]; then
        kill "$BUILD_PID" 2>/dev/null
        echo "build still running at its deadline: stopped" >>"$RES/build.log"
        echo timeout >"$RES/build.rc"
    fi
fi
say "build: $(cat "$RES/build.rc") $(tail -n 3 "$RES/build.log" | tr '\n' ' ' | cut -c1-200)"
"$PY" -m kind_fast.info >"$RES/info.log" 2>&1
grep -E "compiled extension|status|cuda  |triton  " "$RES/info.log" | head -8

# ---- 5. GPU tests ------------------------------------------------------------------------------
if [ "$DRY" = 1 ]; then
    "$PY" -m pytest -q -m gpu --collect-only -p no:cacheprovider tests/ >"$RES/gpu_tests.log" 2>&1
    echo "GPU tests: dry run, collected only: $(tail -n 1 "$RES/gpu_tests.log")" >"$RES/gpu_tests.summary"
else
    timeout -k 10 "$(left "$(at 80)")" "$PY" -m pytest -m gpu -v -rs -p no:cacheprovider \
        --continue-on-collection-errors tests/ >"$RES/gpu_tests.log" 2>&1
    rc=$?
    counts=$(grep -E "^(tests/)?[^ ]+::[^ ]+ (PASSED|FAILED|SKIPPED|ERROR)" "$RES/gpu_tests.log" \
             | awk '{print $2}' | sort | uniq -c | awk '{printf "%s %s, ", $1, tolower($2)}')
    note=""
    [ "$rc" = 124 ] || [ "$rc" = 137 ] && note=" (stopped at its time limit; tests after that point did not run)"
    echo "GPU tests: ${counts:-none ran, }pytest rc=$rc$note; last line: $(tail -n 1 "$RES/gpu_tests.log")" \
        >"$RES/gpu_tests.summary"
fi
say "$(cat "$RES/gpu_tests.summary")"
copy_out

# ---- 6. the CUDA extension's rows (its M3 layers and sampling step first) -----------------------
say "section cuda"
timeout -k 10 "$(left "$(at 100)")" "$PY" bench/gpu_check.py "${FLAGS[@]}" --out "$RES" --sections cuda \
    --deadline "cuda=$(at 97)" >"$RES/bench_b.log" 2>&1
say "cuda: rc=$?"

# ---- 7. summary: the ratio table, last ---------------------------------------------------------
"$PY" bench/gpu_check.py --out "$RES" --summarize >"$RES/table.txt" 2>&1
copy_out
echo
echo "results in $RES ($(( $(date +%s) - T0 ))s); logs: bench_a.log bench_b.log gpu_tests.log build.log"
echo
cat "$RES/table.txt"
