"""Which implementation of the kind_linear op family runs.

Backends:
    torch   the pure-PyTorch reference (path M1), every device and dtype. Always available.
    triton  fused Triton kernels (kernels/), CUDA tensors in fp16/bf16.
    cuda    the compiled extension kind_fast._C (csrc/), CUDA tensors in fp16/bf16.

``auto`` (the default, or ``KIND_FAST_BACKEND``) picks per device: on a GPU the fused backends of
``AUTO_ORDER`` that are ready (available, supporting the dtype, and passing the backend's
optional ``auto_ready`` gate, e.g. the CUDA backend's one-time self-check); with several ready,
the fastest per shape from measurements it caches (kind_fast.ops.autoselect); elsewhere the
reference. ``use_backend`` switches it::

    with kind_fast.use_backend("torch"):
        y = layer(x, labels=labels)

Plugging in a backend: a module named in ``_BACKEND_MODULES`` provides
    status() -> (available: bool, reason: str)
    supports(device_type: str, dtype: torch.dtype) -> bool
    OP: the registered forward op, same schema as torch.ops.kind_fast.kind_linear
    auto_ready(device_type, dtype) -> bool   (optional) whether "auto" may use it now
    request() -> None   (optional) called when the backend is selected explicitly, before its
                        status is asked: e.g. the CUDA backend builds a missing extension then
    AUTO_OP: (optional) what "auto" calls instead of OP (same schema), e.g. OP gated per shape
    GROUPED_OP: (optional) a registered op with kind_fast::kind_linear_grouped's schema that runs
        a group of layers on one x in one launch; without it, groups run as exact per-layer
        calls of OP (kind_fast.ops.kind_linear_grouped.resolve_grouped_op)
It is imported on first use, never at ``import kind_fast``. A fp32/fp64 input that a fused
backend does not support runs on the reference.

The selection is a module attribute (not a ContextVar) and the choice is made in a function
torch.compile treats as a constant of its arguments, so compiled code guards on the selection
and recompiles when it changes.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType

import torch

BACKENDS = ("torch", "triton", "cuda")
_CHOICES = ("auto",) + BACKENDS
_BACKEND_MODULES = {"triton": "kind_fast.ops.kind_linear_triton", "cuda": "kind_fast.ops.kind_linear_cuda"}
AUTO_ORDER = ("triton", "cuda")  # tried in this order on CUDA tensors under "auto"


class _State:
    backend: str = os.environ.get("KIND_FAST_BACKEND", "auto")


_STATE = _State()
if _STATE.backend not in _CHOICES:
    raise ValueError(f"KIND_FAST_BACKEND={_STATE.backend!r} is not one of {_CHOICES}")
_MODULES: dict[str, tuple[ModuleType | None, str]] = {}


def backend_module(name: str) -> tuple[ModuleType | None, str]:
    """(module, "") or (None, why it is missing), imported on first use and cached. The op
    family (kind_fast.ops.paths) reaches a backend's extra paths (M2, M3) through this."""
    if name not in _MODULES:
        try:
            _MODULES[name] = (importlib.import_module(_BACKEND_MODULES[name]), "")
        except ModuleNotFoundError as e:
            if e.name == _BACKEND_MODULES[name]:
                _MODULES[name] = (None, "not part of this version of kind_fast")
            else:
                _MODULES[name] = (None, f"cannot be imported: {e}")
        except Exception as e:  # noqa: BLE001 - a broken backend is a reason, not a crash
            _MODULES[name] = (None, f"failed to import: {type(e).__name__}: {e}")
    return _MODULES[name]


_backend_module = backend_module


def backend_status() -> dict[str, tuple[bool, str]]:
    """name -> (available, reason) for every backend."""
    status = {"torch": (True, "pure-PyTorch reference (any device, any dtype)")}
    for name in _BACKEND_MODULES:
        mod, why = _backend_module(name)
        status[name] = (False, why) if mod is None else mod.status()
    return status


def current_backend() -> str:
    """The selected backend name ('auto' unless changed)."""
    return _STATE.backend


def set_backend(name: str) -> None:
    """Select a backend globally ('auto', 'torch', 'triton', 'cuda')."""
    if name not in _CHOICES:
        raise ValueError(f"unknown backend {name!r}; choose one of {_CHOICES}")
    if name != "auto":
        mod, _ = _backend_module(name) if name in _BACKEND_MODULES else (None, "")
        if mod is not None and hasattr(mod, "request"):
            mod.request()
        ok, reason = backend_status()[name]
        if not ok:
            raise RuntimeError(f"backend {name!r} is not available: {reason}")
    _STATE.backend = name


@contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Select a backend for the duration of the block ('auto', 'torch', 'triton', 'cuda')."""
    previous = _STATE.backend
    set_backend(name)
    try:
        yield
    finally:
        _STATE.backend = previous


def _auto_candidates(device_type: str, dtype: torch.dtype) -> tuple[str, ...]:
    """Fused backends "auto" may use for these tensors, in AUTO_ORDER."""
    if device_type != "cuda":
        return ()
    names = []
    for name in AUTO_ORDER:
        mod, _ = _backend_module(name)
        if mod is None or not mod.status()[0] or not mod.supports(device_type, dtype):
            continue
        ready = getattr(mod, "auto_ready", None)
        if ready is None or ready(device_type, dtype):
            names.append(name)
    return tuple(names)


@torch.compiler.assume_constant_result
def _choose(device_type: str, dtype: torch.dtype, selection: str) -> str:
    if selection == "torch":
        return "torch"
    if selection == "auto":
        candidates = _auto_candidates(device_type, dtype)
        return candidates[0] if candidates else "torch"
    mod, why = _backend_module(selection)
    if mod is None:
        raise RuntimeError(f"backend {selection!r} is not available: {why}")
    if mod.supports(device_type, dtype):
        return selection
    if dtype in (torch.float32, torch.float64):
        return "torch"  # fused backends are half-precision kernels; full precision runs the reference
    raise RuntimeError(f"backend {selection!r} does not run {dtype} tensors on {device_type}")


def resolve_backend(device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """Concrete backend for tensors on ``device`` of ``dtype`` under the current selection."""
    return _choose(device.type, dtype, _STATE.backend)


def resolve_op(device: torch.device, dtype: torch.dtype) -> Callable:
    """The registered forward op that runs tensors on ``device`` of ``dtype``."""
    name = resolve_backend(device, dtype)
    if name == "torch":
        return torch.ops.kind_fast.kind_linear
    if _STATE.backend != "auto":
        return _MODULES[name][0].OP
    if not torch.compiler.is_compiling():
        candidates = _auto_candidates(device.type, dtype)
        if len(candidates) > 1:  # several fused backends ready: the fastest per shape
            from kind_fast.ops.autoselect import PerShapeOp

            return PerShapeOp(candidates, [_auto_op(_MODULES[n][0]) for n in candidates])
    return _auto_op(_MODULES[name][0])


def _auto_op(mod: ModuleType) -> Callable:
    """The op "auto" calls for a backend: its AUTO_OP (e.g. gated per shape) or its OP."""
    return getattr(mod, "AUTO_OP", mod.OP)
