"""Per-shape choice between fused backends under ``use_backend("auto")`` (issue 4).

When more than one fused backend is ready for a CUDA device and dtype (Triton and the CUDA
extension), ``kind_fast.ops.backends.resolve_op`` returns a ``PerShapeOp``: on the first eager
call for a shape bucket it times each candidate once on the real arguments (device events,
forward, plus backward when gradients are needed), caches the fastest, and from then on calls
it directly. The key buckets M and the rows per sample to the next power of two and keeps the
other sizes exact:

    (device index, dtype, bucket(M), in, out, N_T, K, bucket(T), needs grad)

Never timed: under torch.compile tracing and during CUDA-graph capture (timing synchronises);
there a bucket measured before is used, else the first ready backend of AUTO_ORDER. So: run
one eager step before capturing or compiling to get the measured choice.
``KIND_FAST_AUTOTUNE=0`` turns measuring off (always the first ready backend).
Nothing here draws from the global RNG streams.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["PerShapeOp", "shape_key", "cached_choices", "clear_cache"]

_CACHE: dict[tuple, str] = {}
_REPS = 3


def _bucket(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def shape_key(args: Sequence, needs_grad: bool) -> tuple:
    """Cache key of one call of the forward op (args in the op's order)."""
    x, w_g, _, u_t, _, _, idx, _, labels = args
    m, n_in = x.shape
    b = max(int(labels.shape[0]), 1)
    return (x.device.index, x.dtype, _bucket(m), int(n_in), int(w_g.shape[0]), int(u_t.shape[0]),
            int(idx.shape[1]), _bucket(m // b), bool(needs_grad))


def cached_choices() -> dict[tuple, str]:
    """key -> backend name of every bucket measured so far."""
    return dict(_CACHE)


def clear_cache() -> None:
    _CACHE.clear()


def _no_timing() -> bool:
    from kind_fast._tracing import capturing_or_tracing

    return os.environ.get("KIND_FAST_AUTOTUNE", "1") == "0" or capturing_or_tracing()


def _time_ms(fn: Callable[[], None]) -> float:
    fn()  # warm-up (and first-call compilation of Triton kernels)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(_REPS):
        start.record()
        fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end))
    return best


def _runner(op: Callable, args: Sequence, needs_grad: bool) -> Callable[[], None]:
    if not needs_grad:
        def forward():
            with torch.no_grad():
                op(*args)
        return forward
    leaves = [a.detach().requires_grad_(a.requires_grad) if isinstance(a, Tensor) else a for a in args]
    wrt = [a for a in leaves if isinstance(a, Tensor) and a.requires_grad]

    def forward_backward():
        y, _ = op(*leaves)
        torch.autograd.grad(y, wrt, grad_outputs=torch.ones_like(y))  # ones: no RNG draw
    return forward_backward


class PerShapeOp:
    """Callable with the forward op's signature that runs the fastest ready backend per shape."""

    def __init__(self, names: Sequence[str], ops: Sequence[Callable]):
        self.names = tuple(names)
        self.ops = dict(zip(self.names, ops))

    def choose(self, args: Sequence) -> str:
        if torch.compiler.is_compiling():
            return self.names[0]
        needs_grad = torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args)
        key = shape_key(args, needs_grad) + (self.names,)
        name = _CACHE.get(key)
        if name is not None:
            return name
        if _no_timing():
            return self.names[0]
        times = {}
        for cand in self.names:
            try:
                times[cand] = _time_ms(_runner(self.ops[cand], args, needs_grad))
            except Exception:  # noqa: BLE001 - a backend that fails here is simply not chosen
                continue
        name = min(times, key=times.get) if times else self.names[0]
        _CACHE[key] = name
        if os.environ.get("KIND_FAST_DEBUG", "") == "1":
            import sys

            shown = ", ".join(f"{k} {v:.3f} ms" for k, v in times.items())
            print(f"kind_fast auto: {key[:-1]} -> {name} ({shown})", file=sys.stderr)
        return name

    def __call__(self, *args):
        return self.ops[self.choose(args)](*args)

    def __repr__(self) -> str:
        return f"PerShapeOp({', '.join(self.names)})"
