"""Guarded loading of the optional compiled extension ``kind_fast._C`` (csrc/).

Nothing here runs at ``import kind_fast``. The first caller that asks (the backend registry,
``python -m kind_fast.info``) triggers one load attempt; a missing extension is a reason string,
a broken one is additionally one warning. Set ``KIND_FAST_DISABLE_CUDA_EXT=1`` to never load it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from types import ModuleType

_state: dict = {}


def load_extension() -> tuple[ModuleType | None, str]:
    """(module or None, human-readable status). Cached after the first call."""
    if "result" in _state:
        return _state["result"]
    if os.environ.get("KIND_FAST_DISABLE_CUDA_EXT", "") == "1":
        result = (None, "disabled by KIND_FAST_DISABLE_CUDA_EXT=1")
    elif importlib.util.find_spec("kind_fast._C") is None:
        result = (None, "not built (install with a CUDA-enabled torch and nvcc: see README)")
    else:
        try:
            mod = importlib.import_module("kind_fast._C")
            result = (mod, "loaded")
        except Exception as e:  # noqa: BLE001 - any load failure becomes a reason, never an ImportError
            reason = f"built but failed to load: {type(e).__name__}: {e}"
            warnings.warn(f"kind_fast: the CUDA extension kind_fast._C {reason}; "
                          "falling back to the torch/Triton backends", RuntimeWarning, stacklevel=2)
            result = (None, reason)
    _state["result"] = result
    return result
