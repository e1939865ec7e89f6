#!/usr/bin/env bash
# One GPU check of the Triton backend: install from this working tree, run the GPU tests and a
# pinned benchmark subset, write full results, print a short table last. For a GPU machine with
# torch (2.11+) and Triton (3.6+) preinstalled and NO network; under 8 minutes on an H100 (step
# limits: install 180 s, info 60 s, GPU tests 180 s, compiled-reference rows 150 s, other rows 120 s).
#
#   bash bench/gpu_check.sh [RESULTS_DIR]
#
# RESULTS_DIR (or KIND_FAST_RESULTS) defaults to bench/results/<date>-<card>/; when $OUT is set
# (the lent device machine) the files are also copied there, flat (at most 8 files).
# Env: PYTHON (default python3), KIND_FAST_BUILD_CUDA (default 0: do not build csrc/ here),
#      KIND_FAST_BENCH_COMPILE (default 1: time torch.compile of the reference too),
#      KIND_FAST_AUTOTUNE (default unset: pinned configs), STEP_TIMEOUT_TESTS / STEP_TIMEOUT_BENCH (s).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$(pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export KIND_FAST_BUILD_CUDA=${KIND_FAST_BUILD_CUDA:-0}
export KIND_FAST_BENCH_COMPILE=${KIND_FAST_BENCH_COMPILE:-1}
unset TRITON_INTERPRET  # real kernels here

[[ "$PY" == */* ]] && PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")  # survives cd
card=$( { nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || true; } | head -1 \
        | tr -c 'A-Za-z0-9._-' '_' | sed 's/_*$//')
card=${card:-nogpu}
RES=${1:-${KIND_FAST_RESULTS:-bench/results/$(date +%F)-$card}}
mkdir -p "$RES"
RES=$(cd "$RES" && pwd)
declare -A STATUS
T0=$(date +%s)

step() {  # step NAME TIMEOUT_S CMD... : run with a timeout, log to $RES/NAME.log, never abort
    local name=$1 limit=$2 rc=0
    shift 2
    echo "== $name (limit ${limit}s): $*"
    timeout -k 15 "$limit" "$@" >"$RES/$name.log" 2>&1 || rc=$?
    tail -n 5 "$RES/$name.log" | sed 's/^/   /'
    STATUS[$name]=$([ "$rc" = 0 ] && echo ok || echo "FAILED (rc=$rc)")
    echo "   -> ${STATUS[$name]} after $(( $(date +%s) - T0 ))s total"
}

# ---- 1. environment (card, driver, versions) -----------------------------------------------
{
    echo "# kind_fast GPU check, $(date -u '+%F %T UTC')"
    echo
    echo "- commit: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$REPO" diff --quiet 2>/dev/null || echo ' (+ local changes)')"
    echo "- card / driver / memory: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo 'nvidia-smi unavailable')"
    echo "- clocks (sm, mem, max sm): $(nvidia-smi --query-gpu=clocks.sm,clocks.mem,clocks.max.sm --format=csv,noheader 2>/dev/null || echo '?')"
    "$PY" - <<'EOF' 2>&1 || echo "- python/torch/triton: could not be imported"
import sys, torch
try:
    import triton; tv = triton.__version__
except Exception as e:  # noqa: BLE001
    tv = f"not importable ({e})"
print(f"- python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {tv}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"- device: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
EOF
} >"$RES/env.md"
cat "$RES/env.md"

# ---- 2. install from the working tree (offline: no deps, no build isolation, no index) -----
# (editable first; a plain install if the image's setuptools cannot do editable installs)
export PY
step install 180 bash -c '
    "$PY" -m pip install --no-deps --no-build-isolation --no-index -e . \
        || "$PY" -m pip install --no-deps --no-build-isolation --no-index .
    cd / && "$PY" -c "import kind_fast, kind_fast.kernels; print(\"kind_fast\", kind_fast.__version__, \"from\", kind_fast.__file__)"'
step info 60 "$PY" -m kind_fast.info
{ echo; echo '```'; cat "$RES/info.log"; echo '```'; } >>"$RES/env.md"

# ---- 3. GPU tests ----------------------------------------------------------------------------
step gpu_tests "${STEP_TIMEOUT_TESTS:-180}" "$PY" -m pytest -q -rs -m gpu -p no:cacheprovider \
    --junitxml="$RES/gpu_tests.xml" tests/

# ---- 4. pinned benchmark subset (bf16, M = 32·256 tokens) ------------------------------------
# torch.compile of the reference costs a compile per row: only three rows time it.
B=bench/bench_kind_linear.py
COMPILED=("$B::test_gpu_layer_triton[DiT-XL/2.fc1-forward]" "$B::test_gpu_layer_triton[DiT-XL/2.fc1-transfer]"
          "$B::test_gpu_layer_triton[DiT-B/2.proj-transfer]")
PLAIN=()
for row in DiT-XL/2.proj-forward DiT-XL/2.proj-transfer DiT-B/2.proj-forward DiT-S/2.fc1-forward \
           DiT-S/2.fc1-transfer DiT-XL/2.fc1-pretrain; do
    PLAIN+=("$B::test_gpu_layer_triton[$row]")
done
PLAIN+=("$B::test_gpu_layer_triton_m2[64-forward]" "$B::test_gpu_layer_triton_m2[64-pretrain]")
step bench_compiled "${STEP_TIMEOUT_BENCH_COMPILED:-150}" "$PY" -m pytest -q -p no:cacheprovider \
    --benchmark-json="$RES/bench_compiled.json" --benchmark-columns=median,rounds "${COMPILED[@]}"
step bench "${STEP_TIMEOUT_BENCH:-120}" env KIND_FAST_BENCH_COMPILE=0 "$PY" -m pytest -q -p no:cacheprovider \
    --benchmark-json="$RES/bench.json" --benchmark-columns=median,rounds "${PLAIN[@]}"

# ---- 5. summary: markdown file + the short table printed last --------------------------------
"$PY" - "$RES" <<'EOF' || echo "summary failed (see $RES/bench.log)"
import json, os, sys
res = sys.argv[1]
rows = []
for name in ("bench_compiled.json", "bench.json"):
    try:
        rows += json.load(open(os.path.join(res, name))).get("benchmarks", [])
    except Exception as e:  # noqa: BLE001
        print(f"no {name} ({e})")
fmt = lambda v, f="{:.3f}": "-" if v is None else f.format(v)  # noqa: E731
lines = ["| shape | mode | triton ms | linear ms | ratio | goal | reference ms | x faster | compiled ref ms | x faster | all goals |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
for b in rows:
    e = b.get("extra_info", {})
    if "t_m2_ms" in e:
        continue
    g = e.get("goals", {})
    lin = g.get("forward_vs_linear") or g.get("transfer_vs_linear")
    ref, comp = g.get("speedup_vs_reference"), g.get("speedup_vs_compiled_reference")
    lines.append("| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
        e.get("shape"), e.get("mode"), fmt(e.get("t_kind_ms")), fmt(e.get("t_linear_ms")),
        fmt(e.get("ratio_vs_linear")), "-" if not lin else f"<= {lin[1]:.2f}: {'met' if lin[2] else 'MISSED'}",
        fmt(e.get("t_reference_ms")), "-" if not ref else f"{ref[0]:.2f} ({'met' if ref[2] else 'MISSED'})",
        fmt(e.get("t_compiled_reference_ms")), "-" if not comp else f"{comp[0]:.2f} ({'met' if comp[2] else 'MISSED'})",
        e.get("all_goals_met")))
m2 = [b.get("extra_info", {}) for b in rows if "t_m2_ms" in b.get("extra_info", {})]
rows = [b for b in rows if "t_m2_ms" not in b.get("extra_info", {})]
m2_lines = ["", "| M2 (DiT-XL/2.proj, r_G, K=32) | mode | M2 ms | M1 ms | linear ms | M2/M1 | cost model path |",
            "|---|---|---|---|---|---|---|"] + [
    "| r_G={} | {} | {} | {} | {} | {} | {} |".format(e.get("learngene_rank"), e.get("mode"), fmt(e.get("t_m2_ms")),
                                                    fmt(e.get("t_m1_ms")), fmt(e.get("t_linear_ms")),
                                                    fmt(e.get("ratio_m2_vs_m1")), e.get("path")) for e in m2]
env = open(os.path.join(res, "env.md")).read()
try:  # GPU test counts from the junit file
    import xml.etree.ElementTree as ET
    suite = ET.parse(os.path.join(res, "gpu_tests.xml")).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    n, fl, er, sk = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    tests = f"GPU tests: {n - fl - er - sk} passed, {fl + er} failed, {sk} skipped"
except Exception as e:  # noqa: BLE001
    tests = f"GPU tests: no junit result ({e})"
env += "\n- " + tests + "\n"
if m2:
    lines += m2_lines
lines.append("")
lines.append(tests)
with open(os.path.join(res, "summary.md"), "w") as f:
    f.write(env + "\n## Triton backend vs nn.Linear / reference / torch.compile(reference), bf16\n\n"
            "ratio = t(triton) / t(F.linear or nn.Linear fwd+bwd); goals from docs/design.md §6.\n\n")
    f.write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF

if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
    for f in summary.md env.md bench.json bench_compiled.json gpu_tests.xml gpu_tests.log bench.log \
             bench_compiled.log; do  # the device tool brings back at most 8 files
        cp "$RES/$f" "$OUT"/ 2>/dev/null || true
    done
fi
echo
echo "results in $RES ($(( $(date +%s) - T0 ))s)"
for s in install info gpu_tests bench_compiled bench; do printf '  %-15s %s\n' "$s" "${STATUS[$s]:-not run}"; done
