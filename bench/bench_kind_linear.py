"""Layer benchmarks of kind_linear: FastKindLinear against nn.Linear of the same shape.

Modes (docs/design.md §6):
    forward    inference forward (no grad)
    transfer   forward + backward, learngenes frozen: dX, dU_T, dV_T, dσ_T (no weight GEMM)
    pretrain   forward + backward, every component trains
Each test times the KIND layer with pytest-benchmark and, interleaved in the same process,
the nn.Linear baseline; ``extra_info`` holds both medians, their ratio, TFLOP/s and the goal.
CPU variants run anywhere (the reference backend); GPU variants skip without a GPU.
"""

from __future__ import annotations

import pytest
import torch
from conftest import cpu_median, dit_layer_shapes, gpu_median, interleaved, load_average, paired, pair_stats, \
    requires_cuda, synced

import kind_fast as kf
from kind_fast.perf.benchmark import make_reference_layer_step
from kind_fast.ops.kind_linear import kind_linear_flops

TAILORS, ACTIVE, CLASSES, TOKENS = 96, 32, 10, 256
# (mode) -> goal on the ratio t(KIND) / t(nn.Linear), docs/design.md §6: transfer <= 0.80 on the
# CPU (with or without a weight_cache() scope; the FLOP floor is ~0.72) and on the GPU (d >= 768).
CPU_GOALS = {"transfer": 0.80}
GPU_GOALS = {"transfer": 0.80}


def _setup(n_in, n_out, m, mode, device, dtype):
    gen = torch.Generator().manual_seed(0)
    gate = kf.ClassGate.block(CLASSES, TAILORS, ACTIVE)
    layer = kf.FastKindLinear(n_in, n_out, tailor_rank=TAILORS, gate=gate).to(device, dtype)
    lin = torch.nn.Linear(n_in, n_out).to(device, dtype)
    b = m // TOKENS
    x = torch.randn(b, TOKENS, n_in, generator=gen).to(device, dtype)
    labels = torch.randint(0, CLASSES, (b,), generator=gen).to(device)
    g = torch.randn(b, TOKENS, n_out, generator=gen).to(device, dtype)
    if mode == "transfer":
        layer.freeze_learngenes()
    if mode != "forward":
        x.requires_grad_(True)

    def run_kind():
        if mode == "forward":
            with torch.no_grad():
                return layer(x, labels=labels)
        layer(x, labels=labels).backward(g)

    def run_linear():
        if mode == "forward":
            with torch.no_grad():
                return lin(x)
        lin(x).backward(g)

    return run_kind, run_linear


def _flops(n_in, n_out, m, mode) -> tuple[int, int]:
    """(KIND FLOPs, nn.Linear FLOPs) of one call in ``mode``."""
    fwd = kind_linear_flops(m, n_in, n_out, ACTIVE)
    lin = 2 * m * n_in * n_out
    if mode == "forward":
        return fwd, lin
    mask = [True, mode == "pretrain", mode == "pretrain", True, True, True, False]
    return fwd + kind_linear_flops(m, n_in, n_out, ACTIVE, mask), 3 * lin


def _record(benchmark, times, flops, goal, device):
    ratio = times["kind"] / times["linear"]
    benchmark.extra_info.update(
        device=device, t_kind_ms=times["kind"] * 1e3, t_linear_ms=times["linear"] * 1e3,
        ratio_vs_linear=ratio, goal_ratio=goal, meets_goal=None if goal is None else ratio <= goal,
        kind_tflops=flops[0] / times["kind"] / 1e12, linear_tflops=flops[1] / times["linear"] / 1e12,
        torch=torch.__version__,
    )


CPU_CASES = [("DiT-B/2.fc1", *dit_layer_shapes("B")["DiT-B/2.fc1"])] + [
    (name, n_in, n_out) for name, (n_in, n_out) in dit_layer_shapes("S").items()
]


@pytest.mark.parametrize("mode", ["transfer", "pretrain", "forward"])
@pytest.mark.parametrize("name,n_in,n_out", CPU_CASES, ids=[c[0] for c in CPU_CASES])
def test_cpu_layer(benchmark, name, n_in, n_out, mode):
    m = 2048
    run_kind, run_linear = _setup(n_in, n_out, m, mode, "cpu", torch.float32)
    times = interleaved({"kind": run_kind, "linear": run_linear}, cpu_median)
    _record(benchmark, times, _flops(n_in, n_out, m, mode), CPU_GOALS.get(mode), "cpu")
    benchmark.extra_info.update(shape=name, tokens=m, threads=torch.get_num_threads())
    benchmark.pedantic(run_kind, rounds=5, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("scope", ["inside", "outside"])
def test_cpu_fc1_transfer_scope(benchmark, scope):
    """DiT-B/2 fc1, 2048 tokens, transfer fwd+bwd against nn.Linear fwd+bwd, inside and outside a
    ``kind_fast.weight_cache()`` scope (docs/design.md §6: <= 0.80 both ways): paired rounds
    (KIND and nn.Linear back to back, order alternating), the median of the per-round ratios
    and their spread, the machine's load before and after."""
    n_in, n_out = dit_layer_shapes("B")["DiT-B/2.fc1"]
    m = 2048
    run_kind, run_linear = _setup(n_in, n_out, m, "transfer", "cpu", torch.float32)
    for fn in (run_kind, run_linear):
        fn()
    load_before = load_average()
    rounds = paired({"kind": run_kind, "linear": run_linear}, lambda fn: cpu_median(fn, reps=1, warmup=0), rounds=9)
    st = pair_stats(rounds, "kind", "linear")
    benchmark.extra_info.update(
        shape="DiT-B/2.fc1", tokens=m, scope=scope, threads=torch.get_num_threads(), torch=torch.__version__,
        t_kind_ms=st["ms"], t_linear_ms=st["base_ms"], ratio_vs_linear=st["ratio"], ratio_min=st["ratio_min"],
        ratio_max=st["ratio_max"], rounds=st["rounds"], goal_ratio=CPU_GOALS["transfer"],
        meets_goal=st["ratio"] <= CPU_GOALS["transfer"], load_before=load_before, load_after=load_average())
    benchmark.pedantic(run_kind, rounds=3, iterations=1, warmup_rounds=1)


GPU_CASES = [(name, *shape) for size in ("S", "B", "L", "XL") for name, shape in dit_layer_shapes(size).items()]


@requires_cuda
@pytest.mark.parametrize("mode", ["transfer", "pretrain", "forward"])
@pytest.mark.parametrize("name,n_in,n_out", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_gpu_layer_reference(benchmark, name, n_in, n_out, mode):
    """The reference backend on the GPU in bf16 (the unfused baseline of docs/design.md §6)."""
    m = 32 * TOKENS
    with kf.use_backend("torch"):
        run_kind, run_linear = _setup(n_in, n_out, m, mode, "cuda", torch.bfloat16)
        times = interleaved({"kind": run_kind, "linear": run_linear}, gpu_median)
        _record(benchmark, times, _flops(n_in, n_out, m, mode), None, torch.cuda.get_device_name())
        benchmark.extra_info.update(shape=name, tokens=m, backend="torch")
        benchmark.pedantic(synced(run_kind, "cuda"), rounds=10, iterations=1, warmup_rounds=2)


# =====================================================================================
# GPU: the Triton backend beside nn.Linear, the unfused reference and its torch.compile
# =====================================================================================
# docs/design.md §6 goals, recorded per row in extra_info["goals"] as {goal: [value, target, met]}:
#   forward          t(triton) <= 1.10 · t(F.linear) · (1 + K/in + K/out)
#   transfer         t(triton) <= 0.80 · t(nn.Linear fwd+bwd), for d = min(in, out) >= 768
#   every mode       t(reference) / t(triton) >= 2  and  t(compiled reference) / t(triton) >= 1.3
# KIND_FAST_BENCH_COMPILE=0 skips the compiled reference (it costs a compile per shape and mode).
GPU_TRITON_MODES = ["forward", "transfer", "pretrain"]
GPU_DEVICE, GPU_DTYPE, GPU_TOKENS = "cuda", torch.bfloat16, 32 * TOKENS  # overridable for dry runs
GPU_M2_WIDTH = 1152  # DiT-XL/2.proj


def _gpu_goals(times, n_in, n_out, mode):
    t = times["triton"]
    goals = {}
    if mode == "forward":
        target = 1.10 * (1 + ACTIVE / n_in + ACTIVE / n_out)
        goals["forward_vs_linear"] = [t / times["linear"], target, t / times["linear"] <= target]
    if mode == "transfer" and min(n_in, n_out) >= 768:
        goals["transfer_vs_linear"] = [t / times["linear"], 0.80, t / times["linear"] <= 0.80]
    goals["speedup_vs_reference"] = [times["reference"] / t, 2.0, times["reference"] / t >= 2.0]
    if times.get("compiled") is not None:
        goals["speedup_vs_compiled_reference"] = [times["compiled"] / t, 1.3, times["compiled"] / t >= 1.3]
    return goals


@requires_cuda
@pytest.mark.parametrize("mode", GPU_TRITON_MODES)
@pytest.mark.parametrize("name,n_in,n_out", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_gpu_layer_triton(benchmark, name, n_in, n_out, mode):
    """Triton backend (bf16) vs nn.Linear, the unfused reference and torch.compile(reference)."""
    import os

    m = GPU_TOKENS
    dev, dt = GPU_DEVICE, GPU_DTYPE
    run_linear = _setup(n_in, n_out, m, mode, dev, dt)[1]
    run_triton = _setup(n_in, n_out, m, mode, dev, dt)[0]
    _on("triton", run_triton)  # compile the kernels outside the timing
    run_reference = _setup(n_in, n_out, m, mode, dev, dt)[0]

    # the same layer state for the compiled reference (fresh objects: no shared grads)
    gen = torch.Generator().manual_seed(1)
    gate = kf.ClassGate.block(CLASSES, TAILORS, ACTIVE)
    layer = kf.FastKindLinear(n_in, n_out, tailor_rank=TAILORS, gate=gate).to(dev, dt)
    if mode == "transfer":
        layer.freeze_learngenes()
    b = m // TOKENS
    x = torch.randn(b, TOKENS, n_in, generator=gen).to(dev, dt).requires_grad_(mode != "forward")
    labels = torch.randint(0, CLASSES, (b,), generator=gen).to(dev)
    g = torch.randn(b, TOKENS, n_out, generator=gen).to(dev, dt)
    fns = {"triton": lambda: _on("triton", run_triton), "linear": run_linear,
           "reference": lambda: _on("torch", run_reference)}
    if os.environ.get("KIND_FAST_BENCH_COMPILE", "1") != "0":
        fns["compiled"] = torch.compile(make_reference_layer_step(layer, x, labels, g, mode))
        fns["compiled"]()  # compile outside the timing
    times = interleaved(fns, gpu_median)
    times.setdefault("compiled", None)
    goals = _gpu_goals(times, n_in, n_out, mode)
    _record(benchmark, {"kind": times["triton"], "linear": times["linear"]}, _flops(n_in, n_out, m, mode),
            GPU_GOALS.get(mode) if min(n_in, n_out) >= 768 else None, _device_name(dev))
    benchmark.extra_info.update(
        shape=name, tokens=m, backend="triton", mode=mode,
        t_reference_ms=times["reference"] * 1e3,
        t_compiled_reference_ms=None if times["compiled"] is None else times["compiled"] * 1e3,
        goals=goals, all_goals_met=all(v[2] for v in goals.values()),
    )
    benchmark.pedantic(synced(lambda: _on("triton", run_triton), dev), rounds=10, iterations=1, warmup_rounds=2)


def _on(backend, run):
    with kf.use_backend(backend):
        return run()


def _device_name(dev):
    return torch.cuda.get_device_name() if dev == "cuda" else dev


@requires_cuda
@pytest.mark.parametrize("mode", ["forward", "pretrain"])
@pytest.mark.parametrize("learngene_rank", [32, 64])
def test_gpu_layer_triton_m2(benchmark, learngene_rank, mode):
    """Path M2 (fully factored, small N_G + K) against M1 on the same layer and nn.Linear:
    checks the cost model's claim that M2 wins when r_G + K << min(in, out)."""
    from kind_fast.ops.paths import choose_path, force_path

    n_in = n_out = GPU_M2_WIDTH
    m, dev, dt = GPU_TOKENS, GPU_DEVICE, GPU_DTYPE
    gen = torch.Generator().manual_seed(0)
    gate = kf.ClassGate.block(CLASSES, TAILORS, ACTIVE)
    layer = kf.FastKindLinear(n_in, n_out, tailor_rank=TAILORS, learngene_rank=learngene_rank, gate=gate)
    layer = layer.to(dev, dt)
    lin = torch.nn.Linear(n_in, n_out).to(dev, dt)
    b = m // TOKENS
    x = torch.randn(b, TOKENS, n_in, generator=gen).to(dev, dt).requires_grad_(mode != "forward")
    labels = torch.randint(0, CLASSES, (b,), generator=gen).to(dev)
    g = torch.randn(b, TOKENS, n_out, generator=gen).to(dev, dt)
    choice = choose_path(m, n_in, n_out, ACTIVE, TAILORS, learngene_rank=learngene_rank)

    def call(module, force_m1=False):
        def run():
            with kf.use_backend("triton"), force_path("M1" if force_m1 else None):
                if mode == "forward":
                    with torch.no_grad():
                        return module(x, labels=labels) if module is layer else module(x)
                (module(x, labels=labels) if module is layer else module(x)).backward(g)
        return run

    fns = {"m2": call(layer), "m1": call(layer, force_m1=True), "linear": call(lin)}
    for fn in fns.values():
        fn()  # compile outside the timing
    times = interleaved(fns, gpu_median)
    benchmark.extra_info.update(
        device=_device_name(dev), mode=mode, learngene_rank=learngene_rank, tokens=m, path=choice.path,
        predicted_flop_ratio_m2_vs_dense=choice.flop_ratio,
        t_m2_ms=times["m2"] * 1e3, t_m1_ms=times["m1"] * 1e3, t_linear_ms=times["linear"] * 1e3,
        ratio_m2_vs_m1=times["m2"] / times["m1"], ratio_m2_vs_linear=times["m2"] / times["linear"],
        m2_faster_than_m1=times["m2"] < times["m1"], torch=torch.__version__,
    )
    benchmark.pedantic(fns["m2"], rounds=10, iterations=1, warmup_rounds=2)
