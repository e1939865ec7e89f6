"""Deployment benchmarks: one CFG sampling step of the exports and of a mixed-task batch.

Rows, interleaved in one process (medians), each one guided denoising evaluation of
``batch`` images of one class (2·batch rows: the class, then the null label):

    dense     the dense DiT of the same size (``kind=None``): the ceiling
    kind      the KIND-DiT (W_G cached, the gathered tailor term per row)
    merged    ``DiT.export([c], "merged")``: one dense weight per served label, segmented GEMM
              (plain PyTorch: one GEMM per label present; a CFG batch has two)
    reduced   ``DiT.export([c], "reduced")``: W_G + the class's tailors through ``kind_linear``
    tasks3    ``MultiTaskDiT`` of 3 tasks, the batch spread over the tasks (one ``kind_linear``
              call per layer over the stacked banks, per-sample heads) — against ``kind``

Sizes as ``bench_model_step.py``: CPU DiT-S/2 at depth 2, batch 4, fp32; GPU S/B/L/XL /2 at
full depth, batch 32, bf16 weights (no autocast: the merged weights are stored in bf16).
``extra_info``: ``step_ms`` per row and ``ratio_vs_dense`` (``tasks3``: ``ratio_vs_kind``).
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import cpu_median, gpu_median, interleaved, requires_cuda, synced

from kind_fast.perf.benchmark import build_model
from kind_fast.deploy.tasks import MultiTaskDiT, task_state_dict

CPU_MODEL, CPU_DEPTH, CPU_BATCH = "DiT-S/2", 2, 4
GPU_MODELS, GPU_BATCH = ("DiT-S/2", "DiT-B/2", "DiT-L/2", "DiT-XL/2"), 32


def _cfg_step(model, x, t, y, null):
    x2, t2, y2 = torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])

    @torch.no_grad()
    def step():
        return model.forward_with_cfg(x2, t2, y2, 4.0) if hasattr(model, "forward_with_cfg") \
            else model(x2, t2, y2)

    return step


def _run(benchmark, name, *, device, depth, batch, dtype, timer):
    dense = build_model(name, "dense", device=device, depth=depth).to(dtype)
    kind = build_model(name, "kind", device=device, depth=depth).to(dtype)
    c = 3
    merged, reduced = kind.export([c], "merged"), kind.export([c], "reduced")
    tasks = [(f"t{k}", {"num_classes": kind.num_classes, "gate": kind.kind_gate.to_config()}, task_state_dict(kind))
             for k in range(3)]
    multi = MultiTaskDiT(kind, tasks)
    g = torch.Generator().manual_seed(0)
    a = kind.arch
    x = torch.randn(batch, a["in_channels"], a["input_size"], a["input_size"], generator=g).to(device, dtype)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    y = torch.full((batch,), c, device=device)
    null = torch.full_like(y, kind.num_classes)
    task_of = torch.arange(batch, device=device) % 3
    y_multi = multi.label_offset[task_of] + c
    steps = {
        "dense": _cfg_step(dense, x, t, y, null),
        "kind": _cfg_step(kind, x, t, y, null),
        "merged": _cfg_step(merged, x, t, y, null),
        "reduced": _cfg_step(reduced, x, t, y, null),
        "tasks3": _cfg_step(multi, x, t, y_multi, multi.null_labels(y_multi)),
    }
    times = interleaved(steps, timer, rounds=3)
    info = {f"{k}_step_ms": v * 1e3 for k, v in times.items()}
    info.update({f"{k}_ratio_vs_dense": times[k] / times["dense"] for k in ("kind", "merged", "reduced")})
    info.update(tasks3_ratio_vs_kind=times["tasks3"] / times["kind"], model=name, depth=len(kind.blocks),
                batch=batch, dtype=str(dtype), device=str(device), torch=torch.__version__,
                threads=torch.get_num_threads())
    benchmark.extra_info.update(info)
    benchmark.pedantic(synced(steps["merged"], device), rounds=3, iterations=1, warmup_rounds=1)


@pytest.fixture
def cpu_threads():
    n = os.environ.get("KIND_FAST_BENCH_THREADS")
    if n:
        torch.set_num_threads(int(n))


def test_cpu_export_sampling(benchmark, cpu_threads):
    _run(benchmark, CPU_MODEL, device="cpu", depth=CPU_DEPTH, batch=CPU_BATCH, dtype=torch.float32,
         timer=lambda fn: cpu_median(fn, reps=5, warmup=1))


@requires_cuda
@pytest.mark.parametrize("name", GPU_MODELS)
def test_gpu_export_sampling(benchmark, name):
    _run(benchmark, name, device="cuda", depth=None, batch=GPU_BATCH, dtype=torch.bfloat16, timer=gpu_median)
