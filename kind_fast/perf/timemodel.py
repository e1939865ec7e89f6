"""Time model of the kind_linear op family on the reference GPU: every number here is MODELLED.

``python -m kind_fast.perf.timemodel [--markdown bench/results/model_dit_xl.md]`` prints, for every
DiT-XL/2 layer at M = 8192 and 65536 tokens and for the DiT-XL/2 steps, each goal of
docs/design.md §6 as a modelled ratio, at our main-loop efficiency e = 1.00 (cuBLAS parity)
and e = 0.85, and the break-even efficiency e* at which the ratio meets the goal.

How a time is made (no GPU; kind_fast.perf.launches records what the code launches):

1. The code under test runs on ``meta`` tensors inside ``kind_fast.perf.launches.record_launches``:
   the Triton launchers plan for the reference GPU there and every kernel launch is recorded
   (Triton launches with grid, sizes and constexprs; aten ops with shapes). So the model prices
   exactly the launches the code makes, and follows every change of a launcher or a plan.
2. Each launch gets a time (``price``):

   * a Triton kernel with a tile schedule (``kind_linear_fused_kernel`` and the others named
     in ``TRITON_MODELS``): its programs in launch order, each taking
     ``ctas × MMA FLOPs / (rate_SM · e) + exposed`` on one of ``SMs × ctas`` slots (list
     scheduling; this is where wave quantization comes from: the last wave is as long as its
     longest program). ``rate_SM`` = peak × ``cublas`` / SMs: e is our main loop's rate per
     FLOP relative to cuBLAS's. ``exposed`` is the part of a program that issues no MMA:
     its pipeline fill and the latency chain of its epilogue (each kernel's chain is spelled
     out in its model); ``ctas`` resident programs per SM hide each other's exposed parts,
     hence the factor. HBM time = modelled bytes (kind_fast.perf.perfmodel's L2 replay where it has
     one, else compulsory bytes) / bandwidth, where bandwidth is capped by
     ``resident programs × cta_bandwidth`` (a program keeps only a few stages in flight).
     Kernel time = max(compute, HBM) + one launch.
   * an aten GEMM (cuBLAS): max(FLOPs / (peak · cublas), bytes / bandwidth) + pipeline fill +
     one launch: no wave quantization and an overlapped epilogue (cuBLAS's persistent
     schedules), the most favourable assumption for the baseline we are judged against.
   * attention (recorded as one ``flash_attention`` launch by the step replays): FLOPs at
     ``attention`` × peak.
   * any other aten op: (bytes read + written) / bandwidth + HBM latency + one launch.
3. A goal's ratio divides two such sums (e.g. KIND transfer forward + backward over nn.Linear
   forward + backward, with bias, as bench/gpu_check.py measures them).

The constants (``GpuTime``) are stated assumptions, not measurements: the first GPU run of
``bash bench/gpu_check.sh`` prints the model's prediction beside each measured ratio, which is
how they get calibrated. What the model leaves out: clocks and power limits (they scale
cuBLAS and us alike), L2 bandwidth limits of the main loop (folded into e), other work on the
GPU, the CPU cost of launching (it assumes the CPU runs ahead of the GPU; under CUDA graphs it
does).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from kind_fast.perf import perfmodel as pm
from kind_fast.perf.launches import Launch, TensorInfo

__all__ = ["GpuTime", "H100_TIME", "price", "price_all", "KernelTime", "layer_goal_rows", "step_goal_rows",
           "break_even", "markdown", "main", "GOALS", "dit_step_launches", "dit_step_rows", "price_custom",
           "step_memory", "layer_launches", "LayerShape", "flop_floor", "rows_json"]

US = 1e-6


@dataclass(frozen=True)
class GpuTime:
    """Constants of the time model (stated assumptions; see the module docstring)."""
    name: str = "H100 SXM"
    sms: int = 132
    peak: float = 989.4e12         # dense bf16 tensor-core FLOP/s
    tf32_peak: float = 494.7e12    # dense TF32 tensor-core FLOP/s (fp32 GEMMs: the trainer allows TF32, as DiT)
    cublas: float = 0.70           # cuBLAS main loop on large bf16 GEMMs, fraction of peak (~690 TFLOP/s)
    attention: float = 0.50        # FlashAttention-2-class attention, fraction of peak
    hbm: float = 3.35e12           # HBM3 bytes/s
    hbm_eff: float = 0.90          # achievable fraction for streaming kernels
    cta_bandwidth: float = 100e9   # bytes/s one resident program sustains (stages in flight / latency)
    launch: float = 2.0 * US       # GPU-side gap per dependent kernel (CPU ahead of the GPU)
    hbm_latency: float = 0.8 * US  # first bytes of a program's pipeline from HBM
    l2_latency: float = 0.35 * US  # one L2 round trip (a flag atomic, a small load)
    store_bandwidth: float = 110e9  # bytes/s one SM issues plain stores of an output tile
    wgmma_sync: float = 0.05 * US  # a K-step that must wait for its own warpgroup MMA (wait_group 0)
    l2: pm.Gpu = pm.REFERENCE      # the L2 model of kind_fast.perf.perfmodel (25 MB budget)

    def rate_sm(self, e: float) -> float:
        """MMA FLOP/s of one SM in our main loops at efficiency e (relative to cuBLAS)."""
        return self.peak * self.cublas * e / self.sms

    @property
    def bandwidth(self) -> float:
        return self.hbm * self.hbm_eff


H100_TIME = GpuTime()


@dataclass
class KernelTime:
    name: str
    seconds: float
    compute: float = 0.0     # makespan of the programs (or FLOPs / rate)
    memory: float = 0.0      # HBM bytes / bandwidth
    flops: float = 0.0
    bytes: float = 0.0
    programs: int = 0
    exposed: float = 0.0     # SM-seconds of non-MMA time per program (its model's chain)
    note: str = ""


# =====================================================================================
# Generic pricing
# =====================================================================================
def _memory_seconds(nbytes: float, gpu: GpuTime, resident: int | None = None) -> float:
    bw = gpu.bandwidth if resident is None else min(gpu.bandwidth, resident * gpu.cta_bandwidth)
    return nbytes / bw


def gemm_seconds(m: int, n: int, k: int, gpu: GpuTime, *, batch: int = 1, elt: int = 2,
                 out_elt: int | None = None) -> KernelTime:
    """A cuBLAS GEMM (batch × (m × k)·(k × n)): compute or HBM bound, plus fill and launch; fp32
    operands (elt 4) run on TF32 tensor cores."""
    flops = 2.0 * batch * m * n * k
    nbytes = batch * (m * k + k * n) * elt + batch * m * n * (out_elt or elt)
    comp = flops / ((gpu.tf32_peak if elt >= 4 else gpu.peak) * gpu.cublas)
    mem = _memory_seconds(nbytes, gpu)
    return KernelTime("cublas gemm", max(comp, mem) + gpu.hbm_latency + gpu.launch, comp, mem, flops, nbytes)


def _aten_gemm(r: Launch, gpu: GpuTime) -> KernelTime | None:
    ins = [t for t in r.inputs if len(t.shape) >= 2]
    out = r.outputs[0] if r.outputs else None
    if r.name in ("mm", "addmm") and len(ins) >= 2 and out is not None:
        a, b = ins[-2], ins[-1]
        m, k = a.shape
        n = b.shape[1]
        t = gemm_seconds(m, n, k, gpu, elt=a.itemsize, out_elt=out.itemsize)
    elif r.name in ("bmm", "baddbmm") and len(ins) >= 2 and out is not None:
        a, b = ins[-2], ins[-1]
        bt, m, k = a.shape
        n = b.shape[2]
        t = gemm_seconds(m, n, k, gpu, batch=bt, elt=a.itemsize, out_elt=out.itemsize)
    else:
        return None
    t.name = f"cublas {r.name}"
    return t


def _aten_memory(r: Launch, gpu: GpuTime) -> KernelTime:
    nbytes = sum(t.nbytes for t in r.inputs) + sum(t.nbytes for t in r.outputs)
    mem = _memory_seconds(nbytes, gpu)
    return KernelTime(f"aten {r.name}", mem + gpu.hbm_latency + gpu.launch, 0.0, mem, 0.0, nbytes)


def _attention(r: Launch, gpu: GpuTime) -> KernelTime:
    """FlashAttention forward (4·B·H·T²·D FLOPs) or backward (2.5× that), q/k/v/o read once."""
    b, h, t, d = r.inputs[0].shape
    flops = 4.0 * b * h * t * t * d * (2.5 if r.name.endswith("backward") else 1.0)
    nbytes = sum(x.nbytes for x in r.inputs) + sum(x.nbytes for x in r.outputs)
    comp = flops / (gpu.peak * gpu.attention)
    mem = _memory_seconds(nbytes, gpu)
    return KernelTime(r.name, max(comp, mem) + gpu.hbm_latency + gpu.launch, comp, mem, flops, nbytes)


def price(r: Launch, gpu: GpuTime = H100_TIME, e: float = 1.0) -> KernelTime:
    """Modelled seconds of one recorded launch (see the module docstring)."""
    if r.kind == "sync":
        return KernelTime(f"sync {r.name}", 10 * US, note="host read of device data")
    if r.kind == "triton":
        fn = TRITON_MODELS.get(r.name)
        if fn is None:
            raise KeyError(f"no time model for Triton kernel {r.name} (add one to kind_fast.perf.timemodel)")
        return _cached(fn, r, gpu, e)
    if r.kind == "model":  # a stand-in recorded by a replay (attention)
        return _attention(r, gpu)
    if r.kind == "custom":
        return _custom(r, gpu, e)
    g = _aten_gemm(r, gpu)
    return g if g is not None else _aten_memory(r, gpu)


_PRICED: dict = {}


def _cached(fn, r: Launch, gpu: GpuTime, e: float) -> KernelTime:
    """A Triton launch's price, memoised per (launch, GPU, e): recorded launches are kept
    alive by ``layer_launches``' cache, so their ids are stable."""
    key = (id(r), gpu, e)
    hit = _PRICED.get(key)
    if hit is None or hit[0] is not r:
        hit = (r, fn(r, gpu, e))
        _PRICED[key] = hit
    return hit[1]


def price_all(launches: Sequence[Launch], gpu: GpuTime = H100_TIME, e: float = 1.0) -> float:
    return sum(price(r, gpu, e).seconds for r in launches)


# =====================================================================================
# Triton kernels (kernels/kind_linear.py, kernels/kind_linear_merged.py)
# =====================================================================================
@functools.lru_cache(maxsize=4096)
def _makespan(progs: tuple, ctas: int, sms: int, rate: float) -> float:
    """Makespan of programs (MMA FLOPs, exposed seconds) dispatched in launch order onto
    ``sms × ctas`` slots, each program taking ``ctas × FLOPs / rate + exposed`` on its slot.
    Runs of equal programs are dispatched in closed form (whole waves), the rest one by one."""
    if not progs:
        return 0.0
    import heapq

    slots = sms * ctas
    free = [0.0] * min(slots, len(progs))
    heapq.heapify(free)
    i = 0
    while i < len(progs):
        f, x = progs[i]
        d = ctas * f / rate + x
        j = i
        while j < len(progs) and progs[j] == progs[i]:
            j += 1
        run = j - i
        if run >= 2 * len(free) and max(free) - min(free) < 1e-15:  # whole waves of one program kind
            waves, rest = divmod(run, len(free))
            base = free[0] + waves * d
            free = [base + d] * rest + [base] * (len(free) - rest)
            heapq.heapify(free)
            i = j
            continue
        s = heapq.heappop(free)
        heapq.heappush(free, s + d)
        i += 1
    return max(free)


def _tile_kernel(name: str, progs: list[tuple[float, float]], nbytes: float, ctas: int, gpu: GpuTime, e: float,
                 note: str = "") -> KernelTime:
    """Programs as (MMA FLOPs, exposed seconds) in launch order, ``ctas`` resident per SM (a
    persistent grid with a dynamic tile counter runs them in the same order, one grid slot per
    resident CTA, so the same list schedule prices it)."""
    rate = gpu.rate_sm(e)
    ctas = max(1, min(ctas, -(-len(progs) // gpu.sms)))  # programs sharing an SM (fewer than SMs: none)
    comp = _makespan(tuple(progs), ctas, gpu.sms, rate)
    mem = _memory_seconds(nbytes, gpu, resident=min(len(progs), gpu.sms * ctas))
    flops = sum(f for f, _ in progs)
    exposed = sum(x for _, x in progs) / max(len(progs), 1)
    return KernelTime(name, max(comp, mem) + gpu.launch, comp, mem, flops, nbytes, len(progs), exposed, note)


@functools.lru_cache(maxsize=None)
def _traffic_fused(m, n, kd, k, t, pass_, l2, elt, partials=False) -> tuple[int, int]:
    tr = pm.traffic_fused(m, n, kd, k, t, pass_=pass_, gpu=l2, elt=elt,
                          plan=pm.plan_fused(m, n, kd, k, t, partials=partials, gpu=l2))
    return tr.total, tr.recomputed


@functools.lru_cache(maxsize=None)
def _traffic_tailor(m, o, n_t, k, t, l2, elt) -> int:
    return pm.traffic_tailor_grad(m, o, n_t, k, t, gpu=l2, elt=elt).total


def _elt(r: Launch) -> int:
    return 4 if r.meta.get("PREC") == "ieee" else 2


def _fused(r: Launch, gpu: GpuTime, e: float) -> KernelTime:
    """kind_linear_fused_kernel (path M1 forward / dx): a persistent grid whose CTAs take the
    programs of the row-major order from a device counter; per row tile G owner sub-tiles
    (BN/G output columns + KP/NSH shrink columns each), then the row's other N-tiles.

    Exposed per program (nothing else runs on its SM meanwhile at one CTA per SM; more CTAs
    per SM hide each other's): the K-loop's pipeline fill (the program's first loads, from
    HBM); its epilogue's latency chain: the row's flags (acquire, one L2 round trip), h (another),
    the expand MMA (counted as FLOPs), the output stores; an owner's publish (store, barrier,
    release: one more). Owner 0 with ds partials loads the saved h (one more). The dx pass with
    tailor-gradient partials: owners run the dU_T dot too (FLOPs) and each of its steps waits
    for it (``wgmma_sync`` per K-step); every program loads its x tile after its output tile
    (HBM latency), runs the dV_T dot and stores its partial. HBM bytes: the L2 replay of
    kind_fast.perf.perfmodel for the GEMM's operands, plus x and the partials once; the shrink parts
    that replay finds recomputed (an owner not done when a tile of its row ends: the tile
    recomputes the part, KP/NSH columns over the whole reduction) are added as MMA work."""
    s, m_ = r.sizes, r.meta
    M, N, KD, K, T = s["M"], s["N"], s["KD"], s["K"], s["T"]
    bm, bn, kp, g_cnt, nsh, spt = m_["BM"], m_["BN"], m_["KP"], m_["G"], m_["NSH"], m_["SPT"]
    ds, du, dv = bool(m_["DS_PARTIAL"]), bool(m_.get("DU_PART")), bool(m_.get("DV_PART"))
    plan = pm.plan_fused(M, N, KD, K, T, partials=du or dv)
    ctas = plan.ctas_per_sm
    m_tiles, n_tiles = pm.cdiv(M, bm), pm.cdiv(N, bn)
    steps = pm.cdiv(KD, m_["BK"])
    elt = _elt(r)
    progs = []
    for _ in range(m_tiles):
        for j in range(g_cnt + n_tiles - 1):
            owner = j < g_cnt
            cols = bn // g_cnt if owner else bn
            shrink = spt * kp // nsh if (owner and j < nsh) else 0
            flops = 2.0 * bm * KD * (cols + shrink) + 2.0 * bm * kp * cols * spt
            x = gpu.hbm_latency + 2 * gpu.l2_latency + bm * cols * elt / gpu.store_bandwidth
            if shrink:
                x += gpu.l2_latency
                if du:
                    flops += 2.0 * bm * KD * shrink
                    x += steps * gpu.wgmma_sync
            if ds and j == 0:
                x += gpu.l2_latency
            if dv:
                flops += 2.0 * bm * cols * kp
                x += gpu.hbm_latency + cols * kp * elt / gpu.store_bandwidth
            progs.append((flops, x))
    if plan.tiles and (plan.BM, plan.BN, plan.G) == (bm, bn, g_cnt):
        nbytes, recomputed = _traffic_fused(M, N, KD, K, T, "dx" if ds else "forward", gpu.l2, elt, du or dv)
    else:  # a config off the pinned plan (autotuning): compulsory bytes
        nbytes, recomputed = (M * KD + KD * N + M * N) * elt + M * K * 4, 0
    nbytes += (M * N * elt + m_tiles * kp * N * elt if dv else 0) + (m_tiles * kp * KD * elt if du else 0)
    if recomputed:
        extra = recomputed * 2.0 * bm * KD * (kp // nsh) / len(progs)
        progs = [(f + extra, x) for f, x in progs]
    return _tile_kernel(r.name, progs, nbytes, ctas, gpu, e)


def _tailor_reduce(r: Launch, gpu: GpuTime, e: float) -> KernelTime:
    """kind_linear_tailor_reduce_kernel: memory-bound. It reads each written partial once (K
    slots per row tile of dU_T and dV_T), its programs' fp32 sums twice when SPLIT > 1, writes
    the gradients. Latency: a dU_T / dV_T program walks its row tiles RB at a time, an L2 round
    trip (labels, ids) then an HBM one (the partials) a step; the gate-gradient programs, beside
    them, walk the batch 16 samples a step, two L2 round trips each. Kernel time = the longest
    of the HBM time and those walks, plus the first loads' latency and the launch."""
    s, m_ = r.sizes, r.meta
    M, NO, NI, NT, K, B, split = s["M"], s["NO"], s["NI"], s["NT"], s["K"], s["B"], s.get("SPLIT", 1)
    m_tiles = pm.cdiv(M, m_["BM"])
    elt = 2
    nbytes = m_tiles * K * (NO + NI) * elt + NT * (NO + NI) * elt
    if split > 1:
        nbytes += 2 * split * NT * (NO + NI) * 4
    mem = _memory_seconds(nbytes, gpu, resident=r.programs)
    gate = pm.cdiv(B, m_["BB"]) * 2 * gpu.l2_latency if (m_["NEED_DVAL"] or m_["NEED_DSIG"]) else 0.0
    walk = pm.cdiv(pm.cdiv(m_tiles, split), m_["RB"]) * (gpu.l2_latency + gpu.hbm_latency)
    lat = max(gate, walk)
    return KernelTime(r.name, max(mem, lat) + gpu.hbm_latency + gpu.launch, lat, mem, 0.0, nbytes, r.programs)


def _rows(r: Launch, gpu: GpuTime, e: float) -> KernelTime:
    """kind_linear_rows_kernel (path M2, or the shrink alone): a program per (row tile, N-group):
    the shrink over the whole reduction, then the expand into each of its N-tiles."""
    s, m_ = r.sizes, r.meta
    M, N, KD = s["M"], s["N"], s["KD"]
    bm, bn, kp, spt = m_["BM"], m_["BN"], m_["KP"], m_["SPT"]
    ng = s.get("NG", 1) if "NG" in s else 1
    has_out = bool(m_["HAS_OUT"])
    m_tiles, n_tiles = pm.cdiv(M, bm), pm.cdiv(N, bn)
    elt = _elt(r)
    per = pm.cdiv(n_tiles, ng) if has_out else 0
    progs = []
    for _ in range(m_tiles * ng):
        flops = 2.0 * bm * KD * kp * spt + 2.0 * bm * kp * bn * per * spt
        x = gpu.hbm_latency + per * bm * bn * elt / gpu.store_bandwidth
        progs.append((flops, x))
    nbytes = M * KD * elt * (ng if has_out else 1) + (M * N * elt if has_out else 0) + M * s["K"] * 4
    plan = pm.plan_fused(M, N, KD, s["K"], s["T"], has_base=False, has_out=has_out)
    return _tile_kernel(r.name, progs, nbytes, plan.ctas_per_sm, gpu, e)


def _tailor_grad(r: Launch, gpu: GpuTime, e: float) -> KernelTime:
    """kind_linear_tailor_grad_kernel (dU_T / dV_T as separate passes): programs (tailor
    block, column block, split) walk their row-tile lists; HBM bytes from the traffic model
    (z re-read once per tailor block that uses a row tile); bandwidth capped by the resident
    programs (18 programs at M = 8192 for a 1152-wide output: this is why it is slow there)."""
    s, m_ = r.sizes, r.meta
    M, O, NT, K, T = s["M"], s["O"], s["NT"], s["K"], s["T"]
    split = s.get("SPLIT", 1)
    bm, bt, bo = m_["BM"], m_["BT"], m_["BO"]
    plan = pm.plan_tailor_grad(M, O, NT, K, T)
    elt = _elt(r)
    nbytes = _traffic_tailor(M, O, NT, K, T, gpu.l2, elt)
    m_tiles = pm.cdiv(M, bm)
    share = m_tiles * (bt / max(NT, 1) if plan.SKIP else 1.0) / split
    progs = [(2.0 * bt * bm * bo * share, gpu.hbm_latency) for _ in range(r.programs)]
    return _tile_kernel(r.name, progs, nbytes, plan.ctas_per_sm, gpu, e)


def _tiny(r: Launch, gpu: GpuTime, e: float) -> KernelTime:
    """Gate tables, per-sample ds, gate gradients: kilobytes; one latency and one launch."""
    return KernelTime(r.name, gpu.hbm_latency + gpu.l2_latency + gpu.launch, programs=r.programs)


def _merged_gemm(r: Launch, gpu: GpuTime, e: float) -> KernelTime:
    """kind_linear_merged_gemm_kernel (path M3): a GEMM over merged slot weights, one program per
    output tile, one K-loop per slot among the tile's rows (one in a CFG batch at T = 256).
    Exposed per program: pipeline fill and the output stores."""
    s, m_ = r.sizes, r.meta
    M, N, KD = s["M"], s["N"], s["KD"]
    bm, bn = m_["BM"], m_["BN"]
    elt = 2
    plan = pm.plan_merged_gemm(M, N, KD, s["T"])
    progs = [(2.0 * bm * bn * KD, gpu.hbm_latency + bm * bn * elt / gpu.store_bandwidth)
             for _ in range(pm.cdiv(M, bm) * pm.cdiv(N, bn))]
    nbytes = (M * KD + 2 * KD * N + M * N) * elt
    return _tile_kernel(r.name, progs, nbytes, plan.ctas_per_sm, gpu, e)


def _merged_dw(r: Launch, gpu: GpuTime, e: float) -> KernelTime:
    s, m_ = r.sizes, r.meta
    M, N, KD = s["M"], s["N"], s["KD"]
    progs = [(2.0 * m_["BN"] * m_["BK"] * M / max(r.grid[-1], 1), gpu.hbm_latency) for _ in range(r.programs)]
    return _tile_kernel(r.name, progs, (M * (N + KD)) * 2 + N * KD * 4, 2, gpu, e)


TRITON_MODELS: dict[str, Callable[[Launch, GpuTime, float], KernelTime]] = {
    "kind_linear_fused_kernel": _fused,
    "kind_linear_rows_kernel": _rows,
    "kind_linear_tailor_grad_kernel": _tailor_grad,
    "kind_linear_gate_tables_kernel": _tiny,
    "kind_linear_sample_ds_kernel": _tiny,
    "kind_linear_gate_grad_kernel": _tiny,
    "kind_linear_tailor_reduce_kernel": _tailor_reduce,
    "kind_linear_merged_gemm_kernel": _merged_gemm,
    "kind_linear_merged_dw_kernel": _merged_dw,
}


# =====================================================================================
# Replays on meta tensors: what one layer pass launches
# =====================================================================================
@contextlib.contextmanager
def meta_replay():
    """``torch.autocast("meta", ...)`` as a no-op (and autocast off on ``meta``) while the
    package's code runs on ``meta`` tensors (torch has no autocast for that device type; the
    replays model autocast themselves: the DiT-XL/2 steps section)."""
    import torch

    real, real_enabled = torch.autocast, torch.is_autocast_enabled

    def autocast(device_type, *args, **kwargs):
        if device_type == "meta":
            return contextlib.nullcontext()
        return real(device_type, *args, **kwargs)

    def is_autocast_enabled(*args):
        if args and args[0] == "meta":
            return False
        return real_enabled(*args)

    torch.autocast, torch.is_autocast_enabled = autocast, is_autocast_enabled
    try:
        yield
    finally:
        torch.autocast, torch.is_autocast_enabled = real, real_enabled


@contextlib.contextmanager
def _meta_kernels():
    """The Triton kernel module decorated for the GPU (never the interpreter): meta tensors
    plan for the reference GPU and every launch is recorded, not run."""
    import os

    old = os.environ.pop("TRITON_INTERPRET", None)
    try:
        from kind_fast.ops.kind_linear_triton import _kernels

        yield _kernels()
    finally:
        if old is not None:
            os.environ["TRITON_INTERPRET"] = old


@dataclass(frozen=True)
class LayerShape:
    name: str
    n_in: int
    n_out: int
    m: int
    k: int = 32
    n_t: int = 96
    t: int = 256
    classes: int = 10


def _e(*shape, dt=None):
    import torch

    return torch.empty(shape, dtype=dt or torch.bfloat16, device="meta")


@functools.lru_cache(maxsize=None)
def layer_launches(shape: LayerShape, what: str) -> tuple[Launch, ...]:
    """The launches of one pass of one layer (``what``):

    ``linear_fwd``      F.linear(x, W, b) (no grad)
    ``linear_fwd_bwd``  nn.Linear forward + backward with bias, x requiring grad (dx, dW, db)
    ``kind_fwd``        the Triton backend's forward op (path M1; W_G given)
    ``kind_bwd_transfer``  its backward with the transfer mask (dx, dU_T, dσ_T, dV_T)
    ``kind_bwd_pretrain``  with every gradient (dx, dW_G, db, dU_T, dσ_T, dV_T)
    ``kind_bwd:MASK``   with the gradient mask MASK (7 digits 0/1, the backward op's order)
    ``wg_fwd_bwd``      W_G = U_Gᵀ diag(σ_G) V_G materialised and differentiated (pretrain)
    ``m3_fwd``          path M3's segmented GEMM over two cached merged weights (a CFG batch)
    """
    with meta_replay():
        _layer_launches(shape, what)  # the first call also makes the device's launch state (once)
        return _layer_launches(shape, what)


def _layer_launches(shape: LayerShape, what: str) -> tuple[Launch, ...]:
    import torch
    import torch.nn.functional as F

    from kind_fast.perf.launches import record_launches

    m, n_in, n_out, k, n_t, t = shape.m, shape.n_in, shape.n_out, shape.k, shape.n_t, shape.t
    b = m // t
    f32 = torch.float32
    x, g, bias, labels = _e(m, n_in), _e(m, n_out), _e(n_out), _e(b, dt=torch.int64)
    w = _e(n_out, n_in)
    if what == "linear_fwd":
        with record_launches() as rec:
            F.linear(x, w, bias)
        return tuple(rec)
    if what == "linear_fwd_bwd":
        lin_w, lin_b = w.clone().requires_grad_(), bias.clone().requires_grad_()
        xr = x.clone().requires_grad_()
        with record_launches() as rec:
            F.linear(xr, lin_w, lin_b).backward(g)
        return tuple(rec)
    if what == "wg_fwd_bwd":
        n_g = min(n_in, n_out) - n_t
        u_g, s_g, v_g = (_e(n_g, n_out, dt=f32).requires_grad_(), _e(n_g, dt=f32).requires_grad_(),
                         _e(n_g, n_in, dt=f32).requires_grad_())
        from kind_fast.ops.paths import _learngene_weight

        with record_launches() as rec:
            _learngene_weight(u_g, s_g, v_g, torch.bfloat16).backward(w)
        return tuple(rec)
    from kind_fast.ops import kind_linear_triton as T

    u_t, v_t, sigma = _e(n_t, n_out), _e(n_t, n_in), _e(n_t, dt=f32)
    idx, val = _e(shape.classes + 1, k, dt=torch.int32), _e(shape.classes + 1, k, dt=f32)
    with _meta_kernels():
        if what == "kind_fwd":
            with record_launches() as rec:
                T.kind_linear_triton_forward(x, w, bias, u_t, sigma, v_t, idx, val, labels)
            return tuple(rec)
        h = _e(m, k, dt=f32)
        if what.startswith("kind_bwd"):
            mask = {"kind_bwd_transfer": "1001110", "kind_bwd_pretrain": "1111110"}.get(what) or what.split(":")[1]
            mask = [c == "1" for c in mask]
            with record_launches() as rec:
                T.kind_linear_triton_backward(g, x, w, u_t, sigma, v_t, idx, val, labels, h, mask)
            return tuple(rec)
        if what == "m3_fwd":
            from kind_fast.ops.kind_linear_merged_triton import _kernels as merged_kernels

            mk = merged_kernels()
            weights = _e(2, n_out, n_in)
            slots = torch.tensor(pm.cfg_slots(b), dtype=torch.int64).to("meta")
            with record_launches() as rec:
                mk.merged_gemm(x, weights, bias, slots, True)
            return tuple(rec)
    raise ValueError(f"unknown pass {what!r}")


# =====================================================================================
# Goals (docs/design.md §6)
# =====================================================================================
GOALS = {
    "forward": "t(KIND forward) <= 1.10 × t(F.linear) × (1 + K/in + K/out)",
    "transfer": "t(KIND transfer fwd+bwd) <= 0.80 × t(nn.Linear fwd+bwd)",
    "pretrain": "t(KIND pretrain fwd+bwd) <= 1.20 × t(nn.Linear fwd+bwd)",
    "sampling M3": "t(M3 segmented GEMM) <= 1.05 × t(F.linear)",
}


@dataclass
class GoalRow:
    what: str                 # layer / step name
    goal: str                 # key of GOALS (or a step goal)
    m: int
    target: float
    ratio: Callable[[float], float] = field(repr=False)   # e -> modelled ratio
    floor: float | None = None  # the ratio of an ideal schedule at e = 1 (FLOPs only; see flop_floor)

    def at(self, e: float) -> float:
        return self.ratio(e)

    @property
    def e_star(self) -> float:
        return break_even(self.ratio, self.target)


def flop_floor(goal: str, n_in: int, n_out: int, m: int, k: int = 32, n_t: int = 96) -> float:
    """The goal's ratio for an ideal schedule at cuBLAS parity: every kernel a pure main loop
    over the op's own FLOPs (no exposed prologue or epilogue, no wave quantization, no launch,
    no memory-bound pass), the baseline the same. Its e* = floor / target is the least main-
    loop efficiency ANY schedule needs: a goal whose floor e* exceeds 0.85 cannot be met at
    85 % of cuBLAS by any design.

    forward      1 + K/in + K/out                               (shrink + expand)
    transfer     (2 + 3·(K/in + K/out)) / 3                     (forward, dx; dU_T, dV_T; no dW)
    pretrain     (3 + 3·(K/in + K/out) + 3·N_G/M) / 3           (+ dW_G; W_G built and projected)
    sampling M3  1
    """
    lr = k / n_in + k / n_out
    if goal == "forward":
        return 1 + lr
    if goal == "transfer":
        return (2 + 3 * lr) / 3
    if goal == "pretrain":
        return (3 + 3 * lr + 3 * (min(n_in, n_out) - n_t) / m) / 3
    if goal == "sampling M3":
        return 1.0
    raise ValueError(goal)


def break_even(ratio: Callable[[float], float], target: float, lo: float = 0.3, hi: float = 3.0) -> float:
    """Smallest main-loop efficiency e at which ratio(e) <= target (ratio falls as e grows);
    inf when even e = ``hi`` misses it."""
    if ratio(hi) > target:
        return math.inf
    if ratio(lo) <= target:
        return lo
    for _ in range(24):
        mid = 0.5 * (lo + hi)
        if ratio(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi


DIT_XL_LAYERS = (("q/k/v/proj", 1152, 1152), ("fc1", 1152, 4608), ("fc2", 4608, 1152))


def _sum(shape: LayerShape, passes: Sequence[str], gpu: GpuTime, e: float) -> float:
    return sum(price_all(layer_launches(shape, p), gpu, e) for p in passes)


def layer_goal_rows(ms: Sequence[int] = (8192, 65536), gpu: GpuTime = H100_TIME,
                    layers=DIT_XL_LAYERS) -> list[GoalRow]:
    rows = []
    for m in ms:
        for name, n_in, n_out in layers:
            sh = LayerShape(f"DiT-XL/2.{name}", n_in, n_out, m)
            k = sh.k
            lin_f = _sum(sh, ["linear_fwd"], gpu, 1.0)
            lin_fb = _sum(sh, ["linear_fwd_bwd"], gpu, 1.0)

            def fwd(e, sh=sh, lin_f=lin_f):
                return _sum(sh, ["kind_fwd"], gpu, e) / lin_f

            def transfer(e, sh=sh, lin_fb=lin_fb):
                return _sum(sh, ["kind_fwd", "kind_bwd_transfer"], gpu, e) / lin_fb

            def pretrain(e, sh=sh, lin_fb=lin_fb):
                return _sum(sh, ["wg_fwd_bwd", "kind_fwd", "kind_bwd_pretrain"], gpu, e) / lin_fb

            def m3(e, sh=sh, lin_f=lin_f):
                return _sum(sh, ["m3_fwd"], gpu, e) / lin_f

            def floor(goal, n_in=n_in, n_out=n_out, m=m, k=k, n_t=sh.n_t):
                return flop_floor(goal, n_in, n_out, m, k, n_t)

            rows.append(GoalRow(sh.name, "forward", m, 1.10 * (1 + k / n_in + k / n_out), fwd, floor("forward")))
            if min(n_in, n_out) >= 768:
                rows.append(GoalRow(sh.name, "transfer", m, 0.80, transfer, floor("transfer")))
            rows.append(GoalRow(sh.name, "pretrain", m, 1.20, pretrain, floor("pretrain")))
            rows.append(GoalRow(sh.name, "sampling M3", m, 1.05, m3, floor("sampling M3")))
    return rows


def step_goal_rows(gpu: GpuTime = H100_TIME) -> list[GoalRow]:
    """DiT-XL/2 training and sampling steps (``dit_step_rows``, below)."""
    return dit_step_rows(gpu)


def _custom(r: Launch, gpu: GpuTime, e: float) -> KernelTime:
    return price_custom(r, gpu, e)


# =====================================================================================
# DiT-XL/2 steps
# =====================================================================================
# DiT-XL/2 steps in the time model (kind_fast.perf.timemodel): every number here is MODELLED.
#
# A whole step of a real DiT-XL/2 (kind_fast.models.dit, batch 32, 256 tokens per image) runs on
# ``meta`` tensors inside ``kind_fast.perf.launches.record_launches``; every launch is priced by
# kind_fast.perf.timemodel. What is substituted, and why (stated assumptions):
#
# * The KIND layers run the reference op on ``meta`` tensors; each call of
#   ``kind_fast::kind_linear`` / ``kind_fast::kind_linear_backward`` (recorded as one custom-op
#   launch) is priced as what the Triton backend launches for that shape and gradient mask
#   (``timemodel.layer_launches``), and ``kind_fast::kind_linear_merged_gemm`` (path M3) as the
#   Triton segmented GEMM.
# * Attention (``F.scaled_dot_product_attention``) is recorded as one FlashAttention launch
#   forward and one backward (``GpuTime.attention``), not as the math decomposition ``meta``
#   tensors would take.
# * Mixed precision as the trainer and bench/gpu_check.py run it (fp32 parameters under bf16
#   autocast; torch has no autocast on ``meta``): the step is replayed in fp32 and every float
#   tensor of its forward and backward is priced as bf16 (autocast's activations; the ops
#   autocast keeps in fp32 are few and small next to the GEMMs); what autocast adds is priced
#   per step: one cast of every parameter matrix a forward reads (fp32 read, bf16 write) and
#   AdamW over the fp32 trainable parameters and gradients (``torch.optim.AdamW``'s foreach
#   path, replayed on ``meta``). Known understatement: W_G's build and projections, which the
#   layer runs in fp32 with autocast off (TF32 GEMMs), are priced as bf16 here; the layer rows
#   (``timemodel.layer_launches("wg_fwd_bwd")``) price them in fp32.
# * Transfer steps run inside ``kind_fast.nn.caching.training_scope`` as the trainer runs them
#   (W_G built once and reused while the learngenes are frozen; bench/gpu_check.py does the same).
# * Peak memory (the transfer step's ≤ 0.75 × goal): fp32 parameters + bf16 copies of what a
#   forward reads + fp32 gradients and AdamW state of the trainable parameters + the distinct
#   storages autograd saves for backward (counted with saved-tensor hooks).

BATCH, MODEL, CLASSES = 32, "DiT-XL/2", 10


# =====================================================================================
# Custom ops of our own, priced as the Triton launches they stand for
# =====================================================================================
def price_custom(r: Launch, gpu: GpuTime, e: float) -> KernelTime:
    ins = r.inputs
    if r.name in ("kind_fast::kind_linear", "kind_fast::kind_linear_backward", "kind_fast::kind_linear_triton",
                  "kind_fast::kind_linear_triton_backward"):
        bwd = r.name.endswith("backward")
        # forward: (x, w_g, [bias], u_t, sigma_t, v_t, idx, val, labels)
        # backward: (grad_y, x, w_g, u_t, sigma_t, v_t, idx, val, labels, h)
        x = ins[1] if bwd else ins[0]
        w_g = ins[2] if bwd else ins[1]
        idx = next(t for t in ins if t.dtype in ("int32", "int64") and len(t.shape) == 2)
        labels = next(t for t in ins if t.dtype in ("int32", "int64") and len(t.shape) == 1)
        u_t = next(t for t in ins[2 if bwd else 1:] if len(t.shape) == 2 and t.shape[1] == w_g.shape[0]
                   and t is not w_g)
        m, n_in = x.shape
        shape = LayerShape("layer", n_in, w_g.shape[0], m, k=idx.shape[1], n_t=u_t.shape[0], t=m // labels.shape[0],
                           classes=idx.shape[0] - 1)
        if bwd:
            mask = r.args[-1]
            what = "kind_bwd:" + "".join("1" if v else "0" for v in mask)
        else:
            what = "kind_fwd"
        secs = price_all(layer_launches(shape, what), gpu, e)
        return KernelTime(r.name, secs, note=what)
    if r.name in ("kind_fast::kind_linear_merged_gemm", "kind_fast::kind_linear_merged_gemm_triton"):
        x, weights = ins[0], ins[1]
        m, n_in = x.shape
        slots = next(t for t in ins if len(t.shape) == 1 and t.dtype in ("int32", "int64"))
        shape = LayerShape("layer", n_in, weights.shape[1], m, t=m // slots.shape[0])
        return KernelTime(r.name, price_all(layer_launches(shape, "m3_fwd"), gpu, e))
    raise KeyError(f"no time model for custom op {r.name}")


# =====================================================================================
# Replays
# =====================================================================================
@contextlib.contextmanager
def _flash_attention(rec: list) -> Iterator[None]:
    """F.scaled_dot_product_attention recorded as one FlashAttention launch forward and one
    backward (see the module docstring)."""
    import torch
    import torch.nn.functional as F

    class _Flash(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            info = [TensorInfo(tuple(t.shape), str(t.dtype).replace("torch.", ""), "meta") for t in (q, k, v)]
            rec.append(Launch("model", "flash_attention", inputs=info, outputs=info[:1]))
            ctx.info = info
            return torch.empty_like(q)

        @staticmethod
        def backward(ctx, g):
            info = ctx.info
            rec.append(Launch("model", "flash_attention_backward", inputs=info + info[:1], outputs=info))
            return torch.empty_like(g), torch.empty_like(g), torch.empty_like(g)

    real = F.scaled_dot_product_attention

    def sdpa(q, k, v, *args, **kwargs):
        return _Flash.apply(q, k, v)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


def _model(mode: str):
    """DiT-XL/2 of ``mode`` (kind_fast.perf.benchmark.build_model) on meta tensors (fp32)."""
    from kind_fast.perf.benchmark import build_model

    return build_model(MODEL, mode, device="meta", num_classes=CLASSES)


def _bf16(t: TensorInfo) -> TensorInfo:
    return TensorInfo(t.shape, "bfloat16", t.device) if t.dtype == "float32" else t


def _as_autocast(rec) -> list[Launch]:
    """Records of an fp32 replay priced as autocast's bf16 activations (module docstring)."""
    out = []
    for r in rec:
        if r.kind in ("aten", "model"):
            r = Launch(r.kind, r.name, r.grid, r.sizes, r.meta, [_bf16(t) for t in r.inputs],
                       [_bf16(t) for t in r.outputs], r.args)
        out.append(r)
    return out


def _weights_read(model) -> int:
    """Elements of the bf16 weights a forward reads under autocast: a dense layer's matrix, a
    KIND layer's W_G (out × in) and its tailors U_T, V_T."""
    from kind_fast.nn.layers import FastKindLinear

    n, kind_params = 0, set()
    for m in model.modules():
        if isinstance(m, FastKindLinear):
            n += m.out_features * m.in_features + m.u_t.numel() + m.v_t.numel()
            kind_params.update(id(p) for p in m.parameters())
    return n + sum(p.numel() for p in model.parameters() if id(p) not in kind_params and p.dim() >= 2)


def _autocast_extras(model, trainable_only: bool) -> list[Launch]:
    """What fp32 parameters under bf16 autocast add to a bf16 replay: a cast per floating
    parameter a forward reads (KIND's W_G cached inside training_scope is cast once, when
    built: not per step), and AdamW (foreach) over fp32 copies of the trainable parameters."""
    import torch

    from kind_fast.perf.launches import record_launches
    from kind_fast.nn.layers import FastKindLinear

    out = []
    kind_params = {id(p) for m in model.modules() if isinstance(m, FastKindLinear) for p in m.parameters()}
    shapes = [tuple(p.shape) for p in model.parameters() if id(p) not in kind_params and p.dim() >= 2]
    for m in model.modules():  # W_G comes from the cache (built in bf16 once); U_T, V_T cast per call
        if isinstance(m, FastKindLinear):
            shapes += [tuple(m.u_t.shape), tuple(m.v_t.shape)]
    for shape in shapes:
        out.append(Launch("aten", "_to_copy", inputs=[TensorInfo(shape, "float32", "meta")],
                          outputs=[TensorInfo(shape, "bfloat16", "meta")]))
    params = [p for p in model.parameters() if p.requires_grad]
    if params:
        copies = [torch.empty(p.shape, dtype=torch.float32, device="meta", requires_grad=True) for p in params]
        for c in copies:
            c.grad = torch.empty_like(c)
        opt = torch.optim.AdamW(copies, lr=1e-4, weight_decay=0.0, foreach=True)
        with record_launches() as rec:
            opt.step()
        out.extend(rec)
    return out


@contextlib.contextmanager
def _triton_paths() -> Iterator[None]:
    """``meta`` tensors resolve to the Triton backend (the choice a GPU run makes; its ops run
    their fake kernels here), so the op family's cost model picks the paths it picks there;
    the recording dispatch mode is hidden from the entry point (it would otherwise keep to the
    op paths, as it does under FlopCounterMode)."""
    import kind_fast.ops.backends as B
    import kind_fast.ops.paths as P
    from kind_fast.ops import kind_linear_triton as T

    real_b, real_o, real_d = B.resolve_backend, B.resolve_op, P.under_dispatch_mode
    P.under_dispatch_mode = lambda: False

    def resolve_backend(device, dtype=None):
        return "triton" if device.type == "meta" else real_b(device, dtype)

    def resolve_op(device, dtype):
        return T.OP if device.type == "meta" else real_o(device, dtype)

    B.resolve_backend, B.resolve_op = resolve_backend, resolve_op
    try:
        yield
    finally:
        B.resolve_backend, B.resolve_op, P.under_dispatch_mode = real_b, real_o, real_d


@functools.lru_cache(maxsize=None)
def dit_step_launches(mode: str) -> tuple[tuple[Launch, ...], dict]:
    with meta_replay(), _triton_paths():
        return _dit_step_launches(mode)


def _dit_step_launches(mode: str) -> tuple[tuple[Launch, ...], dict]:
    """(launches, info) of one DiT-XL/2 step: ``full_ft``, ``transfer``, ``pretrain`` (forward,
    ε-loss, backward, AdamW) or ``dense_sample`` / ``kind_sample`` (one guided sampling step:
    the model on 32 images of one class and their 32 null rows; KIND inside
    ``kind_fast.nn.utils.serving`` on cached merged weights, as the sampler runs it)."""
    import torch

    from kind_fast.nn.caching import training_scope, weight_cache
    from kind_fast.models.diffusion import GaussianDiffusion
    from kind_fast.perf.launches import record_launches

    info: dict = {}
    if mode in ("dense_sample", "kind_sample"):
        model = _model("dense" if mode == "dense_sample" else "kind")
        size = int(round(model.pos_embed.shape[1] ** 0.5)) * model.patch_size
        x = torch.empty(2 * BATCH, model.in_channels, size, size, device="meta")
        t = torch.zeros(2 * BATCH, dtype=torch.int64, device="meta")
        y = torch.tensor([3] * BATCH + [CLASSES] * BATCH).to("meta")
        from kind_fast.nn.utils import serving

        scope = contextlib.ExitStack()
        if mode == "kind_sample":
            scope.enter_context(weight_cache())
            scope.enter_context(serving(model, [3, CLASSES]))
        with scope, torch.no_grad():
            model(x, t, y)  # the first call merges and caches the served classes' weights
            rec: list = []
            with _flash_attention(rec), record_launches() as got:
                model(x, t, y)
            rec.extend(got)
        return tuple(_as_autocast(rec)), info
    model = _model(mode)
    diffusion = GaussianDiffusion()
    size = int(round(model.pos_embed.shape[1] ** 0.5)) * model.patch_size
    x = torch.empty(BATCH, model.in_channels, size, size, device="meta")
    y = torch.zeros(BATCH, dtype=torch.int64, device="meta")
    scope = training_scope(model) if mode == "transfer" else contextlib.nullcontext()
    saved: dict[int, int] = {}
    params = {p.untyped_storage()._cdata for p in model.parameters()}

    def pack(t):
        st = t.untyped_storage()
        if st._cdata not in params:  # autocast saves bf16 activations: fp32 ones count as bf16
            saved[st._cdata] = st.nbytes() // (2 if t.dtype == torch.float32 else 1)
        return t

    with scope:
        if mode == "transfer":  # W_G built before the measured step, as in a running trainer
            with torch.no_grad():
                _ = diffusion.loss(model, x, y)
        rec = []
        with _flash_attention(rec), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with record_launches() as got:
                loss = diffusion.loss(model, x, y)
                loss.backward()
            rec.extend(got)
    rec = _as_autocast(rec) + _autocast_extras(model, True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    bf16_copies = _weights_read(model)
    info.update(trainable=trainable, params=total, saved_bytes=sum(saved.values()),
                memory=4 * total + 2 * bf16_copies + (4 + 8) * trainable + sum(saved.values()))
    return tuple(rec), info


def step_memory(mode: str) -> int:
    return dit_step_launches(mode)[1]["memory"]


def dit_step_rows(gpu: GpuTime = H100_TIME) -> list[GoalRow]:
    """Step goals: transfer ≤ 0.80 × full fine-tuning (time) and ≤ 0.75 × (peak memory, modelled);
    pretrain ≤ 1.20 × a dense (full fine-tuning) step; KIND sampling ≤ 1.05 × a dense step."""
    m = BATCH * 256

    def t(mode, e):
        return price_all(dit_step_launches(mode)[0], gpu, e)

    full = t("full_ft", 1.0)
    dense_sample = t("dense_sample", 1.0)
    mem_ratio = step_memory("transfer") / step_memory("full_ft")
    return [
        GoalRow(f"{MODEL} step (B={BATCH})", "transfer step", m, 0.80, lambda e: t("transfer", e) / full),
        GoalRow(f"{MODEL} step (B={BATCH})", "transfer peak memory", m, 0.75, lambda e: mem_ratio),
        GoalRow(f"{MODEL} step (B={BATCH})", "pretrain step", m, 1.20, lambda e: t("pretrain", e) / full),
        GoalRow(f"{MODEL} sampling (B={BATCH} + null)", "sampling step", 2 * m, 1.05,
                lambda e: t("kind_sample", e) / dense_sample),
    ]


# =====================================================================================
# Report
# =====================================================================================
def launch_counts(shape: LayerShape) -> dict[str, int]:
    from kind_fast.perf.launches import kernel_launches

    return {p: len(kernel_launches(list(layer_launches(shape, p))))
            for p in ("kind_fwd", "kind_bwd_transfer", "kind_bwd_pretrain")}


def _fmt(v: float) -> str:
    return "∞" if math.isinf(v) else f"{v:.2f}"


def markdown(rows: Sequence[GoalRow], gpu: GpuTime = H100_TIME, efficiencies=(1.0, 0.85)) -> str:
    head = ["| what | goal | M | target | FLOP floor e* | " + " | ".join(f"modelled @ e={e:.2f}" for e in efficiencies)
            + " | met @ e=1.00 | e* (break-even) |",
            "|---|---|---|---|---|" + "---|" * len(efficiencies) + "---|---|"]
    lines = []
    for r in rows:
        vals = [r.at(e) for e in efficiencies]
        fl = "-" if r.floor is None else f"{r.floor / r.target:.2f}"
        lines.append(f"| {r.what} | {r.goal} | {r.m} | {r.target:.3f} | {fl} | " + " | ".join(f"{v:.3f}" for v in vals)
                     + f" | {'yes' if vals[0] <= r.target else 'NO'} | {_fmt(r.e_star)} |")
    return "\n".join(head + lines) + "\n"


def worst_rows(rows: Sequence[GoalRow]) -> str:
    """Per goal, the row furthest from it at e = 1.00 (modelled ratio / target)."""
    worst: dict[str, GoalRow] = {}
    for r in rows:
        if r.goal not in worst or r.at(1.0) / r.target > worst[r.goal].at(1.0) / worst[r.goal].target:
            worst[r.goal] = r
    lines = ["| goal | worst row | M | target | modelled @ e=1.00 | e* |", "|---|---|---|---|---|---|"]
    for g, r in worst.items():
        lines.append(f"| {g} | {r.what} | {r.m} | {r.target:.3f} | {r.at(1.0):.3f} | {_fmt(r.e_star)} |")
    return "\n".join(lines) + "\n"


def constants_table(gpu: GpuTime) -> str:
    rows = [("SMs", gpu.sms), ("tensor peak (dense bf16)", f"{gpu.peak / 1e12:.0f} TFLOP/s"),
            ("tensor peak (dense TF32: fp32 GEMMs)", f"{gpu.tf32_peak / 1e12:.0f} TFLOP/s"),
            ("cuBLAS main loop", f"{gpu.cublas:.2f} × peak"), ("attention", f"{gpu.attention:.2f} × peak"),
            ("HBM", f"{gpu.hbm / 1e12:.2f} TB/s × {gpu.hbm_eff:.2f}"),
            ("bandwidth per resident program", f"{gpu.cta_bandwidth / 1e9:.0f} GB/s"),
            ("launch gap", f"{gpu.launch / US:.1f} µs"), ("HBM latency", f"{gpu.hbm_latency / US:.2f} µs"),
            ("L2 round trip", f"{gpu.l2_latency / US:.2f} µs"),
            ("store issue per SM", f"{gpu.store_bandwidth / 1e9:.0f} GB/s"),
            ("a K-step waiting for its own MMA", f"{gpu.wgmma_sync / US:.2f} µs"),
            ("L2 budget (traffic model)", f"{gpu.l2.l2_budget / pm.MB:.0f} MiB")]
    return "| constant | value |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kind_fast.perf.timemodel", description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, nargs="*", default=[8192, 65536])
    ap.add_argument("--no-steps", action="store_true", help="layer rows only")
    ap.add_argument("--markdown", metavar="PATH", help="also write the report (bench/results/model_dit_xl.md)")
    ap.add_argument("--json", metavar="PATH", help="also write the rows (bench/results/model_dit_xl.json, which "
                    "bench/gpu_check.py prints beside its measurements)")
    args = ap.parse_args(argv)
    gpu = H100_TIME
    rows = layer_goal_rows(args.m, gpu)
    if not args.no_steps:
        rows += step_goal_rows(gpu)
    counts = launch_counts(LayerShape("DiT-XL/2.q", 1152, 1152, 8192))
    text = ("# Time model of the kind_linear op family, DiT-XL/2 (MODELLED, not measured)\n\n"
            "Generated by `python -m kind_fast.perf.timemodel` (no GPU): the launches the code makes, recorded on "
            "`meta` tensors, each priced by the model in `kind_fast/perf/timemodel.py` (its docstring states how). "
            "e is our kernels' main-loop rate per FLOP relative to cuBLAS's; e* is the smallest e at which the "
            "modelled ratio meets the goal (∞: no e does). K = 32 of N_T = 96 tailors, T = 256, bf16, 10 classes.\n\n"
            "## Constants (assumptions, to be calibrated by `bash bench/gpu_check.sh`)\n\n" + constants_table(gpu) +
            f"\n## Launches of one KIND layer (DiT-XL/2.q, M = 8192; counted)\n\n"
            f"forward {counts['kind_fwd']}, transfer backward {counts['kind_bwd_transfer']}, "
            f"pretrain backward {counts['kind_bwd_pretrain']}.\n\n## Worst row per goal\n\n" + worst_rows(rows) +
            "\n## Goals\n\n" + markdown(rows, gpu))
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump({"note": "MODELLED (kind_fast.perf.timemodel), not measured", "gpu": gpu.name,
                       "rows": rows_json(rows)}, f, indent=1)
            f.write("\n")
    return 0


def rows_json(rows: Sequence[GoalRow]) -> list[dict]:
    """The goal rows as plain data: what, goal, M, target, the modelled ratio at e = 1.00 and
    0.85, the break-even e* (None: no e meets it) and the FLOP floor's e*."""
    out = []
    for r in rows:
        e_star = r.e_star
        out.append(dict(what=r.what, goal=r.goal, M=r.m, target=round(r.target, 4), at_1_00=round(r.at(1.0), 4),
                        at_0_85=round(r.at(0.85), 4), e_star=None if math.isinf(e_star) else round(e_star, 3),
                        floor_e_star=None if r.floor is None else round(r.floor / r.target, 3)))
    return out


if __name__ == "__main__":
    sys.exit(main())
