"""The CUDA C++ backend of the kind_linear op family (csrc/, compiled as ``kind_fast._C``).

What it is for (docs/design.md §2, §6):

* **A second, independent implementation of path M1** for cross-checking and comparison on a
  GPU: the dense learngene GEMM on cuBLAS, then hand-written kernels for the class-gated tailor
  shrink h = x·V_T[ids]ᵀ and expand y += (h⊙s)·U_T[ids] (WMMA tensor cores, double-buffered
  16-byte ``cp.async`` K-loops), deterministic gradient reductions. It makes the same passes
  over memory as the reference (one GEMM, one more read of x, a read-modify-write of y), so it
  cannot meet the forward goal of §6 (about 1.14 × F.linear at DiT-XL/2; a second pass over x
  alone costs ~16 % of the GEMM at out = 1152 on an H200): the single-pass fused M1 is the Triton
  backend's. ``use_backend("auto")`` uses this M1 only where the cost model below says it is
  no slower than the reference (``auto_shape_ok``), after its one-time self-check passed.
* **Path M3 (sampling) on cuBLAS**, two ops:
  - ``MERGED_GEMM_OP`` (``kind_linear_cuda_merged_gemm``, the schema of
    ``kind_fast::kind_linear_merged_gemm``, with autograd): the segmented GEMM the op family
    (kind_fast.ops.paths) runs on merged weights from a layer's cache, as in sampling. Given
    the slots on the host (``MERGED_GEMM_HOST_SLOTS``: the family passes a CPU copy it reads once
    per labels tensor), each run of samples of one slot is one cuBLAS GEMM on its rows of x with
    the bias in the epilogue: a CFG batch ``[c]*n + [null]*n`` costs a dense layer. Slots on the
    device are never read: every slot's GEMM runs on all rows (S × the FLOPs, exact).
  - ``MERGED_OP`` (``kind_linear_merged``): the whole path from the components, merging per
    call: one dense weight per group of samples and one cuBLAS GEMM per group (bias in its
    epilogue), exact for any labels (a rank-2K correction for samples whose class differs from
    their group's), no host synchronisation, CUDA-graph safe.

Registered ops (defined in C++, csrc/module.cpp; the schemas and semantics of the reference's
``kind_fast::kind_linear`` / ``kind_linear_backward``, see kind_fast/ops/kind_linear.py):

    torch.ops.kind_fast.kind_linear_cuda(x, w_g, bias, u_t, sigma_t, v_t, idx, val, labels) -> (y, h)
    torch.ops.kind_fast.kind_linear_cuda_backward(grad_y, x, w_g, u_t, sigma_t, v_t, idx, val,
                                                  labels, h, output_mask) -> 7 gradients
    torch.ops.kind_fast.kind_linear_cuda_merged(x, w_g, bias, u_t, sigma_t, v_t, idx, val,
                                                labels, max_classes) -> y        (path M3, no grad)
    torch.ops.kind_fast.kind_linear_cuda_merged_gemm(x, weights, bias, slots) -> y   (path M3, cached)
    torch.ops.kind_fast.kind_linear_cuda_merged_gemm_backward(grad_y, x, weights, slots, output_mask)
        -> (dx, dweights, dbias)        (schemas of kind_fast::kind_linear_merged_gemm(_backward))

This module adds their fake kernels, autograd and FLOP formulas (C++ names it with
``set_python_module``), the backend protocol of kind_fast/ops/backends.py, the cost model, and the
safety rule for ``use_backend("auto")``: these kernels were written without a GPU to run them,
so "auto" uses them on a device only after a one-time self-check there (a small random problem
per dtype, both tailor plans, every output and gradient against the reference) has passed, and
then only for shapes where the model says they do not lose to the reference. An explicit
``use_backend("cuda")`` runs them directly.

Nothing here loads the extension at import; ``status()`` or the first use does.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from torch import Tensor

from kind_fast.ops._ext import arch_names, load_extension
from kind_fast.ops.kind_linear import (
    acc_dtype,
    kind_linear_backward_fake,
    kind_linear_fake,
    kind_linear_setup_context,
    make_kind_linear_backward,
    register_kind_linear_flop_formulas,
)
from kind_fast.ops.self_check import SelfCheckGate

# OP, BACKWARD_OP, MERGED_OP, MERGED_GEMM_OP and MERGED_GEMM_BACKWARD_OP are module attributes
# resolved on first access (__getattr__)
__all__ = ["status", "request", "supports", "auto_ready", "auto_shape_ok", "self_check", "self_check_results",
           "kind_linear_merged", "merged_groups", "Hardware", "H200", "modelled_time", "model_passes",
           "SUPPORTED_DTYPES", "AUTO_OP", "MERGED_GEMM_HOST_SLOTS", "cost_table_markdown"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
OP_NAMES = ("kind_linear_cuda", "kind_linear_cuda_backward", "kind_linear_cuda_merged", "kind_linear_cuda_merged_gemm",
            "kind_linear_cuda_merged_gemm_backward")
# The op family passes MERGED_GEMM_OP its slots as a CPU tensor when it knows them on the host
# (kind_fast.ops.paths): this backend's segmented GEMM then runs one cuBLAS GEMM per run of samples.
MERGED_GEMM_HOST_SLOTS = True

_lock = threading.Lock()
_registered = False


# =====================================================================================
# Backend protocol (kind_fast.ops.backends)
# =====================================================================================
_status: list = []  # [(available, reason)] once computed; reset when a self-check adds a result


def status() -> tuple[bool, str]:
    """(available, reason): the extension is built, loads, and serves its ops. Cheap after the
    first call (the registry asks on every layer call)."""
    if _status:
        return _status[0]
    mod, reason = load_extension()
    if mod is None:
        result = (False, f"compiled extension {reason}")
    else:
        _register()
        done = sorted(_gate.results().items(), key=lambda kv: (kv[0][0], str(kv[0][1])))
        checks = "; ".join(f"cuda:{d} {str(dt).replace('torch.', '')} self-check {'passed' if ok else 'FAILED'}"
                           for (d, dt), (ok, _) in done)
        built = f"{arch_names(getattr(mod, 'ARCH_LIST', '?'))}, CUDA {getattr(mod, 'CUDA_VERSION', '?')}"
        result = (True, f"kind_fast._C ({built})" + (f"; {checks}" if checks else ""))
    _status[:] = [result]
    return result


def request() -> None:
    """The CUDA backend was asked for by name (``use_backend("cuda")``): build the extension now
    if it is neither installed nor cached (kind_fast.ops._ext.load_extension; "auto" never does)."""
    load_extension(build=True)
    _status.clear()


def supports(device_type: str, dtype: torch.dtype) -> bool:
    """CUDA tensors in float16/bfloat16 (float32/float64 run the reference through the registry)."""
    return device_type == "cuda" and dtype in SUPPORTED_DTYPES


def _statically_ready(device_type: str, dtype: torch.dtype) -> bool:
    return supports(device_type, dtype) and status()[0]


# "auto" uses this backend on a device only after its one-time self-check passed there
_gate = SelfCheckGate(
    "CUDA", lambda: (torch.ops.kind_fast.kind_linear_cuda, torch.ops.kind_fast.kind_linear_cuda_backward),
    _statically_ready, on_result=lambda: _status.clear(),  # status() lists the self-checks
)
auto_ready = _gate.auto_ready
self_check_results = _gate.results


def self_check(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """Run the CUDA ops on small random problems on ``device`` against the reference."""
    return _gate.check(device, dtype)


_OP_ATTRS = {"OP": "kind_linear_cuda", "BACKWARD_OP": "kind_linear_cuda_backward",
             "MERGED_OP": "kind_linear_cuda_merged", "MERGED_GEMM_OP": "kind_linear_cuda_merged_gemm",
             "MERGED_GEMM_BACKWARD_OP": "kind_linear_cuda_merged_gemm_backward"}


def __getattr__(name: str):  # the ops of _OP_ATTRS before status() has registered them
    ops = _OP_ATTRS
    if name in ops:
        ok, why = status()
        if not ok:
            raise RuntimeError(f"the CUDA backend is not available: {why}")
        return getattr(torch.ops.kind_fast, ops[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# =====================================================================================
# Fake kernels, autograd, FLOP formulas (registered once, when the extension has loaded)
# =====================================================================================
def _fake_merged(x, w_g, bias, u_t, sigma_t, v_t, idx, val, labels, max_classes):
    return x.new_empty((x.shape[0], w_g.shape[0]))


def _register() -> None:
    """Fake kernels, autograd and FLOP formulas for the C++ ops (once)."""
    global _registered
    if _registered:
        return
    with _lock:
        if _registered:
            return
        from torch.utils.flop_counter import register_flop_formula

        from kind_fast.ops.kind_linear_merged import (
            kind_linear_merged_gemm_backward_fake,
            kind_linear_merged_gemm_fake,
            kind_linear_merged_gemm_setup_context,
            make_kind_linear_merged_gemm_backward,
            register_merged_flop_formulas,
        )

        torch.library.register_fake("kind_fast::kind_linear_cuda", kind_linear_fake)
        torch.library.register_fake("kind_fast::kind_linear_cuda_backward", kind_linear_backward_fake)
        torch.library.register_fake("kind_fast::kind_linear_cuda_merged", _fake_merged)
        torch.library.register_autograd(
            "kind_fast::kind_linear_cuda",
            make_kind_linear_backward(torch.ops.kind_fast.kind_linear_cuda_backward),
            setup_context=kind_linear_setup_context,
        )
        register_kind_linear_flop_formulas(torch.ops.kind_fast.kind_linear_cuda,
                                           torch.ops.kind_fast.kind_linear_cuda_backward)
        # path M3's segmented GEMM: the reference family's fake kernels, autograd and FLOP formulas
        torch.library.register_fake("kind_fast::kind_linear_cuda_merged_gemm", kind_linear_merged_gemm_fake)
        torch.library.register_fake("kind_fast::kind_linear_cuda_merged_gemm_backward",
                                    kind_linear_merged_gemm_backward_fake)
        torch.library.register_autograd(
            "kind_fast::kind_linear_cuda_merged_gemm",
            make_kind_linear_merged_gemm_backward(torch.ops.kind_fast.kind_linear_cuda_merged_gemm_backward),
            setup_context=kind_linear_merged_gemm_setup_context,
        )
        register_merged_flop_formulas(torch.ops.kind_fast.kind_linear_cuda_merged_gemm,
                                      torch.ops.kind_fast.kind_linear_cuda_merged_gemm_backward)

        @register_flop_formula(torch.ops.kind_fast.kind_linear_cuda_merged)
        def _(x_shape, w_g_shape, bias_shape, u_t_shape, sigma_t_shape, v_t_shape, idx_shape, val_shape,
              labels_shape, max_classes, *a, **k) -> int:
            m, n_in, n_out, kk = x_shape[0], x_shape[1], w_g_shape[0], idx_shape[1]
            groups = merged_groups(labels_shape[0], max_classes)
            return 2 * m * n_in * n_out + 2 * groups * n_out * n_in * kk  # per-group GEMMs + merges

        # plain module attributes from now on (torch.compile reads them without tracing __getattr__)
        ops = torch.ops.kind_fast
        globals().update({attr: getattr(ops, name) for attr, name in _OP_ATTRS.items()})
        _registered = True


# =====================================================================================
# Path M3 (sampling)
# =====================================================================================
def kind_linear_merged(x: Tensor, w_g: Tensor, bias: Tensor | None, u_t: Tensor, sigma_t: Tensor, v_t: Tensor,
                       idx: Tensor, val: Tensor, labels: Tensor, max_classes: int = 2) -> Tensor:
    """Path M3 for sampling: y = kind_linear(...) for 2-D x (M, in), through merged weights.

    The B samples form G = ``merged_groups(B, max_classes)`` equal groups of consecutive samples
    (the largest divisor of B that is <= max_classes). Group g gets one merged dense weight for
    the class c_g of its first sample, W_g = W_G + U_T[idx[c_g]]ᵀ·diag(σ_T[idx[c_g]]⊙val[c_g])·
    V_T[idx[c_g]], and its rows run through one cuBLAS GEMM (bias in the epilogue). Samples whose
    class differs from their group's get an exact rank-2K correction (path M1's kernels), so any
    labels give kind_linear's result up to rounding; the fast case is few classes in runs that
    line up with the groups, e.g. a CFG batch ``[c]*n + [null]*n`` with max_classes=2.
    Inference only (no autograd); no host synchronisation (CUDA-graph safe)."""
    if torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad
                                       for t in (x, w_g, bias, u_t, sigma_t, v_t, val)):
        raise RuntimeError("kind_linear_merged (path M3) is inference-only: call it under torch.no_grad()")
    if not isinstance(max_classes, int) or max_classes < 1:
        raise ValueError(f"max_classes must be a positive int, got {max_classes!r}")
    ok, why = status()
    if not ok:
        raise RuntimeError(f"the CUDA backend is not available: {why}")
    acc = acc_dtype(x.dtype)
    return torch.ops.kind_fast.kind_linear_cuda_merged(
        x.contiguous(), w_g.contiguous(), bias, u_t.contiguous(), sigma_t.to(acc), v_t.contiguous(), idx,
        val.to(acc), labels, max_classes)


def merged_groups(batch: int, max_classes: int) -> int:
    """Number of equal sample groups path M3 uses: the largest divisor of ``batch`` that is at
    most ``max_classes`` (1 at least). Same rule as csrc/kind_linear_cuda.cu."""
    for g in range(min(int(batch), int(max_classes)), 1, -1):
        if batch % g == 0:
            return g
    return 1


# =====================================================================================
# Cost model (docs/design.md §6): why this backend is not the fast M1, and auto's gate
# =====================================================================================
# Each implementation is a list of passes (flops, HBM bytes, achieved bandwidth fraction,
# launches); a pass takes max(flops / rate, bytes / (bandwidth · efficiency)), plus a fixed
# cost per launch. GEMMs on cuBLAS are compute-bound at DiT shapes and identical in every
# implementation, so ratios between implementations come from the extra passes over x and y.
@dataclass(frozen=True)
class Hardware:
    name: str
    tflops: float         # dense bf16 GEMM rate reached by cuBLAS
    hbm_tbs: float        # HBM bandwidth reached by a large device copy (bytes read + written)
    launch_us: float      # device time one more dependent kernel launch costs (no CUDA graph)
    lib_efficiency: float = 0.85   # cuBLAS / ATen memory-bound passes (skinny GEMMs, copies, gathers)
    hand_efficiency: float = 0.60  # this backend's shrink/expand: WMMA + cp.async, no TMA; assumed


# measured on the lent H200 (cuBLAS 8192³ bf16: 788 TFLOP/s; device copy: 4.3 TB/s); the
# efficiencies are assumptions until bench/gpu_check.sh measures the kernels
H200 = Hardware("H200", tflops=788.0, hbm_tbs=4.3, launch_us=2.0)
_MODES = ("forward", "transfer", "pretrain")
_IMPLS = ("linear", "reference", "cuda", "k_augmented", "cuda_merged", "cuda_merged_gemm")


def model_passes(impl: str, mode: str, m: int, batch: int, n_in: int, n_out: int, n_t: int, k: int,
                 hw: Hardware = H200, *, elem: int = 2, groups: int = 2) -> list[tuple[str, float, float, float, int]]:
    """(name, flops, HBM bytes, bandwidth efficiency, launches) of each pass of ``impl``:

    linear       F.linear / nn.Linear (forward; + dX, dW and db for the backward modes)
    reference    the pure-PyTorch reference (kind_fast/ops/kind_linear.py) as it runs: its
                 launch counts are those of kind_linear_ref / kind_linear_backward_ref
    cuda         this backend's M1 (csrc/kind_linear_cuda.cu): cuBLAS GEMM, shrink, expand
    k_augmented  the rejected forward design y = [x | H_s]·[W_Gᵀ; U_T]: one cuBLAS GEMM with
                 K = in + N_T (H_s scattered into N_T columns, so mixed-class batches work),
                 after a shrink pass that also copies x into [x | H_s], and the weight concatenation
    cuda_merged  this backend's path M3 (inference): ``groups`` merges, one GEMM per group, no
                 correction needed (the CFG layout)
    cuda_merged_gemm  path M3 as the op family runs it in sampling: the merged weights come from
                 the layer's cache, MERGED_GEMM_OP runs one GEMM per group (host slots, CFG layout)
    Modes: forward; transfer (fwd + dX, dU_T, dV_T, dσ_T); pretrain (transfer + dW_G, db).
    """
    if impl not in _IMPLS or mode not in _MODES:
        raise ValueError(f"impl must be one of {_IMPLS} and mode one of {_MODES}, got {impl!r}, {mode!r}")
    if mode != "forward" and impl in ("k_augmented", "cuda_merged", "cuda_merged_gemm"):
        raise ValueError(f"{impl} is a forward (inference) design only")
    lib, hand = hw.lib_efficiency, hw.hand_efficiency
    e, f32 = elem, 4
    mm, bk = m, max(int(batch), 1)
    t = mm // bk
    sample = t >= k and k < n_t  # the tailor plan (kind_fast.ops.kind_linear.tailor_plan)
    ref = impl == "reference"
    out: list[tuple[str, float, float, float, int]] = []

    def gemm(name, a, b, c, eff=lib, launches=1, rmw=False):  # (a×c)·(c×b) on cuBLAS
        nbytes = (a * c + b * c + (2 if rmw else 1) * a * b) * e
        out.append((name, 2.0 * a * b * c, float(nbytes), eff, launches))

    def mem(name, nbytes, eff=lib, launches=1, flops=0.0):
        out.append((name, float(flops), float(nbytes), eff, launches))

    def shrink(name, depth):  # this backend's shrink kernel, with its split-K rule
        tiles = bk * -(-t // 64) * -(-k // 32)
        splits = 1 if tiles >= 528 else max(1, min(-(-528 // tiles), -(-depth // 256)))
        mem(name, mm * depth * e + bk * k * depth * e + mm * k * f32 * (1 if splits == 1 else 2 * splits + 1),
            hand, 2 if splits > 1 else 1, flops=2.0 * mm * k * depth)

    if impl == "cuda_merged_gemm":
        for i in range(max(1, int(groups))):
            gemm(f"group {i}: x_g·W_gᵀ + b (cached W_g)", mm // max(1, int(groups)), n_out, n_in)
        return out
    if impl == "cuda_merged":
        g = max(1, int(groups))
        mem("gate tables + M3 plan + gather U_T rows", g * k * n_out * (e + f32), lib, 3)
        mem("merge W_g = W_G + U_gᵀ·diag(s_g)·V_g", n_out * n_in * e + g * n_out * n_in * e, hand, 1,
            flops=2.0 * g * n_out * n_in * k)
        for i in range(g):
            gemm(f"group {i}: x_g·W_gᵀ + b", mm // g, n_out, n_in)
        return out
    if impl == "k_augmented":
        mem("gate tables", 0, lib, 1)
        mem("shrink + copy x into [x | H_s]", mm * n_in * e + mm * (n_in + n_t) * e, hand, 1,
            flops=2.0 * mm * k * n_in)
        mem("[W_G | U_Tᵀ] concatenation", 2 * n_out * (n_in + n_t) * e, lib, 1)
        gemm("[x | H_s]·[W_G | U_Tᵀ]ᵀ (K = in + N_T)", mm, n_out, n_in + n_t)
        return out

    gemm("x·W_Gᵀ (+ bias)", mm, n_out, n_in)
    if impl == "linear":
        if mode != "forward":
            gemm("dX = g·W", mm, n_in, n_out)
            gemm("dW = gᵀ·x", n_out, n_in, mm)
            mem("db", mm * n_out * e)
        return out
    # ---- forward tailor term
    if sample and ref:
        mem("per-sample gate (ids, s)", 0, lib, 5)
        mem("gather V_T rows (B, K, in)", 2 * bk * k * n_in * e)
        gemm("shrink bmm x·V_gᵀ", mm, k, n_in)
        mem("h to fp32, ⊙ s, round", mm * k * 20, lib, 3)
        mem("gather U_T rows (B, K, out)", 2 * bk * k * n_out * e)
        gemm("expand baddbmm_ (read-modify-write y)", mm, n_out, k, rmw=True)
    elif sample:
        mem("gate tables", 0, lib, 1)
        shrink("shrink kernel (x once more)", n_in)
        mem("expand kernel (read-modify-write y)", 2 * mm * n_out * e + mm * k * f32 + bk * k * n_out * e, hand, 1,
            flops=2.0 * mm * k * n_out)
    else:  # row plan: all N_T tailors on cuBLAS, then K of N_T columns per row and back
        mem("per-sample gate (ids, s)" if ref else "gate tables", 0, lib, 5 if ref else 1)
        gemm("x·V_Tᵀ (all N_T)", mm, n_t, n_in)
        mem("gather K of N_T, scale, scatter back", mm * n_t * e * 2 + mm * k * f32 * (4 if ref else 2),
            lib if ref else hand, 8 if ref else 2)
        gemm("(h⊙s scattered)·U_T (read-modify-write y)", mm, n_out, n_t, rmw=True)
    if mode == "forward":
        return out
    # ---- backward
    gemm("dX = g·W_G", mm, n_in, n_out)
    if mode == "pretrain":
        gemm("dW_G = gᵀ·x", n_out, n_in, mm)
        mem("db", mm * n_out * e, lib, 2)
    if sample and ref:
        mem("zeros, per-sample gate", n_t * (n_in + n_out) * e, lib, 8)
        mem("gather U_T, V_T rows", 2 * bk * k * (n_in + n_out) * e, lib, 2)
        gemm("dh_s bmm g·U_gᵀ", mm, k, n_out)
        mem("dh_s to fp32, ⊙ s, round", mm * k * 20, lib, 3)
        gemm("dX += dh·V_g (read-modify-write dX)", mm, n_in, k, rmw=True)
        mem("h ⊙ s, round", mm * k * 14, lib, 2)
        gemm("dU per sample (h⊙s)ᵀ·g", bk * k, n_out, t)
        gemm("dV per sample (dh⊙s)ᵀ·x", bk * k, n_in, t)
        mem("index_add onto the tailors", bk * k * (n_in + n_out) * (e + 2 * f32) + 4 * n_t * (n_in + n_out) * f32,
            lib, 8)
        mem("ds, dσ", mm * k * 8, lib, 6)
    elif sample:
        mem("gate tables", 0, lib, 1)
        shrink("shrink kernel g·U_T[ids]ᵀ (g once more)", n_out)
        mem("expand kernel into dX (read-modify-write)", 2 * mm * n_in * e + mm * k * f32 + bk * k * n_in * e, hand,
            1, flops=2.0 * mm * k * n_in)
        mem("h ⊙ s, dh_s ⊙ s rounded", mm * k * 28, lib, 6)
        gemm("dU per sample (h⊙s)ᵀ·g", bk * k, n_out, t)
        gemm("dV per sample (dh⊙s)ᵀ·x", bk * k, n_in, t)
        mem("combine onto the tailors", bk * k * (n_in + n_out) * e + n_t * (n_in + n_out) * e, hand, 2)
        mem("ds, dσ", mm * k * 8, hand, 3)
    else:
        mem("zeros, per-sample gate" if ref else "gate tables", 0, lib, 8 if ref else 1)
        gemm("g·U_Tᵀ (all N_T)", mm, n_t, n_out)
        mem("gather/scale/scatter K of N_T (dh_s, h_s)", mm * n_t * e * 4 + mm * k * f32 * 4,
            lib if ref else hand, 12 if ref else 3)
        gemm("dX += dh_s·V_T (read-modify-write dX)", mm, n_in, n_t, rmw=True)
        gemm("dU_T = h_sᵀ·g", n_t, n_out, mm)
        gemm("dV_T = dh_sᵀ·x", n_t, n_in, mm)
        mem("ds, dσ", mm * k * 8, lib if ref else hand, 6 if ref else 3)
    return out


def modelled_time(impl: str, mode: str, m: int, batch: int, n_in: int, n_out: int, n_t: int, k: int,
                  hw: Hardware = H200, **kw) -> float:
    """Seconds ``impl`` is modelled to take (see ``model_passes``)."""
    total = 0.0
    for _, flops, nbytes, eff, launches in model_passes(impl, mode, m, batch, n_in, n_out, n_t, k, hw, **kw):
        total += max(flops / (hw.tflops * 1e12), nbytes / (hw.hbm_tbs * 1e12 * eff)) + launches * hw.launch_us * 1e-6
    return total


def auto_shape_ok(m: int, batch: int, n_in: int, n_out: int, n_t: int, k: int, mode: str,
                  hw: Hardware = H200) -> bool:
    """Whether ``use_backend("auto")`` may run this backend's M1 for this call: its modelled time
    is at most the reference's. (Whether it is also faster than Triton is measured per shape
    by kind_fast.ops.autoselect.)"""
    return modelled_time("cuda", mode, m, batch, n_in, n_out, n_t, k, hw) <= \
        modelled_time("reference", mode, m, batch, n_in, n_out, n_t, k, hw)


_GATE_CACHE: dict[tuple, bool] = {}


class _AutoOp:
    """What ``use_backend("auto")`` calls for this backend: the CUDA forward op where
    ``auto_shape_ok`` holds for the call's shapes and mode, else the reference op (same schema,
    same autograd contract). Decided from shapes only (no sync, traceable by torch.compile).
    ``fast``/``reference`` default to torch.ops.kind_fast.kind_linear_cuda / kind_linear."""

    def __init__(self, fast=None, reference=None):
        self._fast, self._reference = fast, reference

    def choose(self, x, w_g, bias, u_t, sigma_t, v_t, idx, val, labels) -> bool:
        """True when the CUDA op runs this call."""
        grad = torch.is_grad_enabled() and any(
            isinstance(a, Tensor) and a.requires_grad for a in (x, w_g, bias, u_t, sigma_t, v_t, val))
        mode = "forward" if not grad else ("pretrain" if w_g.requires_grad else "transfer")
        key = (int(x.shape[0]), int(labels.shape[0]), int(x.shape[1]), int(w_g.shape[0]), int(u_t.shape[0]),
               int(idx.shape[1]), mode)
        if torch.compiler.is_compiling():  # shapes are constants of the trace: no cache to mutate
            return auto_shape_ok(*key[:6], mode)
        ok = _GATE_CACHE.get(key)
        if ok is None:
            ok = _GATE_CACHE[key] = auto_shape_ok(*key[:6], mode)
        return ok

    def __call__(self, *args):
        if self.choose(*args):
            op = self._fast if self._fast is not None else torch.ops.kind_fast.kind_linear_cuda
        else:
            op = self._reference if self._reference is not None else torch.ops.kind_fast.kind_linear
        return op(*args)

    def __repr__(self) -> str:
        return "kind_linear_cuda where the cost model allows, else the reference"


AUTO_OP = _AutoOp()


def cost_table_markdown(hw: Hardware = H200, tokens: tuple[int, ...] = (8192, 65536)) -> str:
    """The model's DiT-XL/2 table (times ÷ F.linear or nn.Linear fwd+bwd), as csrc/README.md shows it."""
    d, n_t, k, per_sample = 1152, 96, 32, 256
    layers = {"qkv": (d, 3 * d), "proj": (d, d), "fc1": (d, 4 * d), "fc2": (4 * d, d)}
    lines = ["| layer | M | forward goal | reference | cuda M1 | K-augmented | cuda M3 (CFG, merging per call) | "
             "cuda M3 (CFG, cached weights) | transfer: reference | cuda M1 | pretrain: reference | cuda M1 | "
             "auto uses cuda M1 (fwd/transfer/pretrain) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, (n_in, n_out) in layers.items():
        for m in tokens:
            b = m // per_sample
            r = {}
            for mode in _MODES:
                base = modelled_time("linear", mode, m, b, n_in, n_out, n_t, k, hw)
                impls = ("reference", "cuda") + (("k_augmented", "cuda_merged", "cuda_merged_gemm")
                                                 if mode == "forward" else ())
                for impl in impls:
                    r[impl, mode] = modelled_time(impl, mode, m, b, n_in, n_out, n_t, k, hw) / base
            goal = 1.10 * (1 + k / n_in + k / n_out)
            auto = "/".join("yes" if auto_shape_ok(m, b, n_in, n_out, n_t, k, mode, hw) else "no" for mode in _MODES)
            lines.append(f"| DiT-XL/2.{name} | {m} | {goal:.2f} | {r['reference', 'forward']:.2f} | "
                         f"{r['cuda', 'forward']:.2f} | {r['k_augmented', 'forward']:.2f} | "
                         f"{r['cuda_merged', 'forward']:.2f} | {r['cuda_merged_gemm', 'forward']:.2f} | "
                         f"{r['reference', 'transfer']:.2f} | "
                         f"{r['cuda', 'transfer']:.2f} | {r['reference', 'pretrain']:.2f} | "
                         f"{r['cuda', 'pretrain']:.2f} | {auto} |")
    return "\n".join(lines)
