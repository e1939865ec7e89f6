"""One-time self-check that gates a fused backend for ``use_backend("auto")``.

A fused backend (Triton, CUDA C++) is chosen by "auto" on a device only after its forward and
backward ops reproduced the reference there, on small random problems per dtype: a kernel
that miscompiles or misbehaves on a card nobody tested becomes one warning and the reference,
never a silent wrong answer. The check runs once per (device, dtype) on the first call that can
run real kernels: not during CUDA-graph capture or under fake/proxy tensors (there it counts as
not passed yet); during torch.compile's Python-level tracing it runs.
``use_backend("<name>")`` runs a backend directly, without the gate.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable

import torch

from kind_fast._tracing import capturing_or_tracing
from kind_fast.ops.kind_linear import kind_linear_backward_ref, kind_linear_ref

__all__ = ["capturing_or_tracing", "check_ops", "SelfCheckGate", "CHECK_CASES"]

_ORDER = ("x", "w_g", "bias", "u_t", "sigma_t", "v_t", "idx", "val", "labels")
_NAMES = ("y", "h", "dx", "dw_g", "dbias", "du_t", "dsigma_t", "dv_t", "dval")
_TOL = {torch.float16: 2e-2, torch.bfloat16: 6e-2}
# (in, out, N_T, K, B, T, C): odd sizes, K not a multiple of 16, T not a multiple of a 64-row
# tile, both tailor plans (T >= K: "sample"; T < K: "row"), a padded gate row (fewer active
# tailors than K) and a repeated tailor id inside a row.
CHECK_CASES = ((72, 80, 24, 7, 3, 37, 5), (40, 56, 16, 9, 4, 3, 3))


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


def check_ops(forward_op: Callable, backward_op: Callable, device: torch.device,
              dtype: torch.dtype) -> tuple[bool, str]:
    """Compare every output and gradient of a backend's op pair with the reference computed in
    float32 from the same (rounded) inputs. (passed, details); synchronises once at the end."""
    tol = _TOL[dtype]
    worst = 0.0
    try:
        for i, case in enumerate(CHECK_CASES):
            args, grad_y = check_problem(case, device, dtype, seed=1234 + i)
            a = [args[k] for k in _ORDER]
            no_bias = [args[k] for k in _ORDER if k != "bias"]
            y, h = forward_op(*a)
            grads = backward_op(grad_y, *no_bias, h, [True] * 7)
            f32 = [t.float() if t.is_floating_point() else t for t in a]
            y_ref, h_ref = kind_linear_ref(*f32)
            ref_grads = kind_linear_backward_ref(grad_y.float(), *[t for k, t in zip(_ORDER, f32) if k != "bias"],
                                                 h_ref, [True] * 7)
            for name, got, ref in zip(_NAMES, (y, h, *grads), (y_ref, h_ref, *ref_grads)):
                if got.shape != ref.shape:
                    return False, f"case {case}: {name} has shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
                got32 = got.float()
                if not bool(torch.isfinite(got32).all()):
                    return False, f"case {case}: {name} has non-finite values"
                scale = 1.0 + float(ref.abs().max()) if ref.numel() else 1.0
                err = float((got32 - ref).abs().max()) if ref.numel() else 0.0
                if err > tol * scale:
                    return False, f"case {case}: {name} max error {err:.3g} > {tol * scale:.3g}"
                worst = max(worst, err / scale)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as e:  # noqa: BLE001 - a crash is a failed check, reported, not raised
        return False, f"{type(e).__name__}: {e}"
    return True, f"max relative error {worst:.2e} (tolerance {tol:g})"


class SelfCheckGate:
    """Per-(device, dtype) cache of a backend's self-check; ``auto_ready`` is the registry's
    optional backend hook (see kind_fast.backends)."""

    def __init__(self, backend: str, ops: Callable[[], tuple[Callable, Callable]],
                 ready: Callable[[str, torch.dtype], bool], on_result: Callable[[], None] | None = None):
        self.backend = backend
        self._ops = ops  # () -> (forward op, backward op), resolved lazily
        self._ready = ready  # static availability: status and dtype support
        self._on_result = on_result
        self._lock = threading.Lock()
        self._results: dict[tuple[int, torch.dtype], tuple[bool, str]] = {}

    def check(self, device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
        return check_ops(*self._ops(), device, dtype)

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
