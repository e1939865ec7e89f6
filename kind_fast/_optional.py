"""Optional dependencies: check them before work starts and say in one line what to install."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping

__all__ = ["available", "missing"]


def available(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a missing parent package, or sys.modules[module] is None
        return False


def missing(requirements: Mapping[str, str]) -> list[str]:
    """pip names of the requirements ({import name: pip name}) that cannot be imported."""
    return [pip for module, pip in requirements.items() if not available(module)]
