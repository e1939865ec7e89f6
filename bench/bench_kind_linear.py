"""Layer benchmarks of kind_linear: FastKindLinear against nn.Linear of the same shape.

Modes (DESIGN §6):
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
from conftest import cpu_median, dit_layer_shapes, gpu_median, interleaved, requires_cuda

import kind_fast as kf
from kind_fast.ops.kind_linear import kind_linear_flops

TAILORS, ACTIVE, CLASSES, TOKENS = 96, 32, 10, 256
# (mode) -> goal on the ratio t(KIND) / t(nn.Linear); CPU goals from the foundation issue and
# DESIGN §6 (transfer: <= 0.90, the FLOP floor is ~0.72), GPU goals from DESIGN §6.
CPU_GOALS = {"transfer": 0.90}
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


GPU_CASES = [(name, *shape) for size in ("S", "B", "L", "XL") for name, shape in dit_layer_shapes(size).items()]


@requires_cuda
@pytest.mark.parametrize("mode", ["transfer", "pretrain", "forward"])
@pytest.mark.parametrize("name,n_in,n_out", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_gpu_layer_reference(benchmark, name, n_in, n_out, mode):
    """The reference backend on the GPU in bf16 (the unfused baseline of DESIGN §6)."""
    m = 32 * TOKENS
    with kf.use_backend("torch"):
        run_kind, run_linear = _setup(n_in, n_out, m, mode, "cuda", torch.bfloat16)
        times = interleaved({"kind": run_kind, "linear": run_linear}, gpu_median)
        _record(benchmark, times, _flops(n_in, n_out, m, mode), None, torch.cuda.get_device_name())
        benchmark.extra_info.update(shape=name, tokens=m, backend="torch")

        def timed():
            run_kind()
            torch.cuda.synchronize()

        benchmark.pedantic(timed, rounds=10, iterations=1, warmup_rounds=2)
