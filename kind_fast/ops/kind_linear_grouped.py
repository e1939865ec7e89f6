"""kind_linear_grouped: several KIND layers that read the same input, as one op.

Math (docs/design.md §1-2). Layers i = 1..G read the same rows x (M = B·T, in) and share one
gate (idx, val); layer i has its own W_G,i (out_i, in), bias b_i, tailors U_T,i (N_T, out_i),
σ_T,i (N_T), V_T,i (N_T, in). Each computes exactly what ``kind_linear`` computes for it:

    y_i = x·W_G,iᵀ + Σ_k val[c, k]·σ_T,i[idx[c, k]]·(x·v_T,i[idx[c, k]])·u_T,i[idx[c, k]] + b_i

The op takes the learngene weights and biases concatenated, W_G = [W_G,1; ...; W_G,G] (Σ out_i,
in) and b = [b_1; ...; b_G] (a layer without bias contributes zeros), so the G learngene terms
are one GEMM y = x·W_Gᵀ + b, and the tailors as lists (one entry per layer). It returns
y = [y_1 | ... | y_G] (M, Σ out_i), layer i in its block of columns, and h = [h_1 | ... | h_G]
(M, G·K), the shrinks saved for backward. Grouping is an execution detail: the layers keep their
parameters, names and state-dict keys; only the work is shared (one pass over x; on a fused
backend, one launch). Attention's q, k, v are the group KIND-DiT runs.

Backward: dx = Σ_i (dx of layer i) = g·W_G + Σ_i (tailor part of layer i); dW_G = gᵀx and db = Σ
g over the concatenation; every tailor gradient is layer i's own (``kind_linear``'s backward on
g_i = dL/dy_i, the columns of layer i); dval (a trainable gate shared by the layers) is the sum
over layers.

Registered as ``kind_fast::kind_linear_grouped`` / ``kind_fast::kind_linear_grouped_backward``
(torch.library: fake kernels, autograd, FLOP formulas; opcheck-clean, torch.compile fullgraph).
The kernel registered here is the reference: one ``kind_linear_ref`` per layer on its block of
W_G, exactly the separate layers' arithmetic. Backends plug in through their module
(``kind_fast.ops.backends``): a backend module that defines ``GROUPED_OP`` (this op's schema) serves
groups with it; for every other backend the functional runs the group as exact per-layer calls
of that backend's ``kind_linear`` op (``resolve_grouped_op`` returns None). On the CPU, eager
groups run the op family's lean path M5 (``kind_fast.ops.kind_linear_lean``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from kind_fast.ops.kind_linear import (
    acc_dtype,
    checked_inputs,
    kind_linear,
    kind_linear_backward_ref,
    kind_linear_flops,
    kind_linear_ref,
    sample_rows,
)

__all__ = [
    "kind_linear_grouped",
    "kind_linear_grouped_ref",
    "kind_linear_grouped_backward_ref",
    "kind_linear_grouped_flops",
    "resolve_grouped_op",
    "concat_group",
]


def _blocks(w_g: Tensor, u_t: Sequence[Tensor]) -> list[slice]:
    """Row blocks of the concatenated W_G: layer i's out_i rows (out_i = u_t[i].shape[1])."""
    out, o = [], 0
    for u in u_t:
        out.append(slice(o, o + u.shape[1]))
        o += u.shape[1]
    if o != w_g.shape[0]:
        raise ValueError(f"w_g has {w_g.shape[0]} rows but the layers' u_t give {o} output features in all")
    return out


# =====================================================================================
# Reference: the separate layers, one after the other
# =====================================================================================
def kind_linear_grouped_ref(
    x: Tensor, w_g: Tensor, bias: Tensor | None, u_t: Sequence[Tensor], sigma_t: Sequence[Tensor],
    v_t: Sequence[Tensor], idx: Tensor, val: Tensor, labels: Tensor,
) -> tuple[Tensor, Tensor]:
    """Forward reference on 2-D x (M, in): (y (M, Σ out_i), h (M, G·K)), layer by layer."""
    ys, hs = [], []
    for i, rows in enumerate(_blocks(w_g, u_t)):
        y, h = kind_linear_ref(x, w_g[rows], None if bias is None else bias[rows], u_t[i], sigma_t[i], v_t[i],
                               idx, val, labels)
        ys.append(y)
        hs.append(h)
    return torch.cat(ys, 1), torch.cat(hs, 1)


def kind_linear_grouped_backward_ref(
    grad_y: Tensor, x: Tensor, w_g: Tensor, u_t: Sequence[Tensor], sigma_t: Sequence[Tensor],
    v_t: Sequence[Tensor], idx: Tensor, val: Tensor, labels: Tensor, h: Tensor, output_mask: Sequence[bool],
) -> tuple[Tensor, Tensor, Tensor, list[Tensor], list[Tensor], list[Tensor], Tensor]:
    """Backward reference: (dx, dw_g, dbias, [du_t], [dsigma_t], [dv_t], dval), each layer's
    ``kind_linear_backward_ref`` on its columns of ``grad_y`` and ``h``; dx and dval summed over
    the layers, dw_g and dbias concatenated. ``output_mask`` (7 bools, kind_linear_backward's
    order) applies to every layer; the gradients not asked for are empty tensors."""
    mask = [bool(m) for m in output_mask]
    k = idx.shape[1]
    dx = dval = None
    dws, dbs, dus, dss, dvs = [], [], [], [], []
    for i, rows in enumerate(_blocks(w_g, u_t)):
        gi = grad_y[:, rows].contiguous()
        hi = h[:, i * k:(i + 1) * k].contiguous()
        dxi, dw, db, du, ds, dv, dvl = kind_linear_backward_ref(gi, x, w_g[rows], u_t[i], sigma_t[i], v_t[i], idx,
                                                                val, labels, hi, mask)
        dx = dxi if dx is None else (dx + dxi if mask[0] else dx)
        dval = dvl if dval is None else (dval + dvl if mask[6] else dval)
        dws.append(dw)
        dbs.append(db)
        dus.append(du)
        dss.append(ds)
        dvs.append(dv)
    dw = torch.cat(dws) if mask[1] else x.new_empty(0)
    db = torch.cat(dbs) if mask[2] else x.new_empty(0)
    return dx, dw, db, dus, dss, dvs, dval


# =====================================================================================
# Registered ops
# =====================================================================================
@torch.library.custom_op("kind_fast::kind_linear_grouped", mutates_args=())
def _kind_linear_grouped_op(
    x: Tensor, w_g: Tensor, bias: Tensor | None, u_t: list[Tensor], sigma_t: list[Tensor], v_t: list[Tensor],
    idx: Tensor, val: Tensor, labels: Tensor,
) -> tuple[Tensor, Tensor]:
    return kind_linear_grouped_ref(x, w_g, bias, u_t, sigma_t, v_t, idx, val, labels)


def kind_linear_grouped_fake(x, w_g, bias, u_t, sigma_t, v_t, idx, val, labels):
    """Fake (meta) kernel of every backend's grouped forward: y (M, Σ out_i), h (M, G·K)."""
    y = x.new_empty((x.shape[0], w_g.shape[0]))
    h = x.new_empty((x.shape[0], len(u_t) * idx.shape[1]), dtype=acc_dtype(x.dtype))
    return y, h


_kind_linear_grouped_op.register_fake(kind_linear_grouped_fake)


@torch.library.custom_op("kind_fast::kind_linear_grouped_backward", mutates_args=())
def _kind_linear_grouped_backward_op(
    grad_y: Tensor, x: Tensor, w_g: Tensor, u_t: list[Tensor], sigma_t: list[Tensor], v_t: list[Tensor],
    idx: Tensor, val: Tensor, labels: Tensor, h: Tensor, output_mask: list[bool],
) -> tuple[Tensor, Tensor, Tensor, list[Tensor], list[Tensor], list[Tensor], Tensor]:
    dx, dw, db, du, ds, dv, dval = kind_linear_grouped_backward_ref(grad_y, x, w_g, u_t, sigma_t, v_t, idx, val,
                                                                    labels, h, output_mask)
    return dx, dw, db, du, ds, dv, dval


def kind_linear_grouped_backward_fake(grad_y, x, w_g, u_t, sigma_t, v_t, idx, val, labels, h, output_mask):
    """Fake (meta) kernel of every backend's grouped backward."""
    need_dx, need_dw, need_db, need_du, need_ds, need_dv, need_dval = (bool(m) for m in output_mask)

    def like(ref, need):
        return torch.empty_like(ref) if need else x.new_empty(0)

    return (like(x, need_dx), like(w_g, need_dw), like(w_g[:, 0], need_db), [like(u, need_du) for u in u_t],
            [like(s, need_ds) for s in sigma_t], [like(v, need_dv) for v in v_t], like(val, need_dval))


_kind_linear_grouped_backward_op.register_fake(kind_linear_grouped_backward_fake)


def grouped_setup_context(ctx, inputs, output):
    x, w_g, bias, u_t, sigma_t, v_t, idx, val, labels = inputs
    _, h = output
    ctx.groups = len(u_t)
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, w_g, idx, val, labels, h, *u_t, *sigma_t, *v_t)
    ctx.mark_non_differentiable(h)


def make_grouped_backward(backward_op: Callable) -> Callable:
    """The autograd backward of a grouped forward op whose gradients ``backward_op`` computes."""

    def _backward(ctx, grad_y, grad_h):
        x, w_g, idx, val, labels, h, *rest = ctx.saved_tensors
        n = ctx.groups
        u_t, sigma_t, v_t = rest[:n], rest[n:2 * n], rest[2 * n:]
        each = ctx.needs_input_grad  # list arguments (u_t, sigma_t, v_t): one flag per layer
        need = [any(v) if isinstance(v, (list, tuple)) else bool(v) for v in each]
        mask = [need[0], need[1], need[2] and ctx.has_bias, need[3], need[4], need[5], need[7]]
        if not any(mask):
            return (None,) * 9
        dx, dw, db, du, ds, dv, dval = backward_op(grad_y.contiguous(), x, w_g, list(u_t), list(sigma_t),
                                                   list(v_t), idx, val, labels, h, mask)

        def pick(ts, j):
            if not need[j]:
                return None
            flags = each[j] if isinstance(each[j], (list, tuple)) else [each[j]] * len(ts)
            return [t if f else None for t, f in zip(ts, flags)]

        return (dx if mask[0] else None, dw if mask[1] else None, db if mask[2] else None, pick(du, 3),
                pick(ds, 4), pick(dv, 5), None, dval if mask[6] else None, None)

    return _backward


_kind_linear_grouped_op.register_autograd(
    make_grouped_backward(torch.ops.kind_fast.kind_linear_grouped_backward),
    setup_context=grouped_setup_context,
)


# =====================================================================================
# FLOP formulas: the sum of the layers' kind_linear formulas
# =====================================================================================
def kind_linear_grouped_flops(m: int, n_in: int, outs: Sequence[int], k: int,
                              output_mask: Sequence[bool] | None = None) -> int:
    """Forward FLOPs of a group (``output_mask`` None), else backward FLOPs for that mask."""
    return sum(kind_linear_flops(m, n_in, o, k, output_mask) for o in outs)


def register_kind_linear_grouped_flop_formulas(forward_op, backward_op) -> None:
    """FLOP formulas of a backend's grouped forward/backward op pair (this module's schemas)."""

    @register_flop_formula(forward_op)
    def _(x_shape, w_g_shape, bias_shape, u_t_shape, sigma_t_shape, v_t_shape, idx_shape, *args, **kwargs) -> int:
        return kind_linear_grouped_flops(x_shape[0], x_shape[1], [u[1] for u in u_t_shape], idx_shape[1])

    @register_flop_formula(backward_op)
    def _(grad_y_shape, x_shape, w_g_shape, u_t_shape, sigma_t_shape, v_t_shape, idx_shape, val_shape, labels_shape,
          h_shape, output_mask, *args, **kwargs) -> int:
        return kind_linear_grouped_flops(x_shape[0], x_shape[1], [u[1] for u in u_t_shape], idx_shape[1],
                                         output_mask)


register_kind_linear_grouped_flop_formulas(torch.ops.kind_fast.kind_linear_grouped,
                                           torch.ops.kind_fast.kind_linear_grouped_backward)


# =====================================================================================
# Backend dispatch and the functional
# =====================================================================================
def resolve_grouped_op(device: torch.device, dtype: torch.dtype) -> Callable | None:
    """The registered grouped op that serves tensors on ``device`` of ``dtype`` under the current
    backend selection, or None where that backend has no grouped op yet (the functional then
    runs exact per-layer calls of the backend's ``kind_linear`` op). A backend module serves
    groups by defining ``GROUPED_OP`` with this module's schema."""
    from kind_fast.ops.backends import backend_module, resolve_backend

    name = resolve_backend(device, dtype)
    if name == "torch":
        return torch.ops.kind_fast.kind_linear_grouped
    mod, _ = backend_module(name)
    return getattr(mod, "GROUPED_OP", None) if mod is not None else None


def concat_group(w_g, bias) -> tuple[Tensor, Tensor | None]:
    """(W_G (Σ out_i, in), b (Σ out_i,) or None) from per-layer lists (or already concatenated
    tensors); a layer without bias contributes zeros, no bias at all gives None."""
    if not isinstance(w_g, Tensor):
        w_g = list(w_g)
        if not w_g or not all(isinstance(w, Tensor) for w in w_g):
            raise TypeError("kind_linear_grouped: w_g must be a tensor (Σ out_i, in) or a non-empty list of "
                            "(out_i, in) tensors, one per layer")
        outs = [w.shape[0] for w in w_g]
        w_g = torch.cat(w_g) if len(w_g) > 1 else w_g[0]
        if bias is not None and not isinstance(bias, Tensor):
            bias = list(bias)
            if len(bias) != len(outs):
                raise ValueError(f"kind_linear_grouped: bias must have one entry per layer ({len(outs)}), "
                                 f"got {len(bias)}")
            if all(b is None for b in bias):
                bias = None
            else:
                ref = next(b for b in bias if b is not None)
                bias = torch.cat([b if b is not None else ref.new_zeros(o) for b, o in zip(bias, outs)])
    elif bias is not None and not isinstance(bias, Tensor):
        raise TypeError("kind_linear_grouped: with a concatenated w_g, bias must be a tensor (Σ out_i,) or None")
    return w_g, bias


def _check_group(u_t, sigma_t, v_t) -> int:
    seqs = (("u_t", u_t), ("sigma_t", sigma_t), ("v_t", v_t))
    for name, s in seqs:
        if isinstance(s, Tensor) or not isinstance(s, (list, tuple)):
            raise TypeError(f"kind_linear_grouped: {name} must be a list with one entry per layer, "
                            f"got {type(s).__name__}")
    n = len(u_t)
    if n == 0:
        raise ValueError("kind_linear_grouped needs at least one layer")
    bad = [name for name, s in seqs if len(s) != n]
    if bad:
        raise ValueError(f"kind_linear_grouped: {', '.join(bad)} must have one entry per layer ({n})")
    return n


def kind_linear_grouped(
    x: Tensor, w_g, bias, u_t: Sequence[Tensor], sigma_t: Sequence[Tensor], v_t: Sequence[Tensor], idx: Tensor,
    val: Tensor, labels: Tensor, *, rows_per_sample: int | None = None,
) -> list[Tensor]:
    """G KIND layers on the same input, sharing one gate: the list of the G outputs, output i
    equal to ``kind_linear(x, w_g[i], bias[i], u_t[i], sigma_t[i], v_t[i], idx, val, labels)``.

    Args are ``kind_linear``'s, per layer: ``w_g`` a list of (out_i, in) weights (or their
    concatenation (Σ out_i, in)), ``bias`` a list with None entries allowed (or the concatenation,
    or None), ``u_t``, ``sigma_t``, ``v_t`` lists. Every layer has the same in_features and the
    gate's tailor rank. Under autocast, x and the factors are cast once, as in ``kind_linear``.
    Returns y_i shaped like x with out_features_i last.
    """
    n = _check_group(u_t, sigma_t, v_t)
    w_g, bias = concat_group(w_g, bias)
    if not isinstance(w_g, Tensor) or w_g.dim() != 2:
        raise ValueError("kind_linear_grouped: w_g must be 2-D (Σ out_i, in)")
    outs = [u.shape[1] if isinstance(u, Tensor) and u.dim() == 2 else -1 for u in u_t]
    if sum(outs) != w_g.shape[0] or min(outs) < 0:
        raise ValueError(f"kind_linear_grouped: w_g has {w_g.shape[0]} rows but the layers' u_t (N_T, out_i) give "
                         f"out_i = {outs}")
    rows = _blocks(w_g, u_t)
    cast = [checked_inputs(x, w_g[r], None if bias is None else bias[r], u_t[i], sigma_t[i], v_t[i], idx, val,
                           labels) for i, r in enumerate(rows)]
    x = cast[0][0]
    u_t, v_t = [c[3] for c in cast], [c[4] for c in cast]
    if torch.is_autocast_enabled(x.device.type):
        w_g = w_g.to(x.dtype)
        bias = bias.to(x.dtype) if bias is not None else None
    lead = x.shape[:-1]
    x2 = sample_rows(x, labels, rows_per_sample)
    if x2.shape[0] == 0:
        return [F.linear(x, w_g[r], None if bias is None else bias[r]) for r in rows]
    op = resolve_grouped_op(x2.device, x2.dtype)
    if op is None:  # no grouped kernel on this backend yet: exact per-layer calls of its op
        t = x2.shape[0] // labels.shape[0]
        return [kind_linear(x2, w_g[r], None if bias is None else bias[r], u_t[i], sigma_t[i], v_t[i], idx, val,
                            labels, rows_per_sample=t).view(*lead, outs[i]) for i, r in enumerate(rows)]
    acc = acc_dtype(x2.dtype)
    with torch.autocast(x2.device.type, enabled=False):
        y, _ = op(x2.contiguous(), w_g.contiguous(), bias, [u.contiguous() for u in u_t],
                  [s.to(acc) for s in sigma_t], [v.contiguous() for v in v_t], idx, val.to(acc), labels)
    return [part.view(*lead, o) for part, o in zip(y.split(outs, 1), outs)]
