"""Static kernel audit: ``python -m kind_fast.perf.audit --arch sm_90`` (no GPU needed).

Compiles every kernel configuration the launchers can pin or autotune ahead of time for
sm_90a (Triton's ``ASTSource`` + ``GPUTarget("cuda", 90, 32)``) and every CUDA kernel in csrc/
with ``nvcc -Xptxas -v`` (where nvcc is present), then reads the compiler's own reports:

    regs      registers per thread (from the cubin, ``cuobjdump -res-usage``)
    spills    spill stores + spill loads in bytes (``ptxas -v``)
    smem      shared memory per block in bytes (Triton's launch metadata + static smem)
    CTAs/SM   resident blocks per SM on sm_90 from regs, smem and threads
    wgmma     warpgroup MMA instructions in the SASS (HGMMA; HMMA = the older mma.sync)
    wait_group  N of ``wgmma.wait_group N`` (SASS ``WARPGROUP.DEPBAR.LE gsb0, N``) in the K-loops,
              least-most over a kernel's K-loops: N >= 1 keeps a warpgroup MMA in flight while
              the next is issued; 0 waits for each (the dx kernel's owners store their dU_T
              slice of every K-step, so their loop has to)
    async     asynchronous global->shared copies in the SASS: cp.async (LDGSTS) and TMA
              (UTMALDG, UBLKCP; counted apart as "TMA")
    pipelined for every K-loop (an innermost loop of the SASS that issues MMAs): the loop
              itself issues asynchronous copies and never waits for all of them (no
              ``DEPBAR.LE SB0, 0x0`` inside), i.e. loads for later iterations are in flight
              while this iteration's MMAs run (code after the last unconditional EXIT, the
              out-of-line retry loops of mbarrier waits, is not a loop of the body)
    persistent  a kernel its module declares persistent (``PERSISTENT_KERNELS``) whose binary
              has a loop over tiles around the K-loops and whose launch grid is no larger than
              the GPU holds at once (SMs × CTAs/SM): its CTAs stay resident and loop

Where the configs come from. Every module of ``kind_fast.kernels`` that defines kernels has an
entry in ``kind_fast.perf.replay.AUDIT_CASES``: (label, replay) pairs, each replay running the
module's launchers on ``meta`` tensors (launchers plan for the reference GPU, 132 SMs, on
``meta``). ``audit_specs`` runs them inside ``capture_launches``, which records each kernel
launch instead of running it, so the audit sees exactly what the launchers would launch; the
audit imports each kernel module compiled, never interpreted, and compiles what they launch. A
spec is one launch of one kernel: the argument types and the specialisation Triton's JIT would
apply (pointer alignment, integers equal to 1 or divisible by 16), the constexprs, num_warps and
num_stages, and whether the config is pinned by a launcher or only reachable through
autotuning.

CUDA: ``csrc/*.cu`` compiled device-only (``--cubin -arch=sm_90a``) against the installed
torch's headers. A CPU build of torch ships the headers but not the generated
``c10/cuda/impl/cuda_cmake_macros.h``; the audit then supplies a one-line stand-in (it only
declares how c10_cuda was linked, which device code never uses) and says so in the notes.

Compiled results are cached per process (``audit_spec``), so the tests and the tool can share
them; Triton's own on-disk cache makes a second run of the tool fast as well.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib
import io
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["AuditSpec", "AuditRow", "SM90", "audit_spec", "audit_specs", "collect_specs", "capture_launches",
           "audit_cuda", "sass_stats", "run_audit", "compile_all", "problem", "markdown_table", "main"]

ROOT = Path(__file__).resolve().parents[2]  # the checkout (this file is kind_fast/perf/audit.py)


@dataclass(frozen=True)
class Machine:
    """Per-SM limits of one architecture (what occupancy and the smem check use)."""
    name: str
    capability: int
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255
    max_threads_per_sm: int = 2048
    max_blocks_per_sm: int = 32
    smem_per_sm: int = 228 * 1024
    smem_per_block: int = 227 * 1024      # opt-in maximum of one block
    smem_reserved_per_block: int = 1024   # the driver's per-block reservation
    sms: int = 132                        # H100 SXM / H200


SM90 = Machine("sm_90", 90)
ARCHS = {"sm_90": SM90, "sm_90a": SM90}


# =====================================================================================
# Specs
# =====================================================================================
@dataclass(frozen=True)
class AuditSpec:
    """One kernel launch to compile: ``fn`` is the (compiled-mode) ``triton.jit`` function."""
    kernel: str                             # report name (the kernel function's name)
    variant: str                            # what this config serves, e.g. "fwd DiT-XL/2.fc2 M=8192"
    fn: Any = field(compare=False, hash=False, repr=False)
    signature: tuple                        # ((arg, type), ...) for non-constexpr args
    constexprs: tuple                       # ((arg, value), ...), incl. JIT specialisations (== 1)
    divisible: tuple = ()                   # args assumed divisible by 16 (pointers: 16-B aligned)
    num_warps: int = 4
    num_stages: int = 3
    pinned: bool = True                     # False: only reachable through autotuning
    has_dot: bool | None = None             # None: decided from the compiled code
    grid: tuple = field(default=(), compare=False)  # the recorded launch's grid (persistence check)
    persistent: bool = field(default=False, compare=False)  # its module lists it in PERSISTENT_KERNELS

    @property
    def key(self) -> tuple:
        return (self.kernel, self.signature, self.constexprs, self.divisible, self.num_warps, self.num_stages)


_DTYPE_NAMES: dict = {}


def _dtype_name(dtype) -> str:
    import torch

    if not _DTYPE_NAMES:
        _DTYPE_NAMES.update({torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
                             torch.float64: "fp64", torch.int32: "i32", torch.int64: "i64", torch.int16: "i16",
                             torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"})
    return _DTYPE_NAMES[dtype]


def _is_descriptor(value) -> bool:
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        return False
    return isinstance(value, TensorDescriptor)


def _triton_type(value) -> str | None:
    """Triton's signature type of a runtime argument (None: a constexpr-like value)."""
    import torch

    if isinstance(value, torch.Tensor):
        return "*" + _dtype_name(value.dtype)
    if _is_descriptor(value):  # a host-side TMA descriptor: its element type and block shape
        return f"tensordesc<{_dtype_name(value.base.dtype)}[{', '.join(str(b) for b in value.block_shape)}]>"
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    return None


def spec_from_launch(fn, args: Sequence, kwargs: dict, *, variant: str, pinned: bool = True,
                     num_warps: int = 4, num_stages: int = 3, grid: tuple = ()) -> AuditSpec:
    """The spec Triton's JIT would compile for ``fn[grid](*args, **kwargs)``: tensors become
    pointers (16-byte aligned unless a view's offset says otherwise), integers equal to 1 become
    constexprs, integers divisible by 16 get the divisibility attribute (as Triton specialises)."""
    import torch

    names = list(fn.arg_names)
    values = dict(zip(names, args))
    values.update(kwargs)
    cexpr_names = {p.name for p in fn.params if p.is_constexpr}
    sig, cx, div = [], [], []
    for n in names:
        v = values.get(n)
        if n in cexpr_names:
            cx.append((n, v))
            continue
        t = _triton_type(v)
        if v is None:
            cx.append((n, None))
        elif isinstance(v, torch.Tensor):
            sig.append((n, t))
            if (v.storage_offset() * v.element_size()) % 16 == 0:
                div.append(n)
        elif _is_descriptor(v):
            sig.append((n, t))
        elif isinstance(v, bool):
            sig.append((n, t))
        elif isinstance(v, int):
            if v == 1:
                cx.append((n, 1))
            else:
                sig.append((n, t))
                if v % 16 == 0:
                    div.append(n)
        else:
            sig.append((n, t or "fp32"))
    return AuditSpec(kernel=fn.__name__, variant=variant, fn=fn, signature=tuple(sig), constexprs=tuple(cx),
                     divisible=tuple(div), num_warps=num_warps, num_stages=num_stages, pinned=pinned, grid=grid)


@contextlib.contextmanager
def capture_launches(variant: str) -> Iterator[list[AuditSpec]]:
    """Record every Triton kernel launch (direct or autotuned) made inside the block as specs,
    instead of running it. Use with ``meta`` tensors; the launcher's own logic picks the configs.
    An autotuned launch records every config its pruning keeps (``pinned=False``)."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    out: list[AuditSpec] = []

    def jit_run(self, *args, grid=None, warmup=False, **kwargs):
        warps = kwargs.pop("num_warps", 4)
        stages = kwargs.pop("num_stages", 3)
        for k in ("num_ctas", "maxnreg", "enable_fp_fusion", "launch_cooperative_grid", "launch_pdl"):
            kwargs.pop(k, None)
        g = grid if isinstance(grid, (tuple, list)) else ((grid,) if grid is not None else ())
        out.append(spec_from_launch(self, args, kwargs, variant=variant, num_warps=warps, num_stages=stages,
                                    grid=tuple(int(x) for x in g) if not callable(grid) else ()))

    def tuner_run(self, *args, **kwargs):
        grid = kwargs.pop("grid", None)
        named = dict(zip(self.arg_names, args))
        configs = list(self.configs)
        prune = getattr(self, "early_config_prune", None)
        if prune:
            configs = prune(configs, {**named, **kwargs}, **kwargs)
        for c in configs:
            kw = {**kwargs, **c.kwargs}
            g = grid({**named, **kw}) if callable(grid) else grid
            g = g if isinstance(g, (tuple, list)) else ((g,) if g is not None else ())
            out.append(spec_from_launch(self.fn, args, kw, variant=variant + " (autotune)", pinned=False,
                                        num_warps=c.num_warps, num_stages=c.num_stages,
                                        grid=tuple(int(x) for x in g)))

    saved = (JITFunction.run, Autotuner.run)
    JITFunction.run, Autotuner.run = jit_run, tuner_run
    try:
        yield out
    finally:
        JITFunction.run, Autotuner.run = saved


def audit_specs(module: str, full: bool = True) -> list[AuditSpec]:
    """The specs the launchers of ``kind_fast.kernels.<module>`` launch in its audit cases
    (``kind_fast.perf.replay.AUDIT_CASES``; ``full=False``: the short list CI compiles), in
    order, labelled by case. Run with TRITON_INTERPRET unset (``collect_specs`` does)."""
    from kind_fast.perf.replay import AUDIT_CASES

    specs: list[AuditSpec] = []
    for label, replay in AUDIT_CASES[module](full):
        with capture_launches(label) as got:
            replay()
        specs.extend(got)
    return specs


def collect_specs(include_autotune: bool = True, full: bool = True) -> list[AuditSpec]:
    """Every spec the audit cases of the modules of kind_fast.kernels list (compiled mode),
    deduplicated (a config listed as pinned anywhere counts as pinned). ``full=False``: the
    short lists (what CI compiles). A kernel module that defines Triton kernels and has no
    audit cases is an error, so a new kernel file cannot go unaudited."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    from kind_fast.perf.replay import AUDIT_CASES

    with _compiled_mode():
        import kind_fast.kernels as pkg

        specs: dict[tuple, AuditSpec] = {}
        for info in pkgutil.iter_modules(pkg.__path__):
            mod = importlib.import_module(f"kind_fast.kernels.{info.name}")
            if getattr(mod, "INTERPRETED", False):
                mod = importlib.reload(mod)
            if info.name not in AUDIT_CASES:
                if any(isinstance(v, (JITFunction, Autotuner)) for v in vars(mod).values()):
                    raise RuntimeError(f"kind_fast.kernels.{info.name} defines Triton kernels but "
                                       "kind_fast.perf.replay.AUDIT_CASES lists no audit cases for it")
                continue
            persistent = set(getattr(mod, "PERSISTENT_KERNELS", ()))
            for s in audit_specs(info.name, full=full):
                if s.kernel in persistent:
                    s = dataclasses.replace(s, persistent=True)
                if not include_autotune and not s.pinned:
                    continue
                prev = specs.get(s.key)
                if prev is None or (s.pinned and not prev.pinned):
                    specs[s.key] = s
        return list(specs.values())


@contextlib.contextmanager
def _compiled_mode():
    """TRITON_INTERPRET off while specs are built and compiled (kernels decorated for the GPU)."""
    old = os.environ.pop("TRITON_INTERPRET", None)
    try:
        yield
    finally:
        if old is not None:
            os.environ["TRITON_INTERPRET"] = old


# =====================================================================================
# Tools: ptxas, cuobjdump, nvcc
# =====================================================================================
def _triton_tool(name: str) -> str | None:
    try:
        from triton import knobs

        tool = getattr(knobs.nvidia, name.replace("-", "_"))
        if tool is not None and tool.path and os.path.exists(tool.path):
            return tool.path
    except Exception:  # noqa: BLE001 - older Triton: look in its bin folder
        pass
    try:
        import triton

        p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        if p.exists():
            return str(p)
    except ImportError:
        pass
    return shutil.which(name)


def ptxas_path(capability: int) -> str | None:
    """The ptxas Triton itself uses for this architecture."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(capability).path
    except Exception:  # noqa: BLE001
        return _triton_tool("ptxas")


def cuda_home() -> Path | None:
    """A real CUDA toolkit (not a wrapper script): $CUDA_HOME, then /usr/local/cuda*."""
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
             *sorted(str(p) for p in Path("/usr/local").glob("cuda-*"))[::-1]]
    for c in cands:
        if c and (Path(c) / "bin" / "nvcc").exists() and (Path(c) / "include" / "cuda_runtime.h").exists():
            return Path(c)
    return None


_PTXAS_FUNC = re.compile(r"Compiling entry function '([^']+)'")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse_ptxas(log: str) -> dict[str, dict]:
    """{function: {regs, stack, spill_stores, spill_loads, smem}} from a ``ptxas -v`` log."""
    out: dict[str, dict] = {}
    cur = None
    for line in log.splitlines():
        m = _PTXAS_FUNC.search(line)
        if m:
            cur = out.setdefault(m.group(1), dict(regs=0, stack=0, spill_stores=0, spill_loads=0, smem=0))
            continue
        if cur is None:
            continue
        m = _PTXAS_SPILL.search(line)
        if m:
            cur.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
            continue
        m = _PTXAS_REGS.search(line)
        if m:
            cur["regs"] = int(m.group(1))
            if m.group(2):
                cur["smem"] = int(m.group(2))
    return out


# =====================================================================================
# SASS analysis
# =====================================================================================
_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRA = re.compile(r"\bBRA(?:\.[A-Z0-9.]+)?\s+(?:`\([^)]*\)\s*)?0x([0-9a-f]+)")
_ASYNC = ("LDGSTS", "UTMALDG", "UBLKCP", "UTMAPF")
_WGMMA = "HGMMA"
_MMA = ("HGMMA", "HMMA")


@dataclass
class SassStats:
    wgmma: int = 0
    hmma: int = 0
    ldgsts: int = 0
    tma: int = 0
    dot_loops: int = 0
    pipelined_loops: int = 0
    double_buffered_loops: int = 0   # copies in the loop, but a full wait every iteration
    outer_loops: int = 0             # loops around a K-loop (a persistent kernel's loop over its tiles)
    wgmma_wait: int = -1             # least N of "wgmma.wait_group N" in a K-loop (-1: none there)
    wgmma_wait_max: int = -1         # the K-loop keeping the most MMAs in flight
    loop_notes: list = field(default_factory=list)

    @property
    def async_copies(self) -> int:
        return self.ldgsts + self.tma


def split_sass(text: str) -> dict[str, list[tuple[int, str]]]:
    """{function: [(address, instruction)]} from ``cuobjdump -sass``."""
    funcs: dict[str, list[tuple[int, str]]] = {}
    cur: list | None = None
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("Function :"):
            cur = funcs.setdefault(s.split(":", 1)[1].strip(), [])
            continue
        if cur is None:
            continue
        m = _INSN.search(line)
        if m:
            cur.append((int(m.group(1), 16), m.group(2)))
    return funcs


def sass_stats(insns: list[tuple[int, str]]) -> SassStats:
    """Counts and the K-loop pipelining check of one function's SASS (see the module doc)."""
    st = SassStats()
    ops = []
    for _, text in insns:
        parts = text.split()
        if parts and parts[0].startswith("@"):
            parts = parts[1:]
        ops.append(parts[0] if parts else "")
    for o in ops:
        if o.startswith(_WGMMA):
            st.wgmma += 1
        elif o.startswith("HMMA"):
            st.hmma += 1
        elif o.startswith("LDGSTS"):
            st.ldgsts += 1
        elif o.startswith(("UTMALDG", "UBLKCP")):
            st.tma += 1
    addr_index = {a: i for i, (a, _) in enumerate(insns)}
    # out-of-line stubs (an mbarrier wait's retry loop, a warp-divergent shuffle) follow the last
    # unconditional EXIT and jump back into the body: those jumps are not loops
    main_end = max((i for i, o in enumerate(ops) if o == "EXIT" and not insns[i][1].lstrip().startswith("@")),
                   default=len(insns))
    loops = []
    for i, (a, text) in enumerate(insns):
        m = _BRA.search(text)
        if m and i <= main_end:
            tgt = int(m.group(1), 16)
            if tgt <= a and tgt in addr_index:
                loops.append((addr_index[tgt], i))
    loops = sorted(set(loops))

    def inside(inner, outer):
        return outer[0] <= inner[0] and inner[1] <= outer[1] and inner != outer

    def own(lp):  # a loop's instructions outside its nested loops
        nested = [q for q in loops if inside(q, lp)]
        return [j for j in range(lp[0], lp[1] + 1) if not any(q[0] <= j <= q[1] for q in nested)]

    mma_loops = [lp for lp in loops if any(ops[j].startswith(_MMA) for j in own(lp))]
    waits, loop_waits = [], []
    for lp in mma_loops:
        if any(inside(q, lp) for q in mma_loops):  # a loop around K-loops: the persistent tile loop
            st.outer_loops += 1
            continue
        idx = own(lp)
        mmas = sum(1 for j in idx if ops[j].startswith(_MMA))
        st.dot_loops += 1
        copies = sum(1 for j in idx if ops[j].startswith(_ASYNC))
        full_wait = any(ops[j].startswith("DEPBAR") and re.search(r"SB0,\s*0x0\b", insns[j][1]) for j in idx)
        # a TMA load issued before the iteration's first MMA is waited for by that MMA: the
        # loop loads what it multiplies (a software pipeline issues the loads of later stages
        # after this stage's MMAs)
        first_tma = next((j for j in idx if ops[j].startswith(("UTMALDG", "UBLKCP"))), None)
        first_mma = next(j for j in idx if ops[j].startswith(_MMA))
        full_wait = full_wait or (first_tma is not None and first_tma < first_mma)
        ok = copies > 0 and not full_wait
        st.pipelined_loops += ok
        st.double_buffered_loops += copies > 0 and full_wait
        here = []
        for j in idx:
            w = re.search(r"WARPGROUP\.DEPBAR\.LE\s+gsb0,\s*0x([0-9a-f]+)", insns[j][1])
            if w:
                here.append(int(w.group(1), 16))
        waits.extend(here)
        if here:
            loop_waits.append(min(here))
        st.loop_notes.append(f"loop @0x{insns[lp[0]][0]:x}: {mmas} MMA, {copies} async copies"
                             + (", waits for all copies" if full_wait else ""))
    if any(lp for lp in loops if any(inside(q, lp) for q in mma_loops) and lp not in mma_loops):
        st.outer_loops += 1  # an outer loop issuing no MMA itself
    st.wgmma_wait = min(waits) if waits else -1
    st.wgmma_wait_max = max(loop_waits) if loop_waits else -1
    return st


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


# =====================================================================================
# Rows
# =====================================================================================
@dataclass
class AuditRow:
    kernel: str
    variant: str
    origin: str                  # "pinned", "autotune" or "cuda"
    config: str
    regs: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    smem: int = 0
    ctas_per_sm: int = 0
    wgmma: int = 0
    hmma: int = 0
    async_copies: int = 0
    tma: int = 0
    dot_loops: int = 0
    pipelined_loops: int = 0
    double_buffered_loops: int = 0
    persistent: bool = False     # a loop over tiles around the K-loops, on a grid that fits the GPU at once
    wgmma_wait: int = -1         # least N of the K-loops' "wgmma.wait_group N" (N >= 1: an MMA stays in flight)
    wgmma_wait_max: int = -1     # the K-loop keeping the most MMAs in flight
    seconds: float = 0.0
    error: str = ""
    notes: str = ""

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads

    @property
    def pipelined(self) -> str:
        if self.error:
            return "-"
        if not self.dot_loops:
            return "no K-loop"
        if self.pipelined_loops == self.dot_loops:
            return "yes"
        db = f"; {self.double_buffered_loops} double-buffered" if self.double_buffered_loops else ""
        return f"NO ({self.pipelined_loops}/{self.dot_loops}{db})"


def problem(row: AuditRow, m: Machine = SM90) -> str:
    """'' when a Triton row meets the audit's rules, else what is wrong: it compiles, spills
    nothing, fits the shared memory of one block, uses wgmma when its code multiplies
    matrices (HMMA alone means the mma.sync fallback), and every K-loop is pipelined."""
    if row.error:
        return row.error
    out = []
    if row.spills:
        out.append(f"{row.spill_stores}+{row.spill_loads} bytes spilled")
    if row.smem > m.smem_per_block:
        out.append(f"{row.smem} bytes of shared memory > {m.smem_per_block}")
    if row.hmma and not row.wgmma:
        out.append("MMA without wgmma (HMMA only)")
    if row.dot_loops and row.pipelined_loops < row.dot_loops:
        out.append(f"K-loops not pipelined: {row.notes}")
    return "; ".join(out)


def occupancy(regs: int, smem: int, threads: int, m: Machine = SM90) -> int:
    """Resident blocks per SM (the CUDA occupancy rules for sm_90)."""
    warps = -(-threads // 32)
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = m.regs_per_sm // (per_warp * warps) if regs else m.max_blocks_per_sm
    by_smem = m.smem_per_sm // (smem + m.smem_reserved_per_block) if smem else m.max_blocks_per_sm
    by_threads = m.max_threads_per_sm // (warps * 32)
    return max(0, min(by_regs, by_smem, by_threads, m.max_blocks_per_sm))


def _config_str(spec: AuditSpec) -> str:
    skip = {"PREC"}
    parts = [f"{k}={v}" for k, v in spec.constexprs if k.isupper() and k not in skip and v is not None]
    parts.append(f"w{spec.num_warps}/s{spec.num_stages}")
    return " ".join(parts)


@functools.lru_cache(maxsize=None)
def _compile_cached(key: tuple, capability: int, fn_id: int) -> AuditRow:
    spec = _SPEC_BY_KEY[key]
    return _compile(spec, capability)


_SPEC_BY_KEY: dict[tuple, AuditSpec] = {}


def audit_spec(spec: AuditSpec, machine: Machine = SM90) -> AuditRow:
    """Compile one spec for ``machine`` and read its resources (cached per process)."""
    _SPEC_BY_KEY[spec.key] = spec
    row = _compile_cached(spec.key, machine.capability, id(spec.fn))
    return dataclasses.replace(row, variant=spec.variant, origin="pinned" if spec.pinned else "autotune")


@contextlib.contextmanager
def _ptxas_log_to(buf: io.StringIO) -> Iterator[None]:
    """Triton's own ``ptxas -v`` log (it prints it when ``knobs.nvidia.dump_ptxas_log`` is set)
    into ``buf``: the registers and spills of the very binary it builds, with the flags its
    version uses, for the price of no extra ptxas run."""
    try:
        from triton import knobs

        old = knobs.nvidia.dump_ptxas_log
        knobs.nvidia.dump_ptxas_log = True
    except Exception:  # noqa: BLE001 - an older Triton: the audit runs ptxas itself
        yield
        return
    try:
        with contextlib.redirect_stdout(buf):
            yield
    finally:
        knobs.nvidia.dump_ptxas_log = old


def _compile(spec: AuditSpec, capability: int, machine: Machine = SM90) -> AuditRow:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = AuditRow(spec.kernel, spec.variant, "pinned" if spec.pinned else "autotune", _config_str(spec))
    t0 = time.perf_counter()
    fn = spec.fn
    types = dict(spec.signature)
    cx = dict(spec.constexprs)
    sig = {n: ("constexpr" if n in cx else types.get(n, "i32")) for n in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in spec.divisible if n in fn.arg_names}
    ptxas_log = io.StringIO()
    try:
        src = ASTSource(fn, sig, constexprs=cx, attrs=attrs)
        with warnings.catch_warnings(), _ptxas_log_to(ptxas_log):
            # (Triton 3.9 notes its FP-fusion default, the launch default: kept)
            warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
            ck = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                                options=dict(num_warps=spec.num_warps, num_stages=spec.num_stages))
    except Exception as e:  # noqa: BLE001 - a config that does not compile is a row with an error
        row.error = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        row.seconds = time.perf_counter() - t0
        return row
    dyn_smem = int(getattr(ck.metadata, "shared", 0) or 0)
    # the spills of the binary Triton built, from its own ptxas run's log; only a binary from
    # Triton's on-disk cache (no ptxas run) is assembled again here to read them
    info = next(iter(parse_ptxas(ptxas_log.getvalue()).values()), {})
    ptxas = ptxas_path(capability)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(ck.asm["cubin"])
        if not info and ptxas:
            ptx = Path(tmp) / "k.ptx"
            ptx.write_text(ck.asm["ptx"])
            arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
            r = _run([ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", str(ptx),
                      "-o", str(Path(tmp) / "v.cubin")])
            if r.returncode != 0:  # older ptxas without --regAllocOptLevel
                r = _run([ptxas, "-lineinfo", "-v", f"--gpu-name={arch}", str(ptx), "-o", str(Path(tmp) / "v.cubin")])
            info = next(iter(parse_ptxas(r.stdout + r.stderr).values()), {})
        cuobjdump = _triton_tool("cuobjdump")
        static_smem, regs = 0, info.get("regs", 0)
        sass = ""
        if cuobjdump:  # resources and SASS in one call
            sass = _run([cuobjdump, "-res-usage", "-sass", str(cubin)]).stdout
            m = re.search(r"REG:(\d+).*?SHARED:(\d+)", sass)
            if m:
                regs, static_smem = int(m.group(1)), int(m.group(2))
    row.regs = regs
    row.spill_stores = info.get("spill_stores", 0)
    row.spill_loads = info.get("spill_loads", 0)
    row.smem = dyn_smem + static_smem
    row.ctas_per_sm = occupancy(regs, row.smem, spec.num_warps * 32, machine)
    notes = []
    if not ptxas:
        notes.append("ptxas not found: spills unknown")
    if sass:
        funcs = split_sass(sass)
        st = sass_stats(next(iter(funcs.values()), []))
        row.wgmma, row.hmma, row.async_copies, row.tma = st.wgmma, st.hmma, st.async_copies, st.tma
        row.dot_loops, row.pipelined_loops = st.dot_loops, st.pipelined_loops
        row.double_buffered_loops = st.double_buffered_loops
        row.wgmma_wait, row.wgmma_wait_max = st.wgmma_wait, st.wgmma_wait_max
        grid = spec.grid[0] if spec.grid else 0
        row.persistent = (spec.persistent and bool(st.outer_loops)
                          and 0 < grid <= machine.sms * max(row.ctas_per_sm, 1))
        if row.pipelined_loops < row.dot_loops:
            notes.extend(st.loop_notes)
    else:
        notes.append("cuobjdump not found: no SASS statistics")
    row.notes = "; ".join(notes)
    row.seconds = time.perf_counter() - t0
    return row


# =====================================================================================
# CUDA (csrc/)
# =====================================================================================
def _demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    r = _run([tool], input="\n".join(names))
    out = r.stdout.splitlines() if r.returncode == 0 else names
    return dict(zip(names, out if len(out) == len(names) else names))


def _short_kernel_name(demangled: str) -> tuple[str, str]:
    """('expand_kernel', 'bf16') from 'void kind_fast::kernels::expand_kernel<c10::BFloat16>(...)'."""
    m = re.search(r"(\w+)(?:<([^>(]*)>)?\(", demangled)
    if not m:
        return demangled[:60], ""
    targ = (m.group(2) or "").replace("c10::BFloat16", "bf16").replace("c10::Half", "fp16").replace("__half", "fp16")
    return m.group(1), targ


@functools.lru_cache(maxsize=None)
def audit_cuda(machine: Machine = SM90) -> tuple[list[AuditRow], str]:
    """(rows, note) for every kernel of csrc/*.cu; rows are empty and the note says why when the
    toolkit or the sources are missing."""
    home = cuda_home()
    if home is None:
        return [], "nvcc not found (set CUDA_HOME to a CUDA toolkit): CUDA kernels not audited"
    sources = sorted((ROOT / "csrc").glob("*.cu"))
    if not sources:
        return [], "no csrc/*.cu next to the package (installed without sources): CUDA kernels not audited"
    try:
        from torch.utils.cpp_extension import include_paths
    except ImportError:
        return [], "torch is not importable: CUDA kernels not audited"
    incs = list(include_paths())
    rows: list[AuditRow] = []
    notes = []
    cuobjdump = shutil.which("cuobjdump", path=str(home / "bin")) or _triton_tool("cuobjdump")
    arch = f"sm_{machine.capability}a" if machine.capability >= 90 else f"sm_{machine.capability}"
    with tempfile.TemporaryDirectory() as tmp:
        stub = Path(tmp) / "stub"
        if not any((Path(i) / "c10/cuda/impl/cuda_cmake_macros.h").exists() for i in incs):
            (stub / "c10/cuda/impl").mkdir(parents=True)
            macros = "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n"
            (stub / "c10/cuda/impl/cuda_cmake_macros.h").write_text(macros)
            incs = [str(stub), *incs]
            notes.append("CPU torch: stand-in c10/cuda/impl/cuda_cmake_macros.h")
        for src in sources:
            cubin = Path(tmp) / (src.stem + ".cubin")
            t0 = time.perf_counter()
            cmd = [str(home / "bin" / "nvcc"), "--cubin", f"-arch={arch}", "-Xptxas", "-v", "-std=c++17", "-O3",
                   "-w", *[f"-I{i}" for i in incs], f"-I{ROOT / 'csrc'}", str(src), "-o", str(cubin)]
            r = _run(cmd, cwd=tmp)
            secs = time.perf_counter() - t0
            if r.returncode != 0:
                err = next((ln for ln in (r.stderr + r.stdout).splitlines() if "error" in ln), r.stderr[-200:])
                rows.append(AuditRow(src.name, "", "cuda", "", error=f"nvcc failed: {err.strip()[:200]}",
                                     seconds=secs))
                continue
            parsed = parse_ptxas(r.stdout + r.stderr)
            funcs = split_sass(_run([cuobjdump, "-sass", str(cubin)]).stdout) if cuobjdump else {}
            nice = _demangle(list(parsed))
            for mangled, info in parsed.items():
                name, targ = _short_kernel_name(nice[mangled])
                st = sass_stats(funcs.get(mangled, []))
                row = AuditRow(name, f"{src.name} {targ}".strip(), "cuda", "", regs=info["regs"],
                               spill_stores=info["spill_stores"], spill_loads=info["spill_loads"], smem=info["smem"],
                               wgmma=st.wgmma, hmma=st.hmma, async_copies=st.async_copies, tma=st.tma,
                               dot_loops=st.dot_loops, pipelined_loops=st.pipelined_loops,
                               double_buffered_loops=st.double_buffered_loops, seconds=secs)
                row.ctas_per_sm = occupancy(row.regs, row.smem, 128, machine)
                row.notes = "CTAs/SM assumes 128 threads" + (
                    "; " + "; ".join(st.loop_notes) if st.pipelined_loops < st.dot_loops else "")
                rows.append(row)
    return rows, "; ".join(notes)


# =====================================================================================
# The tool
# =====================================================================================
_WORKER_SPECS: list[AuditSpec] = []


def _worker_init(include_autotune: bool, full: bool) -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    _WORKER_SPECS[:] = collect_specs(include_autotune, full)


def _worker_compile(args: tuple[int, str]) -> AuditRow:
    i, arch = args
    return audit_spec(_WORKER_SPECS[i], ARCHS[arch])


def compile_all(specs: Sequence[AuditSpec], arch: str = "sm_90", jobs: int = 1,
                progress: Callable[[str], None] | None = None, include_autotune: bool = True,
                full: bool = True) -> list[AuditRow]:
    """Rows of ``specs`` (= collect_specs(include_autotune, full)), compiled by ``jobs`` worker
    processes (each rebuilds the same spec list and compiles by index) or in this process."""
    machine = ARCHS[arch]
    rows: list[AuditRow] = []

    def report(i, row):
        if progress:
            progress(f"[{i + 1}/{len(specs)}] {row.kernel} {row.config} {row.seconds:.1f}s")

    if jobs <= 1 or len(specs) < 2:
        with _compiled_mode():
            for i, s in enumerate(specs):
                rows.append(audit_spec(s, machine))
                report(i, rows[-1])
        return rows
    import concurrent.futures
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited Triton state
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init,
                                                initargs=(include_autotune, full)) as pool:
        for i, row in enumerate(pool.map(_worker_compile, [(i, arch) for i in range(len(specs))])):
            spec = specs[i]
            rows.append(dataclasses.replace(row, variant=spec.variant, origin="pinned" if spec.pinned else "autotune"))
            report(i, rows[-1])
    return rows


def run_audit(arch: str = "sm_90", include_autotune: bool = True, include_cuda: bool = True, jobs: int = 1,
              progress: Callable[[str], None] | None = None, full: bool = True) -> tuple[list[AuditRow], list[str]]:
    """(rows, notes): every Triton spec (``full=False``: the modules' short lists), then every
    CUDA kernel."""
    notes: list[str] = []
    rows: list[AuditRow] = []
    try:
        import triton  # noqa: F401
    except ImportError:
        notes.append("Triton is not installed: Triton kernels not audited")
    else:
        with _compiled_mode():
            specs = collect_specs(include_autotune, full)
        rows = compile_all(specs, arch, jobs, progress, include_autotune, full)
    if include_cuda:
        crow, note = audit_cuda(ARCHS[arch])
        rows.extend(crow)
        if note:
            notes.append(note)
    return rows, notes


def _fmt_bytes(n: int) -> str:
    return f"{n / 1024:.1f} KB" if n else "0"


def markdown_table(rows: list[AuditRow]) -> str:
    head = ("| kernel | origin | config | variant | regs | spills (st+ld B) | smem | CTAs/SM | wgmma | wait_group | "
            "async copies | pipelined | persistent |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        r = dataclasses.replace(r, variant=r.variant.replace("|", "/"))  # markdown cells
        if r.error:
            lines.append(f"| {r.kernel} | {r.origin} | {r.config} | {r.variant} | error: {r.error} ||||||||||")
            continue
        mma = f"{r.wgmma}" + (f" (+{r.hmma} HMMA)" if r.hmma else "")
        cp = f"{r.async_copies}" + (f" ({r.tma} TMA)" if r.tma else "")
        wait = "-" if r.wgmma_wait < 0 else (str(r.wgmma_wait) if r.wgmma_wait == r.wgmma_wait_max
                                              else f"{r.wgmma_wait}-{r.wgmma_wait_max}")
        lines.append(f"| {r.kernel} | {r.origin} | {r.config} | {r.variant} | {r.regs} | "
                     f"{r.spill_stores}+{r.spill_loads} | {_fmt_bytes(r.smem)} | {r.ctas_per_sm} | {mma} | "
                     f"{wait} | {cp} | "
                     f"{r.pipelined} | {'yes' if r.persistent else 'no'} |")
    return head + "\n".join(lines) + "\n"


def summary_table(rows: list[AuditRow]) -> str:
    """Per kernel (and origin): ranges over its configs."""
    groups: dict[tuple[str, str], list[AuditRow]] = {}
    for r in rows:
        groups.setdefault((r.kernel, r.origin), []).append(r)

    def rng(vals):
        lo, hi = min(vals), max(vals)
        return f"{lo}" if lo == hi else f"{lo}-{hi}"

    out = ["| kernel | origin | configs | regs | max spills (B) | smem (KB) | CTAs/SM | wgmma | wait_group | "
           "async copies (TMA) | K-loops pipelined | persistent |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (k, o), rs in groups.items():
        ok = [r for r in rs if not r.error]
        if not ok:
            out.append(f"| {k} | {o} | {len(rs)} | error ||||||| ")
            continue
        loops = sum(r.dot_loops for r in ok)
        piped = sum(r.pipelined_loops for r in ok)
        dbuf = sum(r.double_buffered_loops for r in ok)
        waits = [r.wgmma_wait for r in ok if r.wgmma_wait >= 0]
        pers = sum(r.persistent for r in ok)
        out.append(f"| {k} | {o} | {len(rs)}{' (' + str(len(rs) - len(ok)) + ' failed)' if len(ok) < len(rs) else ''}"
                   f" | {rng([r.regs for r in ok])} | {max(r.spills for r in ok)} | "
                   f"{rng([round(r.smem / 1024, 1) for r in ok])} | {rng([r.ctas_per_sm for r in ok])} | "
                   f"{rng([r.wgmma for r in ok])} | {rng(waits) if waits else '-'} | "
                   f"{rng([r.async_copies for r in ok])} ({rng([r.tma for r in ok])}) | "
                   f"{piped}/{loops}{f' ({dbuf} double-buffered)' if dbuf else ''} | {pers}/{len(ok)} |")
    return "\n".join(out) + "\n"


def _versions() -> str:
    parts = [f"Python {sys.version.split()[0]}"]
    try:
        import triton

        parts.append(f"Triton {triton.__version__}")
    except ImportError:
        pass
    try:
        import torch

        parts.append(f"torch {torch.__version__}")
    except ImportError:
        pass
    p = ptxas_path(90)
    if p:
        v = _run([p, "--version"]).stdout.strip().splitlines()
        parts.append(f"ptxas {v[-1] if v else '?'}")
    home = cuda_home()
    if home:
        v = _run([str(home / "bin" / "nvcc"), "--version"]).stdout.strip().splitlines()
        parts.append(f"nvcc {v[-1] if v else '?'}")
    return "; ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kind_fast.perf.audit", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="sm_90", choices=sorted(ARCHS))
    ap.add_argument("--pinned-only", action="store_true", help="skip configs only reachable through autotuning")
    ap.add_argument("--no-cuda", action="store_true", help="skip the CUDA kernels of csrc/")
    ap.add_argument("--markdown", metavar="PATH", help="also write the report as Markdown (e.g. "
                    "bench/results/static_sm90.md)")
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1,
                    help="compile in this many processes (default: one per CPU core)")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    progress = None if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    rows, notes = run_audit(args.arch, include_autotune=not args.pinned_only, include_cuda=not args.no_cuda,
                            jobs=args.jobs, progress=progress)
    elapsed = time.perf_counter() - t0
    bad = [r for r in rows if r.origin != "cuda" and problem(r, ARCHS[args.arch])]
    problems = "".join(f"- {r.kernel} {r.config} ({r.variant}): {problem(r, ARCHS[args.arch])}\n" for r in bad)
    text = (f"# Static kernel audit, {args.arch} (ahead-of-time compilation, no GPU)\n\n"
            f"Generated by `python -m kind_fast.perf.audit --arch {args.arch}"
            f"{' --pinned-only' if args.pinned_only else ''}{' --no-cuda' if args.no_cuda else ''}` "
            f"in {elapsed:.0f} s on {os.cpu_count()} CPU cores, {args.jobs} processes (Triton's on-disk compile "
            f"cache reused where present; {_versions()}).\n"
            "Columns: see `kind_fast/perf/audit.py`. smem limit per block on sm_90: 227 KB. "
            "Async copies and wgmma are static SASS instruction counts. A K-loop is pipelined when "
            "asynchronous copies stay in flight across its back-edge (no full wait inside); a "
            "double-buffered loop (it copies the next step during this step's MMAs, then waits for "
            "every copy once per step) reads NO (... double-buffered). The tests assert the rules for "
            "the Triton configs; the CUDA rows (csrc/) are reported.\n\n"
            "## Summary per kernel\n\n" + summary_table(rows) +
            "\n## Every config\n\n" + markdown_table(rows) +
            ("\n## Notes\n\n" + "\n".join(f"- {n}" for n in notes) + "\n" if notes else "") +
            ("\n## Problems\n\n" + problems if bad else
             "\nEvery Triton config: 0 spill bytes, shared memory within the limit, wgmma in every kernel "
             "with a dot, every K-loop pipelined.\n"))
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
