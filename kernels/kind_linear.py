"""Triton kernels of the kind_linear op family (path M1), and their launchers.

Math (docs/design.md §2; the derivation is at the top of kind_fast/ops/kind_linear.py). Row m of x
belongs to sample b = m // T of class c = labels[b]; the class switches on K tailors
ids = idx[c, :] with gate values val[c, :], so s[c, k] = σ_T[ids_k] · val[c, k] and

    h[m, k] = x[m] · V_T[ids_k]                                   (the shrink, fp32)
    y[m]    = x[m] · W_Gᵀ + Σ_k (h[m, k] · s[c, k]) · U_T[ids_k] + bias

Backward, with g = dL/dy and dh_s[m, k] = g[m] · U_T[ids_k]:

    dx[m]   = g[m] · W_G + Σ_k (dh_s[m, k] · s[c, k]) · V_T[ids_k]
    dU_T[n] = Σ_m Σ_k [ids_k = n] h[m, k] s[c, k] · g[m]
    dV_T[n] = Σ_m Σ_k [ids_k = n] dh_s[m, k] s[c, k] · x[m]
    ds[b,k] = Σ_{m in b} dh_s[m, k] · h[m, k]
    dσ_T[n] = Σ_b Σ_k [ids_k = n] ds[b, k] · val[c_b, k]      dval[c, k] = σ_T[ids_k] Σ_{b: c_b = c} ds[b, k]

The forward and dx have the same shape, "a dense GEMM plus a gathered, gated rank-K term
whose shrink reads the same rows": out = a·B + ((a·Pᵀ[ids]) ⊙ s)·Q[ids] with (a, B, P, Q) =
(x, W_Gᵀ, V_T, U_T) forward and (g, W_G, U_T, V_T) for dx. One kernel serves both:

``kind_linear_fused_kernel`` (K-fused-P, kernel_design_notes §5.2)
    One program owns one BM-row tile and a group of N-tiles. For its first N-tile the K-loop
    runs two dots per step, acc += a·B and acc_h += a·P[ids]ᵀ, so the rows of `a` come from
    memory once; σ⊙gate is applied to acc_h in fp32, the result is kept in registers (in the
    input dtype, as the reference rounds it) and expanded into every N-tile of the group as
    acc += h_s · Q[ids]. The tile's class is labels[tile_start // T] when T % BM == 0; otherwise
    (ONE_CLASS=False) the tile loops over the samples it touches, ScatterMoE-style, with row
    masks: each sample's tailor rows are gathered and only its rows take part in its dots.
    Group 0 also stores the shrink (h forward, dh_s for dx) and, in the backward, per-tile
    partial sums Σ_rows dh_s ⊙ h per sample (no atomics).

``kind_linear_tailor_grad_kernel``
    dU_T and dV_T: out[n, :] = Σ_m w[m, slot(c, n)] σ_n D[c, n] · z[m, :], a long-K skinny GEMM
    over the rows, with the scattered left operand built on the fly from the (M, K) shrink
    through the per-class slot table (pos) and dense gate (D). Tailor blocks a class does not
    use are skipped, so block gates cost what the K active tailors cost. The reduction over M
    is split over SPLIT programs into fp32 partials summed in a fixed order.

``kind_linear_gate_tables_kernel``, ``kind_linear_sample_ds_kernel``, ``kind_linear_gate_grad_kernel``
    pos/D per class; ds per sample from the tile partials (fixed order); dval per class and
    dσ_T per tailor block by loops over the batch in a fixed order.

Nothing uses atomics, so every gradient is bitwise reproducible for a fixed config; under
``torch.use_deterministic_algorithms(True)`` the pinned configs are used (no autotuning).

Tiles: ``tl.dot`` needs dims >= 16 and ``tl.arange`` powers of two, so K is padded to
KP = next_pow2(max(K, 16)) with masked loads (padded slots load σ = val = 0); KP <= 128 (the
BM×KP shrink accumulator lives in registers). The launchers choose pinned configs from the
bucketed shape; ``KIND_FAST_AUTOTUNE=1`` tunes the fused kernel over a small space instead.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# Whether these kernels were decorated for the interpreter (TRITON_INTERPRET=1 at import
# time): Triton decides at decoration time. kind_fast.ops.kind_linear_triton reloads this
# module when the environment changes, so tests can switch it on in-process.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
MAX_ACTIVE = 128  # largest supported K (padded): the BM×KP fp32 shrink accumulator


# =====================================================================================
# Fused GEMM + gathered gated low-rank term (forward and dx)
# =====================================================================================
# Triton's standard library (tl.sum, tl.max, tl.zeros, tl.cdiv, ...) is decorated when Triton
# is imported, so under an interpreter switched on later it would not run. These kernels use
# only builtins and their own jit functions; reductions go through tl.reduce with the standard
# combine functions, which both the compiler and the interpreter (numpy fast path) recognise.
@triton.jit
def _sum(x, AXIS: tl.constexpr):
    return tl.reduce(x, AXIS, tl.standard._sum_combine)


@triton.jit
def _max(x, AXIS: tl.constexpr):
    return tl.reduce(x, AXIS, tl.standard._elementwise_max)


@triton.jit
def _load_rows(ptr, rm, row_ok, kk, k_ok, s_m, s_k):
    """A (BM, BK) tile of a row-major-ish matrix."""
    return tl.load(ptr + rm[:, None] * s_m + kk[None, :] * s_k,
                   mask=row_ok[:, None] & k_ok[None, :], other=0.0)


@triton.jit
def _load_factor_t(ptr, ids, slot_ok, kk, k_ok, s_r, s_k):
    """(BK, KP) tile of the gathered factor rows, transposed: P[ids[j], kk[i]]."""
    return tl.load(ptr + ids[None, :] * s_r + kk[:, None] * s_k,
                   mask=k_ok[:, None] & slot_ok[None, :], other=0.0)


@triton.jit
def _load_factor(ptr, ids, slot_ok, rn, n_ok, s_r, s_n):
    """(KP, BN) tile of the gathered factor rows: Q[ids[j], rn[i]]."""
    return tl.load(ptr + ids[:, None] * s_r + rn[None, :] * s_n,
                   mask=slot_ok[:, None] & n_ok[None, :], other=0.0)


@triton.jit
def _class_ids(lab_ptr, idx_ptr, sample, rj, slot_ok, K):
    """Active tailor ids (KP,) of ``sample``'s class (padded slots: id 0)."""
    cls = tl.load(lab_ptr + sample)
    return tl.load(idx_ptr + cls * K + rj, mask=slot_ok, other=0)


@triton.jit
def _out_tile(
    acc, hs, n_tile, rm, row_ok, rj, slot_ok, ids, samp, s_lo, s_hi,
    a_ptr, b_ptr, q_ptr, bias_ptr, out_ptr, lab_ptr, idx_ptr,
    M, N, KD, K,
    s_am, s_ak, s_bk, s_bn, s_qr, s_qn, s_om, s_on,
    BN: tl.constexpr, BK: tl.constexpr, BASE_LOOP: tl.constexpr,
    HAS_BIAS: tl.constexpr, ONE_CLASS: tl.constexpr, PREC: tl.constexpr,
):
    """Finish one (BM, BN) output tile: [K-loop a·B when BASE_LOOP] + h_s·Q[ids] + bias, store."""
    rn = n_tile * BN + tl.arange(0, BN)
    n_ok = rn < N
    if BASE_LOOP:
        rk = tl.arange(0, BK)
        for k0 in range(0, KD, BK):
            kk = k0 + rk
            k_ok = kk < KD
            a = _load_rows(a_ptr, rm, row_ok, kk, k_ok, s_am, s_ak)              # (BM, BK)
            b = tl.load(b_ptr + kk[:, None] * s_bk + rn[None, :] * s_bn,
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0)         # (BK, BN)
            acc = tl.dot(a, b, acc, input_precision=PREC)
    # ---- expand: acc += h_s · Q[ids]  (per sample with row masks when the tile mixes classes)
    if ONE_CLASS:
        q = _load_factor(q_ptr, ids, slot_ok, rn, n_ok, s_qr, s_qn)                # (KP, BN)
        acc = tl.dot(hs, q, acc, input_precision=PREC)
    else:
        for s in range(s_lo, s_hi + 1):
            ids_s = _class_ids(lab_ptr, idx_ptr, s, rj, slot_ok, K)
            q = _load_factor(q_ptr, ids_s, slot_ok, rn, n_ok, s_qr, s_qn)
            hs_s = tl.where((samp == s)[:, None], hs, 0.0).to(hs.dtype)
            acc = tl.dot(hs_s, q, acc, input_precision=PREC)
    # ---- epilogue
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * s_om + rn[None, :] * s_on,
             acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def kind_linear_fused_kernel(
    # -- rows: the operand read once, and the outputs
    a_ptr,       # (M, KD)  x (forward) | grad_y (dx)
    out_ptr,     # (M, N)   y | dx
    shr_ptr,     # (M, K)   fp32 shrink out: h = x·V_T[ids]ᵀ | dh_s = g·U_T[ids]ᵀ
    hsv_ptr,     # (M, K)   fp32 saved h (DS_PARTIAL)
    part_ptr,    # (cdiv(M, BM), SPT, KP) fp32 Σ_rows dh_s ⊙ h per (tile, sample) (DS_PARTIAL)
    # -- weights
    b_ptr,       # base weight, read as B[k, n] through (s_bk, s_bn): W_Gᵀ | W_G
    bias_ptr,    # (N,)
    p_ptr,       # (N_T, KD) shrink factor rows: V_T | U_T
    q_ptr,       # (N_T, N)  expand factor rows: U_T | V_T
    sig_ptr,     # (N_T,) fp32 σ_T
    # -- gate and routing
    idx_ptr,     # (C+1, K) active tailor ids (contiguous)
    val_ptr,     # (C+1, K) fp32 gate values (contiguous)
    lab_ptr,     # (B,) class of each sample
    # -- sizes
    M, N, KD, K, T, M_BUCKET,
    # -- strides
    s_am, s_ak, s_om, s_on, s_bk, s_bn, s_pr, s_pk, s_qr, s_qn,
    # -- meta
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, KP: tl.constexpr,
    NG: tl.constexpr,           # N-tile groups per row tile (programs = row tiles × NG)
    SPT: tl.constexpr,          # max samples one row tile touches (1 when ONE_CLASS)
    HAS_BASE: tl.constexpr,     # the dense base GEMM a·B (False: path M2, or shrink only)
    HAS_OUT: tl.constexpr,      # output tiles (False: shrink only, e.g. dh_s for dV_T/dσ)
    HAS_BIAS: tl.constexpr,
    ONE_CLASS: tl.constexpr,    # T % BM == 0: one class per row tile
    WRITE_SHRINK: tl.constexpr,
    DS_PARTIAL: tl.constexpr,
    PREC: tl.constexpr,         # tl.dot input precision ("ieee" for fp32 inputs)
):
    pid = tl.program_id(0)
    pid_m = pid // NG
    grp = pid % NG
    m0 = pid_m * BM
    rm = m0 + tl.arange(0, BM)
    row_ok = rm < M
    rj = tl.arange(0, KP)
    slot_ok = rj < K
    rk = tl.arange(0, BK)

    # ---- routing: the tile's class (ONE_CLASS) or each row's, and σ ⊙ gate per slot (fp32)
    if ONE_CLASS:
        cls = tl.load(lab_ptr + m0 // T)
        ids = tl.load(idx_ptr + cls * K + rj, mask=slot_ok, other=0)                # (KP,)
        gate = tl.load(val_ptr + cls * K + rj, mask=slot_ok, other=0.0)
        scale = (tl.load(sig_ptr + ids) * gate)[None, :]                             # (1, KP)
        samp = rm  # unused
        s_lo = 0
        s_hi = 0
    else:
        samp = tl.minimum(rm, M - 1) // T                                            # (BM,)
        cls_r = tl.load(lab_ptr + samp)
        ids_r = tl.load(idx_ptr + cls_r[:, None] * K + rj[None, :], mask=slot_ok[None, :], other=0)
        gate = tl.load(val_ptr + cls_r[:, None] * K + rj[None, :], mask=slot_ok[None, :], other=0.0)
        scale = tl.load(sig_ptr + ids_r) * gate                                      # (BM, KP)
        ids = rj  # unused
        s_lo = m0 // T
        s_hi = (tl.minimum(m0 + BM, M) - 1) // T

    # ---- N-tiles of this group
    n_tiles = (N + BN - 1) // BN
    per = (n_tiles + NG - 1) // NG
    n_beg = grp * per
    n_end = tl.minimum(n_beg + per, n_tiles)
    rn = n_beg * BN + tl.arange(0, BN)
    n_ok = rn < N

    # ---- first N-tile: one K-loop over the rows, two dots per step (x is read once)
    acc = tl.full((BM, BN), 0.0, tl.float32)
    acc_h = tl.full((BM, KP), 0.0, tl.float32)
    for k0 in range(0, KD, BK):
        kk = k0 + rk
        k_ok = kk < KD
        a = _load_rows(a_ptr, rm, row_ok, kk, k_ok, s_am, s_ak)                      # (BM, BK)
        if HAS_BASE:
            b = tl.load(b_ptr + kk[:, None] * s_bk + rn[None, :] * s_bn,
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0)             # (BK, BN)
            acc = tl.dot(a, b, acc, input_precision=PREC)
        if ONE_CLASS:
            p = _load_factor_t(p_ptr, ids, slot_ok, kk, k_ok, s_pr, s_pk)            # (BK, KP)
            acc_h = tl.dot(a, p, acc_h, input_precision=PREC)
        else:
            for s in range(s_lo, s_hi + 1):
                ids_s = _class_ids(lab_ptr, idx_ptr, s, rj, slot_ok, K)
                p = _load_factor_t(p_ptr, ids_s, slot_ok, kk, k_ok, s_pr, s_pk)
                a_s = tl.where((samp == s)[:, None], a, 0.0).to(a.dtype)
                acc_h = tl.dot(a_s, p, acc_h, input_precision=PREC)

    # ---- group 0 stores the shrink and the per-(tile, sample) partials of Σ dh_s ⊙ h
    if grp == 0:
        shr_mask = row_ok[:, None] & slot_ok[None, :]
        shr_off = rm[:, None] * K + rj[None, :]
        if WRITE_SHRINK:
            tl.store(shr_ptr + shr_off, acc_h, mask=shr_mask)
        if DS_PARTIAL:
            prod = acc_h * tl.load(hsv_ptr + shr_off, mask=shr_mask, other=0.0)       # (BM, KP)
            if ONE_CLASS:
                tl.store(part_ptr + pid_m * KP + rj, _sum(prod, 0))
            else:
                for s in range(s_lo, s_hi + 1):
                    sel = tl.where((samp == s)[:, None], prod, 0.0)
                    tl.store(part_ptr + (pid_m * SPT + s - s_lo) * KP + rj, _sum(sel, 0))

    # ---- expand into every N-tile of the group
    if HAS_OUT:
        hs = (acc_h * scale).to(q_ptr.dtype.element_ty)                              # (BM, KP)
        _out_tile(acc, hs, n_beg, rm, row_ok, rj, slot_ok, ids, samp, s_lo, s_hi,
                  a_ptr, b_ptr, q_ptr, bias_ptr, out_ptr, lab_ptr, idx_ptr, M, N, KD, K,
                  s_am, s_ak, s_bk, s_bn, s_qr, s_qn, s_om, s_on,
                  BN, BK, False, HAS_BIAS, ONE_CLASS, PREC)
        for nt in range(n_beg + 1, n_end):
            acc = tl.full((BM, BN), 0.0, tl.float32)
            _out_tile(acc, hs, nt, rm, row_ok, rj, slot_ok, ids, samp, s_lo, s_hi,
                      a_ptr, b_ptr, q_ptr, bias_ptr, out_ptr, lab_ptr, idx_ptr, M, N, KD, K,
                      s_am, s_ak, s_bk, s_bn, s_qr, s_qn, s_om, s_on,
                      BN, BK, HAS_BASE, HAS_BIAS, ONE_CLASS, PREC)


# =====================================================================================
# dU_T and dV_T: long-K skinny GEMM over the rows, gathered through the slot table
# =====================================================================================
@triton.jit
def _tailor_grad_step(acc, w_ptr, z_ptr, rm, row_ok, ro, o_ok, pos, dg, sig, K, s_zm, s_zo,
                      PREC: tl.constexpr):
    """acc (BT, BO) += (w[rows, slot] · σ · D)ᵀ (BT, BM) · z[rows] (BM, BO)."""
    on = pos >= 0
    wv = tl.load(w_ptr + rm[:, None] * K + tl.where(on, pos, 0),
                 mask=row_ok[:, None] & on, other=0.0)                                 # (BM, BT)
    ws = (wv * (dg * sig[None, :])).to(z_ptr.dtype.element_ty)
    z = tl.load(z_ptr + rm[:, None] * s_zm + ro[None, :] * s_zo,
                mask=row_ok[:, None] & o_ok[None, :], other=0.0)                       # (BM, BO)
    return tl.dot(tl.trans(ws), z, acc, input_precision=PREC)


@triton.jit
def kind_linear_tailor_grad_kernel(
    # -- operands
    w_ptr,       # (M, K) fp32: h (for dU_T) | dh_s (for dV_T), one column per active slot
    z_ptr,       # (M, O): grad_y (dU_T) | x (dV_T)
    out_ptr,     # (N_T, O) gradient when SPLIT == 1, else (SPLIT, N_T, O) fp32 partials
    # -- gate tables and routing
    pos_ptr,     # (C+1, N_T) int32: slot of tailor n in class c's list, -1 when off
    dg_ptr,      # (C+1, N_T) fp32: D[c, n] = Σ_k [idx[c, k] = n] val[c, k]
    sig_ptr,     # (N_T,) fp32 σ_T
    lab_ptr,     # (B,)
    # -- sizes and strides
    M, O, NT, K, T,
    s_zm, s_zo,
    # -- meta
    BM: tl.constexpr, BT: tl.constexpr, BO: tl.constexpr, SPLIT: tl.constexpr,
    ONE_CLASS: tl.constexpr, SKIP: tl.constexpr, PREC: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_o = tl.program_id(1)
    pid_s = tl.program_id(2)
    rt = pid_t * BT + tl.arange(0, BT)
    t_ok = rt < NT
    ro = pid_o * BO + tl.arange(0, BO)
    o_ok = ro < O
    sig = tl.load(sig_ptr + rt, mask=t_ok, other=0.0)                                 # (BT,)
    m_tiles = (M + BM - 1) // BM
    per = (m_tiles + SPLIT - 1) // SPLIT
    mt_beg = pid_s * per
    mt_end = tl.minimum(mt_beg + per, m_tiles)

    acc = tl.full((BT, BO), 0.0, tl.float32)
    for mt in range(mt_beg, mt_end):
        rm = mt * BM + tl.arange(0, BM)
        row_ok = rm < M
        # ---- which of this block's tailors each row's class uses, and at which slot
        if ONE_CLASS:
            cls = tl.load(lab_ptr + (mt * BM) // T)
            pos = tl.load(pos_ptr + cls * NT + rt, mask=t_ok, other=-1)[None, :]      # (1, BT)
            dg = tl.load(dg_ptr + cls * NT + rt, mask=t_ok, other=0.0)[None, :]
        else:
            cls_r = tl.load(lab_ptr + tl.minimum(rm, M - 1) // T)                      # (BM,)
            pos = tl.load(pos_ptr + cls_r[:, None] * NT + rt[None, :], mask=t_ok[None, :], other=-1)
            dg = tl.load(dg_ptr + cls_r[:, None] * NT + rt[None, :], mask=t_ok[None, :], other=0.0)
        if SKIP:
            # blocks no row uses are skipped (block gates: only the class's own block works);
            # the branch keeps the loads out of the software pipeline, so dense gates don't skip
            if _max(_max(pos, 1), 0) >= 0:
                acc = _tailor_grad_step(acc, w_ptr, z_ptr, rm, row_ok, ro, o_ok, pos, dg, sig,
                                        K, s_zm, s_zo, PREC)
        else:
            acc = _tailor_grad_step(acc, w_ptr, z_ptr, rm, row_ok, ro, o_ok, pos, dg, sig,
                                    K, s_zm, s_zo, PREC)

    out_off = rt[:, None] * O + ro[None, :]
    out_mask = t_ok[:, None] & o_ok[None, :]
    if SPLIT == 1:
        tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(out_ptr + pid_s * NT * O + out_off, acc, mask=out_mask)


# =====================================================================================
# Gate tables, per-sample ds, dσ_T and dval (tiny; fixed-order loops, no atomics)
# =====================================================================================
@triton.jit
def kind_linear_gate_tables_kernel(
    idx_ptr, val_ptr,   # (C+1, K)
    pos_ptr, dg_ptr,    # (C+1, N_T) int32 / fp32 outputs
    NT, K,
    KP: tl.constexpr, BT: tl.constexpr,
):
    c = tl.program_id(0)
    rj = tl.arange(0, KP)
    slot_ok = rj < K
    ids = tl.load(idx_ptr + c * K + rj, mask=slot_ok, other=-1)
    val = tl.load(val_ptr + c * K + rj, mask=slot_ok, other=0.0)
    for t0 in range(0, NT, BT):
        rt = t0 + tl.arange(0, BT)
        hit = ids[None, :] == rt[:, None]                                             # (BT, KP)
        dg = _sum(tl.where(hit, val[None, :], 0.0), 1)
        pos = _max(tl.where(hit, rj[None, :], -1), 1)
        tl.store(dg_ptr + c * NT + rt, dg, mask=rt < NT)
        tl.store(pos_ptr + c * NT + rt, pos.to(tl.int32), mask=rt < NT)


@triton.jit
def kind_linear_sample_ds_kernel(
    part_ptr,   # (cdiv(M, BM), SPT, KP) fp32 tile partials of the fused kernel
    ds_ptr,     # (B, KP) fp32 out: ds[b] = Σ_{m in b} dh_s[m] ⊙ h[m]
    T, BM, SPT,
    KP: tl.constexpr,
):
    b = tl.program_id(0)
    rj = tl.arange(0, KP)
    t_beg = (b * T) // BM
    t_end = ((b + 1) * T - 1) // BM
    acc = tl.full((KP,), 0.0, tl.float32)
    for t in range(t_beg, t_end + 1):
        slot = b - (t * BM) // T
        acc += tl.load(part_ptr + (t * SPT + slot) * KP + rj)
    tl.store(ds_ptr + b * KP + rj, acc)


@triton.jit
def kind_linear_gate_grad_kernel(
    ds_ptr,      # (B, KP) fp32
    lab_ptr,     # (B,)
    idx_ptr,     # (C+1, K)
    sig_ptr,     # (N_T,) fp32
    pos_ptr, dg_ptr,   # (C+1, N_T)
    dval_ptr,    # (C+1, K) out
    dsig_ptr,    # (N_T,) out
    B, C1, NT, K,
    KP: tl.constexpr, BB: tl.constexpr, BT: tl.constexpr,
    NEED_DVAL: tl.constexpr, NEED_DSIG: tl.constexpr,
):
    pid = tl.program_id(0)
    rj = tl.arange(0, KP)
    if pid < C1:
        # ---- dval[c, k] = σ_T[idx[c, k]] · Σ_{b: labels[b] = c} ds[b, k]
        if NEED_DVAL:
            acc = tl.full((KP,), 0.0, tl.float32)
            for b0 in range(0, B, BB):
                rb = b0 + tl.arange(0, BB)
                lab = tl.load(lab_ptr + rb, mask=rb < B, other=-1)
                sel = (lab == pid) & (rb < B)
                acc += _sum(tl.load(ds_ptr + rb[:, None] * KP + rj[None, :],
                                      mask=sel[:, None], other=0.0), 0)
            slot_ok = rj < K
            ids = tl.load(idx_ptr + pid * K + rj, mask=slot_ok, other=0)
            tl.store(dval_ptr + pid * K + rj,
                     (acc * tl.load(sig_ptr + ids)).to(dval_ptr.dtype.element_ty), mask=slot_ok)
    else:
        # ---- dσ_T[n] = Σ_b ds[b, slot(c_b, n)] · D[c_b, n]
        if NEED_DSIG:
            rt = (pid - C1) * BT + tl.arange(0, BT)
            t_ok = rt < NT
            acc = tl.full((BT,), 0.0, tl.float32)
            for b0 in range(0, B, BB):
                rb = b0 + tl.arange(0, BB)
                b_ok = rb < B
                cls = tl.load(lab_ptr + rb, mask=b_ok, other=0)
                tab = cls[:, None] * NT + rt[None, :]                                  # (BB, BT)
                ok = b_ok[:, None] & t_ok[None, :]
                pos = tl.load(pos_ptr + tab, mask=ok, other=-1)
                on = pos >= 0
                dg = tl.load(dg_ptr + tab, mask=on, other=0.0)
                d = tl.load(ds_ptr + rb[:, None] * KP + tl.where(on, pos, 0), mask=on, other=0.0)
                acc += _sum(d * dg, 0)
            tl.store(dsig_ptr + rt, acc.to(dsig_ptr.dtype.element_ty), mask=t_ok)


# =====================================================================================
# Configs: pinned defaults from bucketed shapes; KIND_FAST_AUTOTUNE=1 tunes the fused kernel
# =====================================================================================
def padded_active(k: int) -> int:
    """KP: K padded to a power of two >= 16 (tl.dot and tl.arange need it)."""
    return max(16, triton.next_power_of_2(max(k, 1)))


def bucket(n: int) -> int:
    """Autotune key bucket of a row count: the next power of two."""
    return triton.next_power_of_2(max(int(n), 1))


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors (4 under the interpreter, so the split paths get exercised)."""
    if device.type != "cuda":
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def row_tile(t: int, kp: int, interpret: bool) -> tuple[int, bool]:
    """(BM, ONE_CLASS): the largest row tile that divides T (one class per tile), else a
    tile small enough that the per-sample loop of a mixed tile stays short."""
    sizes = (32, 16) if interpret else ((128, 64, 32, 16) if kp <= 64 else (64, 32, 16))
    for bm in sizes:
        if t % bm == 0:
            return bm, True
    for bm in sizes:
        if t >= bm:
            return bm, False
    return 16, False


def samples_per_tile(bm: int, t: int) -> int:
    """Most samples a BM-row window can touch."""
    return (t + bm - 2) // t + 1


def fused_config(m: int, n: int, kd: int, kp: int, t: int, device: torch.device) -> dict:
    """Pinned config of kind_linear_fused_kernel for one shape (bucketed M)."""
    interpret = device.type != "cuda"
    bm, one = row_tile(t, kp, interpret)
    if interpret:
        bn, bk, warps, stages = 32, 32, 4, 1
    else:
        bn = 64 if (n <= 512 or kp >= 128) else 128
        bk = 64 if kd >= 64 else 32
        warps = 8 if bm * bn >= 128 * 128 else 4
        stages = 3
    n_tiles = triton.cdiv(n, bn)
    m_tiles = triton.cdiv(m, bm)
    ng = n_groups(m_tiles, n_tiles, kp / bn, num_sms(device))
    return dict(BM=bm, BN=bn, BK=bk, NG=ng, ONE_CLASS=one, num_warps=warps, num_stages=stages)


def n_groups(m_tiles: int, n_tiles: int, shrink_cost: float, sms: int) -> int:
    """N-tile groups per row tile. Programs = m_tiles·NG, each does ceil(n_tiles/NG) output
    tiles plus one shrink (shrink_cost ≈ KP/BN of a tile). Minimise waves × work per program:
    few groups repeat the shrink less, but too few (or a wave count just past an integer)
    leave SMs idle. Ties go to fewer groups."""
    best, best_t = 1, float("inf")
    for ng in range(1, n_tiles + 1):
        per = triton.cdiv(n_tiles, ng)
        if triton.cdiv(n_tiles, per) != ng:  # would leave an empty group
            continue
        t = triton.cdiv(m_tiles * ng, sms) * (per + shrink_cost)
        if t < best_t - 1e-9:
            best, best_t = ng, t
    return best


def _autotune_enabled(device: torch.device) -> bool:
    return (
        device.type == "cuda"
        and os.environ.get("KIND_FAST_AUTOTUNE", "0") == "1"
        and not torch.are_deterministic_algorithms_enabled()
    )


@functools.lru_cache(maxsize=None)
def _autotuned_fused():
    """kind_linear_fused_kernel under triton.autotune (BM and the flags stay host-chosen)."""
    configs = [
        triton.Config(dict(BN=bn, BK=bk, NG=ng), num_warps=w, num_stages=st)
        for bn in (64, 128, 256) for bk in (32, 64) for ng in (1, 2, 4)
        for w, st in ((4, 3), (8, 3), (8, 4))
        if not (bn == 256 and bk == 64 and st == 4)
    ]

    def prune(configs, named_args, **kwargs):
        kp = named_args.get("KP", kwargs.get("KP", 16))
        n = named_args["N"]
        return [c for c in configs if not (kp >= 128 and c.kwargs["BN"] == 256)
                and triton.cdiv(n, c.kwargs["BN"]) >= c.kwargs["NG"]] or configs[:1]

    return triton.autotune(configs=configs, key=["M_BUCKET", "N", "KD", "KP", "HAS_BASE", "HAS_OUT", "ONE_CLASS"],
                           prune_configs_by={"early_config_prune": prune})(kind_linear_fused_kernel)


# =====================================================================================
# Launchers
# =====================================================================================
def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def fused(
    a: torch.Tensor, base: torch.Tensor | None, base_transposed: bool, bias: torch.Tensor | None,
    p: torch.Tensor, q: torch.Tensor, sigma: torch.Tensor, idx: torch.Tensor, val: torch.Tensor,
    labels: torch.Tensor, *, h_saved: torch.Tensor | None = None, write_shrink: bool = True,
    with_out: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None, dict]:
    """out = a·B + ((a·P[ids]ᵀ) ⊙ s)·Q[ids] + bias, with the shrink returned.

    ``base`` is W_G (out, in); the forward passes ``base_transposed=True`` (B = W_Gᵀ), the
    dx pass False (B = W_G). ``base=None`` drops the dense term (path M2: the learngenes are
    slots of P/Q); ``with_out=False`` runs the shrink only. With ``h_saved`` the per-tile
    partials of Σ dh_s ⊙ h come back too. Returns (out, shrink (M, K) fp32, partials, config).
    """
    m, kd = a.shape
    k = idx.shape[1]
    kp = padded_active(k)
    n = q.shape[1]
    t = m // labels.shape[0]
    dev = a.device
    cfg = fused_config(m, n, kd, kp, t, dev)
    bm = cfg["BM"]
    spt = 1 if cfg["ONE_CLASS"] else samples_per_tile(bm, t)
    m_tiles = triton.cdiv(m, bm)
    has_base = base is not None
    out = torch.empty((m, n), dtype=a.dtype, device=dev) if with_out else None
    shr = torch.empty((m, k), dtype=torch.float32, device=dev)
    part = torch.empty((m_tiles, spt, kp), dtype=torch.float32, device=dev) if h_saved is not None else None
    if has_base:
        s_bk, s_bn = (base.stride(1), base.stride(0)) if base_transposed else (base.stride(0), base.stride(1))
    else:
        s_bk = s_bn = 0
    dummy = shr
    args = (
        a, out if with_out else dummy, shr, h_saved if h_saved is not None else dummy,
        part if part is not None else dummy,
        base if has_base else a, bias if bias is not None else dummy, p, q, sigma, idx, val, labels,
        m, n, kd, k, t, bucket(m),
        a.stride(0), a.stride(1),
        out.stride(0) if with_out else 0, out.stride(1) if with_out else 0,
        s_bk, s_bn, p.stride(0), p.stride(1), q.stride(0), q.stride(1),
    )
    flags = dict(BM=bm, KP=kp, SPT=spt, HAS_BASE=has_base, HAS_OUT=with_out, HAS_BIAS=bias is not None,
                 ONE_CLASS=cfg["ONE_CLASS"], WRITE_SHRINK=write_shrink, DS_PARTIAL=h_saved is not None,
                 PREC=_prec(a.dtype))
    if with_out and _autotune_enabled(dev):
        kernel = _autotuned_fused()
        kernel[lambda meta: (m_tiles * meta["NG"],)](*args, **flags)
    else:
        ng = cfg["NG"] if with_out else 1
        kind_linear_fused_kernel[(m_tiles * ng,)](
            *args, BN=cfg["BN"], BK=cfg["BK"], NG=ng, num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"], **flags)
    return out, shr, part, cfg


def gate_tables(idx: torch.Tensor, val: torch.Tensor, n_t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """pos (C+1, N_T) int32 slot of each tailor per class (-1: off) and D (C+1, N_T) fp32."""
    c1, k = idx.shape
    pos = torch.empty((c1, n_t), dtype=torch.int32, device=idx.device)
    dg = torch.empty((c1, n_t), dtype=torch.float32, device=idx.device)
    kind_linear_gate_tables_kernel[(c1,)](idx, val, pos, dg, n_t, k, KP=padded_active(k),
                                          BT=min(64, padded_active(n_t)))
    return pos, dg


def tailor_grad(
    w: torch.Tensor, z: torch.Tensor, pos: torch.Tensor, dg: torch.Tensor, sigma: torch.Tensor,
    labels: torch.Tensor, n_t: int, out_dtype: torch.dtype,
) -> torch.Tensor:
    """out[n] = Σ_m w[m, slot(c_m, n)] σ_n D[c_m, n] z[m]: dU_T (w = h, z = g) or dV_T (w = dh_s, z = x)."""
    m, o = z.shape
    k = w.shape[1]
    t = m // labels.shape[0]
    dev = z.device
    interpret = dev.type != "cuda"
    bm, one = row_tile(t, padded_active(k), interpret)
    bm = min(bm, 64)
    bt = 32 if interpret else (32 if n_t <= 32 else 64)
    # skip unused tailor blocks only when classes use a small part of the tailors (block gates)
    skip = 2 * k <= n_t
    bo = 32 if interpret else (64 if o <= 512 else 128)
    t_blocks, o_blocks, m_tiles = triton.cdiv(n_t, bt), triton.cdiv(o, bo), triton.cdiv(m, bm)
    split = max(1, min(m_tiles, triton.cdiv(2 * num_sms(dev), t_blocks * o_blocks)))
    split = triton.cdiv(m_tiles, triton.cdiv(m_tiles, split))  # no empty split
    if split == 1:
        out = torch.empty((n_t, o), dtype=out_dtype, device=dev)
    else:
        out = torch.empty((split, n_t, o), dtype=torch.float32, device=dev)
    kind_linear_tailor_grad_kernel[(t_blocks, o_blocks, split)](
        w, z, out, pos, dg, sigma, labels, m, o, n_t, k, t, z.stride(0), z.stride(1),
        BM=bm, BT=bt, BO=bo, SPLIT=split, ONE_CLASS=one, SKIP=skip, PREC=_prec(z.dtype),
        num_warps=4, num_stages=3 if not interpret else 1)
    if split > 1:
        out = out.sum(0).to(out_dtype)  # fixed-order reduction (no atomics)
    return out


def sample_ds(part: torch.Tensor, cfg: dict, m: int, b: int) -> torch.Tensor:
    """(B, KP) fp32 ds per sample from the fused kernel's tile partials, in tile order."""
    kp = part.shape[2]
    ds = torch.empty((b, kp), dtype=torch.float32, device=part.device)
    kind_linear_sample_ds_kernel[(b,)](part, ds, m // b, cfg["BM"], part.shape[1], KP=kp)
    return ds


def gate_grads(
    ds: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor, val: torch.Tensor, sigma: torch.Tensor,
    pos: torch.Tensor, dg: torch.Tensor, need_dval: bool, need_dsig: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dval (C+1, K), dσ_T (N_T,)) from ds, each only when asked for."""
    c1, k = idx.shape
    n_t = sigma.shape[0]
    b = labels.shape[0]
    dval = torch.empty((c1, k), dtype=val.dtype, device=ds.device) if need_dval else None
    dsig = torch.empty((n_t,), dtype=sigma.dtype, device=ds.device) if need_dsig else None
    bt = 32
    kind_linear_gate_grad_kernel[(c1 + triton.cdiv(n_t, bt),)](
        ds, labels, idx, sigma, pos, dg, dval if need_dval else ds, dsig if need_dsig else ds,
        b, c1, n_t, k, KP=ds.shape[1], BB=min(64, triton.next_power_of_2(b)), BT=bt,
        NEED_DVAL=need_dval, NEED_DSIG=need_dsig)
    return dval, dsig


__all__ = [
    "INTERPRETED", "MAX_ACTIVE", "fused", "fused_config", "gate_tables", "tailor_grad",
    "sample_ds", "gate_grads", "padded_active", "bucket", "row_tile", "num_sms",
]
