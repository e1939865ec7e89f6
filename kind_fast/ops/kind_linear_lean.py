"""Path M5: the lean CPU path of kind_linear, for one KIND layer or a group reading one x.

Math (docs/design.md §1-2). G layers i = 1..G read the same rows x (M = B·T, in); layer i has a
learngene weight W_i (out_i, in), tailors U_i (N_T, out_i), σ_i (N_T), V_i (N_T, in) and one
shared gate (idx, val). With s_i[b, j] = σ_i[j]·G[c_b, j] (c_b: sample b's class):

    y_i = x·W_iᵀ + b_i + ((x·V_iᵀ) ⊙ s_i)·U_i                          (rows of sample b use s_i[b])

Forward and backward are written by hand (one ``torch.autograd.Function``, no autograd graph of
small ops, no registered-op dispatch): the G dense terms are ONE GEMM against the concatenated
W = [W_1; ...; W_G] (what a dense fused qkv layer costs), dx = g·W is one GEMM, and the tailor
term touches only the tailors the batch's classes switch on, in one of two plans:

* ``"union"`` (few rows per sample, e.g. the demo's 16 tokens): R = the union of the active
  tailors of the classes present in the batch (read on the host from CPU labels, once per labels
  tensor). The shrink is one GEMM hᵀ = V_R·xᵀ (G·R, M) for all layers, stored component-major
  (R rows × M columns: skinny GEMMs run 2x faster this way round on the CPU than as (M, R)); a
  tailor of the union that a sample's class does not use gets gate value 0 for that sample.
* ``"sample"`` (many rows per sample, e.g. DiT's 256 tokens): each sample's K active tailors are
  gathered ((B, K, in) and (B, K, out), small next to x) and the tailor term runs as batched GEMMs,
  exactly K tailors per row.

Backward (g_i = dL/dy_i, dh_i = (g_i·U_iᵀ) ⊙ s_i):

    dx   = g·W + Σ_i dh_i·V_i            dV_i = dh_iᵀ·x (one GEMM for every layer)
    dU_i = (h_i ⊙ s_i)ᵀ·g_i              dσ_i[j] = Σ_b G[c_b, j]·Σ_{rows of b} (g_i·U_iᵀ)[·, j]·h_i[·, j]
    dW   = gᵀ·x (only when the learngenes train)      db = Σ_rows g

Scattered to the N_T rows of each tailor (tailors outside the batch's classes get zero). Gate
values must be fixed (a trainable gate runs the other paths, which also differentiate ``val``).
σ and gate values are applied in float32 (float64 for float64 inputs), as in the reference.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

from kind_fast.ops.kind_linear import acc_dtype
from kind_fast.ops.labels import LabelsMemo

__all__ = ["LeanPlan", "lean_plan", "kind_linear_lean"]


class LeanPlan:
    """How the tailor term of one batch runs on path M5 (one object per labels tensor and gate,
    shared by every layer of a model).

    ``kind``: "union", "sample" or "none" (no tailor is on in the batch). ``b``: samples (each
    owns M/B consecutive rows); ``rank``: R (union) or K (sample), the tailors per row the tailor
    GEMMs carry. Union: the tailor ids are ``cols`` (R,) int64, or the range [``lo``, ``lo`` + R) when
    they are contiguous (``cols`` None: slices instead of gathers); ``gate`` (R, B) holds each
    union tailor's gate value for each sample (0 where the sample's class does not use it), in
    the accumulation dtype. Sample: ``ids`` (B, K) int64 active tailor ids, ``gate`` (B, K)."""

    __slots__ = ("kind", "b", "rank", "cols", "lo", "ids", "gate", "_tiled", "_rows")

    def __init__(self, kind: str, b: int, rank: int, *, cols: Tensor | None = None, lo: int = 0,
                 ids: Tensor | None = None, gate: Tensor | None = None):
        self.kind, self.b, self.rank = kind, b, rank
        self.cols, self.lo, self.ids, self.gate = cols, lo, ids, gate
        self._tiled: dict[int, Tensor] = {}
        self._rows: dict[tuple[int, int], Tensor] = {}

    def gate_for(self, groups: int) -> Tensor:
        """The union gate (R, B) repeated for ``groups`` layers: (groups·R, B)."""
        if groups == 1:
            return self.gate
        hit = self._tiled.get(groups)
        if hit is None:
            hit = self._tiled[groups] = self.gate.repeat(groups, 1)
        return hit

    def gate_rows(self, groups: int, t: int) -> Tensor:
        """The union gate per row: (groups·R, B·t), each sample's value repeated over its t rows
        (built once per plan, groups and t)."""
        hit = self._rows.get((groups, t))
        if hit is None:
            hit = self._rows[(groups, t)] = self.gate_for(groups).repeat_interleave(t, dim=1)
        return hit

    def rows(self, p: Tensor) -> Tensor:
        """The union's rows of a component-major tailor tensor (N_T, ...) (a view when contiguous)."""
        return p.narrow(0, self.lo, self.rank) if self.cols is None else p.index_select(0, self.cols)

    def scatter(self, grad: Tensor, n_t: int, dim: int = 0) -> Tensor:
        """(..., R, ...) gradient rows along ``dim`` placed at the union's tailor ids of zeros (n_t)."""
        r = self.rank
        if self.cols is None:
            if r == n_t:
                return grad
            pad = [0, 0] * (grad.dim() - 1 - dim) + [self.lo, n_t - self.lo - r]
            return F.pad(grad, pad)
        shape = list(grad.shape)
        shape[dim] = n_t
        return grad.new_zeros(shape).index_copy_(dim, self.cols, grad)


# the plans of the last labels tensor and gate: (weakref idx, weakref val, {kind: plan})
_PLANS = LabelsMemo()


def lean_plan(labels: Tensor, idx: Tensor, val: Tensor, classes: tuple[int, ...], kind: str) -> LeanPlan:
    """The ``kind`` ("union" or "sample") plan of a batch: CPU ``labels``, ``classes`` their
    distinct values (sorted), the gate's compiled (idx, val). Built once per labels tensor, gate
    and kind: every layer of a model gets the same object."""
    if val.is_inference():  # no version counter: built every call
        plans: dict = {}
    else:  # the labels unchanged (kind_fast.ops.labels: object, version and values) and the same gate
        key = (id(idx), id(val), val._version)
        plans = _PLANS.get(labels, key)
        if plans is None or plans[0]() is not idx or plans[1]() is not val:
            plans = _PLANS.put(labels, (weakref.ref(idx), weakref.ref(val), {}), key)
        plans = plans[2]
    hit = plans.get(kind)
    if hit is not None:
        return hit
    acc = acc_dtype(val.dtype)
    b = labels.shape[0]
    lab = labels.long()
    with torch.no_grad():
        val_a = val.detach().to(acc)
        if kind == "sample":
            plan = LeanPlan("sample", b, idx.shape[1], ids=idx.index_select(0, lab).long(),
                            gate=val_a.index_select(0, lab))
        else:
            rows = list(classes)
            cols = torch.unique(idx[rows].long()[val_a[rows] != 0])  # sorted
            r = cols.numel()
            if r == 0:
                plan = LeanPlan("none", b, 0)
            else:
                n = int(idx.max()) + 1
                dense = torch.zeros(idx.shape[0], n, dtype=acc).scatter_add_(1, idx.long(), val_a)
                gate = dense.index_select(1, cols).index_select(0, lab).t().contiguous()  # (R, B)
                lo = int(cols[0])
                contiguous = int(cols[-1]) - lo + 1 == r
                plan = LeanPlan("union", b, r, cols=None if contiguous else cols, lo=lo, gate=gate)
    plans[kind] = plan
    return plan


class _LeanKindLinear(torch.autograd.Function):
    """y (M, Σout) = x·Wᵀ + b + the tailor terms of G layers; inputs after ``plan``:
    x (M, in), w (Σout, in), bias (Σout,) or None, then (u_i, sigma_i, v_i) per layer."""

    @staticmethod
    def forward(ctx, plan: LeanPlan, x: Tensor, w: Tensor, bias: Tensor | None, *tailors: Tensor) -> Tensor:
        y = torch.addmm(bias, x, w.t()) if bias is not None else torch.mm(x, w.t())
        ctx.plan, ctx.has_bias = plan, bias is not None
        kind = plan.kind
        if kind == "none":
            ctx.save_for_backward(x, w, *tailors)
            return y
        us, sigmas, vs = tailors[0::3], tailors[1::3], tailors[2::3]
        g_n = len(us)
        dt = x.dtype
        acc = torch.float64 if dt == torch.float64 else torch.float32
        b = plan.b
        t = x.shape[0] // b
        if kind == "union":
            # per row m and union tailor r: g[r, m] the sample's gate value, S = σ_r·g[r, m];
            # hᵀ = V_R·xᵀ (G·R, M), hg = hᵀ ⊙ g (for dσ), hs = hᵀ ⊙ S (the expand's input)
            rows = plan.rows
            if g_n == 1:
                vr, sr = rows(vs[0]), rows(sigmas[0])
            else:
                vr, sr = torch.cat([rows(v) for v in vs]), torch.cat([rows(s) for s in sigmas])
            gr = plan.gate_rows(g_n, t)                                                   # (G·R, M), acc
            s_full = gr * sr.to(acc)[:, None]
            ht = torch.mm(vr, x.t())                                                      # (G·R, M)
            if dt == acc:
                hg, hs = ht * gr, ht * s_full
            else:
                ha = ht.to(acc)
                hg, hs = ha * gr, (ha * s_full).to(dt)
            if g_n == 1:
                ur = rows(us[0])
                y.addmm_(hs.t(), ur)
                ctx.save_for_backward(x, w, hg, hs, s_full, vr, ur)
            else:
                r, o = plan.rank, 0
                urs = []
                for i, u in enumerate(us):
                    ur = rows(u)
                    n_o = ur.shape[1]
                    y[:, o:o + n_o].addmm_(hs[i * r:(i + 1) * r].t(), ur)
                    o += n_o
                    urs.append(ur)
                ctx.save_for_backward(x, w, hg, hs, s_full, vr, *urs)
            ctx.shapes = [(u.shape, u.dtype, sg.dtype, v.dtype) for u, sg, v in zip(us, sigmas, vs)]
            return y
        # sample plan: each sample's K active tailors gathered, batched GEMMs
        ids, k = plan.ids, plan.rank
        xb = x.view(b, t, x.shape[1])
        vg = vs[0][ids] if g_n == 1 else torch.cat([v[ids] for v in vs], 1)          # (B, G·K, in)
        sg = sigmas[0].to(acc)[ids] if g_n == 1 else torch.cat([sg.to(acc)[ids] for sg in sigmas], 1)
        s = sg * (plan.gate if g_n == 1 else plan.gate.repeat(1, g_n))                # (B, G·K)
        h = torch.bmm(xb, vg.transpose(1, 2))                                        # (B, T, G·K)
        hs = h * s[:, None, :] if dt == acc else (h.to(acc) * s[:, None, :]).to(dt)
        yb = y.view(b, t, y.shape[1])
        ugs = []
        if g_n == 1:
            ug = us[0][ids]                                                          # (B, K, out)
            yb.baddbmm_(hs, ug)
            ugs.append(ug)
        else:
            o = 0
            for i, u in enumerate(us):
                ug = u[ids]
                n_o = ug.shape[2]
                yb[:, :, o:o + n_o] += torch.bmm(hs[:, :, i * k:(i + 1) * k], ug)
                o += n_o
                ugs.append(ug)
        ctx.save_for_backward(x, w, h, hs, s, vg, *ugs)
        ctx.shapes = [(u.shape, u.dtype, sg.dtype, v.dtype) for u, sg, v in zip(us, sigmas, vs)]
        return y

    @staticmethod
    def backward(ctx, g: Tensor):
        plan = ctx.plan
        need = ctx.needs_input_grad
        g = g.contiguous()
        kind = plan.kind
        saved = ctx.saved_tensors
        x, w = saved[0], saved[1]
        dx = torch.mm(g, w) if need[1] else None
        dw = torch.mm(g.t(), x) if need[2] else None
        db = g.sum(0) if (need[3] and ctx.has_bias) else None
        if kind == "none":
            tailors = saved[2:]
            return (None, dx, dw, db, *(torch.zeros_like(p) if n else None for p, n in zip(tailors, need[4:])))
        shapes = ctx.shapes
        g_n = len(shapes)
        n_t = shapes[0][0][0]
        need_u, need_s, need_v = any(need[4::3]), any(need[5::3]), any(need[6::3])
        dt = x.dtype
        acc = torch.float64 if dt == torch.float64 else torch.float32
        b = plan.b
        t = x.shape[0] // b
        grads: list = [None] * (3 * g_n)
        if kind == "union":
            hg, hs, s_full, vr = saved[2:6]
            urs = saved[6:6 + g_n]
            r = plan.rank
            if g_n == 1:
                dhs = torch.mm(urs[0], g.t())                                             # (R, M)
            else:
                dhs = torch.empty(g_n * r, g.shape[0], dtype=dt)
                o = 0
                for i, ur in enumerate(urs):
                    n_o = ur.shape[1]
                    torch.mm(ur, g[:, o:o + n_o].t(), out=dhs[i * r:(i + 1) * r])
                    o += n_o
            if need[1] or need_v:
                dh = dhs * s_full if dt == acc else (dhs.to(acc) * s_full).to(dt)
                if need[1]:
                    dx.addmm_(dh.t(), vr)
                if need_v:
                    dv = plan.scatter(torch.mm(dh, x).view(g_n, r, -1), n_t, 1)          # (G, N_T, in)
                    for i in range(g_n):
                        grads[3 * i + 2] = dv[i] if dv.dtype == shapes[i][3] else dv[i].to(shapes[i][3])
            if need_s:
                ds = torch.linalg.vecdot(dhs.to(acc) if dt != acc else dhs, hg)           # (G·R,)
                ds = plan.scatter(ds.view(g_n, r), n_t, 1)                              # (G, N_T)
                for i in range(g_n):
                    grads[3 * i + 1] = ds[i] if ds.dtype == shapes[i][2] else ds[i].to(shapes[i][2])
            if need_u:
                o = 0
                for i, ur in enumerate(urs):
                    n_o = ur.shape[1]
                    if need[4 + 3 * i]:
                        gi = g if g_n == 1 else g[:, o:o + n_o]
                        grads[3 * i] = plan.scatter(torch.mm(hs[i * r:(i + 1) * r], gi), n_t)
                    o += n_o
            return (None, dx, dw, db, *grads)
        # sample plan
        h, hs, s, vg = saved[2:6]
        ugs = saved[6:6 + g_n]
        ids, k = plan.ids, plan.rank
        flat = ids.reshape(-1)
        gb = g.view(b, t, g.shape[1])
        need_dhs = need[1] or need_v or need_s
        if need_dhs:
            if g_n == 1:
                dhs = torch.bmm(gb, ugs[0].transpose(1, 2))                             # (B, T, K)
            else:
                parts, o = [], 0
                for ug in ugs:
                    n_o = ug.shape[2]
                    parts.append(torch.bmm(gb[:, :, o:o + n_o], ug.transpose(1, 2)))
                    o += n_o
                dhs = torch.cat(parts, 2)                                              # (B, T, G·K)
        if need[1] or need_v:
            dh = dhs * s[:, None, :] if dt == acc else (dhs.to(acc) * s[:, None, :]).to(dt)
            if need[1]:
                dx.view(b, t, -1).baddbmm_(dh, vg)
            if need_v:
                dvg = torch.bmm(dh.transpose(1, 2), x.view(b, t, -1))               # (B, G·K, in)
        if need_s:
            prod = dhs * h if dt == acc else dhs.to(acc) * h.to(acc)
            ds = prod.sum(1) * (plan.gate if g_n == 1 else plan.gate.repeat(1, g_n))  # (B, G·K)
        o = 0
        for i in range(g_n):
            sl = slice(i * k, (i + 1) * k)
            n_o = ugs[i].shape[2]
            if need[4 + 3 * i]:
                dug = torch.bmm(hs[:, :, sl].transpose(1, 2), gb[:, :, o:o + n_o])     # (B, K, out_i)
                grads[3 * i] = torch.zeros(n_t, n_o, dtype=acc).index_add_(
                    0, flat, dug.reshape(-1, n_o).to(acc)).to(shapes[i][1])
            if need[5 + 3 * i]:
                grads[3 * i + 1] = torch.zeros(n_t, dtype=acc).index_add_(
                    0, flat, ds[:, sl].reshape(-1)).to(shapes[i][2])
            if need[6 + 3 * i]:
                grads[3 * i + 2] = torch.zeros(n_t, x.shape[1], dtype=acc).index_add_(
                    0, flat, dvg[:, sl].reshape(-1, x.shape[1]).to(acc)).to(shapes[i][3])
            o += n_o
        return (None, dx, dw, db, *grads)


def kind_linear_lean(x2: Tensor, w: Tensor, bias: Tensor | None, tailors, plan: LeanPlan) -> Tensor:
    """Path M5 on 2-D rows x2 (M, in) grouped by sample: ``w`` the (concatenated) learngene
    weights (Σout, in), ``bias`` (Σout,) or None, ``tailors`` a sequence of (u_t, sigma_t, v_t)
    per layer, ``plan`` from ``lean_plan``. Returns y (M, Σout); layer i's output is the column
    block of its out_features."""
    flat = [p for triple in tailors for p in triple]
    return _LeanKindLinear.apply(plan, x2, w, bias, *flat)
