"""Guarded loading of the optional compiled extension ``kind_fast._C`` (csrc/).

Nothing here runs at ``import kind_fast``. The first caller that asks (the backend registry,
``python -m kind_fast.info``) triggers one load attempt; a missing extension is a reason string,
a broken one is additionally one warning (never an ImportError). Set
``KIND_FAST_DISABLE_CUDA_EXT=1`` to never load it.

Where ``pip install`` did not build it, ``KIND_FAST_CUDA_JIT=1`` compiles csrc/ on first use
with ``torch.utils.cpp_extension.load`` (a source checkout, a CUDA-enabled torch, nvcc and
ninja needed; cached in ``TORCH_EXTENSIONS_DIR``; a few minutes the first time).

"Broken" covers: the import itself fails (missing CUDA libraries, undefined symbols), the
extension was built against another torch minor version (its C++ ABI is not stable), or it
imported but did not register its ops.

The torch version check happens twice. ``setup.py`` records the torch it built against in
``kind_fast/_build_info.py`` (``TORCH_VERSION``); that record is compared with the running torch
*before* ``kind_fast._C`` is imported, so a mismatched build is refused without loading it (a
mismatched binary can fail in obscure ways, or crash, at import). The extension's own
``TORCH_VERSION`` constant is checked again after import (builds without the record: JIT).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from types import ModuleType

_state: dict = {}

EXPECTED_OPS = ("kind_linear_cuda", "kind_linear_cuda_backward", "kind_linear_cuda_merged",
                "kind_linear_cuda_merged_gemm", "kind_linear_cuda_merged_gemm_backward")


def arch_names(arch_list: str) -> str:
    """nvcc's __CUDA_ARCH_LIST__ ("800,900") as "sm_80, sm_90" (other text unchanged)."""
    parts = [p.strip() for p in str(arch_list).split(",")]
    if parts and all(p.isdigit() for p in parts):
        return ", ".join(f"sm_{int(p) // 10}" for p in parts)
    return str(arch_list)


def _minor(version: str) -> tuple[str, ...]:
    return tuple(version.split("+")[0].split(".")[:2])


def _mismatch(built: str | None) -> str | None:
    import torch

    if built is not None and _minor(built) != _minor(torch.__version__):
        return (f"it was built against torch {built} but torch {torch.__version__} is running "
                "(rebuild: pip install --no-build-isolation .)")
    return None


def _check_build_info() -> str | None:
    """None when kind_fast/_build_info.py (written by setup.py next to the build) matches the
    running torch, or is absent; else why the build must not be loaded."""
    try:
        info = importlib.import_module("kind_fast._build_info")
    except ImportError:
        return None
    return _mismatch(getattr(info, "TORCH_VERSION", None))


def _check_loaded(mod: ModuleType) -> str | None:
    """None when the loaded extension is usable, else why not."""
    import torch

    problem = _mismatch(getattr(mod, "TORCH_VERSION", None))
    if problem is not None:
        return problem
    missing = [op for op in EXPECTED_OPS if not hasattr(torch.ops.kind_fast, op)]
    if missing:
        return f"it did not register the ops {missing}"
    return None


def load_extension() -> tuple[ModuleType | None, str]:
    """(module or None, human-readable status). Cached after the first call."""
    if "result" in _state:
        return _state["result"]
    if os.environ.get("KIND_FAST_DISABLE_CUDA_EXT", "") == "1":
        result = (None, "disabled by KIND_FAST_DISABLE_CUDA_EXT=1")
    elif importlib.util.find_spec("kind_fast._C") is None:
        if os.environ.get("KIND_FAST_CUDA_JIT", "") == "1":
            result = _jit_build()
        else:
            result = (None, "not built (install with a CUDA-enabled torch and nvcc, or set KIND_FAST_CUDA_JIT=1: "
                            "see README, 'CUDA extension')")
    else:
        mod, problem = None, _check_build_info()  # refused before import when built for another torch
        if problem is None:
            try:
                mod = importlib.import_module("kind_fast._C")
                problem = _check_loaded(mod)
            except Exception as e:  # noqa: BLE001 - any load failure becomes a reason, never an ImportError
                mod, problem = None, f"{type(e).__name__}: {e}"
        if problem is None:
            result = (mod, "loaded")
        else:
            reason = f"built but unusable: {problem}"
            warnings.warn(f"kind_fast: the CUDA extension kind_fast._C is {reason}; "
                          "falling back to the torch/Triton backends", RuntimeWarning, stacklevel=2)
            result = (None, reason)
    _state["result"] = result
    return result


def _jit_build() -> tuple[ModuleType | None, str]:
    """Compile csrc/ now (KIND_FAST_CUDA_JIT=1); (module, "loaded (JIT)") or (None, why not)."""
    from pathlib import Path

    import torch

    csrc = Path(__file__).resolve().parents[1] / "csrc"
    sources = sorted(str(p) for p in (*csrc.glob("*.cu"), *csrc.glob("*.cpp")))
    if not sources:
        return None, f"not built, and KIND_FAST_CUDA_JIT=1 needs the csrc/ sources of a source checkout ({csrc})"
    if torch.version.cuda is None:
        return None, f"not built, and KIND_FAST_CUDA_JIT=1 needs a CUDA-enabled torch (this is {torch.__version__})"
    try:
        from torch.utils.cpp_extension import load

        root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                       "torch_extensions")
        build = os.path.join(root, f"kind_fast_C_{torch.__version__}")
        os.makedirs(build, exist_ok=True)
        # the module's init function is PyInit__C, so the extension is named _C
        mod = load(name="_C", sources=sources, extra_include_paths=[str(csrc)],
                   extra_cuda_cflags=["-O3", "-lineinfo"], build_directory=build, verbose=False)
        problem = _check_loaded(mod)
    except Exception as e:  # noqa: BLE001 - a failed build is a reason, never an ImportError
        problem = f"{type(e).__name__}: {e}"
    if problem is not None:
        reason = f"JIT build (KIND_FAST_CUDA_JIT=1) failed: {problem}"
        warnings.warn(f"kind_fast: {reason}; falling back to the torch/Triton backends", RuntimeWarning, stacklevel=3)
        return None, reason
    return mod, "loaded (JIT-compiled from csrc/)"
