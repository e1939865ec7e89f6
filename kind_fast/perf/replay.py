"""What the Triton kernels' launchers launch at the shapes that matter, replayed on ``meta`` tensors.

A replay runs the Triton backend's ops (kind_fast/ops/kind_linear_triton.py,
kind_fast/ops/kind_linear_merged_triton.py) for one layer shape on ``meta`` tensors, where the
launchers plan for the reference GPU (132 SMs; kernels/kind_linear_plans.py). Inside
``kind_fast.perf.audit.capture_launches`` each kernel launch is recorded instead of run, so a
replay lists exactly the configs those calls launch. The static audit
(``python -m kind_fast.perf.audit``) compiles them, the self-check's coverage tests
(tests/test_self_check.py) compare them with the self-check's cases, and
kind_fast.perf.timemodel prices the same launches.

``AUDIT_CASES`` maps each module of ``kind_fast.kernels`` that defines kernels to its list of
audit cases: (label, replay) pairs, ``full=False`` for the short list CI compiles. The kernel
modules hold only kernels, launchers and their plans; they import nothing of the package, so
this list lives here, above them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

__all__ = ["AUDIT_LAYERS", "REPLAY_MASKS", "replay_kind_linear", "kind_linear_cases", "AUDIT_MODELS",
           "audit_layers", "replay_kind_linear_merged", "kind_linear_merged_cases", "AUDIT_CASES"]

Case = tuple[str, Callable[[], None]]


# =====================================================================================
# kernels/kind_linear.py (paths M1 and M2)
# =====================================================================================
AUDIT_LAYERS = (("DiT-XL/2.q/k/v/proj", 1152, 1152), ("DiT-XL/2.qkv", 1152, 3456), ("DiT-XL/2.fc1", 1152, 4608),
                ("DiT-XL/2.fc2", 4608, 1152), ("DiT-S/2.proj", 384, 384), ("DiT-S/2.fc1", 384, 1536))


# Gradient masks (the backward op's order: dx, dW_G, db, dU_T, dσ_T, dV_T, dval) the replays run:
# transfer, transfer with a trainable gate, pretrain, pretrain with a trainable gate, dx alone
# (a frozen layer inside a trained model), and no dx (the separate tailor-gradient kernels).
REPLAY_MASKS = ((1, 0, 0, 1, 1, 1, 0), (1, 0, 0, 1, 1, 1, 1), (1, 1, 1, 1, 1, 1, 0), (1, 1, 1, 1, 1, 1, 1),
                (1, 0, 0, 0, 0, 0, 0), (0, 0, 0, 1, 1, 1, 0))


def replay_kind_linear(n_in, n_out, m, k, n_t, t, dtype, *, m1=True, m2_learngenes=None, autotune=False):
    """Run the Triton backend's op implementations for one layer shape the way the op family
    does (path M1: forward, then the backward under each of REPLAY_MASKS; path M2 with
    ``m2_learngenes`` learngene slots: forward and backward) on ``meta`` tensors; ``autotune``:
    the fused forward under the autotuner instead (every config its pruning keeps)."""
    from kind_fast.ops import kind_linear_triton as T
    from kind_fast.perf.perfmodel import fused_unsupported

    fused = T._kernels().fused  # the kernel module decorated for the current mode
    dev = torch.device("meta")
    b = m // t
    # the Triton backend runs the reference for the shapes these kernels do not take on a GPU
    m1 = m1 and not fused_unsupported(t, k)
    if m2_learngenes and fused_unsupported(t, m2_learngenes + k):
        m2_learngenes = None

    def e(*shape, dt=dtype):
        return torch.empty(shape, dtype=dt, device=dev)

    x, g, bias, labels = e(m, n_in), e(m, n_out), e(n_out), e(b, dt=torch.int64)
    if m1:
        w_g, u_t, v_t, sigma = e(n_out, n_in), e(n_t, n_out), e(n_t, n_in), e(n_t, dt=torch.float32)
        idx, val = e(11, k, dt=torch.int32), e(11, k, dt=torch.float32)
        if autotune:
            _, h, _, _ = fused(x, w_g, True, bias, v_t, u_t, sigma, idx, val, labels, autotune=True)
            return
        _, h = T.kind_linear_triton_forward(x, w_g, bias, u_t, sigma, v_t, idx, val, labels)
        for mask in REPLAY_MASKS:
            T.kind_linear_triton_backward(g, x, w_g, u_t, sigma, v_t, idx, val, labels, h, [bool(v) for v in mask])
    if m2_learngenes:
        n_s, ks = m2_learngenes + n_t, m2_learngenes + k
        u, v, sig = e(n_s, n_out), e(n_s, n_in), e(n_s, dt=torch.float32)
        ids, vals = e(11, ks, dt=torch.int32), e(11, ks, dt=torch.float32)
        _, h2, _, _ = fused(x, None, True, bias, v, u, sig, ids, vals, labels)
        T.kind_linear_triton_backward(g, x, None, u, sig, v, ids, vals, labels, h2, [True, False, True, True, True,
                                                                                     True, True])


def kind_linear_cases(full: bool = True) -> list[Case]:
    """Every (kernel, config) the launchers of kernels/kind_linear.py can launch on a GPU, as
    replays. ``full``: the pinned plans of the DiT layer shapes (S/2 and XL/2) at M = 512 /
    8192 / 65536 rows, K = 16 / 32 / 48 / 100 active tailors (KP 16 / 32 / 64 / 128), T = 256
    (one class per tile) and T = 16 / 37 (mixed tiles), bf16 and fp16, both paths and every
    backward kernel, plus the autotune space of the fused kernel (``pinned=False``). Otherwise
    (the CI test): what DiT-XL/2 runs (every layer shape, B = 32 and 256, K = 32, T = 256,
    bf16 and fp16, M1 and M2) and one shape for each other KP, for mixed tiles and for the
    narrow (BN = 64) layers of DiT-S/2, bf16."""
    cases: list[Case] = []

    def add(label, *args, **kwargs):
        cases.append((label, functools.partial(replay_kind_linear, *args, **kwargs)))

    if not full:
        for dtype, dt in ((torch.bfloat16, "bf16"), (torch.float16, "fp16")):
            for name, n_in, n_out in AUDIT_LAYERS[:4]:
                for m in (8192, 65536):
                    add(f"{name} M={m} K=32 T=256 {dt}", n_in, n_out, m, 32, 96, 256, dtype, m2_learngenes=64)
        for k, t, (name, n_in, n_out) in ((16, 256, AUDIT_LAYERS[0]), (48, 256, AUDIT_LAYERS[0]),
                                          (100, 256, AUDIT_LAYERS[0]), (32, 37, AUDIT_LAYERS[0]),
                                          (32, 256, AUDIT_LAYERS[4])):
            add(f"{name} M=8192 K={k} T={t} bf16", n_in, n_out, 8192, k, 128 if k > 96 else 96, t, torch.bfloat16,
                m2_learngenes=min(128 - k, 64))
        return cases
    for dtype in (torch.bfloat16, torch.float16):
        dt = "bf16" if dtype == torch.bfloat16 else "fp16"
        for name, n_in, n_out in AUDIT_LAYERS:
            for m in (512, 8192, 65536):
                for k in (16, 32, 48, 100):
                    for t in (256, 37, 16):
                        if (m != 8192 or dtype != torch.bfloat16) and (t != 256 or k != 32):
                            continue  # the other M, fp16 and T only for the DiT default K = 32
                        n_t = 128 if k > 96 else 96
                        label = f"{name} M={m} K={k} T={t} {dt}"
                        add(label, n_in, n_out, m, k, n_t, t, dtype, m2_learngenes=min(128 - k, 64))
                        if t == 256 and m == 8192:
                            add(label, n_in, n_out, m, k, n_t, t, dtype, autotune=True)
    return cases


# =====================================================================================
# kernels/kind_linear_merged.py (path M3)
# =====================================================================================
# DiT layer shapes (hidden d, MLP 4d): (name, in, out); q/k/v/proj share d -> d
AUDIT_MODELS = (("DiT-S", 384), ("DiT-B", 768), ("DiT-L", 1024), ("DiT-XL", 1152))


def audit_layers(d: int) -> tuple[tuple[str, int, int], ...]:
    return (("q/k/v/proj", d, d), ("qkv", d, 3 * d), ("fc1", d, 4 * d), ("fc2", 4 * d, d))


def replay_kind_linear_merged(n_in: int, n_out: int, b: int, t: int, slots: int, dtype: torch.dtype, *,
                              backward: bool = True) -> None:
    """Run the launchers of kernels/kind_linear_merged.py for one layer shape the way the Triton
    backend's M3 ops do (kind_fast/ops/kind_linear_merged_triton.py: the forward with bias; the
    backward's dx and dW) on ``meta`` tensors, B samples of T rows and ``slots`` merged weights.
    The merge itself (a rank-K update of W_G per slot, kind_fast.ops.kind_linear_merged.merge_weights)
    is one batched torch GEMM, not a kernel of that module."""
    from kind_fast.ops.kind_linear_merged_triton import _kernels

    kern = _kernels()  # the kernel module decorated for the current mode
    dev = torch.device("meta")
    m = b * t

    def e(*shape, dt=dtype):
        return torch.empty(shape, dtype=dt, device=dev)

    x, w, bias, sl = e(m, n_in), e(slots, n_out, n_in), e(n_out), e(b, dt=torch.int64)
    kern.merged_gemm(x, w, bias, sl, True)
    if backward:
        g = e(m, n_out)
        kern.merged_gemm(g, w, None, sl, False)
        kern.merged_dw(g, x, sl, slots, dtype)


def kind_linear_merged_cases(full: bool = True) -> list[Case]:
    """Every (kernel, config) the launchers of kernels/kind_linear_merged.py pick at DiT shapes,
    as replays. ``full``: DiT-S/B/L/XL (hidden 384/768/1024/1152, MLP 4×; q/k/v/proj, fused qkv,
    fc1, fc2), T = 256 (/2 patches at 256 px: 128-row one-slot tiles), 1024 (512 px), 64 (/4:
    64-row one-slot tiles) and 16 (/8: 64-row tiles over several slots), a CFG batch (B = 32,
    2 slots) and a few classes (B = 8, 4 slots), bf16 and fp16, forward, dx and dW. T = 37
    (tests' odd size: mixed tiles, masked dW chunks). No config is autotuned. Otherwise (the CI
    test): DiT-XL at T = 256, 64, 16 and 37, B = 32, bf16 and fp16: every distinct config of
    the full list (the configs depend on T and the dtype, not on the layer width;
    tests/test_audit.py checks that the short list covers the full one)."""
    cases: list[Case] = []

    def add(label, *args, **kwargs):
        cases.append((label, functools.partial(replay_kind_linear_merged, *args, **kwargs)))

    dtypes = ((torch.bfloat16, "bf16"), (torch.float16, "fp16"))
    if not full:
        for dtype, dt in dtypes:
            for name, n_in, n_out in audit_layers(1152):
                add(f"M3 DiT-XL.{name} T=256 B=32 CFG {dt}", n_in, n_out, 32, 256, 2, dtype)
            for t in (64, 16, 37):
                add(f"M3 DiT-XL.fc1 T={t} B=32 CFG {dt}", 1152, 4608, 32, t, 2, dtype)
        return cases
    for dtype, dt in dtypes:
        for model, d in AUDIT_MODELS:
            for name, n_in, n_out in audit_layers(d):
                for t in (256, 1024, 64, 16):
                    for b, n_slots, what in ((32, 2, "CFG"), (8, 4, "4 classes")):
                        add(f"M3 {model}.{name} T={t} B={b} {what} {dt}", n_in, n_out, b, t, n_slots, dtype)
        add(f"M3 DiT-XL.fc1 T=37 B=32 CFG {dt}", 1152, 4608, 32, 37, 2, dtype)
    return cases


# module of kind_fast.kernels -> its audit cases (kind_fast.perf.audit.collect_specs compiles them;
# it refuses a kernel module that defines kernels and has no entry here)
AUDIT_CASES: dict[str, Callable[[bool], list[Case]]] = {
    "kind_linear": kind_linear_cases,
    "kind_linear_merged": kind_linear_merged_cases,
}
