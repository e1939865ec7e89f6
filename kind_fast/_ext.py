"""Guarded loading of the optional compiled extension ``kind_fast._C`` (csrc/).

Nothing here runs at ``import kind_fast``. The first caller that asks (the backend registry,
``python -m kind_fast.info``) triggers one load attempt; a missing extension is a reason string,
a broken one is additionally one warning (never an ImportError). Set
``KIND_FAST_DISABLE_CUDA_EXT=1`` to never load it.

"Broken" covers: the import itself fails (missing CUDA libraries, undefined symbols), the
extension was built against another torch minor version (its C++ ABI is not stable), or it
imported but did not register its ops.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from types import ModuleType

_state: dict = {}

EXPECTED_OPS = ("kind_linear_cuda", "kind_linear_cuda_backward", "kind_linear_cuda_merged")


def _minor(version: str) -> tuple[str, ...]:
    return tuple(version.split("+")[0].split(".")[:2])


def _check_loaded(mod: ModuleType) -> str | None:
    """None when the loaded extension is usable, else why not."""
    import torch

    built = getattr(mod, "TORCH_VERSION", None)
    if built is not None and _minor(built) != _minor(torch.__version__):
        return (f"it was built against torch {built} but torch {torch.__version__} is running "
                "(rebuild: pip install --no-build-isolation .)")
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
        result = (None, "not built (install with a CUDA-enabled torch and nvcc: see README, 'CUDA extension')")
    else:
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
