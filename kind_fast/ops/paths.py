"""The kind_linear op family's execution paths, behind one entry point (docs/design.md §2).

A KIND layer y = x·W_cᵀ + b, W_c = W_G + U_Tᵀ diag(σ_T ⊙ g_c) V_T (c: the sample's class), can
run along several exact paths. Which one is cheapest depends on the shape, on whether gradients
are needed, on how many classes the batch holds and on what the backend implements:

    M0  the reference: kind_fast::kind_linear on the torch backend (W_G materialised, gathered
        tailor term in batched GEMMs). Any device and dtype.
    M1  W_G materialised once per step, then ONE fused kind_linear op (Triton/CUDA backends):
        x·W_Gᵀ plus the gathered gated tailor term, the shrink in the same pass over x.
    M2  fully factored (Triton): the learngenes become N_G always-on slots of the fused kernel,
        no W_G, no dense GEMM. Wins when N_G + K << min(in, out).

``choose_path`` is the cost model (shapes only, never a host sync); ``kind_linear_layer`` is
the entry point FastKindLinear calls; it asks the cost model and runs the chosen path.
Backends are reached through the registry (kind_fast.backends), never imported here: the
registry → backend modules → kind_fast.ops.kind_linear is the only direction of imports.

``KIND_FAST_DEBUG=1`` logs each new (shape, path) decision to stderr once; ``python -m
kind_fast.info`` prints the decisions for the DiT-XL/2 layers; ``force_path("M1")`` pins a path
(benchmarks, tests; a path that cannot run the call raises).

Entry point signature (FastKindLinear passes its parameters; other modules may call it too)::

    kind_linear_layer(x, labels, *, u_g, sigma_g, v_g, bias, u_t, sigma_t, v_t, idx, val,
                      w_g=None) -> y

    x        (B, T, in), (B, in) or (M, in), rows grouped by sample; the autocast dtype (when
             autocast is on) or the parameters' dtype
    labels   (B,) int class ids in [0, C] (C = null class), on x's device
    u_g, sigma_g, v_g  learngenes (N_G, out), (N_G,), (N_G, in)
    bias     (out,) or None;  u_t, sigma_t, v_t  tailors (N_T, out), (N_T,), (N_T, in)
    idx, val the compiled gate, (C+1, K) int32 / float32 (ClassGate.compiled)
    w_g      W_G (out, in) in x's dtype, or a callable dtype -> W_G (the layer's cached
             ``learngene_weight``), or None (built here from the learngenes)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from kind_fast.ops.kind_linear import acc_dtype, kind_linear, kind_linear_flops

__all__ = ["PATHS", "PathChoice", "choose_path", "kind_linear_layer", "force_path", "forced_path"]

PATHS = ("M0", "M1", "M2")
# Largest N_G + K the Triton backend's fused kernel takes for M2 (its BM×KP shrink accumulator
# lives in registers); the backend module's own MAX_ACTIVE is read when it is loaded.
_DEFAULT_MAX_ACTIVE = 128


@dataclass(frozen=True)
class PathChoice:
    path: str            # "M0", "M1" or "M2"
    reason: str
    flop_ratio: float    # the chosen path's forward FLOPs / dense F.linear FLOPs of the same shape
    would_prefer: str    # the path the FLOP model picks if every path were implemented everywhere
    backend: str = "triton"


def choose_path(
    rows: int, n_in: int, n_out: int, active: int, tailor_rank: int, *,
    learngene_rank: int | None = None, distinct_classes: int | None = None, training: bool = True,
    backend: str = "triton", max_active: int = _DEFAULT_MAX_ACTIVE,
) -> PathChoice:
    """Which path runs one layer call, and why. Shapes only (no tensor is read).

    Args:
        rows: M = B·T rows; n_in, n_out: the layer's features; active: K (gate slots);
        tailor_rank: N_T; learngene_rank: N_G (None: unknown, M2 not considered);
        distinct_classes: classes in the batch when known on the host (None: unknown);
        training: gradients are needed; backend: the resolved backend ("torch", "triton",
        "cuda"); max_active: the Triton kernel's largest slot count.

    FLOPs per path (forward; the backward scales alike), K active tailors:
        M1  2·M·in·out + 2·M·K·(in + out)               (+ W_G materialised once by the layer)
        M2  2·M·(N_G + K)·(in + out)                    wins when N_G + K < ~0.5·min(in, out)
        M3  2·M·in·out + 2·C_b·K·in·out (merge C_b per-class weights; sampling): wins when the
            merge is cheaper than the tailor term, C_b·in·out < M·(in + out)
    """
    dense = 2 * rows * n_in * n_out
    m1 = kind_linear_flops(rows, n_in, n_out, active)
    ratio = m1 / max(dense, 1)
    prefer = "M1"
    m2_flops = None
    if learngene_rank is not None:
        m2_flops = 2 * rows * (learngene_rank + active) * (n_in + n_out)
        if m2_flops < dense:
            prefer = "M2"
    if (not training and distinct_classes is not None
            and distinct_classes * n_in * n_out < rows * (n_in + n_out)):
        prefer = "M3"
    base = "M1" if backend in ("triton", "cuda") else "M0"
    if (prefer == "M2" and backend == "triton" and rows > 0
            and 0 < learngene_rank + active <= max_active):
        return PathChoice("M2", f"fully factored, no W_G: N_G + K = {learngene_rank + active} slots "
                          "in the fused kernel (kind_linear_factored)", m2_flops / max(dense, 1), "M2", backend)
    if active == 0 or tailor_rank == 0 or rows == 0:
        return PathChoice("M0", "no active tailors: one F.linear", ratio, "M0", backend)
    if base == "M1" and backend == "triton" and active > max_active:
        return PathChoice("M0", f"K={active} active tailors > {max_active}: reference", ratio, prefer, backend)
    reason = ("fused GEMM + gathered tailor term, shrink in the same K-loop" if base == "M1"
              else "reference: x·W_Gᵀ + gathered tailor term in batched GEMMs")
    if prefer == "M2":
        reason += (f" (M2 would be cheaper by the FLOP model but N_G + K > {max_active})"
                   if backend == "triton" else " (M2 would be cheaper by the FLOP model; only the Triton "
                   "backend has it)")
    elif prefer == "M3":
        reason += " (M3 would be cheaper by the FLOP model but is not implemented)"
    return PathChoice(base, reason, ratio, prefer, backend)


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

    A pinned path that cannot run a call (e.g. M2 off the Triton backend) raises there.
    """
    if path is not None and path not in PATHS:
        raise ValueError(f"unknown path {path!r}; choose one of {PATHS} or None")
    previous = _FORCED.path
    _FORCED.path = path
    try:
        yield
    finally:
        _FORCED.path = previous


# =====================================================================================
# Debug log
# =====================================================================================
_LOGGED: set = set()


def _debug_log(choice: PathChoice, rows: int, n_in: int, n_out: int, k: int, n_t: int, b: int,
               dtype: torch.dtype, training: bool) -> None:
    if os.environ.get("KIND_FAST_DEBUG", "0") in ("", "0"):
        return
    key = (choice.path, choice.backend, rows, n_in, n_out, k, n_t, b, dtype, training)
    if key in _LOGGED:
        return
    _LOGGED.add(key)
    print(f"kind_fast path: M={rows} in={n_in} out={n_out} K={k} N_T={n_t} B={b} {dtype} "
          f"{'train' if training else 'eval'} backend={choice.backend} -> {choice.path} ({choice.reason})",
          file=sys.stderr)


# =====================================================================================
# Entry point
# =====================================================================================
def _backend_module(name: str):
    from kind_fast.backends import backend_module

    return backend_module(name)


def _learngene_weight(u_g: Tensor, sigma_g: Tensor, v_g: Tensor, dtype: torch.dtype) -> Tensor:
    acc = acc_dtype(u_g.dtype)
    with torch.autocast(u_g.device.type, enabled=False):
        return ((u_g.t().to(acc) * sigma_g.to(acc)) @ v_g.to(acc)).to(dtype)


def kind_linear_layer(
    x: Tensor, labels: Tensor, *, u_g: Tensor, sigma_g: Tensor, v_g: Tensor, bias: Tensor | None,
    u_t: Tensor, sigma_t: Tensor, v_t: Tensor, idx: Tensor, val: Tensor,
    w_g: Tensor | Callable[[torch.dtype], Tensor] | None = None,
) -> Tensor:
    """A KIND layer's forward along the path ``choose_path`` picks (see the module docstring).

    Every path gives the same result up to rounding and the same gradients (autograd reaches
    every component, ``val`` included). Validation is the ops' own (kind_linear's checks).
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    dev_type = x.device.type
    dt = torch.get_autocast_dtype(dev_type) if torch.is_autocast_enabled(dev_type) else x.dtype
    from kind_fast.backends import resolve_backend

    backend = resolve_backend(x.device, dt)
    n_in, n_out = v_t.shape[-1], u_t.shape[-1]
    rows = x.numel() // max(n_in, 1)
    k = idx.shape[1] if isinstance(idx, Tensor) and idx.dim() == 2 else 0
    n_g = u_g.shape[0]
    training = torch.is_grad_enabled() and any(
        isinstance(t, Tensor) and t.requires_grad for t in (x, u_g, sigma_g, v_g, bias, u_t, sigma_t, v_t, val))
    max_active = _DEFAULT_MAX_ACTIVE
    if backend == "triton":
        max_active = getattr(_backend_module("triton")[0], "MAX_ACTIVE", _DEFAULT_MAX_ACTIVE)
    choice = choose_path(rows, n_in, n_out, k, u_t.shape[0], learngene_rank=n_g, training=training,
                         backend=backend, max_active=max_active)
    forced = _FORCED.path
    path = choice.path if forced is None else forced
    if forced is not None and forced != choice.path:
        choice = PathChoice(forced, "pinned by force_path", choice.flop_ratio, choice.would_prefer, backend)
    if not torch.compiler.is_compiling():
        _debug_log(choice, rows, n_in, n_out, k, u_t.shape[0], labels.shape[0] if isinstance(labels, Tensor)
                   and labels.dim() else 0, dt, training)
    if path == "M2":
        if backend != "triton":
            raise RuntimeError(f"path M2 runs on the Triton backend only (resolved backend: {backend})")
        factored = _backend_module("triton")[0].kind_linear_factored
        return factored(x, u_g, sigma_g, v_g, bias, u_t, sigma_t, v_t, idx, val, labels)
    if path == "M0" and backend != "torch":  # pinned: the reference, not the fused backend
        from kind_fast.backends import use_backend

        with use_backend("torch"):
            return kind_linear_layer(x, labels, u_g=u_g, sigma_g=sigma_g, v_g=v_g, bias=bias, u_t=u_t,
                                     sigma_t=sigma_t, v_t=v_t, idx=idx, val=val, w_g=w_g)
    if w_g is None:
        w = _learngene_weight(u_g, sigma_g, v_g, dt)
    elif callable(w_g) and not isinstance(w_g, Tensor):
        w = w_g(dt)
    else:
        w = w_g
    return kind_linear(x, w, bias, u_t, sigma_t, v_t, idx, val, labels)
