"""The kernels a piece of code launches, recorded without a GPU (docs/design.md §6).

``record_launches()`` records, in order, every kernel launch made inside the block:

* each Triton launch (a ``triton.jit`` kernel called with a grid, directly or through an
  autotuner), intercepted instead of run, with its grid, sizes and constexprs;
* each aten op that would launch a device kernel, through a Python dispatch mode: every op on
  a CUDA or ``meta`` tensor except those that only make or reshape views or allocate (views,
  ``empty``, metadata); a host read of device data (``.item()``, ``.tolist()``) is recorded
  as ``sync``;
* a registered custom op of our own (``kind_fast::*``) as one record, not its insides (the
  time model substitutes the Triton schedule it stands for).

Run the code on ``meta`` tensors (the kernel launchers plan for the reference GPU there, as
the static audit uses them) or on CUDA-device fake tensors (``torch._subclasses.FakeTensorMode``
on a machine without a GPU). Nothing runs: Triton kernels are recorded instead, aten ops run
their meta kernels. tests/test_launch_budget.py counts the launches of one KIND layer with it;
kind_fast.perf.timemodel prices each recorded launch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

__all__ = ["Launch", "TensorInfo", "record_launches", "NO_KERNEL_OPS", "kernel_launches"]


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple
    dtype: str
    device: str

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n

    @property
    def itemsize(self) -> int:
        return {"float64": 8, "int64": 8, "float32": 4, "int32": 4, "bfloat16": 2, "float16": 2, "int16": 2,
                "int8": 1, "uint8": 1, "bool": 1}.get(self.dtype, 4)

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


@dataclass
class Launch:
    """One kernel launch. ``kind``: "triton", "aten", "custom" (a kind_fast::* op) or "sync"."""
    kind: str
    name: str
    grid: tuple = ()
    sizes: dict = field(default_factory=dict)       # Triton: integer arguments by name
    meta: dict = field(default_factory=dict)        # Triton: constexprs, num_warps, num_stages
    inputs: list = field(default_factory=list)      # aten / custom: TensorInfo of tensor inputs
    outputs: list = field(default_factory=list)     # aten / custom: TensorInfo of tensor outputs
    args: tuple = ()                                # aten / custom: non-tensor arguments (repr-able)

    @property
    def programs(self) -> int:
        n = 1
        for g in self.grid:
            n *= int(g)
        return n

    def __str__(self) -> str:
        if self.kind == "triton":
            return f"triton {self.name} grid={self.grid}"
        shapes = ["x".join(map(str, t.shape)) for t in self.inputs[:4]]
        more = f", ... ({len(self.inputs)} tensors)" if len(self.inputs) > 4 else ""
        return f"{self.kind} {self.name} " + ", ".join(shapes) + more


# aten ops that never launch a device kernel: views, allocation, metadata
NO_KERNEL_OPS = frozenset({
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "view", "_unsafe_view", "reshape",
    "t", "transpose", "permute", "expand", "as_strided", "slice", "select", "unsqueeze", "squeeze", "detach",
    "alias", "lift_fresh", "split", "split_with_sizes", "chunk", "unbind", "narrow", "view_as", "expand_as",
    "_reshape_alias", "unflatten", "flatten", "movedim", "diagonal", "sym_size", "sym_stride", "sym_numel",
    "sym_storage_offset", "is_same_size", "_has_compatible_shallow_copy_type", "resolve_conj", "resolve_neg",
    "conj", "_conj", "_neg_view", "set_", "is_nonzero", "dim", "size", "stride", "numel", "record_stream",
    "_foreach_zero_", "zero_grad",  # (set_to_none grads never call them; kept out of counts when they do)
})
_SYNC_OPS = frozenset({"_local_scalar_dense", "item", "equal"})


def _info(t) -> TensorInfo:
    return TensorInfo(tuple(int(s) for s in t.shape), str(t.dtype).replace("torch.", ""), t.device.type)


def _tensors(obj, out: list) -> None:
    import torch

    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            _tensors(o, out)
    elif isinstance(obj, dict):
        for o in obj.values():
            _tensors(o, out)


def _plain(obj):
    import torch

    if isinstance(obj, torch.Tensor):
        return None
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(o) for o in obj)
    if isinstance(obj, (int, float, bool, str)) or obj is None:
        return obj
    return repr(obj)


@contextlib.contextmanager
def record_launches() -> Iterator[list[Launch]]:
    """Record every kernel launch made inside the block (see the module docstring)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    out: list[Launch] = []

    class _Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            result = func(*args, **kwargs)
            ns = func.namespace
            base = func._schema.name.split("::")[-1]
            ins: list = []
            _tensors((args, kwargs), ins)
            devs = {t.device.type for t in ins}
            if ns == "kind_fast":
                outs: list = []
                _tensors(result, outs)
                out.append(Launch("custom", f"kind_fast::{base}", inputs=[_info(t) for t in ins],
                                  outputs=[_info(t) for t in outs], args=_plain(args)))
            elif base in _SYNC_OPS and devs - {"cpu"}:
                out.append(Launch("sync", base, inputs=[_info(t) for t in ins]))
            elif ns in ("aten", "prims") and base not in NO_KERNEL_OPS:
                outs = []
                _tensors(result, outs)
                touched = devs | {t.device.type for t in outs}
                if touched & {"cuda", "meta"}:
                    out.append(Launch("aten", base, inputs=[_info(t) for t in ins if t.device.type != "cpu"],
                                      outputs=[_info(t) for t in outs], args=_plain(args)))
            return result

    with _triton_recorded(out), _Mode():
        yield out


@contextlib.contextmanager
def _triton_recorded(out: list[Launch]) -> Iterator[None]:
    """Triton launches recorded instead of run (a no-op when Triton is not installed)."""
    try:
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction
    except ImportError:
        yield
        return

    def jit_run(self, *args, grid=None, warmup=False, **kwargs):
        names = list(self.arg_names)
        values = dict(zip(names, args))
        values.update(kwargs)
        cexpr = {p.name for p in self.params if p.is_constexpr}
        sizes = {n: v for n, v in values.items() if n not in cexpr and isinstance(v, int) and not isinstance(v, bool)}
        meta = {n: values.get(n) for n in cexpr}
        meta["num_warps"] = kwargs.get("num_warps", 4)
        meta["num_stages"] = kwargs.get("num_stages", 3)
        g = grid(values) if callable(grid) else grid
        g = tuple(int(x) for x in (g if isinstance(g, (tuple, list)) else (g,)))
        out.append(Launch("triton", self.__name__, grid=g, sizes=sizes, meta=meta))

    def tuner_run(self, *args, **kwargs):
        grid = kwargs.pop("grid", None)
        c = self.configs[0]
        return jit_run(self.fn, *args, grid=grid, **{**kwargs, **c.kwargs, "num_warps": c.num_warps,
                                                      "num_stages": c.num_stages})

    saved = (JITFunction.run, Autotuner.run)
    JITFunction.run, Autotuner.run = jit_run, tuner_run
    try:
        yield
    finally:
        JITFunction.run, Autotuner.run = saved


def kernel_launches(launches: list[Launch]) -> list[Launch]:
    """The records that launch a device kernel (Triton, aten, custom ops), without host syncs."""
    return [r for r in launches if r.kind != "sync"]
