"""The Triton backend's path M3 ops (kernels in kernels/kind_linear_merged.py).

Registered ops, with the schemas and semantics of the reference's (kind_fast/ops/kind_linear_merged.py):

    torch.ops.kind_fast.kind_linear_merged_gemm_triton(x, weights, bias, slots) -> y
    torch.ops.kind_fast.kind_linear_merged_gemm_triton_backward(grad_y, x, weights, slots, output_mask)
        -> (dx, dweights, dbias)
    torch.ops.kind_fast.kind_linear_merged_triton(x, w_g, bias, u_t, sigma_t, v_t, idx, val, labels,
                                                  max_classes) -> y          (inference only)

with the reference's fake kernels, autograd and FLOP formulas. The Triton backend module
(kind_fast/ops/kind_linear_triton.py) exposes them as ``MERGED_GEMM_OP`` / ``MERGED_OP``; the
op family (kind_fast.ops.paths, kind_fast.ops.kind_linear_merged) finds them through the
registry. Shapes the kernels do not take (no rows; offsets past int32) run the reference.
"""

from __future__ import annotations

import importlib
import os

import torch
from torch import Tensor

from kind_fast.ops.kind_linear_merged import (
    kind_linear_merged_fake,
    kind_linear_merged_gemm_backward_fake,
    kind_linear_merged_gemm_backward_ref,
    kind_linear_merged_gemm_fake,
    kind_linear_merged_gemm_ref,
    kind_linear_merged_gemm_setup_context,
    kind_linear_merged_ref,
    make_kind_linear_merged_gemm_backward,
    register_merged_flop_formulas,
)

__all__ = ["MERGED_GEMM_OP", "MERGED_GEMM_BACKWARD_OP", "MERGED_OP"]

_KERNEL_MODULE = "kind_fast.kernels.kind_linear_merged"


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _kernels():
    """The kernel module, decorated for the interpreter iff TRITON_INTERPRET is set now (Triton
    decides at decoration time, so a module imported in the other mode is reloaded)."""
    mod = importlib.import_module(_KERNEL_MODULE)
    if mod.INTERPRETED != _interpret():
        mod = importlib.reload(mod)
    return mod


def _fallback(x: Tensor, weights: Tensor, slots: Tensor) -> bool:
    m = x.shape[0]
    return m == 0 or slots.shape[0] == 0 or weights.numel() >= 2**31 or m * max(x.shape[1], weights.shape[1]) >= 2**31


def _gemm_forward(x: Tensor, weights: Tensor, bias: Tensor | None, slots: Tensor) -> Tensor:
    if _fallback(x, weights, slots):
        return kind_linear_merged_gemm_ref(x, weights, bias, slots)
    return _kernels().merged_gemm(x.contiguous(), weights.contiguous(), bias, slots.contiguous(), True)


@torch.library.custom_op("kind_fast::kind_linear_merged_gemm_triton", mutates_args=())
def _gemm_op(x: Tensor, weights: Tensor, bias: Tensor | None, slots: Tensor) -> Tensor:
    return _gemm_forward(x, weights, bias, slots)


_gemm_op.register_fake(kind_linear_merged_gemm_fake)


@torch.library.custom_op("kind_fast::kind_linear_merged_gemm_triton_backward", mutates_args=())
def _gemm_backward_op(grad_y: Tensor, x: Tensor, weights: Tensor, slots: Tensor,
                      output_mask: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    need_dx, need_dw, need_db = (bool(v) for v in output_mask)
    if _fallback(x, weights, slots):
        return kind_linear_merged_gemm_backward_ref(grad_y, x, weights, slots, output_mask)
    kern = _kernels()
    g, x, w, slots = grad_y.contiguous(), x.contiguous(), weights.contiguous(), slots.contiguous()
    dx = kern.merged_gemm(g, w, None, slots, False) if need_dx else x.new_empty(0)
    dw = kern.merged_dw(g, x, slots, w.shape[0], w.dtype) if need_dw else x.new_empty(0)
    db = g.sum(0, dtype=torch.float32).to(g.dtype) if need_db else x.new_empty(0)
    return dx, dw, db


_gemm_backward_op.register_fake(kind_linear_merged_gemm_backward_fake)
_gemm_op.register_autograd(
    make_kind_linear_merged_gemm_backward(torch.ops.kind_fast.kind_linear_merged_gemm_triton_backward),
    setup_context=kind_linear_merged_gemm_setup_context)


@torch.library.custom_op("kind_fast::kind_linear_merged_triton", mutates_args=())
def _merged_op(x: Tensor, w_g: Tensor, bias: Tensor | None, u_t: Tensor, sigma_t: Tensor, v_t: Tensor,
               idx: Tensor, val: Tensor, labels: Tensor, max_classes: int) -> Tensor:
    return kind_linear_merged_ref(x, w_g, bias, u_t, sigma_t, v_t, idx, val, labels, max_classes,
                                  gemm=_gemm_forward)


_merged_op.register_fake(kind_linear_merged_fake)

register_merged_flop_formulas(torch.ops.kind_fast.kind_linear_merged_gemm_triton,
                              torch.ops.kind_fast.kind_linear_merged_gemm_triton_backward,
                              torch.ops.kind_fast.kind_linear_merged_triton)

MERGED_GEMM_OP = torch.ops.kind_fast.kind_linear_merged_gemm_triton
MERGED_GEMM_BACKWARD_OP = torch.ops.kind_fast.kind_linear_merged_gemm_triton_backward
MERGED_OP = torch.ops.kind_fast.kind_linear_merged_triton
