"""The Triton backend of the kind_linear op family (kernels in kernels/kind_linear.py).

Registered ops, with exactly the schemas and semantics of the reference's
(``kind_fast::kind_linear`` / ``kind_fast::kind_linear_backward``, see
kind_fast/ops/kind_linear.py for the math):

    torch.ops.kind_fast.kind_linear_triton(x, w_g, bias, u_t, sigma_t, v_t, idx, val, labels) -> (y, h)
    torch.ops.kind_fast.kind_linear_triton_backward(grad_y, x, w_g, u_t, sigma_t, v_t, idx, val,
                                                    labels, h, output_mask) -> 7 gradients

with the reference's fake kernels, autograd (``make_kind_linear_backward``) and FLOP formulas.
The backend registry (kind_fast/ops/backends.py) imports this module on first use; nothing here
imports Triton until a kernel runs or ``status()`` is asked.

Paths (the op family's cost model ``kind_fast.ops.paths.choose_path`` picks one per call;
``python -m kind_fast.info`` shows it for the DiT shapes and ``KIND_FAST_DEBUG=1`` logs each new
choice and tile config to stderr):
    M1  one fused kernel: x·W_Gᵀ + gathered gated tailor term + bias, shrink in the same K-loop
        (forward, one launch); backward with one class per row tile (T a multiple of the row
        tile, K <= 64): dx fused the same way, writing the slot partials of dU_T and dV_T on
        the way, then one reduction launch for dU_T, dV_T, dσ_T, dval (+ dW_G and db when the
        learngenes train); otherwise dx, then the separate tailor-gradient kernels.
    M2  fully factored (``kind_linear_factored``; the op family's entry point takes it on this
        backend when the cost model says so): the learngenes become N_G always-on slots of the
        same kernel, no W_G, no dense GEMM. Needs N_G + K <= 128.
    M0  the reference (no active tailors, K > 128 active tailors: the fused kernels keep a BM×K
        shrink accumulator in registers; M·max(in, out) >= 2^31: int32 offsets; on a GPU, rows
        per sample that would put more than 4 samples in a 64-row tile, or K > 64 with tiles
        that mix samples: kind_fast.kernels.kind_linear_plans.fused_unsupported).
    M3 (per-class merged weights for sampling): kind_fast/ops/kind_linear_merged_triton.py.

Supported: CUDA tensors in float16/bfloat16 (float32 runs the reference through the
registry); with TRITON_INTERPRET=1 also CPU tensors in float16/float32 (the interpreter has
no bfloat16), which is how CI tests the kernels.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from kind_fast.ops.kind_linear import (
    kind_linear_backward_fake,
    kind_linear_backward_ref,
    kind_linear_fake,
    kind_linear_ref,
    kind_linear_setup_context,
    make_kind_linear_backward,
    register_kind_linear_flop_formulas,
)
from kind_fast.ops.self_check import CHECK_CASES, TRITON_CASES, SelfCheckGate, check_factored_ops, check_merged_ops

__all__ = ["OP", "BACKWARD_OP", "FACTORED_OP", "kind_linear_factored", "status", "supports", "auto_ready",
           "self_check", "MAX_ACTIVE"]

MAX_ACTIVE = 128  # = kernels.kind_linear.MAX_ACTIVE (kept here so the cost model needs no Triton)
_KERNEL_MODULE = "kind_fast.kernels.kind_linear"


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _kernels():
    """The kernel module, decorated for the interpreter iff TRITON_INTERPRET is set now.

    Triton picks compiled vs interpreted kernels when ``@triton.jit`` runs, so a module first
    imported in the other mode is reloaded (tests switch the interpreter on in-process).
    """
    mod = importlib.import_module(_KERNEL_MODULE)
    if mod.INTERPRETED != _interpret():
        mod = importlib.reload(mod)
    return mod


# =====================================================================================
# Backend protocol (kind_fast.ops.backends)
# =====================================================================================
def status() -> tuple[bool, str]:
    """(available, reason)."""
    try:
        import triton
    except ImportError:
        return False, "Triton is not installed (pip install 'kind_fast[triton]')"
    if _interpret():
        return True, f"Triton {triton.__version__} under TRITON_INTERPRET=1 (CPU fp16/fp32, slow; for tests)"
    if not torch.cuda.is_available():
        return False, f"Triton {triton.__version__} is installed but no CUDA GPU is visible"
    return True, f"Triton {triton.__version__}: fused M1 kernels for CUDA fp16/bf16"


def supports(device_type: str, dtype: torch.dtype) -> bool:
    if device_type == "cuda":
        return dtype in (torch.float16, torch.bfloat16)
    if device_type == "cpu" and _interpret():
        return dtype in (torch.float16, torch.float32)
    return False


_LOGGED: set = set()


def _debug_log(kind: str, x: Tensor, n_out: int, k: int, n_t: int, b: int, extra: str = "") -> None:
    if os.environ.get("KIND_FAST_DEBUG", "0") in ("", "0"):
        return
    key = (kind, tuple(x.shape), n_out, k, n_t, b, x.dtype, extra)
    if key in _LOGGED:
        return
    _LOGGED.add(key)
    m, n_in = x.shape
    from kind_fast.ops.paths import choose_path  # the op family's cost model

    choice = choose_path(m, n_in, n_out, k, n_t)
    print(f"kind_fast[triton] {kind}: M={m} in={n_in} out={n_out} K={k} N_T={n_t} T={m // max(b, 1)} "
          f"{x.dtype} -> {choice.path} ({choice.reason}) {extra}", file=sys.stderr)


# =====================================================================================
# Implementations
# =====================================================================================
def _fallback(m: int, k: int, n_t: int, width: int = 0, b: int = 1, device: torch.device | None = None) -> bool:
    """Shapes the kernels do not take: no rows/tailors, K > 128, offsets past int32, and on a
    GPU rows per sample that would need tiles mixing too many samples (or K > 64 with mixed
    tiles; kind_fast.kernels.kind_linear_plans.fused_unsupported: Hopper's MMA needs 64-row tiles)."""
    if m == 0 or k == 0 or n_t == 0 or k > MAX_ACTIVE or m * max(width, k) >= 2**31:
        return True
    if device is not None and device.type == "cuda" and not _interpret():
        from kind_fast.kernels.kind_linear_plans import fused_unsupported

        return bool(fused_unsupported(m // max(b, 1), k))
    return False


def kind_linear_triton_forward(x, w_g, bias, u_t, sigma_t, v_t, idx, val, labels) -> tuple[Tensor, Tensor]:
    m, k, n_t = x.shape[0], idx.shape[1], u_t.shape[0]
    if _fallback(m, k, n_t, max(x.shape[1], w_g.shape[0]), labels.shape[0], x.device):
        _debug_log("forward", x, w_g.shape[0], k, n_t, labels.shape[0])
        return kind_linear_ref(x, w_g, bias, u_t, sigma_t, v_t, idx, val, labels)
    kern = _kernels()
    y, h, _, cfg = kern.fused(
        x.contiguous(), w_g, True, bias, v_t, u_t, sigma_t.float().contiguous(), idx.contiguous(),
        val.float().contiguous(), labels.contiguous())
    _debug_log("forward", x, w_g.shape[0], k, n_t, labels.shape[0], str(cfg))
    return y, h


def kind_linear_triton_backward(
    grad_y, x, w_g, u_t, sigma_t, v_t, idx, val, labels, h, output_mask
) -> tuple[Tensor, ...]:
    """The 7 gradients of kind_linear; ``w_g=None`` means no dense term (path M2: no dw_g)."""
    need_dx, need_dw, need_db, need_du, need_ds, need_dv, need_dval = (bool(v) for v in output_mask)
    m, k, n_t = x.shape[0], idx.shape[1], u_t.shape[0]
    if _fallback(m, k, n_t, max(x.shape[1], u_t.shape[1]), labels.shape[0], x.device):
        w = w_g if w_g is not None else x.new_zeros((u_t.shape[1], x.shape[1]))
        return kind_linear_backward_ref(grad_y, x, w, u_t, sigma_t, v_t, idx, val, labels, h, output_mask)
    kern = _kernels()
    g, x = grad_y.contiguous(), x.contiguous()
    sigma, val32 = sigma_t.float().contiguous(), val.float().contiguous()
    idx, labels, h = idx.contiguous(), labels.contiguous(), h.float().contiguous()

    def empty():  # a fresh one per output: registered ops may not return aliased outputs
        return x.new_empty(0)

    # ---- learngene side: plain GEMM / reduction, only when asked for
    dw = g.t() @ x if need_dw else empty()
    db = g.sum(0) if need_db else empty()  # one launch (accumulated in fp32 by torch for half inputs)
    need_part = need_ds or need_dval
    from kind_fast.kernels.kind_linear_plans import partials_supported

    if need_dx and w_g is not None and partials_supported(m // labels.shape[0], k, _interpret()):
        # ---- path M1, one class per row tile: two launches. The dx kernel writes dx, the ds
        # partials and the slot partials of dU_T (while g streams through its owners) and of
        # dV_T (x read once); the reduction turns them into dU_T, dV_T, dσ_T and dval.
        dx, part, pu, pv, cfg = kern.fused_dx(g, w_g, u_t, v_t, sigma, idx, val32, labels, h, x, need_du=need_du,
                                              need_dv=need_dv, need_ds=need_part)
        du_, dv_, dval_, dsig_ = kern.tailor_reduce(
            pu, pv, part, idx, val32, sigma, labels, m, cfg["BM"], n_t=n_t, du_dtype=u_t.dtype, dv_dtype=v_t.dtype,
            dval_dtype=val.dtype, dsig_dtype=sigma_t.dtype, need_dval=need_dval, need_dsig=need_ds)
        pick = lambda t, need: t if need else empty()  # noqa: E731
        _debug_log("backward", x, u_t.shape[1], k, n_t, labels.shape[0],
                   f"mask={[int(v) for v in output_mask]} fused partials")
        return dx, dw, db, pick(du_, need_du), pick(dsig_, need_ds), pick(dv_, need_dv), pick(dval_, need_dval)
    # ---- otherwise (mixed-class tiles, path M2, no dx, KP = 128): dx fused the same way, with
    # dh_s and the ds partials on the way, then the separate tailor-gradient kernels
    dx, dhs, part, cfg = empty(), None, None, None
    if need_dx or need_dv or need_part:
        out, dhs, part, cfg = kern.fused(
            g, w_g if need_dx else None, False, None, u_t, v_t, sigma, idx, val32, labels,  # M2: w_g None
            h_saved=h if need_part else None, write_shrink=need_dv, with_out=need_dx)
        if need_dx:
            dx = out
    du, dv, dsig, dval = empty(), empty(), empty(), empty()
    if need_du or need_dv or need_part:
        pos, dg = kern.gate_tables(idx, val32, n_t)
        if need_du:
            du = kern.tailor_grad(h, g, pos, dg, sigma, labels, n_t, u_t.dtype)
        if need_dv:
            dv = kern.tailor_grad(dhs, x, pos, dg, sigma, labels, n_t, v_t.dtype)
        if need_part:
            ds = kern.sample_ds(part, cfg, m, labels.shape[0])
            dval_, dsig_ = kern.gate_grads(ds, labels, idx, val32, sigma, pos, dg, need_dval, need_ds)
            if need_dval:
                dval = dval_.to(val.dtype)
            if need_ds:
                dsig = dsig_.to(sigma_t.dtype)
    _debug_log("backward", x, u_t.shape[1], k, n_t, labels.shape[0],
               f"mask={[int(v) for v in output_mask]}")
    return dx, dw, db, du, dsig, dv, dval


# =====================================================================================
# Registered ops
# =====================================================================================
@torch.library.custom_op("kind_fast::kind_linear_triton", mutates_args=())
def _kind_linear_triton_op(
    x: Tensor, w_g: Tensor, bias: Tensor | None, u_t: Tensor, sigma_t: Tensor, v_t: Tensor,
    idx: Tensor, val: Tensor, labels: Tensor,
) -> tuple[Tensor, Tensor]:
    return kind_linear_triton_forward(x, w_g, bias, u_t, sigma_t, v_t, idx, val, labels)


_kind_linear_triton_op.register_fake(kind_linear_fake)


@torch.library.custom_op("kind_fast::kind_linear_triton_backward", mutates_args=())
def _kind_linear_triton_backward_op(
    grad_y: Tensor, x: Tensor, w_g: Tensor, u_t: Tensor, sigma_t: Tensor, v_t: Tensor,
    idx: Tensor, val: Tensor, labels: Tensor, h: Tensor, output_mask: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return kind_linear_triton_backward(grad_y, x, w_g, u_t, sigma_t, v_t, idx, val, labels, h, output_mask)


_kind_linear_triton_backward_op.register_fake(kind_linear_backward_fake)
_kind_linear_triton_op.register_autograd(
    make_kind_linear_backward(torch.ops.kind_fast.kind_linear_triton_backward),
    setup_context=kind_linear_setup_context,
)


register_kind_linear_flop_formulas(torch.ops.kind_fast.kind_linear_triton,
                                   torch.ops.kind_fast.kind_linear_triton_backward)


OP = torch.ops.kind_fast.kind_linear_triton
BACKWARD_OP = torch.ops.kind_fast.kind_linear_triton_backward

# "auto" uses this backend on a GPU only after its one-time self-check passed there (the
# kernels are tested under the interpreter in CI; a compiled kernel that misbehaves on an
# untested card/Triton version becomes one warning and the reference, not a wrong answer)
_gate = SelfCheckGate("Triton", lambda: (OP, BACKWARD_OP),
                      lambda device_type, dtype: device_type == "cuda" and supports(device_type, dtype)
                      and status()[0],
                      cases=CHECK_CASES + TRITON_CASES,
                      extra=lambda device, dtype: _check_other_paths(device, dtype))
auto_ready = _gate.auto_ready
self_check_results = _gate.results


def _check_other_paths(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """The gate's checks beyond the M1 op pair: path M2 (FACTORED_CASES), then path M3's
    segmented GEMM, dx and dW (MERGED_CASES); the first failure fails the gate."""
    ok, msg = check_factored_ops(FACTORED_OP, torch.ops.kind_fast.kind_linear_factored_triton_backward, device, dtype)
    if not ok:
        return ok, msg
    ok3, msg3 = check_merged_ops(MERGED_GEMM_OP, MERGED_GEMM_BACKWARD_OP, device, dtype)
    return ok3, (f"M2 {msg}; M3 {msg3}" if ok3 else msg3)


def self_check(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """Run the Triton ops on small random problems on ``device`` against the reference."""
    return _gate.check(device, dtype)


# =====================================================================================
# Path M2: fully factored. The learngenes become N_G always-on slots (gate value 1) in front
# of each class's tailor slots, so the same fused kernel runs without the dense term:
#     y = ((x·V[ids]ᵀ) ⊙ s)·U[ids] + b,   U = [U_G; U_T], V = [V_G; V_T], σ = [σ_G; σ_T]
# No W_G is materialised and no dense GEMM runs; worth it when r_G + K << min(in, out).
# =====================================================================================
def _m2_flops(m: int, n_in: int, n_out: int, k: int, output_mask: Sequence[bool] | None = None) -> int:
    if output_mask is None:
        return 2 * m * k * (n_in + n_out)
    need_dx, _, need_du, need_ds, need_dv, need_dval = (bool(v) for v in output_mask)
    flops = 2 * m * n_out * k if (need_dx or need_dv or need_ds or need_dval) else 0
    return flops + (2 * m * k * n_in if need_dx else 0) + (2 * m * k * n_out if need_du else 0) + (
        2 * m * k * n_in if need_dv else 0)


@torch.library.custom_op("kind_fast::kind_linear_factored_triton", mutates_args=())
def _kind_linear_factored_op(
    x: Tensor, bias: Tensor | None, u: Tensor, sigma: Tensor, v: Tensor, idx: Tensor, val: Tensor,
    labels: Tensor,
) -> tuple[Tensor, Tensor]:
    m, k, n_r = x.shape[0], idx.shape[1], u.shape[0]
    if _fallback(m, k, n_r, max(x.shape[1], u.shape[1]), labels.shape[0], x.device):
        zeros = x.new_zeros((u.shape[1], x.shape[1]))
        return kind_linear_ref(x, zeros, bias, u, sigma, v, idx, val, labels)
    _debug_log("forward (M2)", x, u.shape[1], k, n_r, labels.shape[0])
    y, h, _, _ = _kernels().fused(
        x.contiguous(), None, True, bias, v, u, sigma.float().contiguous(), idx.contiguous(),
        val.float().contiguous(), labels.contiguous())
    return y, h


@_kind_linear_factored_op.register_fake
def _(x, bias, u, sigma, v, idx, val, labels):
    return kind_linear_fake(x, u.t(), bias, u, sigma, v, idx, val, labels)


@torch.library.custom_op("kind_fast::kind_linear_factored_triton_backward", mutates_args=())
def _kind_linear_factored_backward_op(
    grad_y: Tensor, x: Tensor, u: Tensor, sigma: Tensor, v: Tensor, idx: Tensor, val: Tensor,
    labels: Tensor, h: Tensor, output_mask: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    dx, db, du, dsig, dv, dval = output_mask
    out = kind_linear_triton_backward(grad_y, x, None, u, sigma, v, idx, val, labels, h,
                                      [dx, False, db, du, dsig, dv, dval])
    return (out[0], out[2], out[3], out[4], out[5], out[6])


@_kind_linear_factored_backward_op.register_fake
def _(grad_y, x, u, sigma, v, idx, val, labels, h, output_mask):
    like = (x, u[0], u, sigma, v, val)  # dbias is (out,)
    return tuple(torch.empty_like(r) if need else x.new_empty(0) for r, need in zip(like, output_mask))


def _m2_setup_context(ctx, inputs, output):
    x, bias, u, sigma, v, idx, val, labels = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, u, sigma, v, idx, val, labels, output[1])
    ctx.mark_non_differentiable(output[1])


def _m2_backward(ctx, grad_y, grad_h):
    x, u, sigma, v, idx, val, labels, h = ctx.saved_tensors
    n = ctx.needs_input_grad
    mask = [n[0], n[1] and ctx.has_bias, n[2], n[3], n[4], n[6]]
    if not any(mask):
        return (None,) * 8
    dx, db, du, dsig, dv, dval = torch.ops.kind_fast.kind_linear_factored_triton_backward(
        grad_y.contiguous(), x, u, sigma, v, idx, val, labels, h, mask)
    pick = lambda t, need: t if need else None  # noqa: E731
    return (pick(dx, mask[0]), pick(db, mask[1]), pick(du, mask[2]), pick(dsig, mask[3]),
            pick(dv, mask[4]), None, pick(dval, mask[5]), None)


_kind_linear_factored_op.register_autograd(_m2_backward, setup_context=_m2_setup_context)


@register_flop_formula(torch.ops.kind_fast.kind_linear_factored_triton)
def _(x_shape, bias_shape, u_shape, sigma_shape, v_shape, idx_shape, *args, **kwargs) -> int:
    return _m2_flops(x_shape[0], x_shape[1], u_shape[1], idx_shape[1])


@register_flop_formula(torch.ops.kind_fast.kind_linear_factored_triton_backward)
def _(grad_y_shape, x_shape, u_shape, sigma_shape, v_shape, idx_shape, val_shape, labels_shape, h_shape,
      output_mask, *args, **kwargs) -> int:
    return _m2_flops(x_shape[0], x_shape[1], u_shape[1], idx_shape[1], output_mask)


FACTORED_OP = torch.ops.kind_fast.kind_linear_factored_triton


def kind_linear_factored(
    x: Tensor, u_g: Tensor, sigma_g: Tensor, v_g: Tensor, bias: Tensor | None, u_t: Tensor,
    sigma_t: Tensor, v_t: Tensor, idx: Tensor, val: Tensor, labels: Tensor, *, rows_per_sample: int | None = None,
) -> Tensor:
    """KIND layer from its components without materialising W_G (path M2 on the Triton backend).

    Arguments as ``kind_linear`` with the learngenes U_G (N_G, out), σ_G (N_G,), V_G (N_G, in)
    instead of W_G. Gradients reach every component (and ``val``) through the concatenation.
    Where the Triton backend does not run these tensors, or N_G + K > 128, W_G is materialised
    and ``kind_linear`` (path M1 / reference) runs instead: same result.
    """
    from kind_fast.ops.backends import resolve_backend
    from kind_fast.ops.kind_linear import acc_dtype, kind_linear

    for name, t in (("u_g", u_g), ("sigma_g", sigma_g), ("v_g", v_g)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    n_g = u_g.shape[0]
    if u_g.dim() != 2 or u_g.shape[1] != u_t.shape[-1] or v_g.shape != (n_g, v_t.shape[-1]) or sigma_g.shape != (n_g,):
        raise ValueError(f"learngenes must be u_g (N_G, {u_t.shape[-1]}), sigma_g (N_G,), v_g (N_G, "
                         f"{v_t.shape[-1]}); got {tuple(u_g.shape)}, {tuple(sigma_g.shape)}, {tuple(v_g.shape)}")
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    dev_type = x.device.type
    if torch.is_autocast_enabled(dev_type) and x.is_floating_point():
        dt = torch.get_autocast_dtype(dev_type)  # the one autocast entry point, as kind_linear's
        x, u_g, v_g, u_t, v_t = (t.to(dt) for t in (x, u_g, v_g, u_t, v_t))
        bias = bias.to(dt) if isinstance(bias, Tensor) else bias
    dt = x.dtype
    acc = acc_dtype(dt)
    k = idx.shape[1] if isinstance(idx, Tensor) and idx.dim() == 2 else 0
    if resolve_backend(x.device, dt) != "triton" or not 0 < n_g + k <= MAX_ACTIVE:
        with torch.autocast(dev_type, enabled=False):
            w_g = ((u_g.t().to(acc) * sigma_g.to(acc)) @ v_g.to(acc)).to(dt)
        return kind_linear(x, w_g, bias, u_t, sigma_t, v_t, idx, val, labels, rows_per_sample=rows_per_sample)
    # kind_linear's own checks, on a 0-byte stand-in for W_G
    from kind_fast.ops.labels import check_labels
    from kind_fast.ops.kind_linear import _validate, sample_rows

    _validate(x, x.new_empty(()).expand(u_t.shape[-1], x.shape[-1]), bias, u_t, sigma_t, v_t, idx, val, labels)
    if u_g.dtype != dt or v_g.dtype != dt:
        raise TypeError(f"u_g/v_g dtype {u_g.dtype}/{v_g.dtype} != x dtype {dt} (cast them, or use autocast)")
    check_labels(labels, idx.shape[0] - 1)
    c1 = idx.shape[0]
    with torch.autocast(dev_type, enabled=False):
        u = torch.cat([u_g, u_t])
        v = torch.cat([v_g, v_t])
        sigma = torch.cat([sigma_g.to(acc), sigma_t.to(acc)])
        ids = torch.cat([torch.arange(n_g, device=idx.device, dtype=idx.dtype).expand(c1, n_g), idx + n_g], 1)
        vals = torch.cat([torch.ones((c1, n_g), device=val.device, dtype=acc), val.to(acc)], 1)
        x2 = sample_rows(x, labels, rows_per_sample, who="kind_linear_factored")
        if x2.shape[0] == 0:
            return x.new_zeros((*x.shape[:-1], u.shape[1]))
        y, _ = FACTORED_OP(x2.contiguous(), bias, u, sigma, v, ids.contiguous(), vals, labels)
    return y.view(*x.shape[:-1], u.shape[1])


# Path M3 (merged per-class weights, segmented GEMM): kind_fast/ops/kind_linear_merged_triton.py
from kind_fast.ops.kind_linear_merged_triton import MERGED_GEMM_BACKWARD_OP, MERGED_GEMM_OP, MERGED_OP  # noqa: E402, F401
