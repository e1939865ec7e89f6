"""kind_linear_merged: path M3 of the kind_linear op family, merged per-class weights.

Math (docs/design.md §1–2). Class c sees one dense weight

    W_c = W_G + U_T[ids_c]ᵀ · diag(s_c) · V_T[ids_c],    ids_c = idx[c],  s_c = σ_T[ids_c] ⊙ val[c]

so a batch that holds few distinct classes (classifier-free guidance: {c, null}) can merge one
weight per class ("slot") once, 2·K·in·out FLOPs each, and then run a segmented GEMM

    y[m] = x[m] · W[slot_b]ᵀ + bias,          b = m // T (rows grouped by sample)

at the cost of a dense layer. The merge is a rank-K update of W_G; FastKindLinear caches the
merged weights per (served classes, parameter version), so sampling pays it once per run.
Gradients (when M3 is the cheapest exact path in training, e.g. tiny layers):

    dx[m] = g[m] · W[slot_b]          dW[s] = Σ_{m: slot_b = s} g[m]ᵀ x[m]        dbias = Σ_m g[m]

and autograd carries dW[s] through the merge to W_G (U_G, σ_G, V_G), U_T, σ_T, V_T and val.

Layering: reference → registered ops (fake kernels, autograd, FLOP formulas) → functional. The
Triton kernels are kernels/kind_linear_merged.py (ops: kind_fast/ops/kind_linear_merged_triton.py);
the CUDA backend (csrc/) serves ``kind_linear_cuda_merged_gemm`` (+ backward) and
``kind_linear_cuda_merged`` with these ops' schemas, on cuBLAS.

Registered ops (every backend's variant has the same schema and semantics):

    kind_fast::kind_linear_merged_gemm(Tensor x, Tensor weights, Tensor? bias, Tensor slots) -> Tensor
        x (M, in); weights (S, out, in) in x's dtype; bias (out,) or None; slots (B,) int slot
        of each sample in [0, S), M = B·T, on x's device or on the CPU (host slots: the reference
        and the CUDA backend read them there, without a synchronisation). Returns y (M, out).
        Autograd: dx, dweights, dbias through ``kind_fast::kind_linear_merged_gemm_backward(grad_y,
        x, weights, slots, output_mask: bool[3]) -> (dx, dweights, dbias)``.
    kind_fast::kind_linear_merged(Tensor x, Tensor w_g, Tensor? bias, Tensor u_t, Tensor sigma_t,
                                  Tensor v_t, Tensor idx, Tensor val, Tensor labels, int max_classes) -> Tensor
        The whole path from the components (the CUDA backend's kind_linear_cuda_merged schema):
        up to ``max_classes`` slots go to the distinct classes of ``labels`` in order of first
        appearance, assigned on the device (no host sync); samples of any further class get the
        M1 answer (W_G + gathered tailor term). Inference only (no autograd), like the CUDA op;
        the functional routes calls that need gradients through merge_weights + the GEMM op.

Functional (the signatures other modules call; DiT.export may use merge_weights directly):

    merge_weights(w_g, u_t, sigma_t, v_t, idx, val, classes, dtype=None) -> (S, out, in)
        classes: (S,) int tensor or sequence of class ids; differentiable in every argument.
    kind_linear_merged_gemm(x, weights, bias, slots) -> y          x (B, T, in)/(M, in)
    kind_linear_merged(x, w_g, bias, u_t, sigma_t, v_t, idx, val, labels, max_classes=2) -> y
    assign_slots(labels, num_rows, max_slots) -> (slot_class (S,), class_slot (C+1,))

The reference GEMM has two plans: on the CPU the slots are read on the host (free there) and
each slot's samples run one GEMM (contiguous runs of samples are views, no copy); on other
devices, where reading them would synchronise, one GEMM against all S weights then a select
(S× the FLOPs; the cost model knows, and the fused backends have real segmented kernels).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from kind_fast.ops.kind_linear import SUPPORTED_DTYPES, acc_dtype

__all__ = [
    "merge_weights",
    "assign_slots",
    "kind_linear_merged_gemm",
    "kind_linear_merged_gemm_ref",
    "kind_linear_merged_gemm_backward_ref",
    "kind_linear_merged",
    "kind_linear_merged_ref",
    "kind_linear_merged_gemm_flops",
    "kind_linear_merged_flops",
]


# =====================================================================================
# Reference: merge, slots, segmented GEMM
# =====================================================================================
def merge_weights(w_g: Tensor, u_t: Tensor, sigma_t: Tensor, v_t: Tensor, idx: Tensor, val: Tensor,
                  classes: Tensor | Sequence[int], dtype: torch.dtype | None = None) -> Tensor:
    """W (S, out, in): W[s] = W_G + U_T[idx[c]]ᵀ diag(σ_T[idx[c]] ⊙ val[c]) V_T[idx[c]], c = classes[s].

    Computed in float32 (float64 for float64 inputs) and cast to ``dtype`` (default: w_g's).
    Differentiable in w_g, u_t, sigma_t, v_t and val (one batched GEMM, autograd does the rest).
    """
    dtype = w_g.dtype if dtype is None else dtype
    acc = acc_dtype(w_g.dtype)
    if not isinstance(classes, Tensor):
        classes = torch.tensor(list(classes), dtype=torch.long)
    cls = classes.to(device=idx.device, dtype=torch.long)
    ids = idx.index_select(0, cls).long()                                   # (S, K)
    s = sigma_t.to(acc)[ids] * val.to(acc).index_select(0, cls)             # (S, K)
    with torch.autocast(w_g.device.type, enabled=False):
        left = u_t.to(acc)[ids].transpose(1, 2) * s[:, None, :]             # (S, out, K)
        w = torch.baddbmm(w_g.to(acc).expand(cls.shape[0], *w_g.shape), left, v_t.to(acc)[ids])
    return w.to(dtype)


def assign_slots(labels: Tensor, num_rows: int, max_slots: int) -> tuple[Tensor, Tensor]:
    """Slots for the distinct classes of ``labels`` in order of first appearance, on the device.

    Returns slot_class (S,) int64, S = min(max_slots, B, num_rows): the class of each slot
    (slots past the number of distinct classes hold classes absent from the batch; their
    merged weights are never read), and class_slot (num_rows,) int64: the slot of each class,
    -1 for classes without one (absent, or beyond ``max_slots``). No host synchronisation.
    """
    b = labels.shape[0]
    dev = labels.device
    lab = labels.long()
    n_slots = max(0, min(max_slots, b, num_rows))
    first = torch.full((num_rows,), b, dtype=torch.long, device=dev)
    first = first.scatter_reduce(0, lab, torch.arange(b, device=dev), reduce="amin")
    order = torch.argsort(first, stable=True)       # present classes first, by first appearance
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(num_rows, device=dev))
    class_slot = torch.where((rank < n_slots) & (first < b), rank, torch.full_like(rank, -1))
    return order[:n_slots], class_slot


def _host_segments(slots: Tensor, n_slots: int, device: torch.device | None = None
                   ) -> list[tuple[int, Tensor | slice]]:
    """(slot, samples) per used slot, read on the host: a slice for a contiguous run of
    samples (a view of x, no copy), else an index tensor (on ``device``: x's, for host slots
    of device tensors)."""
    sl = slots.long()
    out = []
    for s in torch.unique(sl).tolist():
        if not 0 <= s < n_slots:
            raise ValueError(f"slots must be in [0, {n_slots}), got {s}")
        where = (sl == s).nonzero().flatten()
        lo, hi = int(where[0]), int(where[-1]) + 1
        out.append((s, slice(lo, hi) if hi - lo == where.numel() else where.to(device or where.device)))
    return out


def _plan(slots: Tensor) -> str:
    return "segments" if slots.device.type == "cpu" else "all"


def kind_linear_merged_gemm_ref(x: Tensor, weights: Tensor, bias: Tensor | None, slots: Tensor, *,
                                plan: str | None = None,
                                segments: Sequence[tuple[int, slice | Tensor]] | None = None) -> Tensor:
    """y (M, out) = x[m] · weights[slots[m // T]]ᵀ + bias on 2-D x (M, in). ``plan``:
    "segments" (one GEMM per slot, slots read on the host) or "all" (one GEMM against every
    slot's weight, then a select; no host read); default: "segments" for CPU slots (also host
    slots of device tensors). ``segments``:
    the (slot, samples) pairs when the caller already knows them (then ``slots`` is not read)."""
    m, n_in = x.shape
    n_slots, n_out = weights.shape[0], weights.shape[1]
    b = slots.shape[0]
    if m == 0 or b == 0:
        return x.new_zeros((m, n_out)) if bias is None else bias.expand(m, n_out).clone()
    t = m // b
    plan = "segments" if segments is not None else (plan or _plan(slots))
    if plan == "segments":
        y = x.new_empty((b, t, n_out))
        x3 = x.view(b, t, n_in)
        for s, rows in (segments if segments is not None else _host_segments(slots, n_slots, x.device)):
            ys = F.linear(x3[rows], weights[s], bias)
            if isinstance(rows, slice):
                y[rows] = ys
            else:
                y.index_copy_(0, rows, ys)
        return y.view(m, n_out)
    yall = F.linear(x, weights.reshape(n_slots * n_out, n_in)).view(b, t, n_slots, n_out)
    sel = slots.long().clamp(0, n_slots - 1).view(b, 1, 1, 1).expand(b, t, 1, n_out)
    y = yall.gather(2, sel).view(m, n_out)
    return y if bias is None else y + bias


def kind_linear_merged_gemm_backward_ref(grad_y: Tensor, x: Tensor, weights: Tensor, slots: Tensor,
                                         output_mask: Sequence[bool], *, plan: str | None = None
                                         ) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweights, dbias); outputs not asked for in ``output_mask`` are empty tensors."""
    need_dx, need_dw, need_db = (bool(v) for v in output_mask)
    m, n_in = x.shape
    n_slots, n_out = weights.shape[0], weights.shape[1]
    b = slots.shape[0]
    acc = acc_dtype(x.dtype)
    g = grad_y
    dx = torch.zeros_like(x) if need_dx else x.new_empty(0)
    dw = torch.zeros_like(weights) if need_dw else x.new_empty(0)
    db = g.sum(0, dtype=acc).to(g.dtype) if need_db else x.new_empty(0)
    if m == 0 or b == 0 or not (need_dx or need_dw):
        return dx, dw, db
    t = m // b
    plan = plan or _plan(slots)
    if plan == "segments":
        g3, x3 = g.view(b, t, n_out), x.view(b, t, n_in)
        dx3 = dx.view(b, t, n_in) if need_dx else None
        for s, rows in _host_segments(slots, n_slots, x.device):
            gs = g3[rows]
            if need_dx:
                dxs = gs @ weights[s]
                if isinstance(rows, slice):
                    dx3[rows] = dxs
                else:
                    dx3.index_copy_(0, rows, dxs)
            if need_dw:
                dw[s] = gs.reshape(-1, n_out).t() @ x3[rows].reshape(-1, n_in)
        return dx, dw, db
    onehot = F.one_hot(slots.long().clamp(0, n_slots - 1), n_slots).to(g.dtype)      # (B, S)
    gall = (g.view(b, t, 1, n_out) * onehot.view(b, 1, n_slots, 1)).view(m, n_slots * n_out)
    if need_dx:
        dx = gall @ weights.reshape(n_slots * n_out, n_in)
    if need_dw:
        dw = (gall.t() @ x).view(n_slots, n_out, n_in)
    return dx, dw, db


def _tailor_term(y: Tensor, x: Tensor, u_t: Tensor, sigma_t: Tensor, v_t: Tensor, idx: Tensor, val: Tensor,
                  labels: Tensor, keep: Tensor) -> Tensor:
    """y + M1's gathered tailor term for the samples where ``keep`` (B,) is True (out of place:
    y may be a custom op's output under autograd)."""
    dt, acc = x.dtype, acc_dtype(x.dtype)
    m, n_in = x.shape
    b, n_out = labels.shape[0], y.shape[1]
    t = m // b
    lab = labels.long()
    ids = idx.index_select(0, lab).long()                                        # (B, K)
    s = sigma_t.to(acc)[ids] * val.to(acc).index_select(0, lab) * keep.to(acc)[:, None]
    h = torch.bmm(x.view(b, t, n_in), v_t[ids].transpose(1, 2)).to(acc)           # (B, T, K)
    return torch.baddbmm(y.view(b, t, n_out), (h * s[:, None, :]).to(dt), u_t[ids]).view(m, n_out)


def kind_linear_merged_ref(x: Tensor, w_g: Tensor, bias: Tensor | None, u_t: Tensor, sigma_t: Tensor,
                           v_t: Tensor, idx: Tensor, val: Tensor, labels: Tensor, max_classes: int, *,
                           gemm: Callable[[Tensor, Tensor, Tensor | None, Tensor], Tensor] | None = None) -> Tensor:
    """Path M3 from the components on 2-D x (M, in) (see the module docstring). ``gemm`` is
    the segmented GEMM to use (default: the reference's); the rest is shared by backends."""
    m = x.shape[0]
    c1, k = idx.shape[0], idx.shape[1]
    if m == 0 or labels.shape[0] == 0 or k == 0 or u_t.shape[0] == 0:
        return F.linear(x, w_g, bias)
    gemm = gemm or kind_linear_merged_gemm_ref
    slot_class, class_slot = assign_slots(labels, c1, max_classes)
    n_slots = slot_class.shape[0]
    merged = merge_weights(w_g, u_t, sigma_t, v_t, idx, val, slot_class, dtype=x.dtype)
    weights = torch.cat([merged, w_g[None]], 0)                  # slot S: W_G, for the rest
    sample_slot = class_slot.index_select(0, labels.long())
    rest = sample_slot < 0
    y = gemm(x, weights, bias, torch.where(rest, torch.full_like(sample_slot, n_slots), sample_slot))
    if labels.device.type == "cpu" and not torch.compiler.is_compiling() and not bool(rest.any()):
        return y  # read on the host for free: no sample outside the slots
    return _tailor_term(y, x, u_t, sigma_t, v_t, idx, val, labels, rest)


# =====================================================================================
# Registered ops
# =====================================================================================
@torch.library.custom_op("kind_fast::kind_linear_merged_gemm", mutates_args=())
def _merged_gemm_op(x: Tensor, weights: Tensor, bias: Tensor | None, slots: Tensor) -> Tensor:
    return kind_linear_merged_gemm_ref(x, weights, bias, slots)


def kind_linear_merged_gemm_fake(x, weights, bias, slots):
    """Fake (meta) kernel of every backend's segmented GEMM: y (M, out)."""
    return x.new_empty((x.shape[0], weights.shape[1]))


_merged_gemm_op.register_fake(kind_linear_merged_gemm_fake)


@torch.library.custom_op("kind_fast::kind_linear_merged_gemm_backward", mutates_args=())
def _merged_gemm_backward_op(grad_y: Tensor, x: Tensor, weights: Tensor, slots: Tensor,
                             output_mask: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    return kind_linear_merged_gemm_backward_ref(grad_y, x, weights, slots, output_mask)


def kind_linear_merged_gemm_backward_fake(grad_y, x, weights, slots, output_mask):
    """Fake (meta) kernel of every backend's segmented-GEMM backward."""
    like = (x, weights, weights[0, :, 0])
    return tuple(torch.empty_like(r) if need else x.new_empty(0) for r, need in zip(like, output_mask))


_merged_gemm_backward_op.register_fake(kind_linear_merged_gemm_backward_fake)


def kind_linear_merged_gemm_setup_context(ctx, inputs, output):
    x, weights, bias, slots = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weights, slots)


def make_kind_linear_merged_gemm_backward(backward_op: Callable) -> Callable:
    """The autograd backward of a segmented-GEMM forward op whose gradients ``backward_op`` computes."""

    def _backward(ctx, grad_y):
        x, weights, slots = ctx.saved_tensors
        n = ctx.needs_input_grad
        mask = [n[0], n[1], n[2] and ctx.has_bias]
        if not any(mask):
            return None, None, None, None
        dx, dw, db = backward_op(grad_y.contiguous(), x, weights, slots, mask)
        return (dx if mask[0] else None, dw if mask[1] else None, db if mask[2] else None, None)

    return _backward


_merged_gemm_op.register_autograd(make_kind_linear_merged_gemm_backward(
    torch.ops.kind_fast.kind_linear_merged_gemm_backward), setup_context=kind_linear_merged_gemm_setup_context)


@torch.library.custom_op("kind_fast::kind_linear_merged", mutates_args=())
def _merged_op(x: Tensor, w_g: Tensor, bias: Tensor | None, u_t: Tensor, sigma_t: Tensor, v_t: Tensor,
               idx: Tensor, val: Tensor, labels: Tensor, max_classes: int) -> Tensor:
    return kind_linear_merged_ref(x, w_g, bias, u_t, sigma_t, v_t, idx, val, labels, max_classes)


def kind_linear_merged_fake(x, w_g, bias, u_t, sigma_t, v_t, idx, val, labels, max_classes):
    """Fake (meta) kernel of every backend's whole-path M3 op: y (M, out)."""
    return x.new_empty((x.shape[0], w_g.shape[0]))


_merged_op.register_fake(kind_linear_merged_fake)


# =====================================================================================
# FLOP formulas (FLOPs = 2 × MACs)
# =====================================================================================
def kind_linear_merged_gemm_flops(m: int, n_in: int, n_out: int, output_mask: Sequence[bool] | None = None) -> int:
    """Segmented GEMM: forward when ``output_mask`` is None, else backward for that mask."""
    if output_mask is None:
        return 2 * m * n_in * n_out
    need_dx, need_dw, _ = (bool(v) for v in output_mask)
    return (2 * m * n_in * n_out if need_dx else 0) + (2 * m * n_in * n_out if need_dw else 0)


def kind_linear_merged_flops(m: int, n_in: int, n_out: int, k: int, slots: int) -> int:
    """Whole-path M3: the segmented GEMM plus ``slots`` rank-K merges (the CUDA op's formula)."""
    return 2 * m * n_in * n_out + 2 * slots * n_out * n_in * k


def register_merged_flop_formulas(gemm_op, gemm_backward_op, merged_op=None) -> None:
    """FLOP formulas of a backend's M3 ops (the schemas above)."""

    @register_flop_formula(gemm_op)
    def _(x_shape, weights_shape, *args, **kwargs) -> int:
        return kind_linear_merged_gemm_flops(x_shape[0], x_shape[1], weights_shape[1])

    @register_flop_formula(gemm_backward_op)
    def _(grad_y_shape, x_shape, weights_shape, slots_shape, output_mask, *args, **kwargs) -> int:
        return kind_linear_merged_gemm_flops(x_shape[0], x_shape[1], weights_shape[1], output_mask)

    if merged_op is not None:
        @register_flop_formula(merged_op)
        def _(x_shape, w_g_shape, bias_shape, u_t_shape, sigma_t_shape, v_t_shape, idx_shape, val_shape,
              labels_shape, max_classes, *args, **kwargs) -> int:
            slots = min(max_classes, labels_shape[0], idx_shape[0])
            return kind_linear_merged_flops(x_shape[0], x_shape[1], w_g_shape[0], idx_shape[1], slots)


register_merged_flop_formulas(torch.ops.kind_fast.kind_linear_merged_gemm,
                              torch.ops.kind_fast.kind_linear_merged_gemm_backward,
                              torch.ops.kind_fast.kind_linear_merged)


# =====================================================================================
# Functional
# =====================================================================================
def _check(cond: bool, msg: str, exc: type[Exception] = ValueError) -> None:
    if not cond:
        raise exc(msg)


def _backend_op(device: torch.device, dtype: torch.dtype, attr: str, default: Callable) -> Callable:
    """The resolved backend's M3 op ``attr`` (MERGED_GEMM_OP / MERGED_OP), else the reference's."""
    from kind_fast.ops.backends import backend_module, resolve_backend

    name = resolve_backend(device, dtype)
    if name == "torch":
        return default
    mod, _ = backend_module(name)
    op = getattr(mod, attr, None) if mod is not None else None
    return op if op is not None else default


def check_slots(slots: Tensor, n_slots: int, n_samples: int) -> None:
    """slots: a 1-D integer tensor of ``n_samples`` entries in [0, n_slots). The range is read
    where that is free (CPU) and asserted asynchronously on CUDA outside graph capture."""
    _check(isinstance(slots, Tensor), f"slots must be a torch.Tensor, got {type(slots).__name__}", TypeError)
    _check(slots.dtype in (torch.int32, torch.int64), f"slots must be int32 or int64, got {slots.dtype}", TypeError)
    _check(slots.dim() == 1 and slots.shape[0] == n_samples,
           f"slots must be ({n_samples},) (one slot per sample), got {tuple(slots.shape)}")
    if torch.compiler.is_compiling() or slots.numel() == 0:
        return
    if slots.device.type == "cpu":
        lo, hi = int(slots.min()), int(slots.max())
        _check(lo >= 0 and hi < n_slots, f"slots out of range: got values in [{lo}, {hi}], expected [0, {n_slots})")
    elif slots.device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
        torch._assert_async(((slots >= 0) & (slots < n_slots)).all(), f"slots out of range [0, {n_slots})")


def kind_linear_merged_gemm(x: Tensor, weights: Tensor, bias: Tensor | None, slots: Tensor) -> Tensor:
    """Segmented GEMM over merged slot weights: y[m] = x[m]·weights[slots[m // T]]ᵀ + bias.

    Args:
        x: (B, T, in), (B, in) or (M, in) with M = B·T rows grouped by sample.
        weights: (S, out, in) merged weights (``merge_weights``), x's dtype.
        bias: (out,) or None, x's dtype.
        slots: (B,) int32/int64 slot of each sample, in [0, S): on x's device, or on the CPU
            ("host slots", e.g. from ``kind_fast.ops.paths.host_slots``): the reference and
            backends with ``MERGED_GEMM_HOST_SLOTS`` (CUDA) then plan their GEMMs on the host
            at no cost; other backends get them copied to the device.

    Differentiable in x, weights and bias. Under autocast, x, weights and bias are cast here.
    """
    _check(isinstance(x, Tensor) and isinstance(weights, Tensor), "x and weights must be torch.Tensors", TypeError)
    dev_type = x.device.type
    if torch.is_autocast_enabled(dev_type) and x.is_floating_point():
        dt = torch.get_autocast_dtype(dev_type)
        x, weights = x.to(dt), weights.to(dt)
        bias = bias.to(dt) if isinstance(bias, Tensor) else bias
    _check(x.dtype in SUPPORTED_DTYPES, f"x dtype {x.dtype} is not supported; use one of {SUPPORTED_DTYPES}", TypeError)
    _check(x.dim() >= 1, "x must have at least one dimension (..., in_features)")
    _check(weights.dim() == 3 and weights.shape[2] == x.shape[-1] and weights.shape[0] >= 1,
           f"weights must be (S >= 1, out, {x.shape[-1]}), got {tuple(weights.shape)}")
    _check(weights.dtype == x.dtype, f"weights dtype {weights.dtype} != x dtype {x.dtype}", TypeError)
    n_out = weights.shape[1]
    if bias is not None:
        _check(isinstance(bias, Tensor) and bias.shape == (n_out,) and bias.dtype == x.dtype,
               f"bias must be a ({n_out},) tensor of x's dtype")
    devs = {x.device, weights.device} | ({bias.device} if bias is not None else set())
    _check(len(devs) == 1, f"all tensors must be on one device, got {sorted(map(str, devs | {slots.device}))}")
    host_slots = isinstance(slots, Tensor) and slots.device.type == "cpu" and x.device.type != "cpu"
    _check(not isinstance(slots, Tensor) or slots.device == x.device or host_slots,
           f"slots must be on x's device ({x.device}) or on the CPU (host slots), got {slots.device}")
    n_b = slots.shape[0] if isinstance(slots, Tensor) and slots.dim() == 1 else -1
    check_slots(slots, weights.shape[0], n_b)
    if x.dim() == 3:
        _check(x.shape[0] == n_b, f"x is (B, T, in) with B={x.shape[0]} but slots has {n_b} entries")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    _check(n_b > 0 or x2.shape[0] == 0, "slots is empty but x has rows")
    _check(n_b == 0 or x2.shape[0] % n_b == 0,
           f"x has {x2.shape[0]} rows, not a multiple of the {n_b} samples (rows must be grouped by sample)")
    op = _backend_op(x2.device, x2.dtype, "MERGED_GEMM_OP", torch.ops.kind_fast.kind_linear_merged_gemm)
    if host_slots and op is not torch.ops.kind_fast.kind_linear_merged_gemm and \
            not _backend_op(x2.device, x2.dtype, "MERGED_GEMM_HOST_SLOTS", False):
        slots = slots.to(x2.device)  # this backend's kernel reads the slots on the device
    with torch.autocast(dev_type, enabled=False):
        y = op(x2.contiguous(), weights.contiguous(), bias, slots)
    return y.view(*lead, n_out)


def kind_linear_merged(x: Tensor, w_g: Tensor, bias: Tensor | None, u_t: Tensor, sigma_t: Tensor, v_t: Tensor,
                       idx: Tensor, val: Tensor, labels: Tensor, max_classes: int = 2) -> Tensor:
    """Path M3 from the components: ``kind_linear``'s arguments plus ``max_classes`` (the most
    merged weights; samples of further classes get path M1's answer). Same result as
    ``kind_linear`` up to rounding. Calls that need gradients run ``merge_weights`` and the
    segmented GEMM op under autograd; the others run the backend's whole-path op."""
    from kind_fast.ops.kind_linear import checked_inputs

    _check(isinstance(max_classes, int) and not isinstance(max_classes, bool) and max_classes >= 1,
           f"max_classes must be a positive int, got {max_classes!r}")
    x, w_g, bias, u_t, v_t = checked_inputs(x, w_g, bias, u_t, sigma_t, v_t, idx, val, labels)
    dev_type = x.device.type
    lead = x.shape[:-1]
    n_b = labels.shape[0]
    if x.dim() == 3:
        _check(x.shape[0] == n_b, f"x is (B, T, in) with B={x.shape[0]} but labels has {n_b} entries")
    x2 = x.reshape(-1, x.shape[-1])
    _check(n_b > 0 or x2.shape[0] == 0, "labels is empty but x has rows")
    _check(n_b == 0 or x2.shape[0] % n_b == 0,
           f"x has {x2.shape[0]} rows, not a multiple of the {n_b} samples in labels")
    acc = acc_dtype(x2.dtype)
    needs_grad = torch.is_grad_enabled() and any(
        isinstance(t, Tensor) and t.requires_grad for t in (x, w_g, bias, u_t, sigma_t, v_t, val))
    with torch.autocast(dev_type, enabled=False):
        if needs_grad:
            gemm_op = _backend_op(x2.device, x2.dtype, "MERGED_GEMM_OP", torch.ops.kind_fast.kind_linear_merged_gemm)
            y = kind_linear_merged_ref(x2, w_g, bias, u_t, sigma_t.to(acc), v_t, idx, val.to(acc), labels,
                                       max_classes, gemm=gemm_op)
        else:
            op = _backend_op(x2.device, x2.dtype, "MERGED_OP", torch.ops.kind_fast.kind_linear_merged)
            y = op(x2.contiguous(), w_g.contiguous(), bias, u_t.contiguous(), sigma_t.to(acc), v_t.contiguous(),
                   idx, val.to(acc), labels, max_classes)
    return y.view(*lead, w_g.shape[0])
