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


def cpu_clock():
    """The CPU benchmarks' clock: wall time (``time.perf_counter``), or with
    ``KIND_FAST_BENCH_CLOCK=thread`` this thread's CPU time (``time.thread_time``: on a machine
    shared with other jobs, waiting for a core does not count; meaningful with one torch thread)."""
    import os

    clock = os.environ.get("KIND_FAST_BENCH_CLOCK", "wall")
    if clock not in ("wall", "thread"):
        raise ValueError(f"KIND_FAST_BENCH_CLOCK must be wall or thread, got {clock!r}")
    return time.thread_time if clock == "thread" else time.perf_counter


def cpu_median(fn, reps: int = 7, warmup: int = 2) -> float:
    """Median time of ``fn()`` in seconds (CPU: ops are synchronous), on ``cpu_clock()``."""
    clock = cpu_clock()
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return statistics.median(times)


def gpu_median(fn) -> float:
    """Median time of ``fn()`` in seconds, with device events (triton.testing.do_bench)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3


def synced(fn, device):
    """``fn`` followed by a device synchronisation where the device is a GPU: what
    ``benchmark.pedantic`` must time (CUDA calls return before the work is done)."""
    if torch.device(device).type != "cuda":
        return fn

    def run():
        fn()
        torch.cuda.synchronize()

    return run


def interleaved(fns: dict, timer, rounds: int = 3) -> dict[str, float]:
    """Best-of-``rounds`` of each timer result, with the implementations interleaved so slow
    drift of the machine (other load, clocks) hits all of them alike."""
    best = {k: float("inf") for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            best[k] = min(best[k], timer(fn))
    return best


def paired(fns: dict, timer, rounds: int = 7) -> dict[str, list[float]]:
    """Every round times each implementation once, back to back (order alternating between
    rounds), so each round is a pair measured under the same machine load. Returns the times
    of every round per implementation: report the median of the per-round ratios and their
    spread, never a ratio of times from different rounds."""
    out: dict[str, list[float]] = {k: [] for k in fns}
    keys = list(fns)
    for r in range(rounds):
        for k in (keys if r % 2 == 0 else keys[::-1]):
            out[k].append(timer(fns[k]))
    return out


def pair_stats(times: dict[str, list[float]], key: str, base: str) -> dict:
    """Median and spread (min, max) of ``key``'s time, ``base``'s time and their per-round ratio."""
    ratios = [a / b for a, b in zip(times[key], times[base])]
    med = statistics.median
    return dict(ms=med(times[key]) * 1e3, ms_min=min(times[key]) * 1e3, ms_max=max(times[key]) * 1e3,
                base_ms=med(times[base]) * 1e3, base_ms_min=min(times[base]) * 1e3,
                base_ms_max=max(times[base]) * 1e3, ratio=med(ratios), ratio_min=min(ratios),
                ratio_max=max(ratios), rounds=len(ratios))


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none): other processes on the machine."""
    try:
        import os

        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _weight_cache(request):
    """Benchmarks run inside ``kind_fast.weight_cache()``, as the trainer (while learngenes are
    frozen) and the sampler do (kind_fast.nn.caching), except tests parametrized with
    ``scope="outside"``: a drop-in layer in a user's own loop (W_G is still kept while the
    learngenes are frozen)."""
    from kind_fast.nn.caching import weight_cache

    params = getattr(getattr(request.node, "callspec", None), "params", {})
    if params.get("scope") == "outside":
        yield
        return
    with weight_cache():
        yield


@pytest.fixture(autouse=True)
def _threads():
    """Pin CPU threads so numbers from one run compare with each other: KIND_FAST_BENCH_THREADS=N
    sets N for every benchmark (1 on a shared machine, and with KIND_FAST_BENCH_CLOCK=thread)."""
    import os

    n = torch.get_num_threads()
    want = os.environ.get("KIND_FAST_BENCH_THREADS")
    if want:
        torch.set_num_threads(int(want))
    yield
    torch.set_num_threads(n)
