"""CUDA-graph capture of a sampling loop's model call (docs/design.md §6: DiT-S/B sampling is
launch-bound, so each step's kernels are replayed from one graph instead of launched one by one).

``graphed(fn, device, enabled)`` returns ``fn`` itself or a ``GraphedCall`` that, on its first
call for a shape, warms ``fn`` up on a side stream (so lazy work happens outside the capture:
Triton compilation, the backends' one-time self-checks, the KIND layers' merged weights), captures
one call into a CUDA graph with static input buffers, and from then on copies the inputs in and
replays. The shapes of a sampling chunk are fixed, so one capture serves every step. If capture
fails (an op that is not capturable), it warns once and calls ``fn`` eagerly from then on: the
samples are the same, only slower.

``use_cuda_graphs(device, requested)`` is the decision: ``requested`` True/False forces it (True on
a device without CUDA is an error), None ("auto") means on for CUDA devices, off elsewhere, and
off when ``KIND_FAST_CUDA_GRAPHS=0``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["use_cuda_graphs", "graphed", "GraphedCall"]


def use_cuda_graphs(device: torch.device | str, requested: bool | None = None) -> bool:
    """Whether a sampling loop on ``device`` captures its model call (see the module docstring)."""
    device = torch.device(device)
    if requested is not None and not isinstance(requested, bool):
        raise TypeError(f"cuda_graphs must be True, False or None (auto), got {requested!r}")
    if requested is True:
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        return True
    if requested is False or device.type != "cuda":
        return False
    return os.environ.get("KIND_FAST_CUDA_GRAPHS", "1") != "0" and torch.cuda.is_available()


class GraphedCall:
    """``fn(*tensors) -> Tensor`` replayed from a CUDA graph per input signature."""

    def __init__(self, fn: Callable[..., Tensor], warmup: int = 2):
        self.fn = fn
        self.warmup = warmup
        self.graphs: dict[tuple, tuple] = {}  # signature -> (graph, static inputs, static output)
        self.failed: str | None = None
        self.replays = 0

    @staticmethod
    def signature(args) -> tuple:
        return tuple((tuple(a.shape), a.dtype, a.device) for a in args)

    def _capture(self, args) -> tuple:
        static = [a.clone() for a in args]
        stream = torch.cuda.Stream(device=args[0].device)
        stream.wait_stream(torch.cuda.current_stream(args[0].device))
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                self.fn(*static)
        torch.cuda.current_stream(args[0].device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.fn(*static)
        return graph, static, out

    def __call__(self, *args: Tensor) -> Tensor:
        if self.failed is not None:
            return self.fn(*args)
        key = self.signature(args)
        entry = self.graphs.get(key)
        if entry is None:
            try:
                entry = self.graphs[key] = self._capture(args)
            except Exception as e:  # noqa: BLE001 - an uncapturable op: run eagerly instead
                self.failed = f"{type(e).__name__}: {e}"
                warnings.warn(f"kind_fast: CUDA-graph capture of the sampling call failed ({self.failed}); "
                              "sampling eagerly", RuntimeWarning, stacklevel=2)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                return self.fn(*args)
        graph, static, out = entry
        for dst, src in zip(static, args):
            dst.copy_(src)
        graph.replay()
        self.replays += 1
        return out.clone()


def graphed(fn: Callable[..., Tensor], device: torch.device | str, enabled: bool | None = None) -> Callable:
    """``fn`` captured in CUDA graphs when ``use_cuda_graphs(device, enabled)``, else ``fn``."""
    return GraphedCall(fn) if use_cuda_graphs(device, enabled) else fn
