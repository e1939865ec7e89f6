"""The CUDA C++ backend of the kind_linear op family (csrc/, compiled as ``kind_fast._C``).

Registered ops (defined in C++, csrc/module.cpp; the schemas and semantics of the reference's
``kind_fast::kind_linear`` / ``kind_linear_backward``, see kind_fast/ops/kind_linear.py):

    torch.ops.kind_fast.kind_linear_cuda(x, w_g, bias, u_t, sigma_t, v_t, idx, val, labels) -> (y, h)
    torch.ops.kind_fast.kind_linear_cuda_backward(grad_y, x, w_g, u_t, sigma_t, v_t, idx, val,
                                                  labels, h, output_mask) -> 7 gradients
    torch.ops.kind_fast.kind_linear_cuda_merged(x, w_g, bias, u_t, sigma_t, v_t, idx, val,
                                                labels, max_classes) -> y        (path M3, no grad)

This module adds their fake kernels, autograd and FLOP formulas (C++ names it with
``set_python_module``), the backend protocol of kind_fast/backends.py, and the safety rule for
``use_backend("auto")``: these kernels were written without a GPU to run them, so "auto" uses
them on a device only after a one-time self-check there (a small random problem per dtype,
both tailor plans, every output and gradient against the reference) has passed. An explicit
``use_backend("cuda")`` runs them directly.

Nothing here loads the extension at import; ``status()`` or the first use does.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

from kind_fast._ext import arch_names, load_extension
from kind_fast.ops.kind_linear import (
    acc_dtype,
    kind_linear_backward_fake,
    kind_linear_fake,
    kind_linear_setup_context,
    make_kind_linear_backward,
    register_kind_linear_flop_formulas,
)
from kind_fast.ops.self_check import SelfCheckGate

# OP, BACKWARD_OP and MERGED_OP are module attributes resolved on first access (__getattr__)
__all__ = ["status", "supports", "auto_ready", "self_check", "self_check_results", "kind_linear_merged",
           "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
OP_NAMES = ("kind_linear_cuda", "kind_linear_cuda_backward", "kind_linear_cuda_merged")

_lock = threading.Lock()
_registered = False


# =====================================================================================
# Backend protocol (kind_fast.backends)
# =====================================================================================
_status: list = []  # [(available, reason)] once computed; reset when a self-check adds a result


def status() -> tuple[bool, str]:
    """(available, reason): the extension is built, loads, and serves its ops. Cheap after the
    first call (the registry asks on every layer call)."""
    if _status:
        return _status[0]
    mod, reason = load_extension()
    if mod is None:
        result = (False, f"compiled extension {reason}")
    else:
        _register()
        done = sorted(_gate.results().items(), key=lambda kv: (kv[0][0], str(kv[0][1])))
        checks = "; ".join(f"cuda:{d} {str(dt).replace('torch.', '')} self-check {'passed' if ok else 'FAILED'}"
                           for (d, dt), (ok, _) in done)
        built = f"{arch_names(getattr(mod, 'ARCH_LIST', '?'))}, CUDA {getattr(mod, 'CUDA_VERSION', '?')}"
        result = (True, f"kind_fast._C ({built})" + (f"; {checks}" if checks else ""))
    _status[:] = [result]
    return result


def supports(device_type: str, dtype: torch.dtype) -> bool:
    """CUDA tensors in float16/bfloat16 (float32/float64 run the reference through the registry)."""
    return device_type == "cuda" and dtype in SUPPORTED_DTYPES


def _statically_ready(device_type: str, dtype: torch.dtype) -> bool:
    return supports(device_type, dtype) and status()[0]


# "auto" uses this backend on a device only after its one-time self-check passed there
_gate = SelfCheckGate(
    "CUDA", lambda: (torch.ops.kind_fast.kind_linear_cuda, torch.ops.kind_fast.kind_linear_cuda_backward),
    _statically_ready, on_result=lambda: _status.clear(),  # status() lists the self-checks
)
auto_ready = _gate.auto_ready
self_check_results = _gate.results


def self_check(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """Run the CUDA ops on small random problems on ``device`` against the reference."""
    return _gate.check(device, dtype)


def __getattr__(name: str):  # OP, BACKWARD_OP, MERGED_OP before status() has registered them
    ops = {"OP": "kind_linear_cuda", "BACKWARD_OP": "kind_linear_cuda_backward", "MERGED_OP": "kind_linear_cuda_merged"}
    if name in ops:
        ok, why = status()
        if not ok:
            raise RuntimeError(f"the CUDA backend is not available: {why}")
        return getattr(torch.ops.kind_fast, ops[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# =====================================================================================
# Fake kernels, autograd, FLOP formulas (registered once, when the extension has loaded)
# =====================================================================================
def _fake_merged(x, w_g, bias, u_t, sigma_t, v_t, idx, val, labels, max_classes):
    return x.new_empty((x.shape[0], w_g.shape[0]))


def _register() -> None:
    """Fake kernels, autograd and FLOP formulas for the C++ ops (once)."""
    global _registered
    if _registered:
        return
    with _lock:
        if _registered:
            return
        from torch.utils.flop_counter import register_flop_formula

        torch.library.register_fake("kind_fast::kind_linear_cuda", kind_linear_fake)
        torch.library.register_fake("kind_fast::kind_linear_cuda_backward", kind_linear_backward_fake)
        torch.library.register_fake("kind_fast::kind_linear_cuda_merged", _fake_merged)
        torch.library.register_autograd(
            "kind_fast::kind_linear_cuda",
            make_kind_linear_backward(torch.ops.kind_fast.kind_linear_cuda_backward),
            setup_context=kind_linear_setup_context,
        )
        register_kind_linear_flop_formulas(torch.ops.kind_fast.kind_linear_cuda,
                                           torch.ops.kind_fast.kind_linear_cuda_backward)

        @register_flop_formula(torch.ops.kind_fast.kind_linear_cuda_merged)
        def _(x_shape, w_g_shape, bias_shape, u_t_shape, sigma_t_shape, v_t_shape, idx_shape, val_shape,
              labels_shape, max_classes, *a, **k) -> int:
            m, n_in, n_out, kk = x_shape[0], x_shape[1], w_g_shape[0], idx_shape[1]
            slots = min(max_classes, labels_shape[0], idx_shape[0])
            return 2 * m * n_in * n_out + 2 * slots * n_out * n_in * kk  # segmented GEMM + merges

        # plain module attributes from now on (torch.compile reads them without tracing __getattr__)
        ops = torch.ops.kind_fast
        globals().update(OP=ops.kind_linear_cuda, BACKWARD_OP=ops.kind_linear_cuda_backward,
                         MERGED_OP=ops.kind_linear_cuda_merged)
        _registered = True


# =====================================================================================
# Path M3 (sampling)
# =====================================================================================
def kind_linear_merged(x: Tensor, w_g: Tensor, bias: Tensor | None, u_t: Tensor, sigma_t: Tensor, v_t: Tensor,
                       idx: Tensor, val: Tensor, labels: Tensor, max_classes: int = 2) -> Tensor:
    """Path M3 for sampling: y for 2-D x (M, in) through one merged dense weight per class,
    W_c = W_G + U_T[idx[c]]ᵀ·diag(σ_T[idx[c]]⊙val[c])·V_T[idx[c]], for the first ``max_classes``
    distinct classes of ``labels`` (CFG batches have 2), then a segmented GEMM; samples of any
    further class take path M1. Same result as ``kind_linear`` up to rounding; no autograd."""
    if torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad
                                       for t in (x, w_g, bias, u_t, sigma_t, v_t, val)):
        raise RuntimeError("kind_linear_merged (path M3) is inference-only: call it under torch.no_grad()")
    if not isinstance(max_classes, int) or max_classes < 1:
        raise ValueError(f"max_classes must be a positive int, got {max_classes!r}")
    ok, why = status()
    if not ok:
        raise RuntimeError(f"the CUDA backend is not available: {why}")
    acc = acc_dtype(x.dtype)
    return torch.ops.kind_fast.kind_linear_cuda_merged(
        x.contiguous(), w_g.contiguous(), bias, u_t.contiguous(), sigma_t.to(acc), v_t.contiguous(), idx,
        val.to(acc), labels, max_classes)
