"""Triton kernels of the kind_linear op family (paths M1 and M2), and their launchers.

Math (docs/design.md §2; the derivation is at the top of kind_fast/ops/kind_linear.py). Row m
of x belongs to sample b = m // T of class c = labels[b]; the class switches on K tailors
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
(x, W_Gᵀ, V_T, U_T) forward and (g, W_G, U_T, V_T) for dx.

``kind_linear_fused_kernel`` (path M1: forward and dx; a persistent grid over output tiles)
    The programs are the output tiles of the row tiles in row-major order; a persistent grid
    of SMs × CTAs/SM CTAs takes them one after another from a counter on the device (the next
    one fetched while the current one runs), so they start in launch order. The shrink of a
    row tile needs the whole row block of ``a``; every output tile of the row needs the shrink
    before its epilogue. A row's programs run together, stream the same row block at the same
    time and it comes from HBM once (kind_fast/perf/perfmodel.py models the L2). ``a`` and W_G are
    read through TMA descriptors (when their strides allow; else pointer loads), the gathered
    factor rows through asynchronous copies. Tile 0 of the row runs as G *owner* sub-tiles of
    BN/G columns; owner g's K-loop runs a second, narrow dot on the very tiles of ``a`` its
    main dot loads, ``part += a·P[ids_g]ᵀ`` for KP/NSH shrink columns (the first NSH owners),
    so an owner does (BN/G + KP/NSH)/BN <= 3/4 of a tile's work: it stores its part of h into
    the shrink output, publishes it (its flag := the launch's epoch, release) and finishes
    well before the row's other tiles reach their epilogue. There every program reads the
    row's flags (acquire); while a part is missing it reads them again for at most SPIN_NS
    nanoseconds of the GPU clock, then recomputes the part into its own scratch (the owner's
    K-steps in the owner's order: bitwise its value), never where the owner stores; it
    assembles h from the published and recomputed parts, applies σ ⊙ gate in fp32, casts to
    the input dtype as the reference rounds it, and adds h_s · Q[ids] and the bias (Q, bias
    and gate loaded before the K-loop). Owner 0 also stores the per-tile partial sums
    Σ_rows dh_s ⊙ h for ds (no atomics). Every program of row r starts its K-loop at step
    (r·ROT) mod steps, so rows running together read different parts of the weight and it
    stays in L2 even in lock-step waves. The tile's class is labels[tile_start // T] when
    T % BM == 0; otherwise (ONE_CLASS=False) the tile handles each sample it touches with row
    masks (SPT samples at most, unrolled).

    Launch state lives on the device and needs no memset: the flags hold the epoch of the
    launch that published (a launch publishes with the last launch's epoch + 1, so a stale
    flag never matches); the launch's last CTA to finish advances the epoch and resets the
    program counter (``device_state``). A CUDA graph replays the same kernels and they read
    the state as it is then.

    dx pass with the tailor-gradient partials (``fused_dx``; one-class tiles, KP <= 64): the
    owners also compute, on each K-step's tile of g already on chip, the dU_T slot partial
    (h ⊙ s')ᵀ · g for their slot columns and store it; every program, after storing its dx
    tile, loads the matching x tile and stores the dV_T slot partial (dh_s ⊙ s')ᵀ · x (x is
    read once). s' folds duplicate tailor ids into the first slot holding the tailor.

``kind_linear_tailor_reduce_kernel`` (path M1 backward, after ``fused_dx``)
    dU_T and dV_T: per (tailor block, column block, split) the gathered sum over the split's
    row tiles of the partial row of the first slot holding each tailor; splits added in
    order by the last program to arrive (an integer counter that it resets); dval and dσ_T
    from the ds partials, by programs that walk the batch in order. One launch: a transfer
    backward is two launches (this and ``fused_dx``), a pretrain backward four (+ dW_G, db).

``kind_linear_rows_kernel`` (path M2, and the shrink alone)
    Without a dense term the shrink is the main work: one program owns a row tile and a
    group of its N-tiles, computes the shrink once and expands it into every tile of the
    group with h_s held in registers.

``kind_linear_tailor_grad_kernel`` (the backward where ``fused_dx`` does not apply: tiles mixing
    samples, path M2, no dx, KP = 128)
    dU_T and dV_T: out[n, :] = Σ_m w[m, slot(c, n)] σ_n D[c, n] · z[m, :], a long-K skinny GEMM
    over the rows, with the scattered left operand built on the fly from the (M, K) shrink
    through the per-class slot table (pos) and dense gate (D). Each tailor block walks a list
    of row tiles: with block gates (2K <= N_T) the compacted list of the tiles whose classes
    use the block (built on the device, in tile order), so block gates cost what the K active
    tailors cost; with dense gates every tile. Either way the loop is one software-pipelined
    loop (the list entry is loaded a few iterations ahead like the data). The reduction over
    M is split over SPLIT programs into fp32 partials summed in a fixed order.

``kind_linear_gate_tables_kernel``, ``kind_linear_sample_ds_kernel``, ``kind_linear_gate_grad_kernel``
    pos/D per class; ds per sample from the tile partials (fixed order); dval per class and
    dσ_T per tailor block by loops over the batch in a fixed order.

Nothing uses atomics for arithmetic (flags and counters only announce data or hand out work),
so every result is bitwise reproducible for a fixed config whichever parts a program loads or
recomputes; under
``torch.use_deterministic_algorithms(True)`` the pinned configs are used (no autotuning).

Tiles: ``tl.dot`` needs dims >= 16 and ``tl.arange`` powers of two, so K is padded to
KP = next_pow2(max(K, 16)) with masked loads (padded slots load σ = val = 0); KP <= 128 (the
BM×KP shrink accumulator lives in registers). Tile sizes, owner splits and splits come from
kernels/kind_linear_plans.py (``plan_fused``, ``plan_tailor_reduce``, ``plan_tailor_grad``), whose
schedules kind_fast/perf/perfmodel.py's traffic model checks (kind_fast/perf/timemodel.py prices
them); ``KIND_FAST_AUTOTUNE=1`` tunes the fused kernel over a small space instead (never while a
CUDA graph is being captured). kind_fast/perf/replay.py replays these launchers on ``meta`` tensors
for ``python -m kind_fast.perf.audit``, which compiles every config they can launch.

This module imports torch, Triton and its sibling kind_linear_plans only, nothing of the package
(tests/test_layering.py).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from kind_fast.kernels.kind_linear_plans import (
    MAX_ACTIVE,
    FusedPlan,
    TailorPlan,
    TailorReducePlan,
    owner_split,
    padded_active,
    plan_fused,
    plan_tailor_grad,
    plan_tailor_reduce,
    rotation_stride,
    row_tile,
    samples_per_tile,
)

# Kernels whose launchers run a persistent grid (the static audit checks the binary and grid)
PERSISTENT_KERNELS = ("kind_linear_fused_kernel",)

# Whether these kernels were decorated for the interpreter (TRITON_INTERPRET=1 at import
# time): Triton decides at decoration time. kind_fast.ops.kind_linear_triton reloads this
# module when the environment changes, so tests can switch it on in-process.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# =====================================================================================
# Shared pieces
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
def _min(x, AXIS: tl.constexpr):
    return tl.reduce(x, AXIS, tl.standard._elementwise_min)


@triton.jit
def _load_rows(ptr, rm, row_ok, kk, k_ok, s_m, s_k):
    """A (BM, BK) tile of a row-major-ish matrix."""
    return tl.load(ptr + rm[:, None] * s_m + kk[None, :] * s_k,
                   mask=row_ok[:, None] & k_ok[None, :], other=0.0)


@triton.jit
def _load_base(ptr, kk, k_ok, rn, n_ok, s_bk, s_bn):
    """(BK, BN) tile of the base weight B."""
    return tl.load(ptr + kk[:, None] * s_bk + rn[None, :] * s_bn, mask=k_ok[:, None] & n_ok[None, :], other=0.0)


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
def _prefetch_factor(ptr, ids, slot_ok, rn, n_ok, s_r, s_n):
    """_load_factor issued now for a use after the K-loop. Volatile, so that the compiler does
    not sink it to its use (it would: the value is dead across the loop), and its latency
    hides behind the K-loop instead of stalling the epilogue."""
    return tl.load(ptr + ids[:, None] * s_r + rn[None, :] * s_n,
                   mask=slot_ok[:, None] & n_ok[None, :], other=0.0, volatile=True)


@triton.jit
def _prefetch_bias(bias_ptr, rn, n_ok, HAS_BIAS: tl.constexpr):
    """The bias of columns rn, loaded now for the epilogue (volatile: see _prefetch_factor)."""
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rn, mask=n_ok, other=0.0, volatile=True)
    else:
        bias = tl.full(rn.shape, 0.0, tl.float32)
    return bias


@triton.jit
def _class_ids(lab_ptr, idx_ptr, sample, rj, slot_ok, K):
    """Active tailor ids (KP,) of ``sample``'s class (padded slots: id 0)."""
    cls = tl.load(lab_ptr + sample)
    return tl.load(idx_ptr + cls * K + rj, mask=slot_ok, other=0)


@triton.jit
def _routing(lab_ptr, idx_ptr, val_ptr, sig_ptr, m0, rm, rj, slot_ok, M, K, T, ONE_CLASS: tl.constexpr):
    """(ids (KP,), scale, samp (BM,), s_lo): the tile's tailor ids and σ ⊙ gate in fp32 —
    (1, KP) for a one-class tile, (BM, KP) per row otherwise — and its rows' samples."""
    if ONE_CLASS:
        cls = tl.load(lab_ptr + m0 // T)
        ids = tl.load(idx_ptr + cls * K + rj, mask=slot_ok, other=0)
        # volatile: loaded at the start, not sunk to the epilogue that uses them (see _prefetch_factor)
        gate = tl.load(val_ptr + cls * K + rj, mask=slot_ok, other=0.0, volatile=True)
        scale = (tl.load(sig_ptr + ids, volatile=True) * gate)[None, :]
        samp = rm
    else:
        samp = tl.minimum(rm, M - 1) // T
        cls_r = tl.load(lab_ptr + samp)
        ids_r = tl.load(idx_ptr + cls_r[:, None] * K + rj[None, :], mask=slot_ok[None, :], other=0)
        gate = tl.load(val_ptr + cls_r[:, None] * K + rj[None, :], mask=slot_ok[None, :], other=0.0)
        scale = tl.load(sig_ptr + ids_r) * gate
        ids = rj
    return ids, scale, samp, m0 // T


@triton.jit
def _shrink_step(acc_h, a, kk, k_ok, p_ptr, ids, slot_ok, samp, s_lo, s_hi, lab_ptr, idx_ptr, rj, K, s_pr, s_pk,
                 SPT: tl.constexpr, ONE_CLASS: tl.constexpr, PREC: tl.constexpr):
    """acc_h (BM, KP) += a · P[ids]ᵀ for one K-step; per sample with row masks in a mixed tile."""
    if ONE_CLASS:
        p = _load_factor_t(p_ptr, ids, slot_ok, kk, k_ok, s_pr, s_pk)                   # (BK, KP)
        acc_h = tl.dot(a, p, acc_h, input_precision=PREC)
    else:
        for i in tl.static_range(SPT):
            s = s_lo + i
            ok = slot_ok & ((rj * 0 + s) <= s_hi)  # (a vector compare: the interpreter rejects scalar & vector masks)
            ids_s = _class_ids(lab_ptr, idx_ptr, tl.minimum(s, s_hi), rj, ok, K)
            p = _load_factor_t(p_ptr, ids_s, ok, kk, k_ok, s_pr, s_pk)
            a_s = tl.where((samp == s)[:, None], a, 0.0).to(a.dtype)
            acc_h = tl.dot(a_s, p, acc_h, input_precision=PREC)
    return acc_h


@triton.jit
def _shrink_range(acc_h, st_lo, st_hi, a_ptr, p_ptr, rm, row_ok, ids, slot_ok, samp, s_lo, s_hi, lab_ptr, idx_ptr,
                  rj, KD, K, s_am, s_ak, s_pr, s_pk,
                  BK: tl.constexpr, SPT: tl.constexpr, ONE_CLASS: tl.constexpr, PREC: tl.constexpr):
    """acc_h += a[rows, k] · P[ids, k]ᵀ over the K-steps [st_lo, st_hi): the shrink alone."""
    rk = tl.arange(0, BK)
    for st in range(st_lo, st_hi):
        kk = st * BK + rk
        k_ok = kk < KD
        a = _load_rows(a_ptr, rm, row_ok, kk, k_ok, s_am, s_ak)
        acc_h = _shrink_step(acc_h, a, kk, k_ok, p_ptr, ids, slot_ok, samp, s_lo, s_hi, lab_ptr, idx_ptr, rj, K,
                             s_pr, s_pk, SPT, ONE_CLASS, PREC)
    return acc_h


@triton.jit
def _expand(acc, hs, q_pre, rn, n_ok, samp, s_lo, s_hi, slot_ok, rj, q_ptr, lab_ptr, idx_ptr, K, s_qr, s_qn,
            SPT: tl.constexpr, ONE_CLASS: tl.constexpr, PREC: tl.constexpr):
    """acc += h_s · Q[ids] (``q_pre``: the one-class tile's Q, loaded earlier)."""
    if ONE_CLASS:
        acc = tl.dot(hs, q_pre, acc, input_precision=PREC)
    else:
        for i in tl.static_range(SPT):
            s = s_lo + i
            ok = slot_ok & ((rj * 0 + s) <= s_hi)  # (a vector compare: the interpreter rejects scalar & vector masks)
            ids_s = _class_ids(lab_ptr, idx_ptr, tl.minimum(s, s_hi), rj, ok, K)
            q = _load_factor(q_ptr, ids_s, ok, rn, n_ok, s_qr, s_qn)
            hs_s = tl.where((samp == s)[:, None], hs, 0.0).to(hs.dtype)
            acc = tl.dot(hs_s, q, acc, input_precision=PREC)
    return acc


@triton.jit
def _store_shrink(h, shr_ptr, hsv_ptr, part_ptr, tile, rm, row_ok, rj, slot_ok, samp, s_lo, s_hi, K,
                  KP: tl.constexpr, SPT: tl.constexpr, ONE_CLASS: tl.constexpr, WRITE_SHRINK: tl.constexpr,
                  DS_PARTIAL: tl.constexpr):
    """Store h (or dh_s), and the tile's partial sums Σ_rows dh_s ⊙ h per sample (for ds)."""
    shr_mask = row_ok[:, None] & slot_ok[None, :]
    shr_off = rm[:, None] * K + rj[None, :]
    if WRITE_SHRINK:
        tl.store(shr_ptr + shr_off, h, mask=shr_mask)
    if DS_PARTIAL:
        prod = h * tl.load(hsv_ptr + shr_off, mask=shr_mask, other=0.0)                 # (BM, KP)
        if ONE_CLASS:
            tl.store(part_ptr + tile * KP + rj, _sum(prod, 0))
        else:
            for i in tl.static_range(SPT):
                s = s_lo + i
                sel = tl.where((samp == s)[:, None], prod, 0.0)
                tl.store(part_ptr + (tile * SPT + i) * KP + rj, _sum(sel, 0), mask=(rj * 0 + s) <= s_hi)


# =====================================================================================
# Path M1: fused GEMM + gathered gated low-rank term (forward and dx), persistent
# =====================================================================================
@triton.jit
def _now():
    """The GPU's nanosecond clock (%globaltimer): a flag wait is bounded in time, not in polls."""
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _load_a(a_ptr, a_desc, rm, row_ok, m0, kk, k_ok, k0, s_am, s_ak, TMA: tl.constexpr):
    """(BM, BK) tile of the row operand (x or g): its TMA descriptor's block, else pointer loads."""
    if TMA:
        return a_desc.load([m0, k0])
    else:
        return _load_rows(a_ptr, rm, row_ok, kk, k_ok, s_am, s_ak)


@triton.jit
def _load_b(b_ptr, b_desc, kk, k_ok, k0, rn, n_ok, n0, s_bk, s_bn, TMA: tl.constexpr, B_TRANS: tl.constexpr):
    """(BK, BNW) tile of the base weight B: W_Gᵀ (forward: W_G's (BNW, BK) block, transposed)
    or W_G (dx), through its TMA descriptor, else pointer loads."""
    if TMA:
        if B_TRANS:
            return tl.trans(b_desc.load([n0, k0]))
        else:
            return b_desc.load([k0, n0])
    else:
        return _load_base(b_ptr, kk, k_ok, rn, n_ok, s_bk, s_bn)


@triton.jit
def _canonical_scale(idx_ptr, val_ptr, sig_ptr, cls, cols, K, KP: tl.constexpr):
    """s' (len(cols),) fp32 of the slot columns ``cols`` of class ``cls``: σ_n · Σ (the gate values
    of every slot of the class holding the same tailor n). The dU_T / dV_T partials are scaled
    by it and the reduction reads, for each tailor, only the first slot holding it, which so
    carries all of that tailor's gradient (duplicate ids, and padding slots holding id 0 with
    value 0, need no other case)."""
    rj = tl.arange(0, KP)
    ok = rj < K
    ids_all = tl.load(idx_ptr + cls * K + rj, mask=ok, other=-1)
    val_all = tl.load(val_ptr + cls * K + rj, mask=ok, other=0.0)
    c_ok = cols < K
    ids_c = tl.load(idx_ptr + cls * K + cols, mask=c_ok, other=-2)
    vsum = _sum(tl.where(ids_c[:, None] == ids_all[None, :], val_all[None, :], 0.0), 1)
    sig = tl.load(sig_ptr + tl.where(c_ok, ids_c, 0), mask=c_ok, other=0.0)
    return tl.where(c_ok, vsum * sig, 0.0)


@triton.jit
def _shrink_cols(a_ptr, a_desc, p_ptr, idx_ptr, lab_ptr, cls, m0, rm, row_ok, samp, s_lo, s_hi, cols, K, KD, steps,
                 rho, s_am, s_ak, s_pr, s_pk,
                 BM: tl.constexpr, BK: tl.constexpr, KPG: tl.constexpr, SPT: tl.constexpr,
                 ONE_CLASS: tl.constexpr, TMA: tl.constexpr, PREC: tl.constexpr):
    """Shrink columns ``cols`` (KPG,) of the tile over the whole reduction, alone: the K-steps of
    their owner's loop in the same order with the same dot shapes, so bitwise its value."""
    ok = cols < K
    ids = tl.load(idx_ptr + cls * K + cols, mask=ok, other=0)
    part = tl.full((BM, KPG), 0.0, tl.float32)
    rk = tl.arange(0, BK)
    for i in range(0, steps):
        st = (rho + i) % steps
        k0 = st * BK
        kk = k0 + rk
        k_ok = kk < KD
        a = _load_a(a_ptr, a_desc, rm, row_ok, m0, kk, k_ok, k0, s_am, s_ak, TMA)
        part = _shrink_step(part, a, kk, k_ok, p_ptr, ids, ok, samp, s_lo, s_hi, lab_ptr, idx_ptr, cols, K,
                            s_pr, s_pk, SPT, ONE_CLASS, PREC)
    return part


@triton.jit
def _gather_h(flag_ptr, epoch, shr_ptr, scratch, a_ptr, a_desc, p_ptr, idx_ptr, lab_ptr, r, cls, m0, rm, row_ok, rj,
              slot_ok, samp, s_lo, s_hi, K, KD, steps, rho, s_am, s_ak, s_pr, s_pk,
              BM: tl.constexpr, BK: tl.constexpr, KP: tl.constexpr, KPG: tl.constexpr, NSH: tl.constexpr,
              SPIN_NS: tl.constexpr, SPT: tl.constexpr, ONE_CLASS: tl.constexpr, FORCE_LOCAL: tl.constexpr,
              TMA: tl.constexpr, PREC: tl.constexpr):
    """The row tile's shrink h (BM, KP) fp32, once every part is published.

    The row's NSH flags are read (acquire); while a part is missing they are read again, for
    at most SPIN_NS nanoseconds of the GPU clock. A part still missing then is recomputed into
    this CTA's private scratch (the owner's K-steps in the owner's order: bitwise its value),
    never into shr, where only its owner stores. The tile is loaded from shr, and then, on
    that rare path, its recomputed columns are taken from the scratch."""
    gi = tl.arange(0, NSH)
    ok = (tl.atomic_add(flag_ptr + r * NSH + gi, 0, sem="acquire", scope="gpu") == epoch).to(tl.int32)
    if FORCE_LOCAL:
        ok = ok * 0
    else:
        if SPIN_NS > 0:
            if _min(ok, 0) == 0:
                t0 = _now()
                while (_min(ok, 0) == 0) & ((_now() - t0) < SPIN_NS):
                    ok = (tl.atomic_add(flag_ptr + r * NSH + gi, 0, sem="acquire", scope="gpu") == epoch).to(tl.int32)
    rl = tl.arange(0, BM)
    mask = row_ok[:, None] & slot_ok[None, :]
    h = tl.load(shr_ptr + rm[:, None] * K + rj[None, :], mask=mask, other=0.0, cache_modifier=".cg")
    if _min(ok, 0) == 0:  # the rare path: recompute, then take those columns from the scratch
        for g in range(0, NSH):  # a runtime loop: one copy of the recompute loop in the code
            if _sum(tl.where(gi == g, ok, 0), 0) == 0:
                cols = g * KPG + tl.arange(0, KPG)
                part = _shrink_cols(a_ptr, a_desc, p_ptr, idx_ptr, lab_ptr, cls, m0, rm, row_ok, samp, s_lo, s_hi,
                                    cols, K, KD, steps, rho, s_am, s_ak, s_pr, s_pk, BM, BK, KPG, SPT, ONE_CLASS,
                                    TMA, PREC)
                tl.store(scratch + rl[:, None] * KP + cols[None, :], part)
        tl.debug_barrier()  # this CTA's own scratch stores, visible to all its threads
        pub = _sum(tl.where((rj // KPG)[:, None] == gi[None, :], ok[None, :], 0), 1) > 0        # (KP,)
        own = tl.load(scratch + rl[:, None] * KP + rj[None, :], mask=mask & (pub == 0)[None, :], other=0.0)
        h = tl.where(pub[None, :], h, own)
    return h


@triton.jit
def _finish_tile(acc, h, scale, q_pre, bias, out_ptr, rn, n_ok, rm, row_ok, samp, s_lo, s_hi, rj, slot_ok, q_ptr,
                 lab_ptr, idx_ptr, K, N, s_qr, s_qn, s_om, s_on,
                 SPT: tl.constexpr, HAS_BIAS: tl.constexpr, ONE_CLASS: tl.constexpr, PREC: tl.constexpr):
    """Epilogue: acc + (h ⊙ σ ⊙ gate → input dtype) · Q[ids] + bias, stored (evict-first; ``q_pre``
    and ``bias`` were loaded before the K-loop)."""
    hs = (h * scale).to(q_ptr.dtype.element_ty)
    acc = _expand(acc, hs, q_pre, rn, n_ok, samp, s_lo, s_hi, slot_ok, rj, q_ptr, lab_ptr, idx_ptr, K, s_qr, s_qn,
                  SPT, ONE_CLASS, PREC)
    if HAS_BIAS:
        acc += bias.to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * s_om + rn[None, :] * s_on, acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & n_ok[None, :], eviction_policy="evict_first")


@triton.jit
def _dv_partial(h, sc, x_ptr, pv_ptr, r, rm, row_ok, n0, rj, slot_ok, N, s_xm, s_xn,
                KP: tl.constexpr, BNW: tl.constexpr, PREC: tl.constexpr):
    """dx pass: this tile's share of dV_T, the slot partial ((dh_s ⊙ s') → input dtype)ᵀ · x[rows,
    its columns], stored in the row tile's slice of pv (m_tiles, KP, N). x is read here, once
    over the launch (each x tile by the one program whose dx tile it matches), 64 columns at
    a time. The dot keeps >= 64 rows on the MMA's M side (warpgroup MMA): (64, KP) column
    pieces, or (KP, BNW) for narrower tiles."""
    dh = (h * sc[None, :]).to(x_ptr.dtype.element_ty)
    base = pv_ptr + (r * KP).to(tl.int64) * N
    if BNW >= 64:
        for c in tl.static_range(BNW // 64):
            rn = n0 + c * 64 + tl.arange(0, 64)
            n_ok = rn < N
            xt = tl.load(x_ptr + rm[:, None] * s_xm + rn[None, :] * s_xn, mask=row_ok[:, None] & n_ok[None, :],
                         other=0.0)
            pv = tl.dot(tl.trans(xt), dh, input_precision=PREC)                              # (64, KP)
            tl.store(base + rj[None, :] * N + rn[:, None], pv.to(pv_ptr.dtype.element_ty),
                     mask=n_ok[:, None] & slot_ok[None, :])
    else:
        rn = n0 + tl.arange(0, BNW)
        n_ok = rn < N
        xt = tl.load(x_ptr + rm[:, None] * s_xm + rn[None, :] * s_xn, mask=row_ok[:, None] & n_ok[None, :],
                     other=0.0)
        pv = tl.dot(tl.trans(dh), xt, input_precision=PREC)                                  # (KP, BNW)
        tl.store(base + rj[:, None] * N + rn[None, :], pv.to(pv_ptr.dtype.element_ty),
                 mask=slot_ok[:, None] & n_ok[None, :])


@triton.jit
def kind_linear_fused_kernel(
    # -- rows: the operand read once, and the outputs
    a_ptr,       # (M, KD)  x (forward) | grad_y (dx)
    a_desc,      # its TMA descriptor, blocks (BM, BK) (TMA; else a_ptr again)
    out_ptr,     # (M, N)   y | dx
    shr_ptr,     # (M, K)   fp32 shrink out (and exchange): h = x·V_T[ids]ᵀ | dh_s = g·U_T[ids]ᵀ
    hsv_ptr,     # (M, K)   fp32 saved h (DS_PARTIAL, DU_PART)
    part_ptr,    # (m_tiles, SPT, KP) fp32 Σ_rows dh_s ⊙ h per (tile, sample) (DS_PARTIAL)
    # -- launch state: no memset per launch
    flag_ptr,    # (>= m_tiles·NSH,) int64: = epoch when shrink part g of row r is published
    state_ptr,   # (3,) int64 [epoch of the last launch, CTAs finished in this one, next program]; persist
    scratch_ptr,  # (CTAs, BM, KP) fp32: each CTA's private recompute space
    # -- weights
    b_ptr,       # base weight, read as B[k, n] through (s_bk, s_bn): W_Gᵀ | W_G
    b_desc,      # W_G's TMA descriptor, blocks (BN, BK) (forward) | (BK, BN) (dx)
    bo_desc,     # the same for the owners' BN/G columns
    bias_ptr,    # (N,)
    p_ptr,       # (N_T, KD) shrink factor rows: V_T | U_T
    q_ptr,       # (N_T, N)  expand factor rows: U_T | V_T
    sig_ptr,     # (N_T,) fp32 σ_T
    # -- gate and routing
    idx_ptr,     # (C+1, K) active tailor ids (contiguous)
    val_ptr,     # (C+1, K) fp32 gate values (contiguous)
    lab_ptr,     # (B,) class of each sample
    # -- dx pass: tailor-gradient partials
    x_ptr,       # (M, N) the forward's x (DV_PART)
    pu_ptr,      # (m_tiles, KP, KD) dU_T slot partials (DU_PART), input dtype
    pv_ptr,      # (m_tiles, KP, N)  dV_T slot partials (DV_PART), input dtype
    # -- sizes
    M, N, KD, K, T, M_BUCKET, ROT,
    # -- strides
    s_am, s_ak, s_om, s_on, s_bk, s_bn, s_pr, s_pk, s_qr, s_qn, s_xm, s_xn,
    # -- meta
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, KP: tl.constexpr,
    G: tl.constexpr,            # tile 0 of a row runs as G sub-tiles of BN/G columns (the owners)
    NSH: tl.constexpr,          # owners that carry a part of the shrink (KP/NSH columns each)
    SPIN_NS: tl.constexpr,      # nanoseconds a program waits for a missing part before recomputing it
    SPT: tl.constexpr,          # max samples one row tile touches (1 when ONE_CLASS)
    HAS_BIAS: tl.constexpr,
    ONE_CLASS: tl.constexpr,    # T % BM == 0: one class per row tile
    DS_PARTIAL: tl.constexpr,
    DU_PART: tl.constexpr,      # dx pass: the owners also write dU_T's slot partials (ONE_CLASS)
    DV_PART: tl.constexpr,      # dx pass: every tile also writes dV_T's slot partials (ONE_CLASS)
    TMA: tl.constexpr,          # a_desc / b_desc / bo_desc are TMA descriptors (aligned strides)
    B_TRANS: tl.constexpr,      # B = W_Gᵀ (forward) or W_G (dx), for the descriptors
    FORCE_LOCAL: tl.constexpr,  # tests: never use a published part (recompute all of h)
    REVERSE_OWNERS: tl.constexpr,  # tests: owner g is program G-1-g of its row
    PREC: tl.constexpr,         # tl.dot input precision ("ieee" for fp32 inputs)
):
    cta = tl.program_id(0)
    ctas = tl.num_programs(0)
    n_tiles = (N + BN - 1) // BN
    per_row = G + n_tiles - 1   # programs of a row tile: G owners (tile 0), then tiles 1..n_tiles-1
    m_tiles = (M + BM - 1) // BM
    steps = (KD + BK - 1) // BK
    # this launch publishes with the epoch after the last launch's: stale flags never match
    epoch = tl.atomic_add(state_ptr, 0, sem="relaxed", scope="gpu") + 1
    scratch = scratch_ptr + cta * (BM * KP)
    rj = tl.arange(0, KP)
    slot_ok = rj < K
    # persistent, with a dynamic tile scheduler: each CTA takes the next program of the
    # row-major program order from a counter on the device (fetched one program ahead, so its
    # latency hides behind the program in hand). Programs start in launch order, as a
    # non-persistent grid's would: the CTAs running at one time work on a few consecutive rows
    # (their A blocks stay in L2) and a row's owners always start before its other tiles
    total = m_tiles * per_row
    pid = tl.atomic_add(state_ptr + 2, 1, sem="relaxed", scope="gpu").to(tl.int32)
    while pid < total:
        nxt = tl.atomic_add(state_ptr + 2, 1, sem="relaxed", scope="gpu").to(tl.int32)
        r = pid // per_row
        j = pid % per_row
        m0 = r * BM
        rm = m0 + tl.arange(0, BM)
        row_ok = rm < M
        ids, scale, samp, s_lo = _routing(lab_ptr, idx_ptr, val_ptr, sig_ptr, m0, rm, rj, slot_ok, M, K, T, ONE_CLASS)
        s_hi = (tl.minimum(m0 + BM, M) - 1) // T
        cls = tl.load(lab_ptr + m0 // T)
        rho = (r * ROT) % steps     # every program of the row runs the K-loop from step rho (mod steps)
        if j < G:
            g = G - 1 - j if REVERSE_OWNERS else j
            _owner_tile(g, r, cls, ids, scale, samp, s_lo, s_hi, m0, rm, row_ok, rj, slot_ok, steps, rho, epoch,
                        scratch, a_ptr, a_desc, out_ptr, shr_ptr, hsv_ptr, part_ptr, flag_ptr, b_ptr, bo_desc,
                        bias_ptr, p_ptr, q_ptr, sig_ptr, idx_ptr, val_ptr, lab_ptr, x_ptr, pu_ptr, pv_ptr,
                        N, KD, K, s_am, s_ak, s_om, s_on, s_bk, s_bn, s_pr, s_pk, s_qr, s_qn, s_xm, s_xn,
                        BM, BN // G, G, BK, KP, KP // NSH, NSH, NSH == G, SPIN_NS, SPT, HAS_BIAS, ONE_CLASS,
                        DS_PARTIAL, DU_PART, DV_PART, TMA, B_TRANS, FORCE_LOCAL, PREC)
        else:
            _plain_tile(j - G + 1, r, cls, ids, scale, samp, s_lo, s_hi, m0, rm, row_ok, rj, slot_ok, steps, rho,
                        epoch, scratch, a_ptr, a_desc, out_ptr, shr_ptr, flag_ptr, b_ptr, b_desc, bias_ptr, p_ptr,
                        q_ptr, sig_ptr, idx_ptr, val_ptr, lab_ptr, x_ptr, pv_ptr,
                        N, KD, K, s_am, s_ak, s_om, s_on, s_bk, s_bn, s_pr, s_pk, s_qr, s_qn, s_xm, s_xn,
                        BM, BN, BK, KP, KP // NSH, NSH, SPIN_NS, SPT, HAS_BIAS, ONE_CLASS, DV_PART, TMA, B_TRANS,
                        FORCE_LOCAL, PREC)
        pid = nxt
    # the launch's last CTA to finish (every CTA read the epoch and took its last program before
    # it got here) advances the epoch and resets the program counter and itself
    tl.debug_barrier()
    if tl.atomic_add(state_ptr + 1, 1, sem="acq_rel", scope="gpu") == ctas - 1:
        tl.atomic_xchg(state_ptr + 2, 0, sem="relaxed", scope="gpu")
        tl.atomic_xchg(state_ptr + 1, 0, sem="relaxed", scope="gpu")
        tl.atomic_xchg(state_ptr, epoch, sem="release", scope="gpu")


@triton.jit
def _main_loop(acc, a_ptr, a_desc, b_ptr, b_desc, m0, rm, row_ok, n0, rn, n_ok, KD, steps, rho, s_am, s_ak, s_bk,
               s_bn, BK: tl.constexpr, TMA: tl.constexpr, B_TRANS: tl.constexpr, PREC: tl.constexpr):
    """acc += a[rows] · B[:, cols] over the K-steps in the row's order (from step rho, mod steps)."""
    rk = tl.arange(0, BK)
    for i in range(0, steps):
        st = (rho + i) % steps
        k0 = st * BK
        kk = k0 + rk
        k_ok = kk < KD
        a = _load_a(a_ptr, a_desc, rm, row_ok, m0, kk, k_ok, k0, s_am, s_ak, TMA)
        acc = tl.dot(a, _load_b(b_ptr, b_desc, kk, k_ok, k0, rn, n_ok, n0, s_bk, s_bn, TMA, B_TRANS), acc,
                     input_precision=PREC)
    return acc


@triton.jit
def _owner_loop(acc, g, r, cls, samp, s_lo, s_hi, m0, rm, row_ok, n0, rn, n_ok, steps, rho, epoch,
                a_ptr, a_desc, shr_ptr, flag_ptr, b_ptr, b_desc, p_ptr, idx_ptr, val_ptr, sig_ptr, lab_ptr, hsv_ptr,
                pu_ptr, KD, K, s_am, s_ak, s_bk, s_bn, s_pr, s_pk,
                BM: tl.constexpr, BK: tl.constexpr, KP: tl.constexpr, KPG: tl.constexpr, NSH: tl.constexpr,
                SPT: tl.constexpr, ONE_CLASS: tl.constexpr, DU_PART: tl.constexpr, TMA: tl.constexpr,
                B_TRANS: tl.constexpr, PREC: tl.constexpr):
    """The owner's K-loop: its output columns and its shrink columns [g·KPG, (g+1)·KPG) on the
    same tile of a; in the dx pass (DU_PART) also the dU_T slot partials of those columns,
    (h ⊙ s')ᵀ · g for each K-step's columns of g, stored as they come (the tile of g is already
    on chip). Then the shrink part is stored into shr and published (flag = epoch, release)."""
    rk = tl.arange(0, BK)
    cols = g * KPG + tl.arange(0, KPG)
    c_ok = cols < K
    ids_g = tl.load(idx_ptr + cls * K + cols, mask=c_ok, other=0)
    part = tl.full((BM, KPG), 0.0, tl.float32)
    if DU_PART:
        sc = _canonical_scale(idx_ptr, val_ptr, sig_ptr, cls, cols, K, KP)
        hs = (tl.load(hsv_ptr + rm[:, None] * K + cols[None, :], mask=row_ok[:, None] & c_ok[None, :], other=0.0)
              * sc[None, :]).to(a_ptr.dtype.element_ty)                                      # (BM, KPG)
        pu_rows = pu_ptr + (r * KP + cols[None, :]).to(tl.int64) * KD                        # (1, KPG)
    for i in range(0, steps):
        st = (rho + i) % steps
        k0 = st * BK
        kk = k0 + rk
        k_ok = kk < KD
        a = _load_a(a_ptr, a_desc, rm, row_ok, m0, kk, k_ok, k0, s_am, s_ak, TMA)
        acc = tl.dot(a, _load_b(b_ptr, b_desc, kk, k_ok, k0, rn, n_ok, n0, s_bk, s_bn, TMA, B_TRANS), acc,
                     input_precision=PREC)
        part = _shrink_step(part, a, kk, k_ok, p_ptr, ids_g, c_ok, samp, s_lo, s_hi, lab_ptr, idx_ptr, cols,
                            K, s_pr, s_pk, SPT, ONE_CLASS, PREC)
        if DU_PART:  # (its result is stored at once: this loop waits for each of its MMAs)
            pu = tl.dot(tl.trans(a), hs, input_precision=PREC)                                 # (BK, KPG)
            tl.store(pu_rows + kk[:, None], pu.to(pu_ptr.dtype.element_ty), mask=k_ok[:, None] & c_ok[None, :])
    tl.store(shr_ptr + rm[:, None] * K + cols[None, :], part, mask=row_ok[:, None] & c_ok[None, :])
    tl.debug_barrier()  # every thread's part is stored before the flag says so
    tl.atomic_xchg(flag_ptr + r * NSH + g, epoch, sem="release", scope="gpu")
    return acc


@triton.jit
def _owner_tile(g, r, cls, ids, scale, samp, s_lo, s_hi, m0, rm, row_ok, rj, slot_ok, steps, rho, epoch, scratch,
                a_ptr, a_desc, out_ptr, shr_ptr, hsv_ptr, part_ptr, flag_ptr, b_ptr, b_desc, bias_ptr, p_ptr, q_ptr,
                sig_ptr, idx_ptr, val_ptr, lab_ptr, x_ptr, pu_ptr, pv_ptr,
                N, KD, K, s_am, s_ak, s_om, s_on, s_bk, s_bn, s_pr, s_pk, s_qr, s_qn, s_xm, s_xn,
                BM: tl.constexpr, BNG: tl.constexpr, G: tl.constexpr, BK: tl.constexpr, KP: tl.constexpr,
                KPG: tl.constexpr, NSH: tl.constexpr, ALL_SHRINK: tl.constexpr, SPIN_NS: tl.constexpr,
                SPT: tl.constexpr,
                HAS_BIAS: tl.constexpr, ONE_CLASS: tl.constexpr, DS_PARTIAL: tl.constexpr, DU_PART: tl.constexpr,
                DV_PART: tl.constexpr, TMA: tl.constexpr, B_TRANS: tl.constexpr, FORCE_LOCAL: tl.constexpr,
                PREC: tl.constexpr):
    """Owner g of a row: BNG columns of tile 0 and (g < NSH) shrink columns [g·KPG, (g+1)·KPG),
    published as soon as its K-loop ends; then its own epilogue."""
    n0 = g * BNG
    rn = n0 + tl.arange(0, BNG)
    n_ok = rn < N
    if ONE_CLASS:
        q_pre = _prefetch_factor(q_ptr, ids, slot_ok, rn, n_ok, s_qr, s_qn)                        # (KP, BNG)
    else:
        q_pre = tl.full((KP, BNG), 0.0, q_ptr.dtype.element_ty)
    bias = _prefetch_bias(bias_ptr, rn, n_ok, HAS_BIAS)
    acc = tl.full((BM, BNG), 0.0, tl.float32)
    if ALL_SHRINK:  # NSH == G: every owner carries a part (one loop in the code)
        acc = _owner_loop(acc, g, r, cls, samp, s_lo, s_hi, m0, rm, row_ok, n0, rn, n_ok, steps, rho, epoch, a_ptr,
                          a_desc, shr_ptr, flag_ptr, b_ptr, b_desc, p_ptr, idx_ptr, val_ptr, sig_ptr, lab_ptr,
                          hsv_ptr, pu_ptr, KD, K, s_am, s_ak, s_bk, s_bn, s_pr, s_pk,
                          BM, BK, KP, KPG, NSH, SPT, ONE_CLASS, DU_PART, TMA, B_TRANS, PREC)
    else:
        if g < NSH:
            acc = _owner_loop(acc, g, r, cls, samp, s_lo, s_hi, m0, rm, row_ok, n0, rn, n_ok, steps, rho, epoch,
                              a_ptr, a_desc, shr_ptr, flag_ptr, b_ptr, b_desc, p_ptr, idx_ptr, val_ptr, sig_ptr,
                              lab_ptr, hsv_ptr, pu_ptr, KD, K, s_am, s_ak, s_bk, s_bn, s_pr, s_pk,
                              BM, BK, KP, KPG, NSH, SPT, ONE_CLASS, DU_PART, TMA, B_TRANS, PREC)
        else:
            acc = _main_loop(acc, a_ptr, a_desc, b_ptr, b_desc, m0, rm, row_ok, n0, rn, n_ok, KD, steps, rho,
                             s_am, s_ak, s_bk, s_bn, BK, TMA, B_TRANS, PREC)
    h = _gather_h(flag_ptr, epoch, shr_ptr, scratch, a_ptr, a_desc, p_ptr, idx_ptr, lab_ptr, r, cls, m0, rm, row_ok,
                  rj, slot_ok, samp, s_lo, s_hi, K, KD, steps, rho, s_am, s_ak, s_pr, s_pk, BM, BK, KP, KPG, NSH,
                  SPIN_NS, SPT, ONE_CLASS, FORCE_LOCAL, TMA, PREC)
    if g == 0:
        _store_shrink(h, shr_ptr, hsv_ptr, part_ptr, r, rm, row_ok, rj, slot_ok, samp, s_lo, s_hi, K,
                      KP, SPT, ONE_CLASS, False, DS_PARTIAL)
    _finish_tile(acc, h, scale, q_pre, bias, out_ptr, rn, n_ok, rm, row_ok, samp, s_lo, s_hi, rj, slot_ok,
                 q_ptr, lab_ptr, idx_ptr, K, N, s_qr, s_qn, s_om, s_on, SPT, HAS_BIAS, ONE_CLASS, PREC)
    if DV_PART:  # owner 0, for all of tile 0 (>= 64 columns on the MMA's M side), after its output
        if g == 0:
            _dv_partial(h, _canonical_scale(idx_ptr, val_ptr, sig_ptr, cls, rj, K, KP), x_ptr, pv_ptr, r, rm,
                        row_ok, 0, rj, slot_ok, N, s_xm, s_xn, KP, BNG * G, PREC)


@triton.jit
def _plain_tile(tile, r, cls, ids, scale, samp, s_lo, s_hi, m0, rm, row_ok, rj, slot_ok, steps, rho, epoch, scratch,
                a_ptr, a_desc, out_ptr, shr_ptr, flag_ptr, b_ptr, b_desc, bias_ptr, p_ptr, q_ptr, sig_ptr, idx_ptr,
                val_ptr, lab_ptr, x_ptr, pv_ptr,
                N, KD, K, s_am, s_ak, s_om, s_on, s_bk, s_bn, s_pr, s_pk, s_qr, s_qn, s_xm, s_xn,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, KP: tl.constexpr, KPG: tl.constexpr,
                NSH: tl.constexpr, SPIN_NS: tl.constexpr, SPT: tl.constexpr, HAS_BIAS: tl.constexpr,
                ONE_CLASS: tl.constexpr, DV_PART: tl.constexpr, TMA: tl.constexpr, B_TRANS: tl.constexpr,
                FORCE_LOCAL: tl.constexpr, PREC: tl.constexpr):
    """Tile ``tile`` (>= 1) of a row: the plain K-loop, h from the owners at the epilogue."""
    n0 = tile * BN
    rn = n0 + tl.arange(0, BN)
    n_ok = rn < N
    if ONE_CLASS:
        q_pre = _prefetch_factor(q_ptr, ids, slot_ok, rn, n_ok, s_qr, s_qn)                        # (KP, BN)
    else:
        q_pre = tl.full((KP, BN), 0.0, q_ptr.dtype.element_ty)
    bias = _prefetch_bias(bias_ptr, rn, n_ok, HAS_BIAS)
    acc = _main_loop(tl.full((BM, BN), 0.0, tl.float32), a_ptr, a_desc, b_ptr, b_desc, m0, rm, row_ok, n0, rn, n_ok,
                     KD, steps, rho, s_am, s_ak, s_bk, s_bn, BK, TMA, B_TRANS, PREC)
    h = _gather_h(flag_ptr, epoch, shr_ptr, scratch, a_ptr, a_desc, p_ptr, idx_ptr, lab_ptr, r, cls, m0, rm, row_ok,
                  rj, slot_ok, samp, s_lo, s_hi, K, KD, steps, rho, s_am, s_ak, s_pr, s_pk, BM, BK, KP, KPG, NSH,
                  SPIN_NS, SPT, ONE_CLASS, FORCE_LOCAL, TMA, PREC)
    _finish_tile(acc, h, scale, q_pre, bias, out_ptr, rn, n_ok, rm, row_ok, samp, s_lo, s_hi, rj, slot_ok,
                 q_ptr, lab_ptr, idx_ptr, K, N, s_qr, s_qn, s_om, s_on, SPT, HAS_BIAS, ONE_CLASS, PREC)
    if DV_PART:  # after the output tile is stored: its accumulator's registers are free again
        _dv_partial(h, _canonical_scale(idx_ptr, val_ptr, sig_ptr, cls, rj, K, KP), x_ptr, pv_ptr, r, rm, row_ok,
                    n0, rj, slot_ok, N, s_xm, s_xn, KP, BN, PREC)


# =====================================================================================
# Path M2 (no dense term) and the shrink alone: row programs
# =====================================================================================
@triton.jit
def kind_linear_rows_kernel(
    a_ptr, out_ptr, shr_ptr, hsv_ptr, part_ptr,            # as kind_linear_fused_kernel
    bias_ptr, p_ptr, q_ptr, sig_ptr, idx_ptr, val_ptr, lab_ptr,
    M, N, KD, K, T, M_BUCKET,
    NG,                         # N-tile groups per row tile (programs = row tiles × NG)
    s_am, s_ak, s_om, s_on, s_pr, s_pk, s_qr, s_qn,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, KP: tl.constexpr,
    SPT: tl.constexpr, HAS_OUT: tl.constexpr, HAS_BIAS: tl.constexpr, ONE_CLASS: tl.constexpr,
    WRITE_SHRINK: tl.constexpr, DS_PARTIAL: tl.constexpr, PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    r = pid // NG
    grp = pid % NG
    m0 = r * BM
    rm = m0 + tl.arange(0, BM)
    row_ok = rm < M
    rj = tl.arange(0, KP)
    slot_ok = rj < K
    ids, scale, samp, s_lo = _routing(lab_ptr, idx_ptr, val_ptr, sig_ptr, m0, rm, rj, slot_ok, M, K, T, ONE_CLASS)
    s_hi = (tl.minimum(m0 + BM, M) - 1) // T
    steps = (KD + BK - 1) // BK
    h = _shrink_range(tl.full((BM, KP), 0.0, tl.float32), 0, steps, a_ptr, p_ptr, rm, row_ok, ids, slot_ok, samp,
                      s_lo, s_hi, lab_ptr, idx_ptr, rj, KD, K, s_am, s_ak, s_pr, s_pk, BK, SPT, ONE_CLASS, PREC)
    if grp == 0:
        _store_shrink(h, shr_ptr, hsv_ptr, part_ptr, r, rm, row_ok, rj, slot_ok, samp, s_lo, s_hi, K,
                      KP, SPT, ONE_CLASS, WRITE_SHRINK, DS_PARTIAL)
    if HAS_OUT:
        hs = (h * scale).to(q_ptr.dtype.element_ty)
        n_tiles = (N + BN - 1) // BN
        per = (n_tiles + NG - 1) // NG
        n_beg = grp * per
        n_end = tl.minimum(n_beg + per, n_tiles)
        for nt in range(n_beg, n_end):
            rn = nt * BN + tl.arange(0, BN)
            n_ok = rn < N
            if ONE_CLASS:
                q = _load_factor(q_ptr, ids, slot_ok, rn, n_ok, s_qr, s_qn)
            else:
                q = tl.full((KP, BN), 0.0, q_ptr.dtype.element_ty)
            acc = _expand(tl.full((BM, BN), 0.0, tl.float32), hs, q, rn, n_ok, samp, s_lo, s_hi, slot_ok, rj, q_ptr,
                          lab_ptr, idx_ptr, K, s_qr, s_qn, SPT, ONE_CLASS, PREC)
            if HAS_BIAS:
                acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + rm[:, None] * s_om + rn[None, :] * s_on, acc.to(out_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & n_ok[None, :])


# =====================================================================================
# dU_T and dV_T: long-K skinny GEMM over the rows, gathered through the slot table
# =====================================================================================
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
    list_ptr,    # (t_blocks, m_tiles) int32 row tiles each tailor block walks, in order
    cnt_ptr,     # (t_blocks,) int32 list lengths
    # -- sizes and strides
    M, O, NT, K, T,
    SPLIT,       # programs sharing the rows of a (tailor block, column block)
    s_zm, s_zo,
    # -- meta
    BM: tl.constexpr, BT: tl.constexpr, BO: tl.constexpr, PARTIALS: tl.constexpr,  # PARTIALS: SPLIT > 1
    ONE_CLASS: tl.constexpr, PREC: tl.constexpr,
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
    # the row tiles of this block's list (every tile when gates are dense), split over SPLIT
    # programs; one loop shape for both keeps the loads software-pipelined
    n_list = tl.load(cnt_ptr + pid_t)
    per = (n_list + SPLIT - 1) // SPLIT
    i_beg = pid_s * per
    i_end = tl.minimum(i_beg + per, n_list)
    rb = tl.arange(0, BM)

    acc = tl.full((BT, BO), 0.0, tl.float32)
    for i in range(i_beg, i_end):
        mt = tl.load(list_ptr + pid_t * m_tiles + i)
        rm = mt * BM + rb
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
        # ---- acc (BT, BO) += (w[rows, slot] · σ · D)ᵀ (BT, BM) · z[rows] (BM, BO)
        on = pos >= 0
        wv = tl.load(w_ptr + rm[:, None] * K + tl.where(on, pos, 0), mask=row_ok[:, None] & on, other=0.0)
        ws = (wv * (dg * sig[None, :])).to(z_ptr.dtype.element_ty)                      # (BM, BT)
        z = tl.load(z_ptr + rm[:, None] * s_zm + ro[None, :] * s_zo, mask=row_ok[:, None] & o_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(ws), z, acc, input_precision=PREC)

    out_off = rt[:, None] * O + ro[None, :]
    out_mask = t_ok[:, None] & o_ok[None, :]
    if PARTIALS:
        tl.store(out_ptr + pid_s * NT * O + out_off, acc, mask=out_mask)
    else:
        tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


# =====================================================================================
# dU_T, dV_T, dσ_T, dval from the dx pass's partials: one launch (path M1, one-class tiles)
# =====================================================================================
@triton.jit
def _block_ds(part_ptr, rb, b_ok, tps, rj, KP: tl.constexpr, BB: tl.constexpr):
    """ds (BB, KP) fp32 of the samples rb: the Σ_rows dh_s ⊙ h of each one's ``tps`` row tiles
    (one-class tiles: sample b owns tiles [b·tps, (b+1)·tps)), added in tile order."""
    acc = tl.full((BB, KP), 0.0, tl.float32)
    for i in range(0, tps):
        acc += tl.load(part_ptr + (rb * tps + i)[:, None] * KP + rj[None, :], mask=b_ok[:, None], other=0.0)
    return acc


@triton.jit
def kind_linear_tailor_reduce_kernel(
    pu_ptr,      # (m_tiles, KP, NO) dU_T slot partials of fused_dx (input dtype)
    pv_ptr,      # (m_tiles, KP, NI) dV_T slot partials
    part_ptr,    # (m_tiles, 1, KP) fp32 Σ_rows dh_s ⊙ h per row tile
    du_ptr,      # (NT, NO) dU_T out
    dv_ptr,      # (NT, NI) dV_T out
    sp_ptr,      # (SPLIT, NT, NO + NI) fp32 the programs' sums when SPLIT > 1
    cnt_ptr,     # (tb · (ob_u + ob_v),) int32 arrival counters: zero before and after the launch
    dval_ptr,    # (C+1, K) out
    dsig_ptr,    # (NT,) out
    idx_ptr, val_ptr, sig_ptr, lab_ptr,
    M, NO, NI, NT, K, T, B, C1, SPLIT,
    BM: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr, BO: tl.constexpr,
    NEED_DU: tl.constexpr, NEED_DV: tl.constexpr, NEED_DVAL: tl.constexpr, NEED_DSIG: tl.constexpr,
    BB: tl.constexpr,           # samples per step of the gate-gradient programs
    BTS: tl.constexpr,          # tailors per dσ_T program
    RB: tl.constexpr,           # row tiles per step of the dU_T / dV_T programs
):
    """Programs, in this order:

    (tailor block, column block, split) of dU_T, then of dV_T: walk the split's row tiles in
        order, RB at a time; a row tile of class c adds, for each tailor n of the block, the
        partial row of the first slot of c holding n (it carries all of n's gradient: canonical
        scale s'), gathered (RB, BT, BO) loads summed over the RB tiles, then over the steps.
        With SPLIT > 1 each program stores its sum; the last to
        arrive at the block's counter (an integer atomic, acquire/release) adds the SPLIT
        sums in split order, stores the gradient and resets the counter.
    C+1 programs of dval[c, k] = σ_T[idx[c, k]] · Σ_{b: labels[b] = c} ds[b, k], samples in order.
    ceil(NT / BTS) programs of dσ_T[n] = Σ_b Σ_k [idx[c_b, k] = n] ds[b, k] · val[c_b, k].
    (ds[b] = Σ over sample b's row tiles of the dx kernel's Σ_rows dh_s ⊙ h; BB samples a step.)

    No float atomics: every sum runs in a fixed order, so the result is bitwise reproducible."""
    pid = tl.program_id(0)
    m_tiles = (M + BM - 1) // BM
    tb = (NT + BT - 1) // BT
    ob_u = (NO + BO - 1) // BO if NEED_DU else 0
    ob_v = (NI + BO - 1) // BO if NEED_DV else 0
    n_red = tb * (ob_u + ob_v) * SPLIT
    rj = tl.arange(0, KP)
    slot_ok = rj < K
    if pid < n_red:
        s = pid // (tb * (ob_u + ob_v))
        blk = pid % (tb * (ob_u + ob_v))         # counter index
        t_blk = blk % tb
        ob = blk // tb
        is_u = ob < ob_u
        if is_u:
            src = pu_ptr
            dst = du_ptr
            ncol = NO
            col0 = 0
            o = ob
        else:
            src = pv_ptr
            dst = dv_ptr
            ncol = NI
            col0 = NO
            o = ob - ob_u
        rt = t_blk * BT + tl.arange(0, BT)
        t_ok = rt < NT
        ro = o * BO + tl.arange(0, BO)
        o_ok = ro < ncol
        per = (m_tiles + SPLIT - 1) // SPLIT
        r_end = tl.minimum((s + 1) * per, m_tiles)
        acc = tl.full((BT, BO), 0.0, tl.float32)
        for r0 in range(s * per, r_end, RB):  # RB row tiles a step: their loads are in flight together
            rr = r0 + tl.arange(0, RB)
            r_ok = rr < r_end
            c = tl.load(lab_ptr + (rr * BM) // T, mask=r_ok, other=0)                         # (RB,)
            ids = tl.load(idx_ptr + c[:, None] * K + rj[None, :], mask=r_ok[:, None] & slot_ok[None, :], other=-1)
            hit = ids[:, None, :] == rt[None, :, None]                                        # (RB, BT, KP)
            first = _min(tl.where(hit, rj[None, None, :], KP), 2)                             # (RB, BT)
            have = (first < K) & r_ok[:, None]
            rows = (rr[:, None] * KP + tl.where(have, first, 0)).to(tl.int64) * ncol          # (RB, BT)
            vals = tl.load(src + rows[:, :, None] + ro[None, None, :], mask=have[:, :, None] & o_ok[None, None, :],
                           other=0.0)                                                         # (RB, BT, BO)
            acc += _sum(vals.to(tl.float32), 0)
        out_mask = t_ok[:, None] & o_ok[None, :]
        if SPLIT == 1:
            tl.store(dst + rt[:, None] * ncol + ro[None, :], acc.to(dst.dtype.element_ty), mask=out_mask)
        else:
            row_w = NO + NI
            tl.store(sp_ptr + (s * NT + rt[:, None]).to(tl.int64) * row_w + col0 + ro[None, :], acc, mask=out_mask)
            tl.debug_barrier()  # every thread's sum is stored before the counter says so
            if tl.atomic_add(cnt_ptr + blk, 1, sem="acq_rel", scope="gpu") == SPLIT - 1:
                tot = tl.full((BT, BO), 0.0, tl.float32)
                for j in range(0, SPLIT):
                    tot += tl.load(sp_ptr + (j * NT + rt[:, None]).to(tl.int64) * row_w + col0 + ro[None, :],
                                   mask=out_mask, other=0.0, cache_modifier=".cg")
                tl.store(dst + rt[:, None] * ncol + ro[None, :], tot.to(dst.dtype.element_ty), mask=out_mask)
                tl.atomic_xchg(cnt_ptr + blk, 0, sem="relaxed", scope="gpu")
    else:
        q = pid - n_red
        n_val = C1 if NEED_DVAL else 0
        tps = T // BM
        if q < n_val:
            # ---- dval[c, k] = σ_T[idx[c, k]] · Σ_{b: labels[b] = c} ds[b, k]   (BB samples a step)
            acc_c = tl.full((KP,), 0.0, tl.float32)
            for b0 in range(0, B, BB):
                rb = b0 + tl.arange(0, BB)
                sel = (tl.load(lab_ptr + rb, mask=rb < B, other=-1) == q) & (rb < B)
                acc_c += _sum(_block_ds(part_ptr, rb, sel, tps, rj, KP, BB), 0)
            ids = tl.load(idx_ptr + q * K + rj, mask=slot_ok, other=0)
            tl.store(dval_ptr + q * K + rj, (acc_c * tl.load(sig_ptr + ids)).to(dval_ptr.dtype.element_ty),
                     mask=slot_ok)
        else:
            # ---- dσ_T[n] = Σ_b Σ_k [idx[c_b, k] = n] ds[b, k] · val[c_b, k]   (BB samples a step)
            rt = (q - n_val) * BTS + tl.arange(0, BTS)
            acc_t = tl.full((BTS,), 0.0, tl.float32)  # (not "acc": the branches' values must not share a name)
            for b0 in range(0, B, BB):
                rb = b0 + tl.arange(0, BB)
                b_ok = rb < B
                c = tl.load(lab_ptr + rb, mask=b_ok, other=0)
                ok = b_ok[:, None] & slot_ok[None, :]
                ids = tl.load(idx_ptr + c[:, None] * K + rj[None, :], mask=ok, other=-1)          # (BB, KP)
                w = _block_ds(part_ptr, rb, b_ok, tps, rj, KP, BB) * tl.load(val_ptr + c[:, None] * K + rj[None, :],
                                                                          mask=ok, other=0.0)
                hit = ids[:, :, None] == rt[None, None, :]                                      # (BB, KP, BTS)
                acc_t += _sum(_sum(tl.where(hit, w[:, :, None], 0.0), 0), 0)
            tl.store(dsig_ptr + rt, acc_t.to(dsig_ptr.dtype.element_ty), mask=rt < NT)


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
            acc_t = tl.full((BT,), 0.0, tl.float32)  # (not "acc": the branches' values must not share a name)
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
                acc_t += _sum(d * dg, 0)
            tl.store(dsig_ptr + rt, acc_t.to(dsig_ptr.dtype.element_ty), mask=t_ok)


# =====================================================================================
# Configs: pinned from kind_linear_plans; KIND_FAST_AUTOTUNE=1 tunes the fused kernel
# =====================================================================================
def bucket(n: int) -> int:
    """Autotune key bucket of a row count: the next power of two."""
    return triton.next_power_of_2(max(int(n), 1))


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors: the device's; 132 (the reference GPU) for ``meta`` tensors,
    which is how the static audit asks what a launcher would launch; 4 under the interpreter,
    so the split paths get exercised."""
    if device.type == "meta":
        return 132
    if device.type != "cuda":
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _interpret(device: torch.device) -> bool:
    return device.type not in ("cuda", "meta")


def fused_config(m: int, n: int, kd: int, kp: int, t: int, device: torch.device, *, has_base: bool = True,
                 has_out: bool = True) -> dict:
    """The pinned plan of the fused / rows kernel for one shape, as a dict (kernels/kind_linear_plans.py)."""
    return _plan(m, n, kd, kp, t, device, has_base, has_out).as_dict()


def _plan(m, n, kd, k, t, device, has_base, has_out) -> FusedPlan:
    return plan_fused(m, n, kd, k, t, has_base=has_base, has_out=has_out, interpret=_interpret(device),
                      sms=num_sms(device))


def _capturing() -> bool:
    """True inside torch.compile tracing or CUDA-graph capture (the test of
    ``kind_fast._tracing.capturing_or_tracing``, written with torch alone: the kernels import
    nothing of the package; tests/test_kind_linear_triton_schedule.py checks they agree)."""
    if torch.compiler.is_compiling():
        return True
    try:
        from torch._guards import TracingContext

        if TracingContext.try_get() is not None:
            return True
    except ImportError:  # pragma: no cover - very old torch
        pass
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _autotune_enabled(device: torch.device) -> bool:
    """Autotuning only on a GPU, when asked for, never in deterministic mode and never while a
    CUDA graph is being captured (benchmarking inside a capture breaks it)."""
    return (
        device.type == "cuda"
        and os.environ.get("KIND_FAST_AUTOTUNE", "0") == "1"
        and not torch.are_deterministic_algorithms_enabled()
        and not _capturing()
    )


# (BN, BK, num_warps, num_stages) of the autotune space of the fused kernel (one-class tiles).
# The static audit (python -m kind_fast.perf.audit) compiles every entry the pruning below keeps at
# KP 16/32/64/128: none spills. Pruned: 4 warps with 128-row tiles or KP = 128 (they spill),
# BN > 64 at KP >= 64 and 4 stages at KP = 128 (likewise). G/NSH follow from (KP, BN) as in the
# pinned plans.
AUTOTUNE_SPACE = ((64, 64, 4, 3), (64, 64, 4, 4), (64, 64, 8, 3), (64, 64, 8, 4), (128, 64, 8, 3), (128, 64, 8, 4),
                  (128, 32, 8, 4))


def autotune_configs(n: int, kp: int, bm: int) -> list[triton.Config]:
    """The autotune configs of the fused kernel for an output width, KP and row tile (BM is
    host-chosen): the space above without the configs the audit shows spilling."""
    out = []
    for bn, bk, w, st in AUTOTUNE_SPACE:
        if kp >= 128 and (bn > 64 or w < 8 or st > 3):
            continue
        if kp >= 64 and bn > 64:  # 128 columns beside a (BM, 64) shrink spill (as the pinned plans)
            continue
        if bm == 128 and w < 8:
            continue
        g, nsh = owner_split(kp, bn, n)
        out.append(triton.Config(dict(BN=bn, BK=bk, G=g, NSH=nsh), num_warps=w, num_stages=st))
    return out


@functools.lru_cache(maxsize=None)
def _autotuned_fused(n: int, kp: int, bm: int):
    """kind_linear_fused_kernel under triton.autotune for one (N, KP, BM) (each trial publishes
    with its own epoch: nothing to reset between trials)."""
    return triton.autotune(configs=autotune_configs(n, kp, bm),
                           key=["M_BUCKET", "N", "KD", "K", "ONE_CLASS", "DS_PARTIAL"])(kind_linear_fused_kernel)


# Nanoseconds a program waits (GPU clock) for a shrink part its owner has not published yet
# before recomputing it itself: owners run with their row's other tiles and publish before
# those reach their epilogue, so this bounds a rare wait (an owner descheduled, a preempted or
# shared GPU) by about the cost of the recompute. 0 under the interpreter, which runs the
# programs one after another (a program ahead of its owners recomputes at once).
SPIN_NS = 2000


# =====================================================================================
# Launchers
# =====================================================================================
def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


# Per device: [state (3,) int64 = (epoch of the last launch, CTAs finished in the running one,
# the running one's next program), flags int64, counters int32 of the tailor-gradient
# reduction]. Zeroed once when made (or grown); every launch after that needs no memset: a
# launch publishes with a new epoch and its last CTA resets the others, and the reduction's
# last program of a block resets its counter.
_DEVICE_STATE: dict = {}
_MIN_FLAGS = 1 << 16


def device_state(device: torch.device, flags: int = 0, counters: int = 0) -> tuple[torch.Tensor, ...]:
    """(state, flags, counters) of ``device``, grown (zeroed) when a launch needs more. One set
    per device: launches of these kernels on one device must not overlap in time (one stream,
    as a training or sampling loop runs them; a CUDA graph keeps its captured order)."""
    key = (device.type, device.index)
    st = _DEVICE_STATE.get(key)
    if st is None:
        st = [torch.zeros(3, dtype=torch.int64, device=device), torch.zeros(0, dtype=torch.int64, device=device),
              torch.zeros(0, dtype=torch.int32, device=device)]
        _DEVICE_STATE[key] = st
    if st[1].numel() < flags:
        st[1] = torch.zeros(max(flags, _MIN_FLAGS), dtype=torch.int64, device=device)
    if st[2].numel() < counters:
        st[2] = torch.zeros(max(counters, 4096), dtype=torch.int32, device=device)
    return tuple(st)


def _tma_ready(t: torch.Tensor) -> bool:
    """A 2-D tensor a TMA descriptor can address: unit inner stride, 16-byte aligned rows and base."""
    if t.dim() != 2 or t.stride(1) != 1 or (t.stride(0) * t.element_size()) % 16:
        return False
    return t.device.type == "meta" or t.data_ptr() % 16 == 0


def _descriptors(a, base, base_transposed, plan):
    """(TMA, a_desc, b_desc, bo_desc): TMA descriptors of the row operand and of W_G (blocks
    for whole tiles and for the owners' BN/G columns) when both can take one; else the tensors."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    if not (_tma_ready(a) and _tma_ready(base)):
        return False, a, base, base
    bng = plan.BN // plan.G
    a_desc = TensorDescriptor.from_tensor(a, [plan.BM, plan.BK])
    if base_transposed:  # forward: W_G is (N, KD); blocks (BN, BK) are read transposed
        return True, a_desc, TensorDescriptor.from_tensor(base, [plan.BN, plan.BK]), \
            TensorDescriptor.from_tensor(base, [bng, plan.BK])
    return True, a_desc, TensorDescriptor.from_tensor(base, [plan.BK, plan.BN]), \
        TensorDescriptor.from_tensor(base, [plan.BK, bng])


def fused(
    a: torch.Tensor, base: torch.Tensor | None, base_transposed: bool, bias: torch.Tensor | None,
    p: torch.Tensor, q: torch.Tensor, sigma: torch.Tensor, idx: torch.Tensor, val: torch.Tensor,
    labels: torch.Tensor, *, h_saved: torch.Tensor | None = None, write_shrink: bool = True,
    with_out: bool = True, plan: FusedPlan | None = None, force_local: bool = False, reverse_owners: bool = False,
    autotune: bool | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None, dict]:
    """out = a·B + ((a·P[ids]ᵀ) ⊙ s)·Q[ids] + bias, with the shrink returned.

    ``base`` is W_G (out, in); the forward passes ``base_transposed=True`` (B = W_Gᵀ), the
    dx pass False (B = W_G). ``base=None`` drops the dense term (path M2: the learngenes are
    slots of P/Q); ``with_out=False`` runs the shrink only. With ``h_saved`` the per-tile
    partials of Σ dh_s ⊙ h come back too. Returns (out, shrink (M, K) fp32, partials, config).
    ``plan`` overrides the pinned plan (``plan_fused``; tests); ``force_local`` makes every program
    of the fused kernel recompute the shrink instead of taking the owners' parts, and
    ``reverse_owners`` runs a row's owners in reverse order (tests, see REVERSE_OWNERS);
    ``autotune`` overrides the KIND_FAST_AUTOTUNE rule (the static audit lists the space).
    """
    out, shr, part, _, _, cfg = _fused(a, base, base_transposed, bias, p, q, sigma, idx, val, labels,
                                       h_saved=h_saved, write_shrink=write_shrink, with_out=with_out, plan=plan,
                                       force_local=force_local, reverse_owners=reverse_owners, autotune=autotune)
    return out, shr, part, cfg


def fused_dx(
    g: torch.Tensor, w_g: torch.Tensor, u_t: torch.Tensor, v_t: torch.Tensor, sigma: torch.Tensor,
    idx: torch.Tensor, val: torch.Tensor, labels: torch.Tensor, h: torch.Tensor, x: torch.Tensor, *,
    need_du: bool, need_dv: bool, need_ds: bool, plan: FusedPlan | None = None, force_local: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, dict]:
    """The dx pass of path M1 with the tailor-gradient partials (one-class row tiles).

    dx = g·W_G + (dh_s ⊙ s)·V_T[ids] as ``fused`` computes it, and on the way, in the same
    launch: per row tile the slot partials of dU_T ((h ⊙ s')ᵀ·g, by the owners while g streams
    through their K-loop) and of dV_T ((dh_s ⊙ s')ᵀ·x, by every tile for its columns: x read
    once), and the ds partials. Returns (dx, ds partials, dU_T partials (m_tiles, KP, out),
    dV_T partials (m_tiles, KP, in), config); ``tailor_reduce`` turns them into gradients."""
    m, n_out = g.shape
    n_in = v_t.shape[1]
    plan = plan or plan_fused(m, n_in, n_out, idx.shape[1], m // labels.shape[0], partials=need_du or need_dv,
                              interpret=_interpret(g.device), sms=num_sms(g.device))
    if not plan.ONE_CLASS:
        raise ValueError("fused_dx needs one-class row tiles (T a multiple of the row tile)")
    dx, _, part, pu, pv, cfg = _fused(g, w_g, False, None, u_t, v_t, sigma, idx, val, labels,
                                      h_saved=h if (need_ds or need_du) else None, write_shrink=False, plan=plan,
                                      force_local=force_local, x=x if need_dv else None, du=need_du)
    return dx, (part if need_ds else None), pu, pv, cfg


def _fused(a, base, base_transposed, bias, p, q, sigma, idx, val, labels, *, h_saved=None, write_shrink=True,
           with_out=True, plan=None, force_local=False, reverse_owners=False, autotune=None, x=None, du=False):
    m, kd = a.shape
    k = idx.shape[1]
    n = q.shape[1]
    t = m // labels.shape[0]
    dev = a.device
    has_base = base is not None
    plan = plan or _plan(m, n, kd, k, t, dev, has_base, with_out)
    bm, kp, spt = plan.BM, plan.KP, plan.SPT
    m_tiles = triton.cdiv(m, bm)
    out = torch.empty((m, n), dtype=a.dtype, device=dev) if with_out else None
    shr = torch.empty((m, k), dtype=torch.float32, device=dev)
    part = torch.empty((m_tiles, spt, kp), dtype=torch.float32, device=dev) if h_saved is not None else None
    dummy = shr
    common = dict(BM=bm, KP=kp, SPT=spt, HAS_BIAS=bias is not None, ONE_CLASS=plan.ONE_CLASS,
                  DS_PARTIAL=h_saved is not None, PREC=_prec(a.dtype))
    weights = (bias if bias is not None else dummy, p, q, sigma, idx, val, labels)
    pu = pv = None
    if plan.tiles:
        use_tma, a_desc, b_desc, bo_desc = _descriptors(a, base, base_transposed, plan)
        s_bk, s_bn = (base.stride(1), base.stride(0)) if base_transposed else (base.stride(0), base.stride(1))
        if du:
            pu = torch.empty((m_tiles, kp, kd), dtype=a.dtype, device=dev)
        if x is not None:
            pv = torch.empty((m_tiles, kp, n), dtype=a.dtype, device=dev)
        strides = (a.stride(0), a.stride(1), out.stride(0), out.stride(1), s_bk, s_bn,
                   p.stride(0), p.stride(1), q.stride(0), q.stride(1),
                   x.stride(0) if x is not None else 0, x.stride(1) if x is not None else 0)
        state, flags, _ = device_state(dev, flags=m_tiles * plan.NSH * 2)
        spin = 0 if _interpret(dev) else SPIN_NS
        head = (a, a_desc, out, shr, h_saved if h_saved is not None else dummy, part if part is not None else dummy)
        launch = (flags, state)
        tail = (x if x is not None else dummy, pu if pu is not None else dummy, pv if pv is not None else dummy)
        flags_in = dict(DU_PART=du, DV_PART=x is not None, TMA=use_tma, B_TRANS=base_transposed)
        tune = autotune if autotune is not None else _autotune_enabled(dev)
        if tune and plan.ONE_CLASS and not (du or x is not None):
            sizes = (m, n, kd, k, t, bucket(m))
            slots = num_sms(dev) * plan.ctas_per_sm
            scratch = torch.empty((slots, bm, kp), dtype=torch.float32, device=dev)

            def grid(meta):
                return (min(m_tiles * (meta["G"] + triton.cdiv(n, meta["BN"]) - 1), slots),)

            # the rotation stride for BK = 64; the kernel takes the row's start step modulo its
            # own step count, so any stride is correct for the BK = 32 configs too
            rot = rotation_stride(triton.cdiv(kd, 64))
            # (autotuning compiles its own descriptors' block shapes: pointer loads here)
            _autotuned_fused(n, kp, bm)[grid](a, a, *head[2:], *launch, scratch, base, base, base, *weights, *tail,
                                              *sizes, rot, *strides, SPIN_NS=spin, FORCE_LOCAL=False,
                                              REVERSE_OWNERS=False, DU_PART=False, DV_PART=False, TMA=False,
                                              B_TRANS=base_transposed, **common)
            return out, shr, part, pu, pv, plan.as_dict()
        steps = triton.cdiv(kd, plan.BK)
        scratch = torch.empty((plan.grid, bm, kp), dtype=torch.float32, device=dev)
        kind_linear_fused_kernel[(plan.grid,)](
            *head, *launch, scratch, base, b_desc, bo_desc, *weights, *tail, m, n, kd, k, t, bucket(m),
            rotation_stride(steps), *strides, BN=plan.BN, BK=plan.BK, G=plan.G, NSH=plan.NSH, SPIN_NS=spin,
            FORCE_LOCAL=force_local, REVERSE_OWNERS=reverse_owners, **flags_in,
            num_warps=plan.num_warps, num_stages=plan.num_stages, **common)
    else:
        head = (a, out if with_out else dummy, shr, h_saved if h_saved is not None else dummy,
                part if part is not None else dummy)
        ng = plan.NG if with_out else 1
        strides = (a.stride(0), a.stride(1), out.stride(0) if with_out else 0, out.stride(1) if with_out else 0,
                   p.stride(0), p.stride(1), q.stride(0), q.stride(1))
        kind_linear_rows_kernel[(m_tiles * ng,)](
            *head, *weights, m, n, kd, k, t, bucket(m), ng, *strides, BN=plan.BN, BK=plan.BK, HAS_OUT=with_out,
            WRITE_SHRINK=write_shrink, num_warps=plan.num_warps, num_stages=plan.num_stages, **common)
    return out, shr, part, pu, pv, plan.as_dict()


def tailor_reduce(
    pu: torch.Tensor | None, pv: torch.Tensor | None, part: torch.Tensor | None, idx: torch.Tensor,
    val: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor, m: int, bm: int, *, n_t: int,
    du_dtype: torch.dtype, dv_dtype: torch.dtype, dval_dtype: torch.dtype, dsig_dtype: torch.dtype,
    need_dval: bool, need_dsig: bool, plan: TailorReducePlan | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dU_T, dV_T, dval, dσ_T) from ``fused_dx``'s partials in one launch (each only when its
    partials are given / it is asked for; see kind_linear_tailor_reduce_kernel)."""
    dev = idx.device
    c1, k = idx.shape
    kp = padded_active(k)
    t = m // labels.shape[0]
    n_out = pu.shape[2] if pu is not None else 0
    n_in = pv.shape[2] if pv is not None else 0
    plan = plan or plan_tailor_reduce(m, n_out, n_in, n_t, k, t, bm, interpret=_interpret(dev), sms=num_sms(dev))
    split = plan.SPLIT
    du = torch.empty((n_t, n_out), dtype=du_dtype, device=dev) if pu is not None else None
    dv = torch.empty((n_t, n_in), dtype=dv_dtype, device=dev) if pv is not None else None
    dval = torch.empty((c1, k), dtype=dval_dtype, device=dev) if need_dval else None
    dsig = torch.empty((n_t,), dtype=dsig_dtype, device=dev) if need_dsig else None
    tb = triton.cdiv(n_t, plan.BT)
    ob_u, ob_v = triton.cdiv(n_out, plan.BO), triton.cdiv(n_in, plan.BO)
    _, _, counters = device_state(dev, counters=tb * (ob_u + ob_v))
    sp = torch.empty((split, n_t, n_out + n_in), dtype=torch.float32, device=dev) if split > 1 else None
    progs = tb * (ob_u + ob_v) * split + (c1 if need_dval else 0) + (triton.cdiv(n_t, 16) if need_dsig else 0)
    if progs == 0:
        return du, dv, dval, dsig
    # an absent operand is passed as its twin (the kernel picks between the two at run time, so
    # their pointer types must agree), or as σ when both are absent
    src_u = pu if pu is not None else (pv if pv is not None else sigma)
    src_v = pv if pv is not None else src_u
    dst_u = du if du is not None else (dv if dv is not None else sigma)
    dst_v = dv if dv is not None else dst_u
    kind_linear_tailor_reduce_kernel[(progs,)](
        src_u, src_v, part if part is not None else sigma, dst_u, dst_v, sp if sp is not None else sigma, counters,
        dval if dval is not None else sigma, dsig if dsig is not None else sigma, idx, val, sigma, labels,
        m, n_out, n_in, n_t, k, t, labels.shape[0], c1, split,
        BM=bm, KP=kp, BT=plan.BT, BO=plan.BO, NEED_DU=pu is not None, NEED_DV=pv is not None,
        NEED_DVAL=need_dval, NEED_DSIG=need_dsig, BB=16, BTS=16, RB=8, num_warps=plan.num_warps,
        num_stages=plan.num_stages)
    return du, dv, dval, dsig


def gate_tables(idx: torch.Tensor, val: torch.Tensor, n_t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """pos (C+1, N_T) int32 slot of each tailor per class (-1: off) and D (C+1, N_T) fp32."""
    c1, k = idx.shape
    pos = torch.empty((c1, n_t), dtype=torch.int32, device=idx.device)
    dg = torch.empty((c1, n_t), dtype=torch.float32, device=idx.device)
    kind_linear_gate_tables_kernel[(c1,)](idx, val, pos, dg, n_t, k, KP=padded_active(k),
                                          BT=min(64, padded_active(n_t)))
    return pos, dg


def tile_lists(pos: torch.Tensor, labels: torch.Tensor, m: int, plan: TailorPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """(lists (t_blocks, m_tiles) int32, counts (t_blocks,) int32): for each tailor block, the
    row tiles (in increasing order) that contain a row whose class uses a tailor of the block.
    On the device, no host synchronisation (a stable sort keeps the tile order)."""
    b = labels.shape[0]
    t = m // b
    bm, bt, n_t = plan.BM, plan.BT, pos.shape[1]
    used = pos >= 0                                                               # (C+1, N_T)
    pad = plan.t_blocks * bt - n_t
    if pad:
        used = torch.cat([used, used.new_zeros((used.shape[0], pad))], 1)
    used = used.view(used.shape[0], plan.t_blocks, bt).any(2)                     # (C+1, t_blocks)
    per_sample = used.index_select(0, labels.long())                              # (B, t_blocks)
    first = torch.arange(plan.m_tiles, device=pos.device) * bm
    s_lo = first // t
    s_hi = (torch.clamp(first + bm, max=m) - 1) // t
    if plan.ONE_CLASS:
        per_tile = per_sample.index_select(0, s_lo)
    else:  # any sample the tile touches: prefix counts over samples
        c = torch.cat([per_sample.new_zeros((1, plan.t_blocks), dtype=torch.int32),
                       per_sample.to(torch.int32).cumsum(0, dtype=torch.int32)])
        per_tile = (c.index_select(0, s_hi + 1) - c.index_select(0, s_lo)) > 0
    keys = (~per_tile).to(torch.int8).t()                                        # (t_blocks, m_tiles): 0 = used
    order = torch.sort(keys, dim=1, stable=True).indices.to(torch.int32)
    counts = per_tile.sum(0, dtype=torch.int32)
    return order.contiguous(), counts


def tailor_grad(
    w: torch.Tensor, z: torch.Tensor, pos: torch.Tensor, dg: torch.Tensor, sigma: torch.Tensor,
    labels: torch.Tensor, n_t: int, out_dtype: torch.dtype, *, plan: TailorPlan | None = None,
) -> torch.Tensor:
    """out[n] = Σ_m w[m, slot(c_m, n)] σ_n D[c_m, n] z[m]: dU_T (w = h, z = g) or dV_T (w = dh_s, z = x)."""
    m, o = z.shape
    k = w.shape[1]
    t = m // labels.shape[0]
    dev = z.device
    plan = plan or plan_tailor_grad(m, o, n_t, k, t, interpret=_interpret(dev), sms=num_sms(dev))
    split = plan.SPLIT
    if split == 1:
        out = torch.empty((n_t, o), dtype=out_dtype, device=dev)
    else:
        out = torch.empty((split, n_t, o), dtype=torch.float32, device=dev)
    if plan.SKIP:
        lists, counts = tile_lists(pos, labels, m, plan)
    else:  # dense gates: every block walks every row tile
        lists = torch.arange(plan.m_tiles, dtype=torch.int32, device=dev).expand(plan.t_blocks, -1).contiguous()
        counts = torch.full((plan.t_blocks,), plan.m_tiles, dtype=torch.int32, device=dev)
    kind_linear_tailor_grad_kernel[(plan.t_blocks, plan.o_blocks, split)](
        w, z, out, pos, dg, sigma, labels, lists, counts, m, o, n_t, k, t, split, z.stride(0), z.stride(1),
        BM=plan.BM, BT=plan.BT, BO=plan.BO, PARTIALS=split > 1, ONE_CLASS=plan.ONE_CLASS,
        PREC=_prec(z.dtype), num_warps=plan.num_warps, num_stages=plan.num_stages)
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
        b, c1, n_t, k, KP=ds.shape[1], BB=32, BT=bt,
        NEED_DVAL=need_dval, NEED_DSIG=need_dsig)
    return dval, dsig


__all__ = [
    "INTERPRETED", "MAX_ACTIVE", "fused", "fused_dx", "tailor_reduce", "device_state", "fused_config", "gate_tables",
    "tailor_grad", "tile_lists", "PERSISTENT_KERNELS",
    "sample_ds", "gate_grads", "padded_active", "bucket", "row_tile", "num_sms", "samples_per_tile",
    "autotune_configs",
]
