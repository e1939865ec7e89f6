"""Layer benchmarks of the CUDA C++ backend (csrc/, kind_fast._C) beside the reference.

Same protocol as bench_kind_linear.py (docs/design.md §6): a KIND layer (FastKindLinear, bf16, DiT
shapes, M = 32·256 tokens, K = 32 of 96 tailors) timed with device events, interleaved in one
process with nn.Linear of the same shape (the ceiling) and with the pure-PyTorch reference
backend (the unfused baseline). Modes:

    forward    inference forward
    transfer   forward + backward with frozen learngenes (dX, dU_T, dV_T, dσ_T)
    pretrain   forward + backward, every component trains
    sample     forward of a CFG batch (half one class, half the null class): path M1 (the
               backend's op) against path M3 (a merged weight per group of samples, one cuBLAS
               GEMM per group)

``extra_info``: t_cuda_ms, t_linear_ms, t_ref_ms, ratio_vs_linear (goal ≤ 0.80 for transfer),
speedup_vs_ref, TFLOP/s, and for "sample" t_m3_ms and m3_vs_m1. bench/gpu_check.sh measures the
same rows (and the §6 goals) in one time-boxed call. Every test skips
without a GPU or without the built extension. Run: ``pytest bench/bench_kind_linear_cuda.py``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import dit_layer_shapes, gpu_median, interleaved

import kind_fast as kf
from kind_fast.ops.kind_linear import kind_linear_flops

TAILORS, ACTIVE, CLASSES, TOKENS, SAMPLES = 96, 32, 10, 256, 32
GOALS = {"transfer": 0.80}  # t(KIND) / t(nn.Linear), docs/design.md §6


def _cuda_ready() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "needs a CUDA GPU"
    from kind_fast.ops import kind_linear_cuda

    return kind_linear_cuda.status()


requires_cuda_backend = pytest.mark.skipif(not _cuda_ready()[0], reason=f"CUDA backend: {_cuda_ready()[1]}")
CASES = [(name, *shape) for size in ("S", "B", "L", "XL") for name, shape in dit_layer_shapes(size).items()]


def _setup(n_in, n_out, mode, labels):
    gen = torch.Generator().manual_seed(0)
    gate = kf.ClassGate.block(CLASSES, TAILORS, ACTIVE)
    layer = kf.FastKindLinear(n_in, n_out, tailor_rank=TAILORS, gate=gate).cuda().to(torch.bfloat16)
    lin = torch.nn.Linear(n_in, n_out).cuda().to(torch.bfloat16)
    b = labels.shape[0]
    x = torch.randn(b, TOKENS, n_in, generator=gen).cuda().to(torch.bfloat16)
    g = torch.randn(b, TOKENS, n_out, generator=gen).cuda().to(torch.bfloat16)
    if mode == "transfer":
        layer.freeze_learngenes()
    if mode in ("transfer", "pretrain"):
        x.requires_grad_(True)

    def kind(backend):
        def run():
            with kf.use_backend(backend):
                if mode in ("forward", "sample"):
                    with torch.no_grad():
                        return layer(x, labels=labels)
                layer(x, labels=labels).backward(g)
        return run

    def linear():
        if mode in ("forward", "sample"):
            with torch.no_grad():
                return lin(x)
        lin(x).backward(g)

    return layer, x, kind, linear


def _flops(n_in, n_out, m, mode) -> tuple[int, int]:
    fwd = kind_linear_flops(m, n_in, n_out, ACTIVE)
    lin = 2 * m * n_in * n_out
    if mode in ("forward", "sample"):
        return fwd, lin
    mask = [True, mode == "pretrain", mode == "pretrain", True, True, True, False]
    return fwd + kind_linear_flops(m, n_in, n_out, ACTIVE, mask), 3 * lin


@requires_cuda_backend
@pytest.mark.parametrize("mode", ["transfer", "pretrain", "forward"])
@pytest.mark.parametrize("name,n_in,n_out", CASES, ids=[c[0] for c in CASES])
def test_gpu_layer_cuda(benchmark, name, n_in, n_out, mode):
    labels = torch.randint(0, CLASSES, (SAMPLES,), generator=torch.Generator().manual_seed(1)).cuda()
    _, _, kind, linear = _setup(n_in, n_out, mode, labels)
    times = interleaved({"cuda": kind("cuda"), "ref": kind("torch"), "linear": linear}, gpu_median)
    m = SAMPLES * TOKENS
    fk, fl = _flops(n_in, n_out, m, mode)
    ratio = times["cuda"] / times["linear"]
    goal = GOALS.get(mode)
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name(), backend="cuda", shape=name, mode=mode, tokens=m,
        t_cuda_ms=times["cuda"] * 1e3, t_linear_ms=times["linear"] * 1e3, t_ref_ms=times["ref"] * 1e3,
        ratio_vs_linear=ratio, goal_ratio=goal, meets_goal=None if goal is None else ratio <= goal,
        speedup_vs_ref=times["ref"] / times["cuda"], cuda_tflops=fk / times["cuda"] / 1e12,
        linear_tflops=fl / times["linear"] / 1e12, torch=torch.__version__,
    )
    run = kind("cuda")

    def timed():
        run()
        torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=10, iterations=1, warmup_rounds=2)


@requires_cuda_backend
@pytest.mark.parametrize("name,n_in,n_out", CASES, ids=[c[0] for c in CASES])
def test_gpu_layer_cuda_sample_m3(benchmark, name, n_in, n_out):
    """CFG sampling batch: path M1 (the backend's op) vs path M3 (kind_linear_merged)."""
    from kind_fast.ops.kind_linear_cuda import kind_linear_merged

    labels = torch.tensor([3] * (SAMPLES // 2) + [CLASSES] * (SAMPLES // 2)).cuda()
    layer, x, kind, linear = _setup(n_in, n_out, "sample", labels)
    idx, val = layer.gate.compiled(x.device)
    with torch.no_grad():
        w_g = layer.learngene_weight(torch.bfloat16)  # cached while learngenes are frozen
    x2 = x.reshape(-1, n_in)

    def m3():
        with torch.no_grad():
            return kind_linear_merged(x2, w_g, layer.bias, layer.u_t, layer.sigma_t, layer.v_t, idx, val, labels,
                                      max_classes=2)

    times = interleaved({"m1": kind("cuda"), "m3": m3, "linear": linear}, gpu_median)
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name(), backend="cuda", shape=name, mode="sample", tokens=x2.shape[0],
        t_cuda_ms=times["m1"] * 1e3, t_m3_ms=times["m3"] * 1e3, t_linear_ms=times["linear"] * 1e3,
        ratio_vs_linear=times["m1"] / times["linear"], m3_vs_m1=times["m3"] / times["m1"], torch=torch.__version__,
    )

    def timed():
        m3()
        torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=10, iterations=1, warmup_rounds=2)
