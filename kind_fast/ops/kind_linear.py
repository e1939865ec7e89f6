"""kind_linear: the KIND linear layer as one op family.

Math (docs/design.md §1–2). For row m of x, belonging to sample b = m // T of class c = labels[b]:

    y[m] = x[m] · W_Gᵀ + Σ_k  val[c, k] · σ_T[idx[c, k]] · (x[m] · v_T[idx[c, k]]) · u_T[idx[c, k]] + b

with W_G = Σ_{i<N_G} σ_i u_iᵀ v_i materialised by the caller (path M1: once per step; autograd
of that materialisation projects dW_G onto U_G, σ_G, V_G). Write s[b, k] = σ_T[idx[c,k]]·val[c,k]
and h[m, k] = x[m]·v_T[idx[c,k]] (the "shrink"); then y = x·W_Gᵀ + (h ⊙ s)·U_T[idx[c]] + b.

Backward, with g = dL/dy and dh_s = g·U_T[idx[c]]ᵀ:
    dx   = g·W_G + (dh_s ⊙ s)·V_T[idx[c]]
    dU_T = Σ_rows (h ⊙ s)ᵀ g          scattered to the active ids
    dV_T = Σ_rows (dh_s ⊙ s)ᵀ x       scattered to the active ids
    ds   = Σ_rows dh_s ⊙ h            per sample, then dσ_T[idx] += ds·val, dval[c] += ds·σ_T[idx]
    dW_G = gᵀ x,  db = Σ_rows g       only when asked for

Layering, as in FlashAttention's layer_norm.py: reference → registered ops (forward, backward)
with fake kernels → autograd → functional. The reference is the oracle for every backend,
the CPU path and the benchmark baseline. It never loops over rows or samples in Python and
never builds a per-sample dense weight. Two plans, chosen from shapes only:

* "sample" (T ≥ K and K < N_T, e.g. DiT's 256 tokens per image): gather each sample's K
  active tailor rows once ((B, K, in) and (B, K, out), small next to x) and run batched GEMMs.
* "row" (otherwise, e.g. one row per sample or an all-on gate): one GEMM against all N_T
  tailors, then gather/scatter the K active columns per row. Costs N_T/K more tailor FLOPs
  but stays GEMM-shaped where the per-sample gather would be larger than x itself.

σ and gate values are applied in float32 (float64 for float64 inputs) on h.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

__all__ = [
    "kind_linear",
    "sample_rows",
    "kind_linear_ref",
    "kind_linear_backward_ref",
    "kind_linear_flops",
    "tailor_plan",
    "acc_dtype",
    "SUPPORTED_DTYPES",
]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype that σ, gate values and h use: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tailor_plan(rows: int, batch: int, active: int, tailor_rank: int) -> str:
    """'sample' or 'row' (see the module docstring); depends on shapes only."""
    t = rows // max(batch, 1)
    return "sample" if (t >= active and active < tailor_rank) else "row"


# =====================================================================================
# Reference
# =====================================================================================
def _per_sample(idx: Tensor, val: Tensor, sigma_t: Tensor, labels: Tensor, acc: torch.dtype):
    """ids (B, K) int64 active tailor ids and s (B, K) = σ_T[ids] ⊙ val[labels], in acc."""
    lab = labels.long()
    ids = idx.index_select(0, lab).long()
    s = sigma_t.to(acc)[ids] * val.to(acc).index_select(0, lab)
    return lab, ids, s


def _scatter_cols(values: Tensor, ids: Tensor, n: int) -> Tensor:
    """(M, K) values placed at columns ids (M, K) of an (M, n) zero matrix (sums duplicates)."""
    return values.new_zeros(values.shape[0], n).scatter_add_(1, ids, values)


def kind_linear_ref(
    x: Tensor,
    w_g: Tensor,
    bias: Tensor | None,
    u_t: Tensor,
    sigma_t: Tensor,
    v_t: Tensor,
    idx: Tensor,
    val: Tensor,
    labels: Tensor,
    *,
    upcast: bool = False,
) -> tuple[Tensor, Tensor]:
    """Forward reference on 2-D x (M, in), M = B·T. Returns (y (M, out), h (M, K)).

    ``upcast=True`` computes in float32 (the test oracle for half-precision inputs).
    """
    if upcast and x.dtype in (torch.float16, torch.bfloat16):
        x, w_g, u_t, v_t = x.float(), w_g.float(), u_t.float(), v_t.float()
        bias = bias.float() if bias is not None else None
    dt, acc = x.dtype, acc_dtype(x.dtype)
    m, n_in = x.shape
    n_out, n_t, k = w_g.shape[0], u_t.shape[0], idx.shape[1]
    b = labels.shape[0]
    t = m // b
    y = F.linear(x, w_g, bias)
    if k == 0 or n_t == 0 or m == 0:
        return y, x.new_zeros((m, k), dtype=acc)
    _, ids, s = _per_sample(idx, val, sigma_t, labels, acc)
    if tailor_plan(m, b, k, n_t) == "sample":
        h = torch.bmm(x.view(b, t, n_in), v_t[ids].transpose(1, 2)).to(acc)  # (B, T, K)
        hs = (h * s[:, None, :]).to(dt)
        y.view(b, t, n_out).baddbmm_(hs, u_t[ids])  # (B, T, K)·(B, K, out)
        return y, h.view(m, k)
    ids_r = ids.repeat_interleave(t, 0)  # (M, K)
    h = F.linear(x, v_t).gather(1, ids_r).to(acc)  # (M, N_T) -> (M, K)
    hs = _scatter_cols(h * s.repeat_interleave(t, 0), ids_r, n_t).to(dt)  # (M, N_T)
    y.addmm_(hs, u_t)
    return y, h


def kind_linear_backward_ref(
    grad_y: Tensor,
    x: Tensor,
    w_g: Tensor,
    u_t: Tensor,
    sigma_t: Tensor,
    v_t: Tensor,
    idx: Tensor,
    val: Tensor,
    labels: Tensor,
    h: Tensor,
    output_mask: Sequence[bool],
) -> tuple[Tensor, ...]:
    """Backward reference: (dx, dw_g, dbias, du_t, dsigma_t, dv_t, dval).

    ``output_mask`` (7 bools, same order) says which gradients to compute; the others are
    returned as empty tensors and cost nothing.
    """
    need_dx, need_dw, need_db, need_du, need_ds, need_dv, need_dval = (bool(v) for v in output_mask)
    dt, acc = x.dtype, acc_dtype(x.dtype)
    m, n_in = x.shape
    n_out, n_t, k = w_g.shape[0], u_t.shape[0], idx.shape[1]
    b = labels.shape[0]
    t = m // b
    g = grad_y

    def empty():  # a fresh one per output: registered ops may not return aliased outputs
        return x.new_empty(0)

    dx = g @ w_g if need_dx else empty()
    dw = g.t() @ x if need_dw else empty()
    db = g.sum(0, dtype=acc).to(dt) if need_db else empty()
    du = torch.zeros_like(u_t) if need_du else empty()
    dv = torch.zeros_like(v_t) if need_dv else empty()
    dsig = torch.zeros_like(sigma_t) if need_ds else empty()
    dval = torch.zeros_like(val) if need_dval else empty()
    if k == 0 or n_t == 0 or m == 0 or not (need_dx or need_du or need_ds or need_dv or need_dval):
        return dx, dw, db, du, dsig, dv, dval

    lab, ids, s = _per_sample(idx, val, sigma_t, labels, acc)
    need_dhs = need_dx or need_dv or need_ds or need_dval
    if tailor_plan(m, b, k, n_t) == "sample":
        gb, xb, hb = g.view(b, t, n_out), x.view(b, t, n_in), h.view(b, t, k)
        flat = ids.reshape(-1)
        if need_dhs:
            dhs = torch.bmm(gb, u_t[ids].transpose(1, 2)).to(acc)  # (B, T, K)
            dh = (dhs * s[:, None, :]).to(dt)
        if need_dx:
            dx.view(b, t, n_in).baddbmm_(dh, v_t[ids])
        if need_du:
            hs = (hb * s[:, None, :]).to(dt)
            dug = torch.bmm(hs.transpose(1, 2), gb)  # (B, K, out)
            du = torch.zeros(n_t, n_out, dtype=acc, device=x.device)
            du = du.index_add_(0, flat, dug.reshape(-1, n_out).to(acc)).to(u_t.dtype)
        if need_dv:
            dvg = torch.bmm(dh.transpose(1, 2), xb)  # (B, K, in)
            dv = torch.zeros(n_t, n_in, dtype=acc, device=x.device)
            dv = dv.index_add_(0, flat, dvg.reshape(-1, n_in).to(acc)).to(v_t.dtype)
        if need_ds or need_dval:
            ds = (dhs * hb).sum(1)  # (B, K)
    else:
        ids_r = ids.repeat_interleave(t, 0)
        s_r = s.repeat_interleave(t, 0)
        if need_dhs:
            dhs = F.linear(g, u_t).gather(1, ids_r).to(acc)  # g·U_Tᵀ (M, N_T) -> (M, K)
            dh_full = _scatter_cols(dhs * s_r, ids_r, n_t).to(dt)  # (M, N_T)
        if need_dx:
            dx.addmm_(dh_full, v_t)
        if need_du:
            du = (_scatter_cols(h * s_r, ids_r, n_t).to(dt).t() @ g).to(u_t.dtype)
        if need_dv:
            dv = (dh_full.t() @ x).to(v_t.dtype)
        if need_ds or need_dval:
            ds = (dhs * h).view(b, t, k).sum(1)  # (B, K)
    if need_ds:
        contrib = (ds * val.to(acc).index_select(0, lab)).reshape(-1)
        dsig = torch.zeros(n_t, dtype=acc, device=x.device).index_add_(0, ids.reshape(-1), contrib)
        dsig = dsig.to(sigma_t.dtype)
    if need_dval:
        contrib = ds * sigma_t.to(acc)[ids]
        dval = torch.zeros(val.shape, dtype=acc, device=x.device).index_add_(0, lab, contrib)
        dval = dval.to(val.dtype)
    return dx, dw, db, du, dsig, dv, dval


# =====================================================================================
# Registered ops (torch.library): the reference is the kernel on every device
# =====================================================================================
@torch.library.custom_op("kind_fast::kind_linear", mutates_args=())
def _kind_linear_op(
    x: Tensor,
    w_g: Tensor,
    bias: Tensor | None,
    u_t: Tensor,
    sigma_t: Tensor,
    v_t: Tensor,
    idx: Tensor,
    val: Tensor,
    labels: Tensor,
) -> tuple[Tensor, Tensor]:
    return kind_linear_ref(x, w_g, bias, u_t, sigma_t, v_t, idx, val, labels)


def kind_linear_fake(x, w_g, bias, u_t, sigma_t, v_t, idx, val, labels):
    """Fake (meta) kernel of every backend's forward op: y (M, out), h (M, K)."""
    y = x.new_empty((x.shape[0], w_g.shape[0]))
    h = x.new_empty((x.shape[0], idx.shape[1]), dtype=acc_dtype(x.dtype))
    return y, h


_kind_linear_op.register_fake(kind_linear_fake)


@torch.library.custom_op("kind_fast::kind_linear_backward", mutates_args=())
def _kind_linear_backward_op(
    grad_y: Tensor,
    x: Tensor,
    w_g: Tensor,
    u_t: Tensor,
    sigma_t: Tensor,
    v_t: Tensor,
    idx: Tensor,
    val: Tensor,
    labels: Tensor,
    h: Tensor,
    output_mask: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return kind_linear_backward_ref(grad_y, x, w_g, u_t, sigma_t, v_t, idx, val, labels, h, output_mask)


def kind_linear_backward_fake(grad_y, x, w_g, u_t, sigma_t, v_t, idx, val, labels, h, output_mask):
    """Fake (meta) kernel of every backend's backward op."""
    like = (x, w_g, w_g[:, 0], u_t, sigma_t, v_t, val)  # dbias is (out,)
    return tuple(
        torch.empty_like(ref) if need else x.new_empty(0) for ref, need in zip(like, output_mask)
    )


_kind_linear_backward_op.register_fake(kind_linear_backward_fake)


# =====================================================================================
# Autograd
# =====================================================================================
# Shared by every backend: its forward op saves (x, w_g, u_t, σ_T, v_T, idx, val, labels, h)
# and its backward op has kind_linear_backward's schema.
def kind_linear_setup_context(ctx, inputs, output):
    x, w_g, bias, u_t, sigma_t, v_t, idx, val, labels = inputs
    _, h = output
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, w_g, u_t, sigma_t, v_t, idx, val, labels, h)
    ctx.mark_non_differentiable(h)


def make_kind_linear_backward(backward_op: Callable) -> Callable:
    """The autograd backward of a forward op whose gradients ``backward_op`` computes."""

    def _backward(ctx, grad_y, grad_h):
        x, w_g, u_t, sigma_t, v_t, idx, val, labels, h = ctx.saved_tensors
        n = ctx.needs_input_grad
        mask = [n[0], n[1], n[2] and ctx.has_bias, n[3], n[4], n[5], n[7]]
        if not any(mask):
            return (None,) * 9
        dx, dw, db, du, ds, dv, dval = backward_op(
            grad_y.contiguous(), x, w_g, u_t, sigma_t, v_t, idx, val, labels, h, mask
        )
        pick = lambda t, need: t if need else None  # noqa: E731
        return (
            pick(dx, mask[0]), pick(dw, mask[1]), pick(db, mask[2]), pick(du, mask[3]),
            pick(ds, mask[4]), pick(dv, mask[5]), None, pick(dval, mask[6]), None,
        )

    return _backward


_kind_linear_op.register_autograd(
    make_kind_linear_backward(torch.ops.kind_fast.kind_linear_backward),
    setup_context=kind_linear_setup_context,
)


# =====================================================================================
# FLOP formulas (torch.utils.flop_counter counts a custom op as 0 without one)
# =====================================================================================
# The op's intrinsic GEMM work with K active tailors per row (FLOPs = 2 × MACs). The
# reference's "row" plan does more (all N_T tailors); a formula describes the op, not a plan.
def kind_linear_flops(m: int, n_in: int, n_out: int, k: int, output_mask: Sequence[bool] | None = None) -> int:
    """Forward FLOPs when ``output_mask`` is None, else backward FLOPs for that mask."""
    if output_mask is None:
        return 2 * m * n_in * n_out + 2 * m * k * (n_in + n_out)
    need_dx, need_dw, _, need_du, need_ds, need_dv, need_dval = (bool(v) for v in output_mask)
    flops = 2 * m * n_out * k if (need_dx or need_dv or need_ds or need_dval) else 0  # dh_s
    flops += (2 * m * n_out * n_in + 2 * m * k * n_in) if need_dx else 0
    flops += 2 * m * n_in * n_out if need_dw else 0
    flops += 2 * m * k * n_out if need_du else 0
    flops += 2 * m * k * n_in if need_dv else 0
    return flops


def register_kind_linear_flop_formulas(forward_op, backward_op) -> None:
    """FLOP formulas of a backend's forward/backward op pair (kind_linear's schemas)."""

    @register_flop_formula(forward_op)
    def _(x_shape, w_g_shape, bias_shape, u_t_shape, sigma_t_shape, v_t_shape, idx_shape, *args, **kwargs) -> int:
        return kind_linear_flops(x_shape[0], x_shape[1], w_g_shape[0], idx_shape[1])

    @register_flop_formula(backward_op)
    def _(grad_y_shape, x_shape, w_g_shape, u_t_shape, sigma_t_shape, v_t_shape, idx_shape, val_shape,
          labels_shape, h_shape, output_mask, *args, **kwargs) -> int:
        return kind_linear_flops(x_shape[0], x_shape[1], w_g_shape[0], idx_shape[1], output_mask)


register_kind_linear_flop_formulas(torch.ops.kind_fast.kind_linear, torch.ops.kind_fast.kind_linear_backward)


# =====================================================================================
# Functional (the one entry point: validation, autocast, flattening, backend choice)
# =====================================================================================
def _check(cond: bool, msg: str, exc: type[Exception] = ValueError) -> None:
    if not cond:
        raise exc(msg)


def _validate(x, w_g, bias, u_t, sigma_t, v_t, idx, val, labels) -> None:
    # every message is formatted only when its check fails (this runs on every call)
    for name, t in (("x", x), ("w_g", w_g), ("u_t", u_t), ("sigma_t", sigma_t), ("v_t", v_t),
                    ("idx", idx), ("val", val), ("labels", labels)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x dtype {x.dtype} is not supported; use one of {SUPPORTED_DTYPES}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., in_features)")
    n_in = x.shape[-1]
    if w_g.dim() != 2 or w_g.shape[1] != n_in:
        raise ValueError(f"w_g must be (out_features, {n_in}) to match x's last dim, got {tuple(w_g.shape)}")
    n_out = w_g.shape[0]
    if u_t.dim() != 2 or u_t.shape[1] != n_out:
        raise ValueError(f"u_t must be (tailor_rank, {n_out}), got {tuple(u_t.shape)}")
    n_t = u_t.shape[0]
    if v_t.shape != (n_t, n_in):
        raise ValueError(f"v_t must be ({n_t}, {n_in}), got {tuple(v_t.shape)}")
    if sigma_t.shape != (n_t,):
        raise ValueError(f"sigma_t must be ({n_t},), got {tuple(sigma_t.shape)}")
    dt = x.dtype
    if w_g.dtype != dt or u_t.dtype != dt or v_t.dtype != dt or (bias is not None and bias.dtype != dt):
        for name, t in (("w_g", w_g), ("u_t", u_t), ("v_t", v_t)) + ((("bias", bias),) if bias is not None else ()):
            if t.dtype != dt:
                raise TypeError(f"{name} dtype {t.dtype} != x dtype {dt} (cast them, or use autocast)")
    if bias is not None and bias.shape != (n_out,):
        raise ValueError(f"bias must be ({n_out},), got {tuple(bias.shape)}")
    if not (sigma_t.is_floating_point() and val.is_floating_point()):
        raise TypeError("sigma_t and val must be floating point")
    if idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"idx must be int32 or int64, got {idx.dtype}")
    if idx.dim() != 2 or val.shape != idx.shape:
        raise ValueError(f"idx and val must both be (num_classes + 1, K), got {tuple(idx.shape)} and "
                         f"{tuple(val.shape)}")
    dev = x.device
    if not (w_g.device == dev and u_t.device == dev and sigma_t.device == dev and v_t.device == dev
            and idx.device == dev and val.device == dev and labels.device == dev
            and (bias is None or bias.device == dev)):
        devs = {t.device for t in (x, w_g, u_t, sigma_t, v_t, idx, val, labels)}
        if bias is not None:
            devs.add(bias.device)
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devs))}")


def checked_inputs(x, w_g, bias, u_t, sigma_t, v_t, idx, val, labels):
    """The entry of every op of the family (``kind_linear``, ``kind_linear_merged``): under
    autocast, x and the factors cast to the autocast dtype here, once (σ and gate values stay
    float32); then the shapes, dtypes, devices and label range are checked. Returns
    (x, w_g, bias, u_t, v_t) as cast."""
    _check(isinstance(x, Tensor), f"x must be a torch.Tensor, got {type(x).__name__}", TypeError)
    dev_type = x.device.type
    if torch.is_autocast_enabled(dev_type) and x.is_floating_point():
        dt = torch.get_autocast_dtype(dev_type)
        x, w_g, u_t, v_t = (t.to(dt) if isinstance(t, Tensor) else t for t in (x, w_g, u_t, v_t))
        bias = bias.to(dt) if isinstance(bias, Tensor) else bias
    _validate(x, w_g, bias, u_t, sigma_t, v_t, idx, val, labels)
    from kind_fast.ops.labels import check_labels

    check_labels(labels, idx.shape[0] - 1)
    return x, w_g, bias, u_t, v_t


def sample_rows(x: Tensor, labels: Tensor, rows_per_sample: int | None = None, *, who: str = "kind_linear") -> Tensor:
    """x as (M, in) rows grouped by sample, after checking that its layout is one of:

    * (B, ..., in) with B = len(labels): x[b] holds the rows of sample b (any number of
      middle dims; (B, in) is one row per sample);
    * (B·T, in) rows already flattened, only with ``rows_per_sample=T`` given explicitly.

    Anything else is a ValueError: a wrong label count never regroups rows silently.
    """
    n_b = labels.shape[0]
    if x.dim() < 2:
        raise ValueError(f"{who}: x must be (B, ..., in_features) with B = len(labels) = {n_b}, "
                         f"got shape {tuple(x.shape)}")
    if rows_per_sample is None:
        if x.shape[0] != n_b:
            raise ValueError(
                f"{who}: x has shape {tuple(x.shape)} but labels has {n_b} entries: x must be (B, ..., in_features) "
                f"with B = len(labels), x[b] holding the rows of sample b"
                + (" (rows flattened to (B·T, in): call kind_linear with rows_per_sample=T)" if x.dim() == 2 else ""))
    else:
        if isinstance(rows_per_sample, bool) or not isinstance(rows_per_sample, int) or rows_per_sample < 1:
            raise ValueError(f"{who}: rows_per_sample must be an int >= 1, got {rows_per_sample!r}")
        if x.dim() != 2 or x.shape[0] != n_b * rows_per_sample:
            raise ValueError(
                f"{who}: with rows_per_sample={rows_per_sample} x must be ({n_b}·{rows_per_sample}, in_features) "
                f"= ({n_b * rows_per_sample}, {x.shape[-1]}), got shape {tuple(x.shape)}")
    return x.reshape(-1, x.shape[-1])


def kind_linear(
    x: Tensor,
    w_g: Tensor,
    bias: Tensor | None,
    u_t: Tensor,
    sigma_t: Tensor,
    v_t: Tensor,
    idx: Tensor,
    val: Tensor,
    labels: Tensor,
    *,
    rows_per_sample: int | None = None,
) -> Tensor:
    """Class-gated KIND linear layer.

    Args:
        x: (B, ..., in) with x[b] the rows of sample b: (B, T, in) tokens, (B, in) one row per
            sample. Rows already flattened to (B·T, in) only with ``rows_per_sample=T``.
        w_g: (out, in) materialised learngene weight, x's dtype.
        bias: (out,) or None, x's dtype.
        u_t: (N_T, out) tailor output vectors, component-major; x's dtype.
        sigma_t: (N_T,) tailor singular values (applied in float32).
        v_t: (N_T, in) tailor input vectors, component-major; x's dtype.
        idx: (C+1, K) int32 active tailor ids per class (last row: null class).
        val: (C+1, K) float gate values (0 in padding slots).
        labels: (B,) int class id of each sample, in [0, C].
        rows_per_sample: T, for x given as flattened (B·T, in) rows (see ``sample_rows``).

    Returns:
        y with x's leading shape and out features, in x's dtype.

    Under autocast, x and the weights are cast to the autocast dtype here, once; σ and the
    gate values stay float32.
    """
    x, w_g, bias, u_t, v_t = checked_inputs(x, w_g, bias, u_t, sigma_t, v_t, idx, val, labels)
    dev_type = x.device.type
    lead = x.shape[:-1]
    x2 = sample_rows(x, labels, rows_per_sample)
    if x2.shape[0] == 0:
        return F.linear(x, w_g, bias)
    acc = acc_dtype(x2.dtype)
    from kind_fast.ops.backends import resolve_op

    op = resolve_op(x2.device, x2.dtype)
    with torch.autocast(dev_type, enabled=False):
        y, _ = op(x2.contiguous(), w_g.contiguous(), bias, u_t.contiguous(), sigma_t.to(acc),
                  v_t.contiguous(), idx, val.to(acc), labels)
    return y.view(*lead, w_g.shape[0])
