#!/usr/bin/env bash
# GPU check of the CUDA C++ backend, in one go on a GPU machine (made for the lent H100/H200:
# torch 2.11.0+cu130, nvcc 13.0, ninja, 16 cores, no network; any CUDA machine with torch,
# nvcc, ninja, pytest and pytest-benchmark works):
#   1. build kind_fast._C in place (setup.py build_ext --inplace, for this GPU's arch)
#   2. python -m kind_fast.info
#   3. tests/test_kind_linear_cuda.py (GPU tests + the emulated kernel tests), and the self-check
#   4. bench/bench_kind_linear_cuda.py (CUDA backend vs nn.Linear vs the reference; M3 vs M1)
#   5. a short table, last
# Full results go to bench/results/ (and to $OUT when set, for the device tool).
#
#   KF_BENCH_K   pytest -k filter for the benchmarks (default "XL or S/2": 8 shapes; "" = all 16)
#   PYTHON       interpreter (default python3)
# Triton's bench/gpu_check.sh is the Triton backend's twin; merge them when both have landed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
RES=bench/results
mkdir -p "$RES"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1
card=$("$PY" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))" 2>/dev/null || echo unknown)
tag="cuda_ext_${card}"
log="$RES/${tag}.log"
: >"$log"
say() { echo "$@" | tee -a "$log"; }
status=0

say "== kind_fast CUDA backend GPU check: $(date -u +%FT%TZ) on $card"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$log"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" 2>&1 | tee -a "$log"
command -v nvcc >/dev/null && nvcc --version | tail -n1 | tee -a "$log"

# --- 1. build (arch of this GPU unless TORCH_CUDA_ARCH_LIST says otherwise)
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo 9.0)
fi
export TORCH_CUDA_ARCH_LIST MAX_JOBS=${MAX_JOBS:-16}
t0=$(date +%s)
if KIND_FAST_BUILD_CUDA=1 "$PY" setup.py -q build_ext --inplace >>"$log" 2>&1; then
    say "== build: OK in $(( $(date +%s) - t0 )) s (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS)"
else
    say "== build: FAILED after $(( $(date +%s) - t0 )) s; the compiler output is in $log"
    tail -n 60 "$log"
    exit 1
fi

# --- 2. what is live
"$PY" -m kind_fast.info 2>&1 | tee -a "$log"

# --- 3. tests (every output and gradient vs the reference, graphs, compile, opcheck, M3)
"$PY" -m pytest tests/test_kind_linear_cuda.py -q -ra -p no:cacheprovider --junitxml="$RES/${tag}_tests.xml" \
    2>&1 | tee "$RES/${tag}_tests.txt" | tail -n 25 | tee -a "$log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
"$PY" - <<'EOF' 2>&1 | tee -a "$log"
import torch
from kind_fast.ops import kind_linear_cuda as kc
for dt in (torch.bfloat16, torch.float16):
    print("self-check", dt, kc.self_check(torch.device("cuda"), dt))
print("status:", kc.status())
EOF

# --- 4. benchmarks
"$PY" -m pytest bench/bench_kind_linear_cuda.py -q -p no:cacheprovider -k "${KF_BENCH_K-XL or S/2}" \
    --benchmark-json="$RES/${tag}_bench.json" --benchmark-columns=median,rounds 2>&1 | tail -n 5 | tee -a "$log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

# --- 5. short table (last)
"$PY" - "$RES/${tag}_bench.json" <<'EOF' 2>&1 | tee "$RES/${tag}_table.md" | tee -a "$log"
import json, sys
try:
    rows = json.load(open(sys.argv[1]))["benchmarks"]
except (OSError, ValueError, KeyError) as e:
    sys.exit(f"no benchmark results: {e}")
print("| shape | mode | cuda ms | nn.Linear ms | ref ms | cuda/linear | ref/cuda | M3/M1 |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    e = r["extra_info"]
    ref = f"{e['t_ref_ms']:.3f}" if "t_ref_ms" in e else ""
    sp = f"{e['speedup_vs_ref']:.2f}" if "speedup_vs_ref" in e else ""
    m3 = f"{e['m3_vs_m1']:.2f}" if "m3_vs_m1" in e else ""
    goal = "" if e.get("meets_goal") is None else (" ok" if e["meets_goal"] else " MISS")
    print(f"| {e['shape']} | {e['mode']} | {e['t_cuda_ms']:.3f} | {e['t_linear_ms']:.3f} | {ref} | "
          f"{e['ratio_vs_linear']:.2f}{goal} | {sp} | {m3} |")
EOF
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then cp "$RES/${tag}"* "$OUT/" 2>/dev/null || true; fi
say "== done (status $status): results in $RES/${tag}*"
exit $status
