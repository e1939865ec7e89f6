"""Which implementation of the kind_linear op family runs.

Backends:
    torch   the pure-PyTorch reference (path M1), every device and dtype. Always available.
    triton  fused Triton kernels (kernels/), CUDA tensors.
    cuda    the compiled extension kind_fast._C (csrc/), CUDA tensors.

``auto`` (the default, or ``KIND_FAST_BACKEND``) picks per device: the fastest available
fused backend on a GPU, the reference elsewhere. ``use_backend`` switches it for a block::

    with kind_fast.use_backend("torch"):
        y = layer(x, labels=labels)

The selection is a module-level value (not a ContextVar) so torch.compile can guard on it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

BACKENDS = ("torch", "triton", "cuda")
_CHOICES = ("auto",) + BACKENDS


class _State:
    backend: str = os.environ.get("KIND_FAST_BACKEND", "auto")


_STATE = _State()
if _STATE.backend not in _CHOICES:
    raise ValueError(f"KIND_FAST_BACKEND={_STATE.backend!r} is not one of {_CHOICES}")


def backend_status() -> dict[str, tuple[bool, str]]:
    """name -> (available, reason) for every backend. Imports Triton / loads _C lazily."""
    status = {"torch": (True, "pure-PyTorch reference (any device, any dtype)")}
    try:
        import triton  # noqa: F401

        status["triton"] = (False, f"triton {triton.__version__} installed, but the fused Triton "
                                   "kernels are not part of this version yet")
    except ImportError:
        status["triton"] = (False, "triton is not installed (pip install 'kind_fast[triton]')")
    from kind_fast._ext import load_extension

    mod, reason = load_extension()
    if mod is None:
        status["cuda"] = (False, f"compiled extension: {reason}")
    else:
        status["cuda"] = (False, "compiled extension loaded, but it serves no kind_linear op yet")
    return status


def current_backend() -> str:
    """The selected backend name ('auto' unless changed)."""
    return _STATE.backend


@contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Select a backend for the duration of the block ('auto', 'torch', 'triton', 'cuda')."""
    if name not in _CHOICES:
        raise ValueError(f"unknown backend {name!r}; choose one of {_CHOICES}")
    if name != "auto":
        ok, reason = backend_status()[name]
        if not ok:
            raise RuntimeError(f"backend {name!r} is not available: {reason}")
    previous = _STATE.backend
    _STATE.backend = name
    try:
        yield
    finally:
        _STATE.backend = previous


def resolve_backend(device: torch.device) -> str:
    """Concrete backend for tensors on ``device`` under the current selection."""
    name = _STATE.backend
    if name == "auto":
        return "torch"  # no fused backend is available yet on any device
    if name != "torch" and device.type != "cuda":
        raise RuntimeError(f"backend {name!r} runs on CUDA tensors, got tensors on {device}")
    return name


def resolve_op(device: torch.device) -> Callable:
    """The registered forward op of the backend that runs on ``device``."""
    name = resolve_backend(device)
    if name == "torch":
        return torch.ops.kind_fast.kind_linear
    raise RuntimeError(f"backend {name!r} has no kind_linear op in this version")
