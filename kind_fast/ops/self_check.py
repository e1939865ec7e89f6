"""One-time self-check that gates a fused backend for ``use_backend("auto")``.

A fused backend (Triton, CUDA C++) is chosen by "auto" on a device only after its forward and
backward ops reproduced the reference there, on small random problems per dtype: a kernel
that miscompiles or misbehaves on a card nobody tested becomes one warning and the reference,
never a silent wrong answer. The check runs once per (device, dtype) on the first call that can
run real kernels: not during CUDA-graph capture or under fake/proxy tensors (there it counts as
not passed yet); during torch.compile's Python-level tracing it runs.
``use_backend("<name>")`` runs a backend directly, without the gate.

What a check covers is what "auto" will run: ``CHECK_CASES`` (odd sizes, mixed-class tiles,
both reference plans) for every backend, and for the Triton backend also ``TRITON_CASES``,
small problems with the production shape of a DiT layer (T = 256, one class per 128-row tile,
several N-tiles per row, KP = 32 / 64 / 128, several K-steps, both tailor-gradient variants)
so the very kernel configs a DiT run launches are the ones checked, ``FACTORED_CASES`` for
path M2 (kind_linear_factored) and ``MERGED_CASES`` for path M3 (the segmented GEMM over merged
class weights that sampling runs, its dx and dW). tests/test_self_check.py checks, on the CPU,
that these cases make the launchers pick the production configs.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable

import torch

from kind_fast._tracing import capturing_or_tracing
from kind_fast.ops.kind_linear import kind_linear_backward_ref, kind_linear_ref

__all__ = ["capturing_or_tracing", "check_ops", "check_factored_ops", "check_merged_ops", "SelfCheckGate",
           "CHECK_CASES", "TRITON_CASES", "FACTORED_CASES", "MERGED_CASES"]

_ORDER = ("x", "w_g", "bias", "u_t", "sigma_t", "v_t", "idx", "val", "labels")
_NAMES = ("y", "h", "dx", "dw_g", "dbias", "du_t", "dsigma_t", "dv_t", "dval")
_TOL = {torch.float16: 2e-2, torch.bfloat16: 6e-2}
# (in, out, N_T, K, B, T, C): odd sizes, K not a multiple of 16, T not a multiple of a 64-row
# tile, both tailor plans (T >= K: "sample"; T < K: "row"), a padded gate row (fewer active
# tailors than K) and a repeated tailor id inside a row.
CHECK_CASES = ((72, 80, 24, 7, 3, 37, 5), (40, 56, 16, 9, 4, 3, 3))
# Production-shaped (same format, B = 2 samples of T = 256 rows): KP = 32 with BM = 128, BN = 128,
# BK = 64, 8 warps, two owner sub-tiles per row and block-gate tailor gradients (2K <= N_T, the
# compacted row lists); KP = 64 likewise with other in/out; KP = 128 (BM = 64, BN = 64, four
# owner sub-tiles, dense tailor gradients). Forward and dx both have >= 5 N-tiles per row. The
# fourth case has enough rows (B = 48) for the tailor gradients to split the rows over programs
# (fp32 partials), as DiT-XL/2 does at B = 256; the last one has as many tailor-gradient blocks
# as the GPU has SMs, so its reduction runs unsplit, as DiT-XL/2's does at B = 32 (and a batch
# divisible by 16, as DiT's, which Triton specialises on).
TRITON_CASES = ((640, 640, 96, 32, 2, 256, 5), (576, 704, 128, 64, 2, 256, 5), (320, 384, 160, 100, 2, 256, 5),
                (640, 640, 64, 32, 48, 256, 5), (704, 704, 96, 32, 16, 256, 5))
# Path M2 (learngenes as N_G always-on slots of the factored kernel): (in, out, N_G, N_T, K, B, T, C);
# N_G + K = 64 and 100 slots (KP = 64 with BM = 128, KP = 128 with BM = 64), several N-groups.
FACTORED_CASES = ((640, 640, 32, 96, 32, 2, 256, 5), (320, 384, 68, 96, 32, 2, 256, 5))
# Path M3 (segmented GEMM over merged slot weights, its dx and dW): (in, out, S, T, slot of each
# sample). A CFG batch at T = 256 runs what DiT-XL/2 sampling and training run (128-row one-slot
# tiles, 4 stages, K-rotation with >= 4 K-steps, several N-tiles; dW in 64-row steps over one run
# per slot); T = 37 with interleaved slots runs 64-row tiles over several slots (a partial last
# K-step) and dW over runs whose last 16-row chunk is masked.
MERGED_CASES = ((320, 384, 2, 256, (0, 0, 1, 1)), (200, 136, 3, 37, (1, 0, 1, 0, 2)))


def _cannot_run_real_kernels() -> bool:
    """True during CUDA-graph capture or under a dispatch mode (fake tensors, proxies): the
    self-check runs real kernels on real tensors. Dynamo tracing itself is fine: the registry's
    choice is evaluated eagerly there (assume_constant_result), so a model compiled before its
    first eager call still gets its fused backend."""
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return True
    try:
        from torch.utils._python_dispatch import _get_current_dispatch_mode

        return _get_current_dispatch_mode() is not None
    except ImportError:  # pragma: no cover - private API moved
        return capturing_or_tracing()


def check_problem(case, device: torch.device, dtype: torch.dtype, seed: int):
    """Random op arguments (dict) and an output gradient for one of ``CHECK_CASES``."""
    n_in, n_out, n_t, k, b, t, classes = case
    g = torch.Generator().manual_seed(seed)  # CPU generator: the global RNG streams stay untouched
    ids = torch.stack([torch.randperm(n_t, generator=g)[:k] for _ in range(classes + 1)]).to(torch.int32)
    val = torch.randn(classes + 1, k, generator=g)
    val[0, k - 2:] = 0.0  # a padded row: id 0 with value 0
    ids[0, k - 2:] = 0
    ids[1, 1] = ids[1, 0]  # a repeated id: contributions are summed
    tensors = dict(
        x=torch.randn(b * t, n_in, generator=g), w_g=torch.randn(n_out, n_in, generator=g) * n_in ** -0.5,
        bias=torch.randn(n_out, generator=g), u_t=torch.randn(n_t, n_out, generator=g) * n_out ** -0.5,
        v_t=torch.randn(n_t, n_in, generator=g) * n_in ** -0.5,
    )
    args = {kk: v.to(device, dtype) for kk, v in tensors.items()}
    args.update(sigma_t=(torch.rand(n_t, generator=g) + 0.5).to(device), idx=ids.to(device), val=val.to(device),
                labels=torch.randint(0, classes + 1, (b,), generator=g).to(device))
    grad_y = torch.randn(b * t, n_out, generator=g).to(device, dtype)
    return args, grad_y


def _compare(case, names, got_all, ref_all, tol: float, worst: float) -> tuple[str, float]:
    """'' or the first mismatch of (name, got, reference) triples; the worst relative error."""
    for name, got, ref in zip(names, got_all, ref_all):
        if got.shape != ref.shape:
            return f"case {case}: {name} has shape {tuple(got.shape)}, expected {tuple(ref.shape)}", worst
        got32 = got.float()
        if not bool(torch.isfinite(got32).all()):
            return f"case {case}: {name} has non-finite values", worst
        scale = 1.0 + float(ref.abs().max()) if ref.numel() else 1.0
        err = float((got32 - ref).abs().max()) if ref.numel() else 0.0
        if err > tol * scale:
            return f"case {case}: {name} max error {err:.3g} > {tol * scale:.3g}", worst
        worst = max(worst, err / scale)
    return "", worst


def check_ops(forward_op: Callable, backward_op: Callable, device: torch.device,
              dtype: torch.dtype, cases=CHECK_CASES) -> tuple[bool, str]:
    """Compare every output and gradient of a backend's op pair with the reference computed in
    float32 from the same (rounded) inputs. (passed, details); synchronises once at the end."""
    tol = _TOL[dtype]
    worst = 0.0
    try:
        for i, case in enumerate(cases):
            args, grad_y = check_problem(case, device, dtype, seed=1234 + i)
            a = [args[k] for k in _ORDER]
            no_bias = [args[k] for k in _ORDER if k != "bias"]
            y, h = forward_op(*a)
            grads = backward_op(grad_y, *no_bias, h, [True] * 7)
            f32 = [t.float() if t.is_floating_point() else t for t in a]
            y_ref, h_ref = kind_linear_ref(*f32)
            ref_grads = kind_linear_backward_ref(grad_y.float(), *[t for k, t in zip(_ORDER, f32) if k != "bias"],
                                                 h_ref, [True] * 7)
            msg, worst = _compare(case, _NAMES, (y, h, *grads), (y_ref, h_ref, *ref_grads), tol, worst)
            if msg:
                return False, msg
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as e:  # noqa: BLE001 - a crash is a failed check, reported, not raised
        return False, f"{type(e).__name__}: {e}"
    return True, f"max relative error {worst:.2e} (tolerance {tol:g})"


def factored_problem(case, device: torch.device, dtype: torch.dtype, seed: int):
    """Arguments (dict) of a path-M2 op (x, bias, u, sigma, v, idx, val, labels) for one of
    ``FACTORED_CASES`` — N_G learngene slots (gate value 1) in front of each class's K tailor
    slots, as kind_linear_factored builds them — and an output gradient."""
    n_in, n_out, n_g, n_t, k, b, t, classes = case
    g = torch.Generator().manual_seed(seed)
    n_s = n_g + n_t
    ids_t = torch.stack([torch.randperm(n_t, generator=g)[:k] for _ in range(classes + 1)])
    idx = torch.cat([torch.arange(n_g).expand(classes + 1, n_g), ids_t + n_g], 1).to(torch.int32)
    val = torch.cat([torch.ones(classes + 1, n_g), torch.randn(classes + 1, k, generator=g)], 1)
    tensors = dict(x=torch.randn(b * t, n_in, generator=g), bias=torch.randn(n_out, generator=g),
                   u=torch.randn(n_s, n_out, generator=g) * n_out ** -0.5,
                   v=torch.randn(n_s, n_in, generator=g) * n_in ** -0.5)
    args = {kk: v.to(device, dtype) for kk, v in tensors.items()}
    args.update(sigma=(torch.rand(n_s, generator=g) + 0.5).to(device), idx=idx.to(device), val=val.to(device),
                labels=torch.randint(0, classes + 1, (b,), generator=g).to(device))
    return args, torch.randn(b * t, n_out, generator=g).to(device, dtype)


def check_factored_ops(forward_op: Callable, backward_op: Callable, device: torch.device, dtype: torch.dtype,
                       cases=FACTORED_CASES) -> tuple[bool, str]:
    """As check_ops for a path-M2 op pair: forward (x, bias, u, sigma, v, idx, val, labels) ->
    (y, h), backward -> (dx, dbias, du, dsigma, dv, dval); the reference is kind_linear with W_G = 0."""
    tol = _TOL[dtype]
    worst = 0.0
    order = ("x", "bias", "u", "sigma", "v", "idx", "val", "labels")
    try:
        for i, case in enumerate(cases):
            args, grad_y = factored_problem(case, device, dtype, seed=4321 + i)
            y, h = forward_op(*[args[k] for k in order])
            grads = backward_op(grad_y, *[args[k] for k in order if k != "bias"], h, [True] * 6)
            f = {k: (v.float() if v.is_floating_point() else v) for k, v in args.items()}
            zeros = f["x"].new_zeros((f["u"].shape[1], f["x"].shape[1]))
            ref_args = (f["x"], zeros, f["bias"], f["u"], f["sigma"], f["v"], f["idx"], f["val"], f["labels"])
            y_ref, h_ref = kind_linear_ref(*ref_args)
            dx, _, db, du, dsig, dv, dval = kind_linear_backward_ref(
                grad_y.float(), *[a for j, a in enumerate(ref_args) if j != 2], h_ref, [True] * 7)
            names = ("M2 y", "M2 h", "M2 dx", "M2 dbias", "M2 du", "M2 dsigma", "M2 dv", "M2 dval")
            msg, worst = _compare(case, names, (y, h, *grads), (y_ref, h_ref, dx, db, du, dsig, dv, dval), tol, worst)
            if msg:
                return False, msg
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as e:  # noqa: BLE001 - a crash is a failed check, reported, not raised
        return False, f"M2: {type(e).__name__}: {e}"
    return True, f"max relative error {worst:.2e} (tolerance {tol:g})"


def check_merged_ops(gemm_op: Callable, backward_op: Callable, device: torch.device, dtype: torch.dtype,
                     cases=MERGED_CASES) -> tuple[bool, str]:
    """As check_ops for a path-M3 op pair: gemm (x, weights, bias, slots) -> y, backward
    (grad_y, x, weights, slots, output_mask) -> (dx, dweights, dbias); the reference is
    kind_linear_merged_gemm_ref in float32 from the same rounded inputs."""
    from kind_fast.ops.kind_linear_merged import kind_linear_merged_gemm_backward_ref, kind_linear_merged_gemm_ref

    tol = _TOL[dtype]
    worst = 0.0
    try:
        for i, case in enumerate(cases):
            n_in, n_out, n_slots, t, slot_of = case
            g = torch.Generator().manual_seed(5678 + i)
            b = len(slot_of)
            x = torch.randn(b * t, n_in, generator=g)
            w = torch.randn(n_slots, n_out, n_in, generator=g) * n_in ** -0.5
            bias = torch.randn(n_out, generator=g)
            gy = torch.randn(b * t, n_out, generator=g)
            x, w, bias, gy = (v.to(device, dtype) for v in (x, w, bias, gy))
            slots = torch.tensor(slot_of, dtype=torch.int64, device=device)
            y = gemm_op(x, w, bias, slots)
            grads = backward_op(gy, x, w, slots, [True, True, True])
            f = [v.float() for v in (x, w, bias, gy)]
            y_ref = kind_linear_merged_gemm_ref(f[0], f[1], f[2], slots, plan="all")
            ref = kind_linear_merged_gemm_backward_ref(f[3], f[0], f[1], slots, [True] * 3, plan="all")
            msg, worst = _compare(case[:4], ("M3 y", "M3 dx", "M3 dweights", "M3 dbias"), (y, *grads), (y_ref, *ref),
                                  tol, worst)
            if msg:
                return False, msg
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as e:  # noqa: BLE001 - a crash is a failed check, reported, not raised
        return False, f"M3: {type(e).__name__}: {e}"
    return True, f"max relative error {worst:.2e} (tolerance {tol:g})"


class SelfCheckGate:
    """Per-(device, dtype) cache of a backend's self-check; ``auto_ready`` is the registry's
    optional backend hook (see kind_fast.ops.backends)."""

    def __init__(self, backend: str, ops: Callable[[], tuple[Callable, Callable]],
                 ready: Callable[[str, torch.dtype], bool], on_result: Callable[[], None] | None = None,
                 cases=CHECK_CASES,
                 extra: Callable[[torch.device, torch.dtype], tuple[bool, str]] | None = None):
        self.backend = backend
        self._ops = ops  # () -> (forward op, backward op), resolved lazily
        self._ready = ready  # static availability: status and dtype support
        self._on_result = on_result
        self._cases = cases
        self._extra = extra  # further checks of the backend's other ops (e.g. path M2)
        self._lock = threading.Lock()
        self._results: dict[tuple[int, torch.dtype], tuple[bool, str]] = {}

    def check(self, device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
        ok, msg = check_ops(*self._ops(), device, dtype, self._cases)
        if ok and self._extra is not None:
            ok2, msg2 = self._extra(device, dtype)
            return ok2, (f"{msg}; {msg2}" if ok2 else msg2)
        return ok, msg

    def results(self) -> dict[tuple[int, torch.dtype], tuple[bool, str]]:
        """(device index, dtype) -> (passed, details) of the checks run so far."""
        return dict(self._results)

    def auto_ready(self, device_type: str, dtype: torch.dtype) -> bool:
        if not self._ready(device_type, dtype):
            return False
        key = (torch.cuda.current_device(), dtype)
        if key not in self._results:
            if _cannot_run_real_kernels():
                return False
            with self._lock:
                if key not in self._results:
                    ok, msg = self.check(torch.device("cuda", key[0]), dtype)
                    self._results[key] = (ok, msg)
                    if self._on_result is not None:
                        self._on_result()
                    if not ok:
                        warnings.warn(
                            f"kind_fast: the {self.backend} backend failed its self-check on cuda:{key[0]} "
                            f"({dtype}): {msg}. use_backend('auto') will not use it there; please report this.",
                            RuntimeWarning, stacklevel=3)
        return self._results[key][0]
