"""Launch plans of the Triton kind_linear kernels and the HBM-traffic model behind them.

``python -m kind_fast.perf.perfmodel`` prints the traffic table of every DiT-XL/2 layer pass (paths
M1 and M3).

The launchers (kernels/kind_linear.py, kernels/kind_linear_merged.py) take their tile sizes,
program order and split counts from the ``plan_*`` functions of kernels/kind_linear_plans.py
(imported as ``kind_fast.kernels.kind_linear_plans``, beside the kernels, so that the kernels
import nothing of the package); this module re-exports them. ``traffic_*`` replays a plan's
actual schedule through a cache model and counts the bytes that cross the HBM interface. Both
are pure Python (no torch, no Triton), so a CPU machine can check a GPU schedule.

What the kernels do (the kernel files have the math):

fused (forward y = x·W_Gᵀ + ((x·V_T[ids]ᵀ) ⊙ s)·U_T[ids] + b, and dx the same with g, W_G, U_T, V_T)
    One program per output tile, row-major, run by a persistent grid (SMs × CTAs/SM) that
    takes them in that order from a device counter, so a row's tiles run together and its A
    block (BM×KD) comes from HBM once. Tile 0 of a row runs as G owner sub-tiles of BN/G
    columns that also compute KP/NSH columns of the shrink (h = a·P[ids]ᵀ) and publish them;
    being shorter than a tile, they finish before the other tiles of the row need h at their
    epilogue (a part not published then is recomputed). Every program of row r starts its
    K-loop at step (r·stride) mod steps. The dx pass with the tailor-gradient partials adds
    the owners' dU_T dot (their work (BN/G + 2·KP/NSH)/BN) and each tile's x read and dV_T
    partial. Without a dense term (path M2) or without outputs (shrink only) a program owns a
    row tile and NG of its N-tiles instead ("row programs"): the shrink, then the expand.

tailor_reduce (path M1 backward: dU_T, dV_T from the dx pass's slot partials; dσ_T, dval)
    Programs (tailor block, column block, split) gather, for each row tile of their split,
    the partial rows of their tailors; splits are added in order by the last to arrive.

tailor_grad (the other backwards: dU_T = Σ_m (h ⊙ s)ᵀ g, dV_T = Σ_m (dh_s ⊙ s)ᵀ x, scattered)
    Programs (tailor block, column block, split), tailor block fastest. With block gates
    (2K <= N_T) each tailor block walks a compacted list of the row tiles whose class uses
    it; SPLIT programs share a block's list and write fp32 partials summed in a fixed order.

merged_gemm (path M3, kernels/kind_linear_merged.py: y = x·W[slot]ᵀ + b over cached merged
    class weights) One program per output tile in row-major order (a row tile's N-tiles run
    together), each row tile's K-loop from its own rotation step; one program per SM (4-stage
    ring). A CFG batch uses two weights (class c, null); both count as compulsory.

Model assumptions (state them with every number):
- The reference machine: 132 SMs (H100 SXM / H200), L2 = 50 MB. Only half of it is counted
  (``l2_effective``): the L2 is two partitions and a line read by SMs on both sides can be
  held in both, and the real replacement policy is not LRU, so the model budgets 25 MB.
- Programs are dispatched in launch order onto ``sms × CTAs/SM`` slots (CTAs/SM from the
  plan, checked against the compiled kernels by the static audit) and run for a time
  proportional to their MMA work; every program streams its operands uniformly over its
  K-loop (each operand block is cut into ``chunks`` pieces read at evenly spaced times).
- The L2 is a fully associative LRU cache of ``l2_effective`` bytes at chunk granularity;
  a read that misses costs its bytes once; every written byte reaches HBM once (write-back,
  no fetch on full-line writes); reads that hit cost nothing. The output tiles, which the
  kernel stores with ``eviction_policy="evict_first"`` (no later program of the launch reads
  them), enter at the cold end; everything else is plain LRU.
- Not modelled: TLB and DRAM page effects, L1, the gate tables and the tiny gate-gradient
  kernels (kilobytes), other kernels running at the same time.
- Compulsory bytes: every input read once, every output written once, at the dtypes the
  kernels use (h, dh_s and partials in fp32).

The model counts bytes, not time: ``traffic_*`` also reports the schedule's waves and how
many shrink parts a program would have to recompute; FLOP efficiency and latency are for a
GPU to measure.
"""

from __future__ import annotations

import argparse
import heapq
import math
import sys
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

# The launch plans live beside the kernels (kernels/kind_linear_plans.py, pure Python, importing
# nothing of kind_fast); this module re-exports them (and the helpers the traffic model uses).
from kind_fast.kernels.kind_linear_plans import (  # noqa: F401
    H100,
    MAX_ACTIVE,
    MAX_SAMPLES_PER_TILE,
    REDUCE_ROWS,
    REFERENCE,
    FusedPlan,
    Gpu,
    MergedDwPlan,
    MergedGemmPlan,
    TailorPlan,
    TailorReducePlan,
    _tile_config,
    cdiv,
    fused_unsupported,
    k_rotation,
    merged_row_tile,
    n_groups,
    next_pow2,
    owner_split,
    padded_active,
    partials_supported,
    plan_fused,
    plan_merged_dw,
    plan_merged_gemm,
    plan_tailor_grad,
    plan_tailor_reduce,
    rotation_stride,
    row_tile,
    samples_per_tile,
)

__all__ = ["Gpu", "H100", "REFERENCE", "FusedPlan", "TailorPlan", "plan_fused", "plan_tailor_grad",
           "TailorReducePlan", "plan_tailor_reduce", "partials_supported",
           "padded_active", "row_tile", "samples_per_tile", "fused_unsupported", "owner_split", "k_rotation",
           "rotation_stride", "Traffic", "traffic_fused", "traffic_tailor_grad", "dit_xl_rows", "MAX_ACTIVE",
           "MergedGemmPlan", "MergedDwPlan", "merged_row_tile", "plan_merged_gemm", "plan_merged_dw",
           "traffic_tailor_reduce", "traffic_dx_partials",
           "traffic_merged_gemm", "dit_xl_merged_rows", "cfg_slots", "merged_grouped_tile"]

MB = 1 << 20


# =====================================================================================
# Traffic simulation
# =====================================================================================
@dataclass
class Traffic:
    read: int = 0            # bytes read from HBM
    written: int = 0         # bytes written to HBM
    compulsory: int = 0      # every input once, every output once
    programs: int = 0
    waves: float = 0.0
    slices_loaded: int = 0   # shrink parts a program found published at its epilogue
    recomputed: int = 0      # shrink parts a program recomputed (not published in time)
    waited: float = 0.0      # tile-times programs spent polling for a part
    notes: list = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.read + self.written

    @property
    def ratio(self) -> float:
        return self.total / max(self.compulsory, 1)


class _Lru:
    """Fully associative LRU cache over (key -> bytes) blocks, write-back."""

    def __init__(self, capacity: int):
        self.cap = capacity
        self.used = 0
        self.lines: OrderedDict = OrderedDict()  # key -> [bytes, dirty]
        self.read = 0
        self.written = 0

    def access(self, key, nbytes: int, write: bool, evict_first: bool = False) -> bool:
        """One access; ``evict_first``: the L2::evict_first hint, a new line goes to the cold end."""
        line = self.lines.get(key)
        if line is not None:
            if not evict_first:
                self.lines.move_to_end(key)
            if write:
                line[1] = True
            return True
        if not write:
            self.read += nbytes
        self.lines[key] = [nbytes, write]
        if evict_first:
            self.lines.move_to_end(key, last=False)
        self.used += nbytes
        while self.used > self.cap and self.lines:
            _, (b, dirty) = self.lines.popitem(last=False)
            self.used -= b
            if dirty:
                self.written += b
        return False

    def contains(self, key) -> bool:
        return key in self.lines

    def flush(self) -> None:
        for b, dirty in self.lines.values():
            if dirty:
                self.written += b
        self.lines.clear()
        self.used = 0


def _dispatch(durations: Sequence[float], slots: int) -> list[float]:
    """Start time of each program, launched in order onto the first free of ``slots``."""
    free = [0.0] * min(slots, max(len(durations), 1))
    heapq.heapify(free)
    starts = []
    for d in durations:
        s = heapq.heappop(free)
        starts.append(s)
        heapq.heappush(free, s + d)
    return starts


def traffic_fused(m: int, n: int, kd: int, k: int, t: int, *, pass_: str = "forward", plan: FusedPlan | None = None,
                  gpu: Gpu = REFERENCE, elt: int = 2, chunks: int = 8, n_t: int = 96, wait: float = 0.25) -> Traffic:
    """Bytes kind_linear_fused_kernel moves for one launch under ``plan`` (default: the
    launcher's). ``pass_`` "forward" (A = x, B = W_Gᵀ, writes y and h) or "dx" (A = g, B = W_G,
    reads the saved h for the ds partials, writes dx and dh_s).

    Time runs in units of one output tile's K-loop; an owner sub-tile takes (BN/G + its
    shrink columns)/BN of that. Every program of a row runs its K-loop from the row's
    rotation step and reads each operand chunk when its first K-step runs. At its end a
    program needs every shrink part: a part published by then is read from L2 (h tile);
    otherwise the program waits for it up to ``wait`` tile-times (the kernel polls) and
    failing that recomputes it, re-reading that part's P and the row's A (``recomputed``)."""
    plan = plan or plan_fused(m, n, kd, k, t, gpu=gpu)
    if not plan.tiles:
        raise ValueError("traffic_fused models the tile schedule (dense term and outputs)")
    kp, bm, bn, g_cnt, nsh = plan.KP, plan.BM, plan.BN, plan.G, plan.NSH
    m_tiles, n_tiles = plan.m_tiles, plan.n_tiles
    dx = pass_ == "dx"
    steps = cdiv(kd, plan.BK)
    bng, kpg = bn // g_cnt, kp // nsh
    p_bytes = n_t * kd * elt      # the shrink factor's rows (all tailors; read once)
    tr = Traffic()
    tr.compulsory = ((m * kd + kd * n + m * n) * elt + n_t * (kd + n) * elt + m * k * 4 * (2 if dx else 1)
                     + (m_tiles * plan.SPT * kp * 4 if dx else 0))
    lru = _Lru(gpu.l2_budget)
    slots = gpu.sms * plan.ctas_per_sm
    per_row = g_cnt + n_tiles - 1
    order = [(r, j) for r in range(m_tiles) for j in range(per_row)]

    def cols_of(j):  # (first column, width, shrink columns) of program j of a row
        if j < g_cnt:
            return j * bng, bng, (kpg if j < nsh else 0)
        return (j - g_cnt + 1) * bn, bn, 0

    durs = []
    for _, j in order:  # MMA work: the full tile width (masked columns still run) + shrink columns
        _, w, sh = cols_of(j)
        durs.append((w + sh) / bn)
    # a persistent grid takes programs in launch order from a device counter: the same order
    starts = _dispatch(durs, min(slots, plan.grid) if plan.grid else slots)
    tr.programs = len(order)
    tr.waves = sum(durs) / slots
    publish = {}
    events = []
    seq = 0

    def ev(tm, kind, key, nbytes):
        nonlocal seq
        events.append((tm, seq, kind, key, nbytes))
        seq += 1

    step_chunk = [st * chunks // steps for st in range(steps)]
    for (r, j), s0, d in zip(order, starts, durs):
        rows = min(bm, m - r * bm)
        c0, w, sh = cols_of(j)
        ncols = max(0, min(w, n - c0))
        ev(s0, "r", ("Q", j), n_t * ncols * elt)
        rho = k_rotation(r, steps)
        seen = set()
        for i in range(steps):
            st = (rho + i) % steps
            c = step_chunk[st]
            if c not in seen:
                seen.add(c)
                tm = s0 + d * (i + 0.5) / steps
                ev(tm, "r", ("A", r, c), rows * kd * elt // chunks)
                for bc in range(c0 // 64, cdiv(c0 + ncols, 64)):  # B by 64-column strips
                    ev(tm, "r", ("B", bc, c), kd * min(64, n - bc * 64) * elt // chunks)
                if sh:
                    ev(tm, "r", ("P", c), p_bytes // chunks)
        end = s0 + d
        if sh:
            publish[(r, j)] = end
            ev(end, "w", ("h", r, j), rows * sh * 4)
        ev(end, "need", (r, j), rows)
        if dx and j == 0:
            ev(end, "r", ("hsaved", r), rows * k * 4)
            ev(end, "w", ("part", r), plan.SPT * kp * 4)
        ev(end, "wf", ("y", r, j), rows * ncols * elt)
    events.sort(key=lambda e: (e[0], e[1]))
    for tm, _, kind, key, nbytes in events:
        if kind == "need":
            r, j = key
            for g in range(nsh):
                pub = publish.get((r, g), math.inf)
                if pub <= tm + (wait if j < g_cnt else 0.0):
                    tr.slices_loaded += 1
                    tr.waited += max(0.0, pub - tm)
                    lru.access(("h", r, g), nbytes * kpg * 4, False)
                else:
                    tr.recomputed += 1
                    for c in range(chunks):
                        lru.access(("A", r, c), nbytes * kd * elt // chunks, False)
                        lru.access(("P", c), p_bytes // chunks, False)
            continue
        lru.access(key, nbytes, kind in ("w", "wf"), evict_first=kind == "wf")
    lru.flush()
    tr.read, tr.written = lru.read, lru.written
    return tr


def traffic_tailor_grad(m: int, o: int, n_t: int, k: int, t: int, *, gate: str = "block",
                        plan: TailorPlan | None = None,
                        gpu: Gpu = REFERENCE, elt: int = 2, classes: int = 1000, seed: int = 0) -> Traffic:
    """Bytes of one tailor-gradient launch (dU_T: w = h, z = g; dV_T: w = dh_s, z = x) plus the
    fixed-order sum of its SPLIT partials. ``gate``: "block" (each class owns one block of K
    tailors; row tiles are listed per tailor block) or "random" (every block used by every row).
    Row tiles get uniformly random classes."""
    import random

    plan = plan or plan_tailor_grad(m, o, n_t, k, t, gpu=gpu)
    bm, bt, bo, split = plan.BM, plan.BT, plan.BO, plan.SPLIT
    m_tiles, t_blocks, o_blocks = plan.m_tiles, plan.t_blocks, plan.o_blocks
    rng = random.Random(seed)
    blocks_of_class = max(1, n_t // max(k, 1))
    lists = [[] for _ in range(t_blocks)]
    for mt in range(m_tiles):
        if plan.SKIP and gate == "block":
            c = rng.randrange(blocks_of_class)
            used = {b for b in range(t_blocks) if b * bt < (c + 1) * k and (b + 1) * bt > c * k}
        else:
            used = set(range(t_blocks))
        for b in used:
            lists[b].append(mt)
    tr = Traffic()
    tr.compulsory = (m * o * elt) + m * k * 4 + n_t * o * elt
    lru = _Lru(gpu.l2_budget)
    slots = gpu.sms * plan.ctas_per_sm
    progs = []
    for s in range(split):
        for ob in range(o_blocks):
            for b in range(t_blocks):
                lst = lists[b]
                per = cdiv(len(lst), split)
                progs.append((b, ob, s, lst[s * per:(s + 1) * per]))
    durs = [max(len(p[3]), 0.05) for p in progs]
    starts = _dispatch(durs, slots)
    tr.programs = len(progs)
    tr.waves = sum(durs) / slots / max(max(durs), 1e-9)
    events = []
    seq = 0
    for (b, ob, s, tiles), s0, d in zip(progs, starts, durs):
        cols = min(bo, o - ob * bo)
        for i, mt in enumerate(tiles):
            tm = s0 + d * (i + 0.5) / max(len(tiles), 1)
            rows = min(bm, m - mt * bm)
            events.append((tm, seq, "r", ("z", mt, ob), rows * cols * elt))
            seq += 1
            events.append((tm, seq, "r", ("w", mt), rows * k * 4))
            seq += 1
        rows_t = min(bt, n_t - b * bt)
        events.append((s0 + d, seq, "w", ("part", s, b, ob) if split > 1 else ("out", b, ob),
                       rows_t * cols * (4 if split > 1 else elt)))
        seq += 1
    events.sort(key=lambda e: (e[0], e[1]))
    for _, _, kind, key, nbytes in events:
        lru.access(key, nbytes, kind == "w")
    if split > 1:  # out = partials.sum(0): read every partial, write the result
        for b in range(t_blocks):
            for ob in range(o_blocks):
                cols = min(bo, o - ob * bo)
                rows_t = min(bt, n_t - b * bt)
                for s in range(split):
                    lru.access(("part", s, b, ob), rows_t * cols * 4, False)
                lru.access(("out", b, ob), rows_t * cols * elt, True)
    lru.flush()
    tr.read, tr.written = lru.read, lru.written
    return tr


def merged_grouped_tile(pid: int, m_tiles: int, n_tiles: int, group_m: int) -> tuple[int, int]:
    """(row tile, N tile) of program ``pid`` in the segmented GEMM's grouped launch order
    (the kernel's ``_grouped_tile``): GROUP_M row tiles per N band."""
    per_group = group_m * n_tiles
    first_m = (pid // per_group) * group_m
    rows = min(m_tiles - first_m, group_m)
    return first_m + (pid % per_group) % rows, (pid % per_group) // rows


def traffic_merged_gemm(m: int, n: int, kd: int, t: int, slots: Sequence[int], *, plan: MergedGemmPlan | None = None,
                        gpu: Gpu = REFERENCE, elt: int = 2, chunks: int = 8, bias: bool = True) -> Traffic:
    """Bytes of one segmented-GEMM launch (path M3, kind_linear_merged_gemm_kernel): A (M, KD)
    rows of x (or g), B[slot] (KD, N) the merged weight of each sample's slot (``slots``: one
    entry per sample, B = M / T), out (M, N) stored evict-first. Programs run in the kernel's
    grouped order; a program's duration is its K-loops (one per distinct slot among its
    rows); each K-loop reads the row block and its slot's weight band in ``chunks`` pieces at
    evenly spaced times. Compulsory: A once, the weight of every used slot once, out once."""
    plan = plan or plan_merged_gemm(m, n, kd, t)
    bm, bn = plan.BM, plan.BN
    m_tiles, n_tiles = plan.m_tiles, plan.n_tiles
    used = sorted(set(slots))
    tr = Traffic()
    tr.compulsory = (m * kd + len(used) * kd * n + m * n + (n if bias else 0)) * elt
    lru = _Lru(gpu.l2_budget)
    progs = [merged_grouped_tile(p, m_tiles, n_tiles, plan.GROUP_M) for p in range(m_tiles * n_tiles)]

    def tile_slots(r):
        first, last = r * bm, min(m, (r + 1) * bm) - 1
        return sorted({slots[b] for b in range(first // t, last // t + 1)})

    row_slots = [tile_slots(r) for r in range(m_tiles)]
    durs = [float(len(row_slots[r])) for r, _ in progs]
    starts = _dispatch(durs, gpu.sms * plan.ctas_per_sm)
    tr.programs = len(progs)
    tr.waves = sum(durs) / (gpu.sms * plan.ctas_per_sm)
    events = []
    seq = 0
    steps = cdiv(kd, plan.BK)
    step_chunk = [st * chunks // steps for st in range(steps)]
    for (r, j), s0, d in zip(progs, starts, durs):
        rows = min(bm, m - r * bm)
        cols = min(bn, n - j * bn)
        loops = row_slots[r]
        rho = k_rotation(r, steps) if plan.ROTATE else 0
        for li, sl in enumerate(loops):
            seen = set()
            for i in range(steps):
                c = step_chunk[(rho + i) % steps]
                if c in seen:
                    continue
                seen.add(c)
                tm = s0 + li + (i + 0.5) / steps
                events.append((tm, seq, "r", ("A", r, c), rows * kd * elt // chunks))
                events.append((tm, seq + 1, "r", ("B", sl, j, c), kd * cols * elt // chunks))
                seq += 2
        if bias:
            events.append((s0, seq, "r", ("bias", j), cols * elt))
            seq += 1
        events.append((s0 + d, seq, "wf", ("y", r, j), rows * cols * elt))
        seq += 1
    events.sort(key=lambda e: (e[0], e[1]))
    for _, _, kind, key, nbytes in events:
        lru.access(key, nbytes, kind == "wf", evict_first=kind == "wf")
    lru.flush()
    tr.read, tr.written = lru.read, lru.written
    return tr


def cfg_slots(samples: int) -> list[int]:
    """Slots of a classifier-free-guidance batch: the first half class c (slot 0), the second
    half the null class (slot 1), as DiT's sampling loop builds it."""
    return [0] * (samples // 2) + [1] * (samples - samples // 2)


# =====================================================================================
# DiT-XL/2 table
# =====================================================================================
DIT_XL = dict(d=1152, mlp=4608, k=32, n_t=96, t=256)
LAYERS = (("q", 1152, 1152), ("k", 1152, 1152), ("v", 1152, 1152), ("proj", 1152, 1152), ("fc1", 1152, 4608),
          ("fc2", 4608, 1152))


def traffic_tailor_reduce(m: int, n_out: int, n_in: int, n_t: int, k: int, t: int, *, gpu: Gpu = REFERENCE,
                          elt: int = 2) -> Traffic:
    """Bytes of kind_linear_tailor_reduce_kernel: every written slot partial of dU_T and dV_T
    (K per row tile) read once, each program's fp32 sum written and read back when SPLIT > 1,
    the gradients written. Its programs each read disjoint partial rows once: no reuse to
    model. Compulsory: the partials and the gradients."""
    bm = row_tile(t, padded_active(k), False)[0]
    plan = plan_tailor_reduce(m, n_out, n_in, n_t, k, t, bm, gpu=gpu)
    tr = Traffic()
    partials = cdiv(m, bm) * k * (n_out + n_in) * elt
    grads = n_t * (n_out + n_in) * elt
    tr.compulsory = partials + grads
    tr.read = partials + (plan.SPLIT * n_t * (n_out + n_in) * 4 if plan.SPLIT > 1 else 0)
    tr.written = grads + (plan.SPLIT * n_t * (n_out + n_in) * 4 if plan.SPLIT > 1 else 0)
    tr.programs = plan.programs
    return tr


def traffic_dx_partials(m: int, n_in: int, n_out: int, k: int, t: int, *, gpu: Gpu = REFERENCE, elt: int = 2,
                        n_t: int = 96) -> Traffic:
    """The dx pass with the tailor-gradient partials (kernels.kind_linear.fused_dx): the fused
    kernel's schedule replayed as ``traffic_fused`` does (dx, dh_s, the ds partials), plus x read
    once (each tile reads the x tile matching its dx tile, in the row order the L2 model
    already sees streaming) and the dU_T / dV_T slot partials written once. The added bytes are
    compulsory for this pass: they count on both sides."""
    plan = plan_fused(m, n_in, n_out, k, t, partials=True, gpu=gpu)
    tr = traffic_fused(m, n_in, n_out, k, t, pass_="dx", plan=plan, gpu=gpu, elt=elt, n_t=n_t)
    extra = m * n_in * elt + plan.m_tiles * plan.KP * (n_in + n_out) * elt
    tr.compulsory += extra
    tr.read += m * n_in * elt
    tr.written += plan.m_tiles * plan.KP * (n_in + n_out) * elt
    return tr


def dit_xl_rows(ms: Sequence[int] = (8192, 65536), gpu: Gpu = REFERENCE, layers=LAYERS) -> list[dict]:
    """Modelled and compulsory bytes of every DiT-XL/2 layer pass of path M1 (forward; dx with
    the tailor-gradient partials; the reduction to dU_T, dV_T, dσ_T, dval)."""
    k, n_t, t = DIT_XL["k"], DIT_XL["n_t"], DIT_XL["t"]
    rows = []
    cache: dict = {}
    for m in ms:
        for name, n_in, n_out in layers:
            for pname in ("forward", "dx", "tailor reduce"):
                key = (m, n_in, n_out, pname)
                if key not in cache:
                    if pname == "forward":
                        cache[key] = traffic_fused(m, n_out, n_in, k, t, pass_="forward", gpu=gpu, n_t=n_t)
                    elif pname == "dx":
                        cache[key] = traffic_dx_partials(m, n_in, n_out, k, t, gpu=gpu, n_t=n_t)
                    else:
                        cache[key] = traffic_tailor_reduce(m, n_out, n_in, n_t, k, t, gpu=gpu)
                tr = cache[key]
                rows.append(dict(layer=f"DiT-XL/2.{name}", pass_=pname, M=m, n_in=n_in, n_out=n_out,
                                 compulsory=tr.compulsory, modelled=tr.total, ratio=tr.ratio, waves=tr.waves,
                                 slices_loaded=tr.slices_loaded, recomputed=tr.recomputed))
    return rows


def dit_xl_merged_rows(samples: Sequence[int] = (32, 256), gpu: Gpu = REFERENCE, layers=LAYERS) -> list[dict]:
    """Path M3 at DiT-XL/2 sampling: a CFG batch of ``samples`` images (half class c, half
    null: two merged weights, cached, so no merge), T = 256, the segmented GEMM's forward of
    every layer."""
    t = DIT_XL["t"]
    rows = []
    cache: dict = {}
    for b in samples:
        m = b * t
        for name, n_in, n_out in layers:
            key = (m, n_in, n_out)
            if key not in cache:
                cache[key] = traffic_merged_gemm(m, n_out, n_in, t, cfg_slots(b), gpu=gpu)
            tr = cache[key]
            rows.append(dict(layer=f"DiT-XL/2.{name}", pass_="M3 forward (CFG)", M=m, n_in=n_in, n_out=n_out,
                             compulsory=tr.compulsory, modelled=tr.total, ratio=tr.ratio, waves=tr.waves,
                             slices_loaded=0, recomputed=0))
    return rows


def markdown(rows: list[dict], gpu: Gpu = REFERENCE) -> str:
    out = [f"Model: {gpu.name}, L2 budget {gpu.l2_budget / MB:.0f} MB (see kind_fast/perf/perfmodel.py).", "",
           "| layer | pass | M | compulsory MB | modelled MB | modelled/compulsory | shrink parts recomputed |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        dep = r["slices_loaded"] + r["recomputed"]
        hit = f"{r['recomputed']}/{dep}" if dep else "-"
        out.append(f"| {r['layer']} | {r['pass_']} | {r['M']} | {r['compulsory'] / MB:.1f} | "
                   f"{r['modelled'] / MB:.1f} | {r['ratio']:.3f} | {hit} |")
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kind_fast.perf.perfmodel", description="HBM traffic of the DiT-XL/2 passes")
    ap.add_argument("--m", type=int, nargs="*", default=[8192, 65536])
    ap.add_argument("--l2-fraction", type=float, default=REFERENCE.l2_effective,
                    help="fraction of the 50 MB L2 the model may use (default %(default)s)")
    ap.add_argument("--markdown", metavar="PATH", help="also write the table (e.g. bench/results/traffic_dit_xl.md)")
    args = ap.parse_args(argv)
    gpu = Gpu(REFERENCE.name, REFERENCE.sms, REFERENCE.l2_bytes, args.l2_fraction)
    rows = dit_xl_rows(args.m, gpu) + dit_xl_merged_rows(tuple(m // DIT_XL["t"] for m in args.m), gpu)
    text = ("# HBM traffic model of the Triton kernels, DiT-XL/2 layer passes\n\n"
            "Generated by `python -m kind_fast.perf.perfmodel` (pure Python, no GPU). The launch plans the "
            "kernels use, replayed through the L2 model whose assumptions are in the docstring of "
            "`kind_fast/perf/perfmodel.py`: K = 32 of N_T = 96 tailors per class (block gates, uniformly random "
            "classes), T = 256 rows per image, bf16. Compulsory: every input read once, every output written "
            "once. The dx pass (path M1's backward) includes x read once and the tailor-gradient slot partials "
            "written once; the tailor reduce pass reads them. Path M3 rows: the segmented GEMM over the two cached "
            "merged weights of a CFG batch (first half "
            "class c, second half null; B = M / 256 images). Not measured on a GPU.\n\n" + markdown(rows, gpu))
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
