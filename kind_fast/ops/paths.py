"""The kind_linear op family's execution paths, behind one entry point (docs/design.md §2).

A KIND layer y = x·W_cᵀ + b, W_c = W_G + U_Tᵀ diag(σ_T ⊙ g_c) V_T (c: the sample's class), runs
along several exact paths. Which one is cheapest depends on the shape, on whether gradients are
needed, on how many classes the batch holds and on what the backend implements:

    M0  the reference op kind_fast::kind_linear on the torch backend: W_G materialised, the
        gathered tailor term in batched GEMMs. Any device and dtype.
    M1  W_G materialised once per step, then ONE fused kind_linear op (Triton/CUDA backends):
        x·W_Gᵀ plus the gathered gated tailor term, the shrink in the same pass over x.
    M2  fully factored (Triton): the learngenes become N_G always-on slots of the fused kernel,
        no W_G, no dense GEMM. Wins when N_G + K << min(in, out).
    M3  merged per-class weights W_c for the S distinct classes of the batch, then a segmented
        GEMM (kind_fast/ops/kind_linear_merged.py): a dense layer's cost when the weights are
        cached, as in sampling (CFG: {c, null}). Differentiable (autograd through the merge).
    M4  tiny layers on the CPU: the layer as a handful of plain PyTorch ops under autograd,
        every tailor through a dense per-sample gate (N_T/K more tailor FLOPs, but no custom-op
        dispatch, gathers or scatters), for shapes where per-call overhead, not FLOPs, dominates.
    M5  the lean CPU path (kind_fast/ops/kind_linear_lean.py): one hand-written autograd
        Function, no registered-op dispatch and no autograd graph of small ops: one GEMM with
        W_G forward, one for dx, and the tailor term's few GEMMs over the tailors the batch's
        classes switch on (R, their union, read from CPU labels; or each sample's K gathered).
        Also runs a group of layers that read the same x (q, k, v) as one call.

``choose_path`` is the cost model: an estimated time per path, FLOPs / throughput + eager op
launches × their overhead (per-device constants measured on the CPU, see COSTS; the tailor
term's skinny GEMMs at their own measured rate), minimised over the paths that can run the
call. It reads shapes only, never tensor values. ``kind_linear_layer``
is the entry point FastKindLinear calls, ``kind_linear_group_layer`` the one for a group of
layers that read the same x (``kind_fast.nn.layers.kind_group``). Backends are reached through the
registry (kind_fast.ops.backends), never imported here.

Caching (M3): the caller passes a ``MergedWeightCache`` and a token function; merged weights
are built once per (class set, parameter version) and reused. In eval calls M3 runs only on
cached weights: a class set is cached when the caller declares it (``classes=``, e.g. the
sampler through ``ClassGate.serving``) or on its second use with unchanged parameters. Under a
Python dispatch mode (FlopCounterMode, fake tensors) or torch.compile nothing is cached and the
op paths M0/M1/M2 run, so FLOP counts follow the op's convention (docs/flops.md).
FastKindLinear passes its cache only inside a ``kind_fast.weight_cache()`` scope (the sampler
opens one), so merged weights, like W_G, can never outlive a write the token cannot see.

Which classes a batch holds: ``classes=`` (declared; labels outside them are an error, checked
on the host for CPU labels and asynchronously on CUDA), else read from CPU labels (free; once per
labels tensor), else, for CUDA labels, all C+1 classes when they fit in the cache.
Each sample's slot (M3): the Triton kernel reads it on the device; backends that plan their
GEMMs on the host (``MERGED_GEMM_HOST_SLOTS``, the CUDA backend: one cuBLAS GEMM per run of
samples of one slot) get them from ``host_slots``, which reads GPU labels once per labels tensor.

``KIND_FAST_DEBUG=1`` logs each new (shape, path) decision to stderr once; ``python -m
kind_fast.info`` prints the decisions for the DiT-XL/2 layers; ``force_path("M1")`` pins a path
(benchmarks, tests; a path that cannot run the call raises).

Entry point (FastKindLinear passes its parameters; DiT.export or other modules may call it)::

    kind_linear_layer(x, labels, *, u_g, sigma_g, v_g, bias, u_t, sigma_t, v_t, idx, val,
                      w_g=None, merged=None, token=None, classes=None, training_module=None) -> y

    x        (B, ..., in) with x[b] the rows of sample b (kind_linear.sample_rows); the autocast dtype (when
             autocast is on) or the parameters' dtype
    labels   (B,) int class ids in [0, C] (C = null class), on x's device
    u_g, sigma_g, v_g  learngenes (N_G, out), (N_G,), (N_G, in)
    bias     (out,) or None;  u_t, sigma_t, v_t  tailors (N_T, out), (N_T,), (N_T, in)
    idx, val the compiled gate, (C+1, K) int32 / float32 (ClassGate.compiled)
    w_g      W_G (out, in) in x's dtype, or a callable dtype -> W_G (the layer's cached
             ``learngene_weight``), or None (built here from the learngenes)
    merged   a kind_fast.nn.merged_cache.MergedWeightCache (None: M3 only uncached, in training)
    token    () -> a token of every tensor the merged weights depend on (merged_cache.tokens)
    classes  declared class ids of this call's labels (a sampling loop), or None
    training_module  the module's ``training`` flag (None: treated as eval when no grad is
             needed); M3 in eval requires it False or ``classes`` declared
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

from kind_fast._tracing import under_dispatch_mode
from kind_fast.ops.kind_linear import _validate, acc_dtype, kind_linear, kind_linear_flops, tailor_plan
from kind_fast.ops.kind_linear_merged import (
    kind_linear_merged_gemm,
    kind_linear_merged_gemm_ref,
    merge_weights,
)
from kind_fast.ops.labels import LabelsMemo

__all__ = ["PATHS", "PathChoice", "DeviceCosts", "COSTS", "TERMS", "choose_path", "path_costs", "path_terms",
           "kind_linear_layer", "kind_linear_group_layer", "kind_linear_eager", "force_path", "forced_path",
           "distinct_classes", "host_slots", "record_paths"]

PATHS = ("M0", "M1", "M2", "M3", "M4", "M5")
# Largest N_G + K the Triton backend's fused kernel takes for M2 (its BM×KP shrink accumulator
# lives in registers); the backend module's own MAX_ACTIVE is read when it is loaded.
_DEFAULT_MAX_ACTIVE = 128


@dataclass(frozen=True)
class PathChoice:
    path: str            # "M0" … "M4"
    reason: str
    flop_ratio: float    # the chosen path's forward FLOPs / dense F.linear FLOPs of the same shape
    would_prefer: str    # the path with the fewest FLOPs if every path ran everywhere
    backend: str = "triton"
    plan: str = ""       # M5: "union" or "sample" (how the tailor term runs)


@dataclass(frozen=True)
class DeviceCosts:
    """The time model's constants for one device type:

        time ≈ dense GEMM FLOPs / flops_per_s + the tailor term's FLOPs / skinny_flops_per_s
               + eager ops × op_s + registered-op (Python custom op) calls × custom_op_s
               + per-sample batched-GEMM items × item_s

    (the tailor term's GEMMs are skinny, R or K columns, and run well below the dense rate on a
    CPU; a batched GEMM over B small per-sample matrices pays per item)."""
    flops_per_s: float
    op_s: float
    custom_op_s: float
    skinny_flops_per_s: float = 0.0  # 0: flops_per_s
    item_s: float = 0.0


# "cpu": the reference and the lean path on the CPU, fitted by ``python bench/cpu_paths.py`` to
# interleaved layer timings on the 2-core VM (one thread, torch 2.13; shared with other jobs
# while measured, so the fit is on this thread's CPU time): bench/results/cpu_paths.md.
# "cuda": the fused backends (also under Triton's CPU interpreter, a test vehicle for GPU
# kernels): no launch overhead is modelled, since none was measured on a GPU, so M1, M2 and M3
# are chosen by FLOPs there, as before; CUDA graphs take the launches off the sampling loop.
COSTS = {
    "cpu": DeviceCosts(flops_per_s=8.95e10, op_s=3.84e-6, custom_op_s=3.59e-5, skinny_flops_per_s=5.23e10,
                       item_s=1.14e-6),
    "cuda": DeviceCosts(flops_per_s=4.0e14, op_s=0.0, custom_op_s=0.0),
}

# the terms of one path's time (time = the DeviceCosts-weighted sum; see path_terms)
TERMS = ("dense_flops", "tailor_flops", "ops", "custom_ops", "items")


def path_terms(
    rows: int, n_in: int, n_out: int, active: int, tailor_rank: int, *,
    learngene_rank: int | None = None, samples: int | None = None, distinct_classes: int | None = None,
    training: bool = True, learngene_grad: bool = False, merged_cached: bool = False,
    backend: str = "triton", device_type: str = "cuda", union_rank: int | None = None,
) -> dict[str, tuple[tuple[float, ...], float, float]]:
    """path -> (the ``TERMS`` of its time, forward FLOPs, forward + backward FLOPs) for every path
    the shape could take (before asking what the backend implements; see the module docstring).
    M5 appears as "M5:union" (when ``union_rank``, R, is known) and "M5:sample" (T >= K)."""
    m, i, o, k, nt = rows, n_in, n_out, active, tailor_rank
    b = samples if samples else max(m, 1)
    dense = 2 * m * i * o
    # when the learngenes train: dW_G = gᵀx, and W_G is materialised (and differentiated) per
    # step, 2·N_G·in·out forward + twice that backward; every path but M2 pays it
    lg = dense if (training and learngene_grad) else 0
    if training and learngene_grad and learngene_rank:
        lg += 6 * learngene_rank * i * o
    lg_ops = 6 if lg else 0
    bwd = 2 if training else 0  # dense backward GEMMs: dx (the learngenes' dW is in lg)
    # eager op counts per call, forward + backward (eval: forward), wrapper included: counted with
    # torch.profiler (top-level aten ops) on the CPU paths by bench/cpu_paths.py's cases; the
    # GPU paths' counts are estimates (no launch overhead is modelled on CUDA anyway)
    tail_mult = 3 if training else 1  # tailor GEMM pairs: forward, and dx/dh + dU/dV backward
    per_sample = tailor_plan(m, b, k, nt) == "sample"

    out = {}
    # M0 / M1: the kind_linear op (the reference's "row" plan multiplies all N_T tailors; its
    # "sample" plan runs batched GEMMs over the B samples)
    ke = nt if not per_sample else k
    t0 = 2 * m * ke * (i + o) * tail_mult
    out["M0"] = ((dense * (1 + bwd / 2) + lg, t0, (88 if training else 37) + lg_ops, 1 + training,
                  b * (2 + 4 * training) if per_sample else 0),
                 kind_linear_flops(m, i, o, k), dense * (1 + bwd / 2) + lg + t0)
    f1 = kind_linear_flops(m, i, o, k)
    t1 = 2 * m * k * (i + o) * tail_mult
    out["M1"] = ((dense * (1 + bwd / 2) + lg, t1, 3 + lg_ops + (7 if training else 0), 1 + training, 0), f1,
                 dense * (1 + bwd / 2) + lg + t1)
    if learngene_rank is not None:
        r = learngene_rank + k
        f2 = 2 * m * r * (i + o)
        f2_all = f2 * (3 if training else 1)
        out["M2"] = ((f2_all, 0, 8 + (8 if training else 0), 1 + training, 0), f2, f2_all)
    if distinct_classes is not None and distinct_classes > 0:
        s = distinct_classes
        # the reference GEMM reads slots on the host on the CPU (one GEMM per slot); elsewhere it
        # multiplies every slot's weight. Triton has a segmented kernel; the CUDA backend runs one
        # cuBLAS GEMM per run of samples of a slot, from host slots (``host_slots``: labels read
        # once per labels tensor), so both cost a dense layer
        factor = 1 if (backend in ("triton", "cuda") or device_type == "cpu") else s
        merge = 0 if (merged_cached and not training) else 2 * s * k * i * o
        f3 = dense * factor + merge
        b3 = (2 * dense * factor + 2 * merge + lg - (dense if lg else 0)) if training else 0
        host = backend == "torch" and device_type == "cpu"  # the reference's loop over slots
        ops3 = ((77 + 13 * s) if training else (60 + 2 * s)) if host else \
            (2 + (0 if merge == 0 else 6) + (4 if training else 0))
        out["M3"] = ((f3 + b3, 0, ops3, 1 + training if backend != "torch" else 0, 0), f3, f3 + b3)
    t4 = 2 * m * nt * (i + o) * tail_mult
    out["M4"] = ((dense * (1 + bwd / 2) + lg, t4, (52 if training else 35) + lg_ops, 0, 0),
                 dense + 2 * m * nt * (i + o), dense * (1 + bwd / 2) + lg + t4)
    if device_type == "cpu" and backend == "torch":
        # M5: the lean path, one hand-written Function; the sample plan's batched GEMMs pay per item
        plans = {}
        if union_rank is not None:
            plans["union"] = (union_rank, 0, 39 if training else 28)
        if samples and m // b >= k:
            plans["sample"] = (k, b * (2 + 4 * training), 57 if training else 28)
        for plan, (r, items, ops) in plans.items():
            t5 = 2 * m * r * (i + o) * tail_mult
            out[f"M5:{plan}"] = ((dense * (1 + bwd / 2) + lg, t5, ops + lg_ops, 0, items),
                                 dense + 2 * m * r * (i + o), dense * (1 + bwd / 2) + lg + t5)
    return out


def path_costs(
    rows: int, n_in: int, n_out: int, active: int, tailor_rank: int, *,
    learngene_rank: int | None = None, samples: int | None = None, distinct_classes: int | None = None,
    training: bool = True, learngene_grad: bool = False, merged_cached: bool = False,
    backend: str = "triton", device_type: str = "cuda", union_rank: int | None = None,
) -> dict[str, tuple[float, float, float]]:
    """path -> (estimated seconds, forward FLOPs, forward + backward FLOPs): ``path_terms``
    weighted by the device's ``COSTS``."""
    c = COSTS["cpu"] if (device_type == "cpu" and backend == "torch") else COSTS["cuda"]
    rates = (1 / c.flops_per_s, 1 / (c.skinny_flops_per_s or c.flops_per_s), c.op_s, c.custom_op_s, c.item_s)
    terms = path_terms(rows, n_in, n_out, active, tailor_rank, learngene_rank=learngene_rank, samples=samples,
                       distinct_classes=distinct_classes, training=training, learngene_grad=learngene_grad,
                       merged_cached=merged_cached, backend=backend, device_type=device_type,
                       union_rank=union_rank)
    return {p: (sum(a * w for a, w in zip(t, rates)), f, fa) for p, (t, f, fa) in terms.items()}


def _choose_path(
    rows: int, n_in: int, n_out: int, active: int, tailor_rank: int, *,
    learngene_rank: int | None = None, samples: int | None = None, distinct_classes: int | None = None,
    training: bool = True, learngene_grad: bool = False, merged_cached: bool = False,
    backend: str = "triton", device_type: str | None = None, max_active: int = _DEFAULT_MAX_ACTIVE,
    allow: Sequence[str] | None = None, union_rank: int | None = None,
) -> PathChoice:
    """Which path runs one layer call, and why. Shapes only (no tensor is read).

    Args:
        rows: M = B·T rows; n_in, n_out: the layer's features; active: K (gate slots);
        tailor_rank: N_T; learngene_rank: N_G (None: M2 not considered); samples: B;
        distinct_classes: S, classes in the batch when known on the host (None: M3 not
        considered); training: gradients are needed; learngene_grad: W_G's factors train;
        merged_cached: the S merged weights are cached (eval M3 pays no merge);
        backend: the resolved backend ("torch", "triton", "cuda"); device_type: "cpu" or
        "cuda" (default: "cuda" for fused backends, else "cpu"); max_active: the Triton
        kernel's largest slot count; allow: restrict the candidates (a tuple; the entry
        point's rules; M5 runs only where the entry point allows it: CPU labels, eager, a
        fixed gate); union_rank: R, the tailors the batch's classes switch on (M5's union
        plan; None: only its sample plan). Results are memoised (arguments are plain values).

    Forward FLOPs per path, K active tailors (backward: see ``path_costs``):
        M0/M1  2·M·in·out + 2·M·K·(in + out)        (M0's "row" plan: N_T instead of K)
        M2     2·M·(N_G + K)·(in + out)             wins when N_G + K < ~0.5·min(in, out)
        M3     2·M·in·out (+ 2·S·K·in·out to merge when not cached)
        M4     2·M·in·out + 2·M·N_T·(in + out)      no custom op: wins on tiny CPU layers
        M5     2·M·in·out + 2·M·R·(in + out)        hand-written backward, no dW: the CPU
               (union plan; the sample plan: K)    transfer path; also groups (q, k, v)
    """
    device_type = device_type or ("cuda" if backend in ("triton", "cuda") else "cpu")
    costs = path_costs(rows, n_in, n_out, active, tailor_rank, learngene_rank=learngene_rank, samples=samples,
                       distinct_classes=distinct_classes, training=training, learngene_grad=learngene_grad,
                       merged_cached=merged_cached, backend=backend, device_type=device_type,
                       union_rank=union_rank)
    dense = max(2 * rows * n_in * n_out, 1)
    flop_best = {p: c[2] for p, c in costs.items() if p not in ("M0", "M4") and not p.startswith("M5")}
    prefer = min(flop_best, key=lambda p: (flop_best[p], p))
    if active == 0 or tailor_rank == 0 or rows == 0:
        return PathChoice("M0", "no active tailors: one F.linear", 1.0, "M0", backend)
    fused = backend in ("triton", "cuda")
    can = {"M1" if fused else "M0"}
    why_not = {}
    if "M2" in costs:
        if backend != "triton":
            why_not["M2"] = "only the Triton backend has it"
        elif not 0 < learngene_rank + active <= max_active:
            why_not["M2"] = f"N_G + K = {learngene_rank + active} > {max_active}"
        else:
            can.add("M2")
    if "M3" in costs:
        can.add("M3")
    if device_type == "cpu" and backend == "torch":
        can.add("M4")
        can.update(p for p in costs if p.startswith("M5"))
    if backend == "triton" and active > max_active:
        can.discard("M1")
        can.add("M0")
        why_not["M1"] = f"K={active} active tailors > {max_active}"
    if allow is not None:
        can = {p for p in can if p.split(":")[0] in allow} or {"M1" if fused and "M1" in can else "M0"}
    key = min(can, key=lambda p: (costs[p][0], p))
    est = costs[key][0]
    path, _, plan = key.partition(":")
    reasons = {
        "M0": "reference: x·W_Gᵀ + gathered tailor term in batched GEMMs",
        "M1": "fused GEMM + gathered tailor term, shrink in the same K-loop",
        "M2": f"fully factored, no W_G: N_G + K = {(learngene_rank or 0) + active} slots in the fused kernel",
        "M3": f"{distinct_classes} merged class weight(s) "
              f"({'cached' if merged_cached and not training else 'merged now'}) + segmented GEMM",
        "M4": "tiny layer: plain autograd ops, all N_T tailors under a dense per-sample gate",
        "M5": (f"lean CPU path: W_G GEMM + the {union_rank} tailors of the batch's classes, hand-written backward"
               if plan == "union" else
               f"lean CPU path: W_G GEMM + each sample's {active} gathered tailors, hand-written backward"),
    }
    # the time estimate is shown where its constants were measured (the CPU), not on CUDA
    reason = f"{reasons[path]}; est. {est * 1e6:.0f} us" if device_type == "cpu" else reasons[path]
    if prefer != path and prefer not in can and prefer in why_not:
        reason += f" ({prefer} would need fewer FLOPs but {why_not[prefer]})"
    if path == "M0" and "M1" in why_not:
        reason = f"{why_not['M1']}: {reason}"
    return PathChoice(path, reason, costs[key][1] / dense, prefer, backend, plan)


choose_path = functools.lru_cache(maxsize=4096)(_choose_path)


# =====================================================================================
# Pinning a path (benchmarks, tests)
# =====================================================================================
class _Forced:
    path: str | None = None


_FORCED = _Forced()


def forced_path() -> str | None:
    """The path pinned by ``force_path`` (None: the cost model decides)."""
    return _FORCED.path


@contextmanager
def force_path(path: str | None) -> Iterator[None]:
    """Pin the path of every ``kind_linear_layer`` call in the block (None: the cost model).

    ``"M5:union"`` / ``"M5:sample"`` also pin M5's plan. A pinned path that cannot run a call
    (M2 off the Triton backend, M3 with unknown classes, M5 off the CPU reference) raises there.
    """
    if path is not None:
        name, _, plan = path.partition(":")
        if name not in PATHS or (plan and (name != "M5" or plan not in ("union", "sample"))):
            raise ValueError(f"unknown path {path!r}; choose one of {PATHS}, 'M5:union', 'M5:sample' or None")
    previous = _FORCED.path
    _FORCED.path = path
    try:
        yield
    finally:
        _FORCED.path = previous


# =====================================================================================
# Debug log, and a recorder of the decisions (benchmarks, tests)
# =====================================================================================
_LOGGED: set = set()
_RECORDERS: list[list] = []


@contextmanager
def record_paths() -> Iterator[list[dict]]:
    """Collect the decision of every ``kind_linear_layer`` call in the block (outside
    torch.compile and dispatch modes): dicts with path, backend, reason, rows, in, out,
    samples, classes (S, when known), training."""
    calls: list[dict] = []
    _RECORDERS.append(calls)
    try:
        yield calls
    finally:
        _RECORDERS.remove(calls)


def _debug_log(choice: PathChoice, rows: int, n_in: int, n_out: int, k: int, n_t: int, b: int,
               dtype: torch.dtype, training: bool, classes: int | None) -> None:
    if os.environ.get("KIND_FAST_DEBUG", "0") in ("", "0"):
        return
    key = (choice.path, choice.backend, rows, n_in, n_out, k, n_t, b, dtype, training, classes)
    if key in _LOGGED:
        return
    _LOGGED.add(key)
    print(f"kind_fast path: M={rows} in={n_in} out={n_out} K={k} N_T={n_t} B={b} classes={classes} {dtype} "
          f"{'train' if training else 'eval'} backend={choice.backend} -> {choice.path} ({choice.reason})",
          file=sys.stderr)


# =====================================================================================
# The classes of CPU labels and their samples (read on the host: free there), once per tensor
# =====================================================================================
_PLAN = LabelsMemo()  # (classes, rows) of the last CPU labels tensor


def host_plan(labels: Tensor) -> tuple[tuple[int, ...], dict] | None:
    """(sorted distinct classes, {class: its samples as a slice (one run) or an index tensor})
    of CPU ``labels``; None for other devices, inference tensors, under torch.compile or a
    dispatch mode. Every layer of a model sees the same labels tensor, so the answer for the
    last one is kept."""
    if (labels.device.type != "cpu" or torch.compiler.is_compiling() or labels.is_inference()
            or under_dispatch_mode()):
        return None
    plan = _PLAN.get(labels)
    if plan is not None:
        return plan
    lab = labels.long()
    classes = tuple(torch.unique(lab).tolist())
    rows = {}
    for c in classes:
        where = (lab == c).nonzero().flatten()
        lo, hi = int(where[0]), int(where[-1]) + 1
        rows[c] = slice(lo, hi) if hi - lo == where.numel() else where
    return _PLAN.put(labels, (classes, rows))


def distinct_classes(labels: Tensor) -> tuple[int, ...] | None:
    """Sorted distinct class ids of CPU ``labels`` (see ``host_plan``), else None."""
    plan = host_plan(labels)
    return None if plan is None else plan[0]


_SLOTS = LabelsMemo()  # host slots of the last labels tensor, per served classes


def host_slots(labels: Tensor, served: tuple[int, ...]) -> Tensor | None:
    """Slot of each sample (B,) int64 on the CPU, slot i = ``served[i]``, for the segmented GEMM
    of backends that plan on the host (``MERGED_GEMM_HOST_SLOTS``: the CUDA backend runs one
    cuBLAS GEMM per run of samples of one slot). Labels on a GPU are read once per labels
    tensor and version (one synchronisation: every layer of a model and every step of a
    sampling loop see the same tensor), then reused. Labels outside ``served`` are a
    ValueError. None (the caller keeps device slots) under torch.compile or a dispatch mode, for
    inference tensors (no version counter), and during CUDA-graph capture unless these labels
    were read before it (the warm-up calls): then the graph keeps that layout, and a device
    assertion captured with it checks at every replay that the labels still hold it."""
    if torch.compiler.is_compiling() or under_dispatch_mode() or labels.is_inference():
        return None
    # a hit on GPU labels enqueues a device assertion that they still hold the values read (also
    # inside a captured graph, where it checks at every replay)
    slots = _SLOTS.get(labels, served)
    if slots is not None:
        return slots
    if labels.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None
    lab = labels.long().cpu()  # one synchronisation for GPU labels
    slot_of = torch.full((int(max(served)) + 1,), -1, dtype=torch.long)
    slot_of[list(served)] = torch.arange(len(served))
    bad = (lab < 0) | (lab >= slot_of.numel())
    slots = slot_of[lab.clamp(0, slot_of.numel() - 1)]
    bad |= slots < 0
    if bool(bad.any()):
        extra = sorted(set(lab[bad].tolist()))
        raise ValueError(f"labels hold classes {extra} outside the declared served classes {list(served)} "
                         "(ClassGate.serving / classes=)")
    return _SLOTS.put(labels, slots, served)


# =====================================================================================
# Path M4: tiny layers as plain autograd ops
# =====================================================================================
class _TinyKindLinear(torch.autograd.Function):
    """y = x·W_Gᵀ + b + ((x·V_Tᵀ) ⊙ s_b)·U_T on 2-D x (M, in) with per-sample tailor scales s
    (B, N_T). Six GEMMs for forward + backward (nn.Linear: three): the dense and shrink GEMMs
    share one pass over x ([W_G; V_T]), dx = [g | dh]·[W_G; V_T] is one GEMM; dW_G only when
    asked for (pretraining)."""

    @staticmethod
    def forward(ctx, x, w_g, bias, u_t, v_t, s):
        m, n_out, n_t = x.shape[0], w_g.shape[0], v_t.shape[0]
        b = s.shape[0]
        wv = torch.cat([w_g, v_t])                                                   # (out + N_T, in)
        yh = x @ wv.t()                                                              # (M, out + N_T)
        h = yh[:, n_out:]
        hs = (h.reshape(b, m // b, n_t).to(s.dtype) * s[:, None, :]).to(x.dtype).view(m, n_t)
        y = torch.addmm(yh[:, :n_out], hs, u_t)
        if bias is not None:
            y += bias
        ctx.save_for_backward(x, wv, u_t, s, h, hs)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, g):
        x, wv, u_t, s, h, hs = ctx.saved_tensors
        need_x, need_w, need_b, need_u, need_v, need_s = ctx.needs_input_grad
        m, n_t = h.shape
        b = s.shape[0]
        dx = dw = db = du = dv = ds = None
        dhs = g @ u_t.t() if (need_x or need_v or need_s) else None                 # (M, N_T)
        if need_u:
            du = hs.t() @ g
        if need_x or need_v:
            dh = (dhs.view(b, m // b, n_t).to(s.dtype) * s[:, None, :]).to(g.dtype).view(m, n_t)
            if need_x:
                dx = torch.cat([g, dh], 1) @ wv
            if need_v:
                dv = dh.t() @ x
        if need_s:
            ds = (dhs.to(s.dtype) * h.to(s.dtype)).view(b, m // b, n_t).sum(1)
        if need_w:
            dw = g.t() @ x
        if need_b and ctx.has_bias:
            db = g.sum(0)
        return dx, dw, db, du, dv, ds


def kind_linear_eager(x: Tensor, w_g: Tensor, bias: Tensor | None, u_t: Tensor, sigma_t: Tensor, v_t: Tensor,
                      idx: Tensor, val: Tensor, labels: Tensor) -> Tensor:
    """Path M4 on 2-D x (M, in): y = x·W_Gᵀ + ((x·V_Tᵀ) ⊙ S[labels])·U_T + b with the dense gate
    S = σ_T ⊙ G (C+1, N_T), G scattered from (idx, val). Exact: tailors a class does not use get
    gate 0. Gradients: dx, dW_G, db, dU_T, dV_T from ``_TinyKindLinear``; dσ_T and dval by
    autograd through S."""
    acc = acc_dtype(x.dtype)
    gate = torch.zeros(idx.shape[0], u_t.shape[0], dtype=acc, device=x.device).scatter_add(
        1, idx.long(), val.to(acc))
    s = (gate * sigma_t.to(acc)).index_select(0, labels.long())                  # (B, N_T)
    return _TinyKindLinear.apply(x, w_g, bias, u_t, v_t, s)


# =====================================================================================
# Entry point
# =====================================================================================
def _backend_module(name: str):
    from kind_fast.ops.backends import backend_module

    return backend_module(name)


def _resolve_backend(device: torch.device, dtype: torch.dtype) -> str:
    from kind_fast.ops.backends import resolve_backend

    return resolve_backend(device, dtype)


def _learngene_weight(u_g: Tensor, sigma_g: Tensor, v_g: Tensor, dtype: torch.dtype) -> Tensor:
    acc = acc_dtype(u_g.dtype)
    with torch.autocast(u_g.device.type, enabled=False):
        return ((u_g.t().to(acc) * sigma_g.to(acc)) @ v_g.to(acc)).to(dtype)


def _check_served(labels: Tensor, classes: tuple[int, ...], served_from_labels: bool) -> None:
    """Labels must lie in the declared classes: read on the host for CPU labels, asserted
    asynchronously on CUDA (outside graph capture), never a silent wrong answer."""
    if served_from_labels or labels.numel() == 0:
        return
    if labels.device.type == "cpu":
        present = distinct_classes(labels)
        if present is None:
            present = tuple(torch.unique(labels).tolist())
        extra = sorted(set(present) - set(classes))
        if extra:
            raise ValueError(f"labels hold classes {extra} outside the declared served classes {list(classes)} "
                             "(ClassGate.serving / classes=)")
    elif labels.device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
        allowed = torch.zeros(int(max(classes)) + 2, dtype=torch.bool, device=labels.device)
        allowed[list(classes)] = True
        torch._assert_async(allowed[labels.long().clamp(0, allowed.numel() - 1)].all(),
                            "labels outside the declared served classes (ClassGate.serving)")


class _Call:
    """One call's decision (``_decide``): the path and what running it needs."""

    __slots__ = ("path", "plan", "backend", "dt", "served", "declared", "training", "key", "tok", "hit", "choice",
                 "admitted")


def _decide(x: Tensor, labels: Tensor, u_g, sigma_g, v_g, bias, u_t, sigma_t, v_t, idx, val, merged, token, classes,
            training_module) -> _Call:
    """The path of one layer call (the rules in the module docstring) and its cache state."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    dev = x.device
    dev_type = dev.type
    dt = torch.get_autocast_dtype(dev_type) if torch.is_autocast_enabled(dev_type) else x.dtype
    backend = _resolve_backend(dev, dt)
    n_in, n_out = v_t.shape[-1], u_t.shape[-1]
    rows = x.numel() // max(n_in, 1)
    k = idx.shape[1] if isinstance(idx, Tensor) and idx.dim() == 2 else 0
    n_b = labels.shape[0] if isinstance(labels, Tensor) and labels.dim() == 1 else 0
    n_g = u_g.shape[0]
    learngene_grad = u_g.requires_grad or sigma_g.requires_grad or v_g.requires_grad
    training = torch.is_grad_enabled() and (
        learngene_grad or x.requires_grad or u_t.requires_grad or sigma_t.requires_grad or v_t.requires_grad
        or (bias is not None and bias.requires_grad) or (isinstance(val, Tensor) and val.requires_grad))
    learngene_grad = training and learngene_grad
    max_active = _DEFAULT_MAX_ACTIVE
    if backend == "triton":
        max_active = getattr(_backend_module("triton")[0], "MAX_ACTIVE", _DEFAULT_MAX_ACTIVE)

    # ---- which paths may run this call (the rules in the module docstring)
    plain = not torch.compiler.is_compiling() and not under_dispatch_mode()
    allow = ["M0", "M1", "M2"]
    served, declared = None, False
    union = None
    if n_b and plain:
        present = distinct_classes(labels)  # CPU labels: read on the host, once per labels tensor
        if classes is not None:
            served, declared = tuple(sorted({int(c) for c in classes})), True
        else:
            served = present
            if served is None and merged is not None and not training and merged.fits(idx.shape[0]):
                served = tuple(range(idx.shape[0]))  # CUDA labels: every class, when they all fit
        if dev_type == "cpu" and backend == "torch":
            allow.append("M4")
            if present is not None and k and not (isinstance(val, Tensor) and val.requires_grad) \
                    and rows % n_b == 0:
                allow.append("M5")
                union = lean_union_rank(labels, idx, val, present)
    key = tok = hit = None
    cached = False
    if served is not None and declared and not all(isinstance(c, int) and 0 <= c < idx.shape[0] for c in served):
        raise ValueError(f"declared classes {list(served)} must be class ids in [0, {idx.shape[0] - 1}]")
    if served is not None:
        if training:
            allow.append("M3")  # differentiable merge, never cached
        elif merged is not None and (training_module is False or declared):
            key = (served, dt, x.device)
            tok = token() if token is not None else None
            hit = merged.get(key, tok)
            cached = hit is not None or merged.admit(key, tok, declared)
            if cached:
                allow.append("M3")
    forced = _FORCED.path
    # under torch.compile the memo is bypassed (dynamo traces the plain function; the choice
    # becomes part of the graph's guards through the shapes)
    choose = _choose_path if torch.compiler.is_compiling() else choose_path
    choice = choose(rows, n_in, n_out, k, u_t.shape[0], learngene_rank=n_g, samples=n_b or None,
                    distinct_classes=len(served) if served is not None else None, training=training,
                    learngene_grad=learngene_grad, merged_cached=cached, backend=backend,
                    device_type=dev_type, max_active=max_active,
                    allow=tuple(allow) if forced is None else None, union_rank=union)
    forced_plan = ""
    if forced is not None:
        forced, _, forced_plan = forced.partition(":")
    path, plan = (choice.path, choice.plan) if forced is None else (forced, forced_plan)
    if forced == "M5":
        if "M5" not in allow:
            raise RuntimeError("path M5 runs on the CPU reference backend only, in eager mode, with CPU labels "
                               "and a fixed (non-trainable) gate")
        if not plan:  # the cheaper plan
            costs = path_costs(rows, n_in, n_out, k, u_t.shape[0], samples=n_b or None, training=training,
                               learngene_grad=learngene_grad, backend=backend, device_type=dev_type,
                               union_rank=union)
            plan = min((p for p in costs if p.startswith("M5")), key=lambda p: costs[p][0]).partition(":")[2]
    if forced is not None and (forced != choice.path or plan != choice.plan):
        choice = PathChoice(forced, "pinned by force_path", choice.flop_ratio, choice.would_prefer, backend, plan)
    if plain:
        _debug_log(choice, rows, n_in, n_out, k, u_t.shape[0], n_b, dt, training,
                   len(served) if served is not None else None)
        for calls in _RECORDERS:
            calls.append(dict(path=path, backend=backend, reason=choice.reason, rows=rows, n_in=n_in, n_out=n_out,
                              samples=n_b, classes=len(served) if served is not None else None,
                              training=training, plan=plan))
    call = _Call()
    call.path, call.plan, call.backend, call.dt, call.choice = path, plan, backend, dt, choice
    call.served, call.declared, call.training, call.key, call.tok, call.hit = served, declared, training, key, tok, hit
    call.admitted = cached
    return call


def lean_union_rank(labels: Tensor, idx: Tensor, val: Tensor, present: tuple[int, ...]) -> int:
    """R of path M5's union plan for CPU ``labels`` (once per labels tensor and gate)."""
    from kind_fast.ops.kind_linear_lean import lean_plan

    return lean_plan(labels, idx, val, present, "union").rank


def kind_linear_layer(
    x: Tensor, labels: Tensor, *, u_g: Tensor, sigma_g: Tensor, v_g: Tensor, bias: Tensor | None,
    u_t: Tensor, sigma_t: Tensor, v_t: Tensor, idx: Tensor, val: Tensor,
    w_g: Tensor | Callable[[torch.dtype], Tensor] | None = None,
    merged=None, token: Callable[[], tuple | None] | None = None,
    classes: Sequence[int] | None = None, training_module: bool | None = None,
) -> Tensor:
    """A KIND layer's forward along the path ``choose_path`` picks (see the module docstring).

    Every path gives the same result up to rounding and the same gradients (autograd reaches
    every component, ``val`` included; path M5 runs only where ``val`` is fixed).
    """
    call = _decide(x, labels, u_g, sigma_g, v_g, bias, u_t, sigma_t, v_t, idx, val, merged, token, classes,
                   training_module)
    return _execute(call, x, labels, u_g, sigma_g, v_g, bias, u_t, sigma_t, v_t, idx, val, w_g, merged)


def _execute(call: _Call, x: Tensor, labels: Tensor, u_g, sigma_g, v_g, bias, u_t, sigma_t, v_t, idx, val, w_g,
             merged) -> Tensor:
    """Run one layer call along the path ``_decide`` chose."""
    path, backend, dt = call.path, call.backend, call.dt
    dev_type = x.device.type
    n_in, n_out = v_t.shape[-1], u_t.shape[-1]
    n_b = labels.shape[0] if isinstance(labels, Tensor) and labels.dim() == 1 else 0

    # ---- run it
    if path == "M2":
        if backend != "triton":
            raise RuntimeError(f"path M2 runs on the Triton backend only (resolved backend: {backend})")
        factored = _backend_module("triton")[0].kind_linear_factored
        return factored(x, u_g, sigma_g, v_g, bias, u_t, sigma_t, v_t, idx, val, labels)
    if path == "M0" and backend != "torch":  # pinned: the reference, not the fused backend
        from kind_fast.ops.backends import use_backend

        with use_backend("torch"):
            return kind_linear_layer(x, labels, u_g=u_g, sigma_g=sigma_g, v_g=v_g, bias=bias, u_t=u_t,
                                     sigma_t=sigma_t, v_t=v_t, idx=idx, val=val, w_g=w_g)
    if path in ("M0", "M1"):
        return kind_linear(x, _resolve_w_g(w_g, u_g, sigma_g, v_g, dt), bias, u_t, sigma_t, v_t, idx, val, labels)
    # M3 / M4 / M5: the ops' own validation first (kind_linear's checks), then autocast casts. An M3
    # call on cached weights needs no W_G: a 0-byte stand-in carries its shape to the checks.
    hit = call.hit
    w = x.new_empty(()).expand(n_out, n_in) if (path == "M3" and hit is not None) else \
        _resolve_w_g(w_g, u_g, sigma_g, v_g, dt)
    if torch.is_autocast_enabled(dev_type) and x.is_floating_point():
        x, w, u_t, v_t = (t.to(dt) for t in (x, w, u_t, v_t))
        bias = bias.to(dt) if bias is not None else None
    _validate(x, w, bias, u_t, sigma_t, v_t, idx, val, labels)
    from kind_fast.ops.labels import check_labels

    check_labels(labels, idx.shape[0] - 1)
    lead = x.shape[:-1]
    x2 = _rows_by_sample(x, n_in, n_b)
    with _no_autocast(dev_type):
        if path == "M5":
            y = _run_lean(x2, labels, idx, val, w, bias, ((u_t, sigma_t, v_t),), call.plan)
        elif path == "M4":
            y = kind_linear_eager(x2, w, bias, u_t, sigma_t, v_t, idx, val, labels)
        else:
            y = _run_merged(x2, labels, w, bias, u_t, sigma_t, v_t, idx, val, call.served, call.declared,
                            call.training, backend, merged if call.admitted else None, call.key, call.tok, hit)
    return y.view(*lead, n_out)


def _no_autocast(dev_type: str):
    """Autocast off for the block (the casts were made at the entry); no context object when it
    is off already (building one costs more than the small ops it would wrap)."""
    return torch.autocast(dev_type, enabled=False) if torch.is_autocast_enabled(dev_type) else nullcontext()


def _rows_by_sample(x: Tensor, n_in: int, n_b: int) -> Tensor:
    if x.dim() == 3 and x.shape[0] != n_b:
        raise ValueError(f"x is (B, T, in) with B={x.shape[0]} but labels has {n_b} entries")
    x2 = x.reshape(-1, n_in)
    if n_b == 0 or x2.shape[0] % n_b:
        raise ValueError(f"x has {x2.shape[0]} rows, not a multiple of the {n_b} samples in labels "
                         "(rows must be grouped by sample)")
    return x2


def _run_lean(x2: Tensor, labels: Tensor, idx: Tensor, val: Tensor, w: Tensor, bias: Tensor | None, tailors,
              plan_kind: str) -> Tensor:
    """Path M5 on rows x2 (M, in): ``w``/``bias`` the (concatenated) learngene weights, ``tailors``
    one (u_t, sigma_t, v_t) per layer. The plan (union or per-sample) is built once per labels."""
    from kind_fast.ops.kind_linear_lean import kind_linear_lean, lean_plan

    present = distinct_classes(labels)
    plan = lean_plan(labels, idx, val, present, plan_kind or "union")
    return kind_linear_lean(x2.contiguous(), w, bias, tailors, plan)


def kind_linear_group_layer(
    x: Tensor, labels: Tensor, members: Sequence[dict], *, idx: Tensor, val: Tensor,
    weights: Callable[[torch.dtype], tuple[Tensor, Tensor | None]] | None = None,
    classes: Sequence[int] | None = None, training_module: bool | None = None,
) -> list[Tensor]:
    """Several KIND layers that read the same ``x`` and share one gate, as one op where a path
    serves groups (docs/design.md §2): the list of their outputs, each equal to that layer's
    ``kind_linear_layer`` output.

    ``members``: one dict per layer with ``kind_linear_layer``'s keyword arguments (u_g, sigma_g,
    v_g, bias, u_t, sigma_t, v_t, and optionally w_g, merged, token). ``weights``: dtype ->
    (W_G of every layer concatenated (Σ out_i, in), biases concatenated or None), e.g. a cache;
    None: concatenated here. Each layer's path is decided as for a call of its own; when every
    layer's path is M5 the group runs as one lean call (one GEMM for the learngene terms, one
    shrink GEMM for every layer's tailors); when every layer's path is the kind_linear op (M0 /
    M1) it runs as the registered ``kind_linear_grouped`` op (its backend's grouped kernel, or
    exact per-layer calls where the backend has none); otherwise (M2, M3, M4, a pinned path other
    than M5) each layer runs on its own.
    """
    if not members:
        raise ValueError("kind_linear_group_layer needs at least one layer")
    calls = [_decide(x, labels, m["u_g"], m["sigma_g"], m["v_g"], m.get("bias"), m["u_t"], m["sigma_t"], m["v_t"],
                     idx, val, m.get("merged"), m.get("token"), classes, training_module) for m in members]
    paths_ = {c.path for c in calls}
    forced = _FORCED.path

    def separately():  # each layer on its own, along the path decided for it
        return [_execute(c, x, labels, m["u_g"], m["sigma_g"], m["v_g"], m.get("bias"), m["u_t"], m["sigma_t"],
                         m["v_t"], idx, val, m.get("w_g"), m.get("merged")) for c, m in zip(calls, members)]

    if (forced is not None and not forced.startswith("M5")) or len(members) == 1:
        return separately()
    dt = calls[0].dt

    def concatenated():
        if weights is not None:
            return weights(dt)
        from kind_fast.ops.kind_linear_grouped import concat_group

        return concat_group([_resolve_w_g(m.get("w_g"), m["u_g"], m["sigma_g"], m["v_g"], dt) for m in members],
                            [m.get("bias") for m in members])

    if paths_ == {"M5"}:
        n_in = members[0]["v_t"].shape[-1]
        n_b = labels.shape[0]
        w, bias = concatenated()
        us = [m["u_t"] for m in members]
        vs = [m["v_t"] for m in members]
        dev_type = x.device.type
        if torch.is_autocast_enabled(dev_type) and x.is_floating_point():
            x, w = x.to(dt), w.to(dt)
            bias = bias.to(dt) if bias is not None else None
            us, vs = [u.to(dt) for u in us], [v.to(dt) for v in vs]
        for m, u, v in zip(members, us, vs):
            _validate(x, w[:u.shape[1]], None, u, m["sigma_t"], v, idx, val, labels)
        if w.shape != (sum(u.shape[1] for u in us), n_in) or w.dtype != x.dtype:
            raise ValueError(f"the group's concatenated W_G must be ({sum(u.shape[1] for u in us)}, {n_in}) in "
                             f"{x.dtype}, got {tuple(w.shape)} {w.dtype}")
        from kind_fast.ops.labels import check_labels

        check_labels(labels, idx.shape[0] - 1)
        lead = x.shape[:-1]
        x2 = _rows_by_sample(x, n_in, n_b)
        plans = {c.plan for c in calls}
        with _no_autocast(dev_type):
            y = _run_lean(x2, labels, idx, val, w, bias,
                          [(u, m["sigma_t"], v) for m, u, v in zip(members, us, vs)],
                          "sample" if plans == {"sample"} else "union")
        outs = [u.shape[1] for u in us]
        return [part.view(*lead, o) for part, o in zip(y.split(outs, -1), outs)]
    if paths_ <= {"M0", "M1"} and len({c.backend for c in calls}) == 1:
        from kind_fast.ops.kind_linear_grouped import kind_linear_grouped

        w, bias = concatenated()
        return kind_linear_grouped(x, w, bias, [m["u_t"] for m in members], [m["sigma_t"] for m in members],
                                   [m["v_t"] for m in members], idx, val, labels)
    return separately()


def _resolve_w_g(w_g, u_g, sigma_g, v_g, dt) -> Tensor:
    if w_g is None:
        return _learngene_weight(u_g, sigma_g, v_g, dt)
    if callable(w_g) and not isinstance(w_g, Tensor):
        return w_g(dt)
    return w_g


def _run_merged(x2, labels, w, bias, u_t, sigma_t, v_t, idx, val, served, declared, training, backend,
                merged, key, tok, hit) -> Tensor:
    """Path M3: merged weights (cached in eval, merged under autograd in training), slot table,
    segmented GEMM."""
    if served is None:
        raise RuntimeError("path M3 needs the batch's classes: declare them (ClassGate.serving) or pass "
                           "CPU labels")
    _check_served(labels, served, served_from_labels=not declared)
    if hit is not None:
        weights, class_slot = hit
    else:
        weights = merge_weights(w, u_t, sigma_t, v_t, idx, val, served, dtype=x2.dtype)
        class_slot = torch.full((idx.shape[0],), -1, dtype=torch.int32)
        class_slot[list(served)] = torch.arange(len(served), dtype=torch.int32)
        class_slot = class_slot.to(labels.device)
        if merged is not None and key is not None and not training and tok is not None:
            merged.put(key, tok, weights, class_slot)
    plan = host_plan(labels) if x2.device.type == "cpu" and backend == "torch" else None
    if plan is not None:
        # the reference directly (plain ops, autograd-aware), samples grouped on the host once
        # per labels tensor: no custom-op dispatch and no host read per call
        slot_of = {c: i for i, c in enumerate(served)}
        segments = [(slot_of[c], plan[1][c]) for c in plan[0]]
        return kind_linear_merged_gemm_ref(x2, weights, bias, labels, segments=segments)
    slots = None
    if backend != "torch" and getattr(_backend_module(backend)[0], "MERGED_GEMM_HOST_SLOTS", False):
        slots = host_slots(labels, served)  # the backend plans its GEMMs on the host (CUDA: cuBLAS)
    if slots is None:
        slots = class_slot.index_select(0, labels.long())
    return kind_linear_merged_gemm(x2, weights, bias, slots)
