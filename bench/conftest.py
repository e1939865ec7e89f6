"""Shared pieces of the pytest-benchmark suites (``pytest bench/``).

Timing rules (docs/design.md §6, §8): every ratio compares implementations measured in one process on
one device, interleaved, each timed as a median; GPU timings use device events through
``triton.testing.do_bench``. Ratios and TFLOP/s go into ``benchmark.extra_info``.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch

# (in_features, out_features) of the token-wise DiT linears, named after their layers
DIT_WIDTHS = {"S": 384, "B": 768, "L": 1024, "XL": 1152}


def dit_layer_shapes(size: str) -> dict[str, tuple[int, int]]:
    d = DIT_WIDTHS[size]
    return {
        f"DiT-{size}/2.qkv": (d, 3 * d),
        f"DiT-{size}/2.proj": (d, d),
        f"DiT-{size}/2.fc1": (d, 4 * d),
        f"DiT-{size}/2.fc2": (4 * d, d),
    }


def cpu_median(fn, reps: int = 7, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in seconds (CPU: ops are synchronous)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gpu_median(fn) -> float:
    """Median time of ``fn()`` in seconds, with device events (triton.testing.do_bench)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3


def interleaved(fns: dict, timer, rounds: int = 3) -> dict[str, float]:
    """Best-of-``rounds`` of each timer result, with the implementations interleaved so slow
    drift of the machine (other load, clocks) hits all of them alike."""
    best = {k: float("inf") for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            best[k] = min(best[k], timer(fn))
    return best


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _threads():
    """Pin CPU threads so numbers from one run compare with each other."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
