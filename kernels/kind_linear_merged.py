"""Triton kernels of path M3 of the kind_linear op family (merged per-class weights), and their
launchers.

Math (docs/design.md §2; the derivation is at the top of kind_fast/ops/kind_linear_merged.py).
A batch with S distinct classes has S slots. The caller merged one dense weight per slot,
W[s] = W_G + U_T[ids_c]ᵀ diag(σ_T[ids_c] ⊙ val[c]) V_T[ids_c] (a rank-K update, cached by the
layer), and gives each sample b its slot. With rows grouped by sample (row m belongs to sample
b = m // T) and g = dL/dy:

    y[m]  = x[m] · W[slot_b]ᵀ + bias                        segmented GEMM (forward)
    dx[m] = g[m] · W[slot_b]                                the same GEMM with W instead of Wᵀ
    dW[s] = Σ_{m: slot_b = s} g[m]ᵀ · x[m]                  grouped long-K GEMM over the rows

``kind_linear_merged_gemm_kernel``: out = a · B[slot] (+ bias), B[s][k, n] read through the
    strides (s_bs, s_bk, s_bn): B[s] = W[s]ᵀ for the forward, W[s] for dx. One program computes
    one (BM, BN) output tile. Programs walk the tiles in grouped order (GROUP_M row tiles per
    N band; the plan uses GROUP_M = 1, row-major: a row tile's N-tiles run together and read
    its A block from HBM once), and row tile r runs its K-loop from step (r·ROT) mod steps, so
    rows running together read different parts of the weights, which stay in L2 (the traffic
    model in kind_fast/perf/perfmodel.py chose both); outputs are stored evict-first (no later
    program reads them). When T % BM == 0 (ONE_SLOT) a row tile lies in one sample, hence one
    slot: a plain pipelined K-loop of dots with both operands staged in shared memory (on
    sm_90: 128×128×64 tiles, 8 warps, 4 stages, warpgroup MMA), the same work as F.linear.
    Otherwise the tile loops over the slots its rows use (its smallest to largest slot,
    skipping unused ones), a masked pipelined K-loop each; in a CFG batch (first half class c,
    second half null) only tiles that straddle a slot boundary pay for a second loop.

``kind_linear_merged_dw_kernel``: dW[s] = Σ over the rows of slot s of gᵀ·x, a long-K GEMM
    whose K dimension is slot s's rows. The launcher sorts the samples by slot on the device
    (``slot_runs``: no host synchronisation) and marks the runs of consecutive samples of one
    slot; a run is one contiguous range of rows. One program per (BN × BK tile of dW[s],
    slot s) walks its slot's runs, each with a plain software-pipelined K-loop of BR rows per
    step (asynchronous copies on sm_90; the last chunk of a run masked when BR does not divide
    T, FULL=False). A CFG batch is one run per slot, so each program runs one long loop; no
    slot reads another slot's rows, so all slots together do the work of one dense dW. No
    atomics: the result is bitwise reproducible.

The launch plans (tile sizes, warps, stages) come from kernels/kind_linear_plans.py
(``plan_merged_gemm``, ``plan_merged_dw``); kind_fast/perf/perfmodel.py models the segmented
GEMM's HBM traffic under them. ``meta`` tensors plan for the GPU (kind_fast/perf/replay.py
replays the launchers on them for the static sm_90 audit, kind_fast/perf/audit.py). This module
imports torch, Triton and kind_linear_plans only, nothing of the package.

fp32 accumulation throughout; outputs in the input dtype. Under TRITON_INTERPRET=1 the kernels
run on CPU tensors (fp32/fp16) with small tiles; that is how CI tests them.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kind_fast.kernels.kind_linear_plans import merged_row_tile, plan_merged_dw, plan_merged_gemm, rotation_stride

# Whether these kernels were decorated for the interpreter (TRITON_INTERPRET=1 at import time);
# kind_fast.ops.kind_linear_merged_triton reloads this module when the environment changes.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# Reductions through tl.reduce with the standard combine functions: the standard library's
# tl.min/tl.max were decorated at Triton's import and do not run under an interpreter switched
# on later (see kernels/kind_linear.py).
@triton.jit
def _min(x, AXIS: tl.constexpr):
    return tl.reduce(x, AXIS, tl.standard._elementwise_min)


@triton.jit
def _max(x, AXIS: tl.constexpr):
    return tl.reduce(x, AXIS, tl.standard._elementwise_max)


@triton.jit
def _grouped_tile(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, N tile) of program ``pid`` in grouped order: GROUP_M row tiles per N band."""
    m_tiles = (M + BM - 1) // BM
    n_tiles = (N + BN - 1) // BN
    per_group = GROUP_M * n_tiles
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(m_tiles - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def _k_loop(acc, a_ptr, b_ptr, rm, row_use, rn, n_ok, KD, steps, rho, s_am, s_ak, s_bk, s_bn,
            BK: tl.constexpr, PREC: tl.constexpr):
    """acc += a[rm, :] · B[:, rn] over the whole depth KD, from K-step rho (mod steps); rows
    outside ``row_use`` read 0."""
    rk = tl.arange(0, BK)
    for i in range(0, steps):
        kk = ((rho + i) % steps) * BK + rk
        k_ok = kk < KD
        a = tl.load(a_ptr + rm[:, None] * s_am + kk[None, :] * s_ak,
                    mask=row_use[:, None] & k_ok[None, :], other=0.0)                # (BM, BK)
        b = tl.load(b_ptr + kk[:, None] * s_bk + rn[None, :] * s_bn,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)                    # (BK, BN)
        acc = tl.dot(a, b, acc, input_precision=PREC)
    return acc


@triton.jit
def kind_linear_merged_gemm_kernel(
    a_ptr,       # (M, KD)  x (forward) | grad_y (dx)
    b_ptr,       # slot weights W (S, out, in), read as B[s][k, n] through (s_bs, s_bk, s_bn)
    bias_ptr,    # (N,) (HAS_BIAS)
    slot_ptr,    # (B,) int slot of each sample, in [0, S)
    out_ptr,     # (M, N)   y | dx
    M, N, KD, T,
    ROT,         # K-rotation stride: row tile r starts its K-loop at step (r·ROT) mod steps
    s_am, s_ak, s_bs, s_bk, s_bn, s_om, s_on,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    ONE_SLOT: tl.constexpr,     # T % BM == 0: every row tile lies in one sample
    HAS_BIAS: tl.constexpr,
    PREC: tl.constexpr,         # tl.dot input precision ("ieee" for fp32 inputs)
):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BM, BN, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    row_ok = rm < M
    rn = pid_n * BN + tl.arange(0, BN)
    n_ok = rn < N
    acc = tl.full((BM, BN), 0.0, tl.float32)
    steps = (KD + BK - 1) // BK
    rho = (pid_m * ROT) % steps
    if ONE_SLOT:
        slot = tl.load(slot_ptr + (pid_m * BM) // T).to(tl.int64)
        acc = _k_loop(acc, a_ptr, b_ptr + slot * s_bs, rm, row_ok, rn, n_ok, KD, steps, rho, s_am, s_ak, s_bk, s_bn,
                      BK, PREC)
    else:
        row_slot = tl.load(slot_ptr + tl.minimum(rm, M - 1) // T)                    # (BM,)
        s_lo = _min(tl.where(row_ok, row_slot, 2147483647), 0)
        s_hi = _max(tl.where(row_ok, row_slot, -1), 0)
        for s in range(s_lo, s_hi + 1):
            use = row_ok & (row_slot == s)
            if _max(use.to(tl.int32), 0) > 0:
                acc = _k_loop(acc, a_ptr, b_ptr + s * s_bs, rm, use, rn, n_ok, KD, steps, rho,
                              s_am, s_ak, s_bk, s_bn, BK, PREC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * s_om + rn[None, :] * s_on, acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & n_ok[None, :], eviction_policy="evict_first")


@triton.jit
def kind_linear_merged_dw_kernel(
    g_ptr,       # (M, N)  grad_y
    x_ptr,       # (M, KD) x
    order_ptr,   # (B,) int32: the samples sorted by slot (stable: batch order within a slot)
    run_ptr,     # (B,) int32: at the first sorted position of a run of consecutive samples, its length
    start_ptr,   # (S + 1,) int32: slot s's samples are order[start[s]:start[s + 1]]
    dw_ptr,      # (S, N, KD) dW
    N, KD, T,
    s_gm, s_gn, s_xm, s_xk, s_ws, s_wn, s_wk,
    BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
    FULL: tl.constexpr,         # T % BR == 0: no row chunk crosses the end of a run
    PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    s = tl.program_id(1)
    k_tiles = (KD + BK - 1) // BK
    rn = (pid // k_tiles) * BN + tl.arange(0, BN)
    rk = (pid % k_tiles) * BK + tl.arange(0, BK)
    n_ok = rn < N
    k_ok = rk < KD
    rr = tl.arange(0, BR)
    acc = tl.full((BN, BK), 0.0, tl.float32)
    for i in range(tl.load(start_ptr + s), tl.load(start_ptr + s + 1)):
        # a run of consecutive samples of slot s is one contiguous row range [row0, row1)
        # (zero rows at sorted positions inside a run): the K-loop is a plain pipelined loop
        row0 = tl.load(order_ptr + i) * T
        row1 = row0 + tl.load(run_ptr + i) * T
        for r0 in range(row0, row1, BR):
            rows = r0 + rr
            if FULL:
                g = tl.load(g_ptr + rows[None, :] * s_gm + rn[:, None] * s_gn, mask=n_ok[:, None], other=0.0)
                x = tl.load(x_ptr + rows[:, None] * s_xm + rk[None, :] * s_xk, mask=k_ok[None, :], other=0.0)
            else:
                r_ok = rows < row1
                g = tl.load(g_ptr + rows[None, :] * s_gm + rn[:, None] * s_gn,
                            mask=n_ok[:, None] & r_ok[None, :], other=0.0)            # (BN, BR) = gᵀ
                x = tl.load(x_ptr + rows[:, None] * s_xm + rk[None, :] * s_xk,
                            mask=r_ok[:, None] & k_ok[None, :], other=0.0)            # (BR, BK)
            acc = tl.dot(g, x, acc, input_precision=PREC)
    tl.store(dw_ptr + s.to(tl.int64) * s_ws + rn[:, None] * s_wn + rk[None, :] * s_wk,
             acc.to(dw_ptr.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])


# =====================================================================================
# Configs and launchers
# =====================================================================================
def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _interpret(device: torch.device) -> bool:
    """Small interpreter tiles off the GPU; ``meta`` tensors plan for the GPU (the audit)."""
    return device.type not in ("cuda", "meta")


def row_tile(t: int, interpret: bool) -> tuple[int, bool]:
    """(BM, ONE_SLOT) of the segmented GEMM (kind_linear_plans.merged_row_tile)."""
    return merged_row_tile(t, interpret)


def gemm_config(m: int, n: int, kd: int, t: int, device: torch.device) -> dict:
    """Pinned config of the segmented GEMM for one shape (kind_linear_plans.plan_merged_gemm)."""
    p = plan_merged_gemm(m, n, kd, t, interpret=_interpret(device))
    return dict(BM=p.BM, BN=p.BN, BK=p.BK, GROUP_M=p.GROUP_M, ONE_SLOT=p.ONE_SLOT, num_warps=p.num_warps,
                num_stages=p.num_stages, ROT=rotation_stride(triton.cdiv(kd, p.BK)) if p.ROTATE else 0)


def dw_config(n: int, kd: int, t: int, device: torch.device) -> dict:
    """Pinned config of the dW kernel for one shape (kind_linear_plans.plan_merged_dw)."""
    p = plan_merged_dw(n, kd, t, interpret=_interpret(device))
    return dict(BN=p.BN, BK=p.BK, BR=p.BR, FULL=p.FULL, num_warps=p.num_warps, num_stages=p.num_stages)


def merged_gemm(a: torch.Tensor, weights: torch.Tensor, bias: torch.Tensor | None, slots: torch.Tensor,
                transpose: bool) -> torch.Tensor:
    """out (M, N) = a[m] · W[slot]ᵀ (``transpose``: forward, N = out) or a[m] · W[slot] (dx, N = in),
    plus bias. a (M, KD) contiguous, weights (S, out, in), slots (B,)."""
    m, kd = a.shape
    t = m // slots.shape[0]
    if transpose:  # B[s][k, n] = W[s, n, k]
        n, s_bk, s_bn = weights.shape[1], weights.stride(2), weights.stride(1)
    else:          # B[s][k, n] = W[s, k, n]
        n, s_bk, s_bn = weights.shape[2], weights.stride(1), weights.stride(2)
    out = torch.empty((m, n), dtype=a.dtype, device=a.device)
    cfg = gemm_config(m, n, kd, t, a.device)
    grid = (triton.cdiv(m, cfg["BM"]) * triton.cdiv(n, cfg["BN"]),)
    kind_linear_merged_gemm_kernel[grid](
        a, weights, bias if bias is not None else out, slots, out, m, n, kd, t, cfg["ROT"],
        a.stride(0), a.stride(1), weights.stride(0), s_bk, s_bn, out.stride(0), out.stride(1),
        BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], GROUP_M=cfg["GROUP_M"], ONE_SLOT=cfg["ONE_SLOT"],
        HAS_BIAS=bias is not None, PREC=_prec(a.dtype), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def slot_runs(slots: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(order, run, start) on the device, no host synchronisation. ``order`` (B,) the samples
    sorted by slot (stable: batch order within a slot); ``run`` (B,) at the sorted position
    where a run of consecutive samples of one slot begins, the run's length, else 0;
    ``start`` (S + 1,) with slot s's samples at order[start[s]:start[s + 1]]. All int32.
    Slots must be in [0, S). A CFG batch (halves of one slot each) is one run per slot."""
    b = slots.shape[0]
    ranked, order = torch.sort(slots, stable=True)
    new = torch.ones(b, dtype=torch.bool, device=slots.device)
    new[1:] = (order[1:] != order[:-1] + 1) | (ranked[1:] != ranked[:-1])
    pos = torch.arange(b, device=slots.device)
    # the next run start after each position: a suffix minimum of the start positions
    nxt = torch.full((b + 1,), b, dtype=pos.dtype, device=slots.device)
    nxt[:b] = torch.where(new, pos, b).flip(0).cummin(0).values.flip(0)
    run = torch.where(new, nxt[1:] - pos, 0)
    bounds = torch.arange(num_slots + 1, device=slots.device, dtype=ranked.dtype)
    return (order.to(torch.int32), run.to(torch.int32),
            torch.searchsorted(ranked, bounds, out_int32=True))


def merged_dw(g: torch.Tensor, x: torch.Tensor, slots: torch.Tensor, num_slots: int,
              dtype: torch.dtype) -> torch.Tensor:
    """dW (S, out, in) in ``dtype``: dW[s] = Σ over rows of slot s of gᵀ·x. g (M, out), x (M, in)."""
    m, n = g.shape
    kd = x.shape[1]
    t = m // slots.shape[0]
    dw = torch.empty((num_slots, n, kd), dtype=dtype, device=g.device)
    order, run, start = slot_runs(slots, num_slots)
    cfg = dw_config(n, kd, t, g.device)
    grid = (triton.cdiv(n, cfg["BN"]) * triton.cdiv(kd, cfg["BK"]), num_slots)
    kind_linear_merged_dw_kernel[grid](
        g, x, order, run, start, dw, n, kd, t,
        g.stride(0), g.stride(1), x.stride(0), x.stride(1), dw.stride(0), dw.stride(1), dw.stride(2),
        BN=cfg["BN"], BK=cfg["BK"], BR=cfg["BR"], FULL=cfg["FULL"], PREC=_prec(g.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return dw


__all__ = [
    "INTERPRETED", "kind_linear_merged_gemm_kernel", "kind_linear_merged_dw_kernel", "merged_gemm", "merged_dw",
    "gemm_config", "dw_config", "row_tile", "slot_runs",
]
