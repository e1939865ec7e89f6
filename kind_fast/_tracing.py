"""Whether code runs under torch.compile tracing or CUDA-graph capture (a leaf module: the
registry, the per-shape selection and the self-check all ask it, and it imports nothing of
kind_fast, so none of them imports another just for this)."""

from __future__ import annotations

import torch

__all__ = ["capturing_or_tracing", "under_dispatch_mode"]


def capturing_or_tracing() -> bool:
    """True inside torch.compile tracing or CUDA-graph capture: no self-checks, no timing."""
    if torch.compiler.is_compiling():
        return True
    try:
        from torch._guards import TracingContext

        if TracingContext.try_get() is not None:
            return True
    except ImportError:  # pragma: no cover - very old torch
        pass
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def under_dispatch_mode() -> bool:
    """True under a Python dispatch mode: fake tensors, tracing proxies, FlopCounterMode. Code
    that caches tensors or reads values must not do so there."""
    try:
        from torch.utils._python_dispatch import _get_current_dispatch_mode

        return _get_current_dispatch_mode() is not None
    except ImportError:  # pragma: no cover - private API moved
        return torch.compiler.is_compiling()
