"""How many torch CPU threads a command uses (``--threads``; 0 = choose).

At the sizes this package trains on a CPU (the demo's DiT, DiT-S/2 on a laptop) every op is
small and torch's intra-op pool meets at a barrier after each one. When the machine's cores are
already busy, a pool thread that is descheduled holds that barrier for a scheduler time slice,
and each of the thousands of ops per step waits for it. Measured on the 2-core CPU VM (torch
2.13.0+cpu, the demo's model, ``kind-fast transfer --method lora``, another process keeping one
core busy, load average about 3.7): 15-19 img/s with torch's default of 2 threads, 1,340-1,480
img/s with 1 thread; the losses were bit-identical between 1 and 2 threads at that size.

So ``choose`` takes torch's own count on an idle machine, and fewer threads when the load
average already occupies half the cores or more: the cores the load leaves free, at least one.
An explicit request, or ``OMP_NUM_THREADS`` in the environment, is followed as given. The thread
count can change the last bits of CPU results at larger sizes (how an op splits its work), so a
run that must resume bit-exactly on a busy machine should pin ``--threads``.
"""

from __future__ import annotations

import math
import os

import torch

__all__ = ["check", "choose", "apply"]


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):  # no load average on this platform
        return None


def check(requested: int) -> None:
    """ValueError unless ``requested`` is a thread count or 0 (choose)."""
    if requested < 0:
        raise ValueError(f"--threads must be >= 0 (0: choose), got {requested}")


def choose(requested: int = 0) -> tuple[int, str]:
    """(threads, why): ``requested`` if > 0; torch's count if ``OMP_NUM_THREADS`` is set or the
    machine is idle; else the cores the 1-minute load average leaves free (at least 1)."""
    check(requested)
    default = torch.get_num_threads()
    if requested:
        return requested, "as requested"
    if os.environ.get("OMP_NUM_THREADS"):
        return default, "OMP_NUM_THREADS"
    cores, load = _cores(), _load()
    if load is None or load < 0.5 * cores:
        return default, "torch's default"
    free = max(1, cores - math.ceil(load - 0.25))
    n = min(default, free)
    return n, (f"load average {load:.1f} on {cores} cores: more threads would wait on each other; "
               "--threads N to choose")


def apply(requested: int, device: torch.device | str) -> str | None:
    """Set torch's CPU threads for a command running on ``device``; the line to print, or None
    (not on the CPU: nothing changes)."""
    if torch.device(device).type != "cpu":
        return None
    n, why = choose(requested)
    torch.set_num_threads(n)
    return f"CPU: {n} torch thread{'s' if n != 1 else ''} ({why})"
