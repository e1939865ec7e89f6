"""The measurements of the GPU check (bench/gpu_check.sh runs this; docs/design.md §6).

Sections (each one process; every ratio is measured in that process, interleaved, as the best
of per-round medians; GPU times with device events through ``triton.testing.do_bench``):

    layers     DiT-XL/2 layer passes in bf16, K = 32 of 96 tailors, T = 256 rows per sample,
               M = 8192 and 65536 tokens: forward (fc2 forward included), transfer fwd+bwd
               (learngenes frozen: dX, dU_T, dV_T, dσ_T; fc1 dX included; inside a
               kind_fast.weight_cache() scope, as a transfer step runs: W_G built once),
               pretrain fwd+bwd (W_G rebuilt and differentiated every call). Gradients are set
               to None before every backward, as zero_grad(set_to_none=True) leaves them.
               q, k, v and proj are one shape (1152 -> 1152), so one row stands for the four.
               Implementations: F.linear / nn.Linear (the ceiling), the Triton backend, the
               unfused reference and (on a few rows) its torch.compile. First, the Triton
               backend's GPU self-check per dtype (it includes the production configs a DiT
               layer launches: T = 256, one-class 128-row tiles, N-groups >= 2, KP 32/64/128,
               M1 and M2; kind_fast/ops/self_check.py).
    steps      one DiT-XL/2 training step (forward, ε-loss, backward, AdamW; batch 32, bf16
               autocast): full fine-tuning, KIND transfer (inside kind_fast.nn.caching.training_scope,
               as the trainer runs it: W_G reused while the learngenes are frozen), KIND
               pretrain; time and peak memory.
    sampling   one guided DiT-XL/2 sampling step: the sampler's model call
               (kind_fast.train.sampling.cfg_model_fn) on 32 images of one class + their null
               rows, bf16 weights. Dense DiT vs KIND-DiT inside kind_fast.nn.utils.serving(model,
               {c, null}) as sample_chunks runs it: the op family's cost model picks each
               layer's path and backend ("auto"; recorded: M3 on merged weights cached by the
               first call is expected) and KIND-DiT with force_path("M1") beside it; M3's output
               against M1's; the CUDA-graph replays of both steps (what the sampler runs on a GPU).
    cuda       the CUDA extension's backend (csrc/): its self-check; path M3 on CFG layer batches
               through the op family (cached merged weights, MERGED_GEMM_OP: one cuBLAS GEMM per
               run of samples from host slots; beside it the whole-path op merging per call); the
               sampling step above with every KIND layer on this backend; its M1 against F.linear
               and the reference on the layer rows.

Beside every measured goal ratio the summary prints the time model's prediction for it
(MODELLED, bench/results/model_dit_xl.json from ``python -m kind_fast.perf.timemodel --json``), so the
first GPU run calibrates the model.

Goals (docs/design.md §6), recorded per row as [value, target, met]:
    forward   t / t(F.linear) <= 1.10 · (1 + K/in + K/out)
    transfer  t / t(nn.Linear fwd+bwd) <= 0.80 (min(in, out) >= 768)
    pretrain  t / t(nn.Linear fwd+bwd) <= 1.20
    steps     transfer step <= 0.80 × full fine-tuning time and <= 0.75 × its peak memory;
              pretrain step <= 1.20 × full fine-tuning
    sampling  KIND-DiT step with M3 <= 1.05 × the dense DiT step (M1 reported beside it), on
              "auto" (section sampling) and on the CUDA backend (section cuda)
    M3 layer  t(M3, cached weights, CUDA backend) <= 1.05 × t(F.linear)

Every section stops starting new rows when ``--deadline`` (epoch seconds) is near, and records
the rows it skipped with the reason. ``--dry-run`` runs every section on the CPU with tiny
shapes, float32 and the reference backend (what the fused backends would run is then skipped
with its reason): the test suite runs it so that this script is known to work before a GPU
sees it. ``--summarize DIR`` merges DIR's section files into results.json and summary.md and
prints the ratio table (last).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

D_XL, N_T, K_ACTIVE, CLASSES, TOKENS = 1152, 96, 32, 10, 256
GOAL_TRANSFER, GOAL_PRETRAIN, GOAL_STEP_TIME, GOAL_STEP_MEM = 0.80, 1.20, 0.80, 0.75
GOAL_PRETRAIN_STEP, GOAL_SAMPLING, GOAL_M3 = 1.20, 1.05, 1.05
SECTIONS = ("layers", "steps", "sampling", "cuda")


# =====================================================================================
# Configuration: the real check or the CPU dry run
# =====================================================================================
class Config:
    def __init__(self, dry_run: bool):
        self.dry = dry_run
        if dry_run:
            self.device, self.dtype = torch.device("cpu"), torch.float32
            self.d, self.n_t, self.k, self.tokens = 32, 8, 2, (256, 512)
            self.rounds, self.reps = 1, 1
            self.model, self.depth, self.input_size, self.batch = "DiT-S/2", 1, 8, 2
            self.compile_rows = ()  # torch.compile on 2 CPU cores costs more than the whole dry run
        else:
            self.device, self.dtype = torch.device("cuda"), torch.bfloat16
            self.d, self.n_t, self.k, self.tokens = D_XL, N_T, K_ACTIVE, (8192, 65536)
            self.rounds, self.reps = 2, 5
            self.model, self.depth, self.input_size, self.batch = "DiT-XL/2", None, 32, 32
            # torch.compile of the reference costs a compile per row: only these rows time it
            self.compile_rows = (("fc1", 8192, "forward"), ("fc1", 8192, "transfer"))
        d = self.d
        self.layers = {"q,k,v,proj": (d, d), "fc1": (d, 4 * d), "fc2": (4 * d, d)}
        self.prefix = "DiT-XL/2" if not dry_run else "dry-run"


def timer(cfg: Config):
    """Seconds per call of fn (median): device events on a GPU, perf_counter on the CPU."""
    if cfg.device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e-3

    def cpu(fn, reps=cfg.reps):
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    return cpu


def interleaved(fns: dict, time_one, rounds: int) -> dict:
    best = {k: float("inf") for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            best[k] = min(best[k], time_one(fn))
    return best


def sync(cfg: Config) -> None:
    if cfg.device.type == "cuda":
        torch.cuda.synchronize()


def free(cfg: Config) -> None:
    gc.collect()
    if cfg.device.type == "cuda":
        torch.cuda.empty_cache()


def backend_ready(name: str, cfg: Config) -> tuple[bool, str]:
    """(ready, why not) for a fused backend on this device and dtype."""
    import kind_fast as kf

    if cfg.device.type != "cuda":
        return False, f"the {name} backend runs CUDA tensors only (dry run on the CPU)"
    ok, why = kf.ops.backends.backend_status()[name]
    return (ok, "" if ok else why)


class Deadline:
    def __init__(self, deadline: float | None, name: str):
        self.t, self.name = deadline, name

    def left(self) -> float:
        return float("inf") if self.t is None else self.t - time.time()

    def over(self, need: float = 0.0) -> bool:
        return self.left() < need


# =====================================================================================
# Layers
# =====================================================================================
def make_layer(cfg: Config, n_in: int, n_out: int, m: int, mode: str, labels=None, seed: int = 0):
    """(layer, nn.Linear, x, labels, grad_y) for one row."""
    import kind_fast as kf

    gen = torch.Generator(device=cfg.device).manual_seed(seed)  # drawn on the device: no host copies
    gate = kf.ClassGate.block(CLASSES, cfg.n_t, cfg.k)
    # built on the device (its float64 SVD init too: seconds on the CPU at DiT-XL/2 widths)
    layer = kf.FastKindLinear(n_in, n_out, tailor_rank=cfg.n_t, gate=gate, device=cfg.device,
                              dtype=cfg.dtype).to(cfg.device)
    lin = torch.nn.Linear(n_in, n_out, device=cfg.device, dtype=cfg.dtype)
    b = m // TOKENS
    x = torch.randn(b, TOKENS, n_in, generator=gen, device=cfg.device, dtype=cfg.dtype)
    if labels is None:
        labels = torch.randint(0, CLASSES, (b,), generator=gen, device=cfg.device)
    labels = labels.to(cfg.device)
    g = torch.randn(b, TOKENS, n_out, generator=gen, device=cfg.device, dtype=cfg.dtype)
    if mode == "transfer":
        layer.freeze_learngenes()
    if mode in ("transfer", "pretrain"):
        x.requires_grad_(True)
    return layer, lin, x, labels, g


def run_fns(cfg, layer, lin, x, labels, g, mode, impls):
    """name -> zero-argument callable for each implementation of one row. Gradients are set to
    None before each backward (as a training step's zero_grad(set_to_none=True) leaves them), so
    no call pays for accumulating into the last call's gradients."""
    import kind_fast as kf
    from kind_fast.perf.benchmark import make_reference_layer_step

    def fresh():
        x.grad = None
        layer.zero_grad(set_to_none=True)
        lin.zero_grad(set_to_none=True)

    def kind(backend):
        def run():
            with kf.use_backend(backend):
                if mode == "forward":
                    with torch.no_grad():
                        return layer(x, labels=labels)
                fresh()
                layer(x, labels=labels).backward(g)
        return run

    def linear():
        if mode == "forward":
            with torch.no_grad():
                return lin(x)
        fresh()
        lin(x).backward(g)

    fns = {"linear": linear}
    for name in impls:
        if name == "compiled":
            fns[name] = torch.compile(make_reference_layer_step(layer, x, labels, g, mode))
        else:
            fns[name] = kind({"reference": "torch"}.get(name, name))
    return fns


def layer_goals(cfg: Config, t: float, t_lin: float, n_in: int, n_out: int, mode: str) -> dict:
    r = t / t_lin
    if mode == "forward":
        target = 1.10 * (1 + cfg.k / n_in + cfg.k / n_out)
        return {"forward_vs_linear": [r, target, r <= target]}
    if mode == "transfer":
        return {"transfer_vs_linear": [r, GOAL_TRANSFER, r <= GOAL_TRANSFER]} if min(n_in, n_out) >= 768 else {}
    return {"pretrain_vs_linear": [r, GOAL_PRETRAIN, r <= GOAL_PRETRAIN]}


def self_check_rows(section: str, backend: str, cfg: Config) -> list[dict]:
    """The backend's one-time GPU self-check (kind_fast.ops.self_check: for Triton the production
    configs of a DiT layer too: T = 256, one-class 128-row tiles, several N-groups, KP 32/64/128,
    M1 and M2), run here per dtype and recorded (pass/fail and its message)."""
    import importlib

    rows = []
    ok, why = backend_ready(backend, cfg)
    for dt in (torch.bfloat16, torch.float16):
        row = {"section": section, "mode": "self-check", "backend": backend, "dtype": str(dt).replace("torch.", "")}
        rows.append(row)
        if not ok:
            row["skipped"] = f"{backend} backend: {why}"
            continue
        try:
            mod = importlib.import_module({"triton": "kind_fast.ops.kind_linear_triton",
                                           "cuda": "kind_fast.ops.kind_linear_cuda"}[backend])
            t0 = time.time()
            row["passed"], row["message"] = mod.self_check(cfg.device, dt)
            row["seconds"] = time.time() - t0
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        print(f"{section} {backend} self-check {row['dtype']}: " + (
            f"passed={row.get('passed')} {str(row.get('message', row.get('error', '')))[:100]}"), flush=True)
    return rows


def section_layers(cfg: Config, deadline: Deadline) -> list[dict]:
    import kind_fast as kf

    rows = self_check_rows("layers", "triton", cfg)
    tri_ok, tri_why = backend_ready("triton", cfg)
    primary = "triton" if tri_ok else ("reference" if cfg.dry else None)
    time_one = timer(cfg)
    for mode in ("forward", "transfer", "pretrain"):
        for lname, (n_in, n_out) in cfg.layers.items():
            for m in cfg.tokens:
                row = {"section": "layers", "shape": f"{cfg.prefix}.{lname}", "in": n_in, "out": n_out, "tokens": m,
                       "mode": mode, "dtype": str(cfg.dtype).replace("torch.", "")}
                rows.append(row)
                if deadline.over(8):
                    row["skipped"] = "over the time budget"
                    continue
                impls = (["triton"] if tri_ok else []) + ["reference"]
                if (lname, m, mode) in cfg.compile_rows and os.environ.get("KIND_FAST_BENCH_COMPILE", "1") != "0" \
                        and deadline.left() > 60:
                    impls.append("compiled")
                if not tri_ok:
                    row["triton"] = f"skipped: {tri_why}"
                try:
                    layer, lin, x, labels, g = make_layer(cfg, n_in, n_out, m, mode)
                    fns = run_fns(cfg, layer, lin, x, labels, g, mode, impls)
                    # a transfer step reuses W_G while the learngenes are frozen (the trainer's
                    # kind_fast.nn.caching.training_scope); pretraining rebuilds it every call
                    scope = kf.weight_cache() if mode == "transfer" else contextlib.nullcontext()
                    with scope:
                        for fn in fns.values():  # compile / autotune / warm up outside the timing
                            fn()
                        sync(cfg)
                        times = interleaved(fns, time_one, cfg.rounds)
                    for k, v in times.items():
                        row[f"t_{k}_ms"] = v * 1e3
                    if primary is not None:
                        row["primary"] = primary
                        row["goals"] = layer_goals(cfg, times[primary], times["linear"], n_in, n_out, mode)
                    row["reference_vs_linear"] = times["reference"] / times["linear"]
                    if "compiled" in times:
                        row["compiled_vs_linear"] = times["compiled"] / times["linear"]
                except Exception as e:  # noqa: BLE001 - a failed row is reported, the check goes on
                    row["error"] = f"{type(e).__name__}: {e}"
                    traceback.print_exc()
                finally:
                    layer = lin = x = g = fns = None
                    free(cfg)
                model = modelled(row, next(iter(row.get("goals") or {}), None))
                print(f"layers {row['shape']} M={m} {mode}: " + ", ".join(
                    f"{k[2:-3]} {v:.3f} ms" for k, v in row.items() if k.startswith("t_"))
                    + (f"; ratio {next(iter(row['goals'].values()))[0]:.3f}, MODELLED {model}" if model else ""),
                    flush=True)
    return rows


# =====================================================================================
# Model steps
# =====================================================================================
def section_steps(cfg: Config, deadline: Deadline) -> list[dict]:
    with contextlib.ExitStack() as scopes:
        return _section_steps(cfg, deadline, scopes)


def _section_steps(cfg: Config, deadline: Deadline, scopes: contextlib.ExitStack) -> list[dict]:
    from kind_fast.perf.benchmark import build_model, make_train_step
    from kind_fast.nn.caching import training_scope

    amp = torch.bfloat16 if cfg.device.type == "cuda" else None
    time_one = timer(cfg)
    rows, steps, before = [], {}, {}
    for mode in ("full_ft", "transfer", "pretrain"):
        row = {"section": "steps", "model": cfg.model, "mode": mode, "batch": cfg.batch}
        rows.append(row)
        if deadline.over(25):
            row["skipped"] = "over the time budget"
            continue
        try:
            mem0 = torch.cuda.memory_allocated() if cfg.device.type == "cuda" else 0
            model = build_model(cfg.model, mode, device=cfg.device, depth=cfg.depth, input_size=cfg.input_size)
            # W_G reused across steps while the learngenes are frozen, as the trainer runs a
            # transfer (kind_fast.nn.caching.training_scope; a no-op for the other modes)
            scopes.enter_context(training_scope(model))
            step, _ = make_train_step(model, cfg.batch, autocast=amp)
            for _ in range(1 if cfg.dry else 2):  # optimizer state allocated, kernels compiled
                step()
            sync(cfg)
            if cfg.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                step()
                sync(cfg)
                row["peak_mem_gib"] = (torch.cuda.max_memory_allocated() - mem0) / 2**30
            row["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
            steps[mode], before[mode] = step, mem0
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
    if steps and not deadline.over(5):
        step_timer = (lambda fn: _median_events(fn, cfg, cfg.reps)) if cfg.device.type == "cuda" else time_one
        times = interleaved(steps, step_timer, cfg.rounds)
        for row in rows:
            if row["mode"] in times:
                row["t_step_ms"] = times[row["mode"]] * 1e3
    for row in rows:
        if row["mode"] != "full_ft":
            row["kind_backend"] = _auto_backend(cfg)
    base = next((r for r in rows if r["mode"] == "full_ft" and "t_step_ms" in r), None)
    for row in rows:
        if base is None or row is base or "t_step_ms" not in row:
            continue
        tr = row["t_step_ms"] / base["t_step_ms"]
        row["time_vs_full_ft"] = tr
        goals = {}
        if row["mode"] == "transfer":
            goals["step_time_vs_full_ft"] = [tr, GOAL_STEP_TIME, tr <= GOAL_STEP_TIME]
            if "peak_mem_gib" in row and "peak_mem_gib" in base:
                mr = row["peak_mem_gib"] / base["peak_mem_gib"]
                row["memory_vs_full_ft"] = mr
                goals["step_memory_vs_full_ft"] = [mr, GOAL_STEP_MEM, mr <= GOAL_STEP_MEM]
        else:
            goals["step_time_vs_full_ft"] = [tr, GOAL_PRETRAIN_STEP, tr <= GOAL_PRETRAIN_STEP]
            if "peak_mem_gib" in row and "peak_mem_gib" in base:
                row["memory_vs_full_ft"] = row["peak_mem_gib"] / base["peak_mem_gib"]
        row["goals"] = goals
    for r in rows:
        print(f"steps {r['model']} {r['mode']}: " + ", ".join(f"{k} {v}" for k, v in r.items()
                                                           if k in ("t_step_ms", "peak_mem_gib", "skipped", "error")))
    steps.clear()
    free(cfg)
    return rows


def _auto_backend(cfg: Config) -> str:
    """The backend use_backend("auto") resolves to for the KIND layers (cached choices per shape
    may differ between Triton and the CUDA extension when both are ready)."""
    from kind_fast.ops.backends import _auto_candidates, resolve_backend

    name = resolve_backend(cfg.device, cfg.dtype if cfg.device.type == "cuda" else torch.float32)
    cands = _auto_candidates(cfg.device.type, torch.bfloat16) if cfg.device.type == "cuda" else ()
    return name if len(cands) < 2 else f"{name} (auto times {', '.join(cands)} per shape)"


def _median_events(fn, cfg: Config, reps: int = 5) -> float:
    from kind_fast.perf.benchmark import time_fn

    return time_fn(fn, cfg.device, reps=reps, warmup=1)


# =====================================================================================
# The CUDA extension's backend: M1 rows and path M3 layers
# =====================================================================================
def section_cuda(cfg: Config, deadline: Deadline) -> list[dict]:
    ok, why = backend_ready("cuda", cfg)
    time_one = timer(cfg)
    rows = self_check_rows("cuda", "cuda", cfg) if ok else []
    for mode in ("sample", "forward", "transfer"):
        for lname, (n_in, n_out) in cfg.layers.items():
            for m in cfg.tokens:
                row = {"section": "cuda", "shape": f"{cfg.prefix}.{lname}", "in": n_in, "out": n_out, "tokens": m,
                       "mode": mode}
                rows.append(row)
                if not ok:
                    row["skipped"] = f"CUDA backend: {why}"
                    continue
                if deadline.over(8):
                    row["skipped"] = "over the time budget"
                    continue
                try:
                    rows[-1] = _cuda_row(cfg, row, n_in, n_out, m, mode, time_one)
                except Exception as e:  # noqa: BLE001
                    row["error"] = f"{type(e).__name__}: {e}"
                    traceback.print_exc()
                finally:
                    free(cfg)
                print(f"cuda {row['shape']} M={m} {mode}: " + ", ".join(
                    f"{k[2:-3]} {v:.3f} ms" for k, v in row.items() if k.startswith("t_")), flush=True)
        if mode == "sample":  # KIND-DiT's sampling step on this backend (M3: MERGED_GEMM_OP)
            if ok:
                rows.append(sampling_row(cfg, deadline, "cuda", "cuda"))
            else:
                rows.append({"section": "cuda", "model": cfg.model, "mode": "sampling step", "backend": "cuda",
                             "skipped": f"CUDA backend: {why}"})
    return rows


def _cuda_row(cfg, row, n_in, n_out, m, mode, time_one):
    """One layer row of the CUDA backend. Mode "sample": a CFG batch ([c]·B/2 + [null]·B/2) in
    eval inside ``gate.serving({c, null})``: the op family's M3 on this backend (merged weights
    cached by the first call, then MERGED_GEMM_OP: one cuBLAS GEMM per half, from host slots),
    beside the backend's whole-path M3 op that merges per call (kind_linear_merged)."""
    from kind_fast.ops.backends import use_backend
    from kind_fast.ops.kind_linear_cuda import kind_linear_merged
    from kind_fast.ops.paths import record_paths

    b = m // TOKENS
    labels = None
    if mode == "sample":  # a CFG batch: one class, then the null class
        labels = torch.tensor([SAMPLE_CLASS] * (b - b // 2) + [CLASSES] * (b // 2))
    layer, lin, x, labels, g = make_layer(cfg, n_in, n_out, m, "forward" if mode == "sample" else mode, labels)
    fns = run_fns(cfg, layer, lin, x, labels, g, "forward" if mode == "sample" else mode, ["cuda", "reference"])
    scope = contextlib.ExitStack()
    if mode == "sample":
        layer.eval()
        idx, val = layer.gate.compiled(x.device)
        with torch.no_grad():
            w_g = layer.learngene_weight(cfg.dtype)
        x2 = x.reshape(-1, n_in)

        def m3_per_call():
            with torch.no_grad():
                return kind_linear_merged(x2, w_g, layer.bias, layer.u_t, layer.sigma_t, layer.v_t, idx, val,
                                          labels, max_classes=2)

        def m3():
            with torch.no_grad(), use_backend("cuda"):
                return layer(x, labels=labels)

        scope.enter_context(layer.gate.serving([SAMPLE_CLASS, CLASSES]))
        with record_paths() as calls:
            m3()
        row["m3_paths"] = _paths_summary(calls)
        fns["m3"], fns["m3_per_call"] = m3, m3_per_call
    with scope:
        for fn in fns.values():
            fn()
        sync(cfg)
        times = interleaved(fns, time_one, cfg.rounds)
    for k, v in times.items():
        row[f"t_{k}_ms"] = v * 1e3
    row["cuda_vs_linear"] = times["cuda"] / times["linear"]
    row["reference_vs_linear"] = times["reference"] / times["linear"]
    if mode == "sample":
        r = times["m3"] / times["linear"]
        row["m3_per_call_vs_linear"] = times["m3_per_call"] / times["linear"]
        row["goals"] = {"m3_vs_linear": [r, GOAL_M3, r <= GOAL_M3]}
    else:
        row["goals"] = layer_goals(cfg, times["cuda"], times["linear"], n_in, n_out, mode)
    return row


# =====================================================================================
# Sampling: dense DiT vs KIND-DiT through the package's own M3 path, with M1 beside it
# =====================================================================================
CFG_SCALE, SAMPLE_CLASS = 4.0, 3


def sampling_inputs(model, batch: int, cfg: Config):
    """x_t (batch, C, H, W), t (batch,) and labels (batch,) of class SAMPLE_CLASS: one
    guided step of the sampler evaluates them with their null rows (2·batch samples)."""
    gen = torch.Generator().manual_seed(0)
    size = int(round(model.pos_embed.shape[1] ** 0.5)) * model.patch_size
    x = torch.randn(batch, model.in_channels, size, size, generator=gen).to(cfg.device, cfg.dtype)
    t = torch.randint(0, 1000, (batch,), generator=gen).to(cfg.device)
    y = torch.full((batch,), SAMPLE_CLASS, dtype=torch.long).to(cfg.device)
    return x, t, y


def _paths_summary(calls: list[dict]) -> str:
    """'M3 on triton ×112' for the decisions record_paths collected over one model call."""
    from collections import Counter

    counts = Counter(f"{c['path']} on {c['backend']}" for c in calls)
    return ", ".join(f"{k} ×{v}" for k, v in sorted(counts.items())) or "no KIND layer call"


def sampling_row(cfg: Config, deadline: Deadline, section: str, backend: str | None) -> dict:
    """One guided sampling step of the sampler (kind_fast.train.sampling.cfg_model_fn: the model
    on [c]·B + [null]·B) for a dense DiT and a KIND-DiT, bf16 weights (no autocast: neither
    model pays per-call weight casts). KIND-DiT runs inside ``kind_fast.nn.utils.serving(model,
    {c, null})`` as ``sample_chunks`` does: the op family's cost model picks each layer's path
    (M3 on merged weights, cached by the first call) on ``backend`` (None: "auto"); M1 beside it
    is the same call under ``force_path("M1")``. Records the paths the cost model took, how far
    M3's output is from M1's, and on a GPU the CUDA-graph replays of both steps (as the sampler
    runs them) when the budget allows."""
    from kind_fast.ops.backends import use_backend
    from kind_fast.perf.benchmark import build_model
    from kind_fast.ops.paths import force_path, record_paths
    from kind_fast.train.sampling import cfg_model_fn
    from kind_fast.nn.utils import serving

    row = {"section": section, "model": cfg.model, "mode": "sampling step", "batch": cfg.batch,
           "rows": 2 * cfg.batch, "labels": "one class + null (CFG)", "dtype": str(cfg.dtype).replace("torch.", ""),
           "backend": backend or "auto"}
    if deadline.over(30):
        row["skipped"] = "over the time budget"
        return row
    dense = kind = None
    try:
        dense = build_model(cfg.model, "dense", device=cfg.device, depth=cfg.depth,
                            input_size=cfg.input_size).to(cfg.dtype)
        kind = build_model(cfg.model, "kind", device=cfg.device, depth=cfg.depth,
                           input_size=cfg.input_size).to(cfg.dtype)
        x, t, y = sampling_inputs(kind, cfg.batch, cfg)
        null, ch = kind.num_classes, kind.in_channels
        step_dense = cfg_model_fn(dense, y, CFG_SCALE, null, ch)
        step_kind = cfg_model_fn(kind, y, CFG_SCALE, null, ch)
        step_timer = (lambda fn: _median_events(fn, cfg, reps=7)) if cfg.device.type == "cuda" else timer(cfg)

        def kind_m1():
            with force_path("M1"):
                return step_kind(x, t)

        with torch.no_grad(), (use_backend(backend) if backend else contextlib.nullcontext()), \
                serving(kind, [SAMPLE_CLASS, null]):
            with record_paths() as calls:  # the first call merges and caches the served weights
                out_m3 = step_kind(x, t)
            row["m3_paths"] = _paths_summary(calls)
            with record_paths() as calls:
                out_m1 = kind_m1()
            row["m1_paths"] = _paths_summary(calls)
            row["m3_vs_m1_rel_diff"] = ((out_m3 - out_m1).abs().max() / out_m1.abs().max().clamp_min(1e-12)).item()
            fns = {"dense": lambda: step_dense(x, t), "kind_m3": lambda: step_kind(x, t), "kind_m1": kind_m1}
            for fn in fns.values():
                fn()
            sync(cfg)
            times = interleaved(fns, step_timer, cfg.rounds)
            if cfg.device.type == "cuda" and not deadline.over(12):  # the sampler's CUDA-graph replays
                from kind_fast.deploy.graphs import GraphedCall

                graphed = {"dense_graphed": GraphedCall(step_dense), "kind_m3_graphed": GraphedCall(step_kind)}
                for name, g in graphed.items():
                    g(x, t)
                    if g.failed:
                        row[f"{name}_note"] = f"capture failed, ran eagerly: {g.failed[:120]}"
                sync(cfg)
                times.update(interleaved({k: (lambda g=g: g(x, t)) for k, g in graphed.items()}, step_timer,
                                         cfg.rounds))
            elif cfg.device.type == "cuda":
                row["graphed"] = "skipped: over the time budget"
        for k, v in times.items():
            row[f"t_{k}_ms"] = v * 1e3
        r = times["kind_m3"] / times["dense"]
        row["m3_vs_dense"] = r
        row["m1_vs_dense"] = times["kind_m1"] / times["dense"]
        if "kind_m3_graphed" in times:
            row["m3_graphed_vs_dense_graphed"] = times["kind_m3_graphed"] / times["dense_graphed"]
        row["goals"] = {"sampling_m3_vs_dense": [r, GOAL_SAMPLING, r <= GOAL_SAMPLING]}
    except Exception as e:  # noqa: BLE001
        row["error"] = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    finally:
        dense = kind = None
        free(cfg)
    print(f"{section} sampling step ({row['backend']}): " + ", ".join(
        f"{k} {v}" for k, v in row.items() if k.startswith(("t_", "m", "error", "skipped"))), flush=True)
    return row


def section_sampling(cfg: Config, deadline: Deadline) -> list[dict]:
    return [sampling_row(cfg, deadline, "sampling", None)]


# =====================================================================================
# Summary: results.json, summary.md and the ratio table (printed last)
# =====================================================================================
def _f(v, fmt="{:.2f}"):
    if isinstance(v, str):
        return v
    return "-" if v is None else fmt.format(v)


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


MODEL_FILE = Path(__file__).resolve().parent / "results" / "model_dit_xl.json"
# the goal keys of these rows -> kind_fast.perf.timemodel's goal names
_MODEL_GOALS = {"forward_vs_linear": "forward", "transfer_vs_linear": "transfer", "pretrain_vs_linear": "pretrain",
                "m3_vs_linear": "sampling M3", "step_memory_vs_full_ft": "transfer peak memory",
                "sampling_m3_vs_dense": "sampling step"}


def _model_rows() -> list[dict]:
    try:
        return json.loads(MODEL_FILE.read_text())["rows"]
    except (OSError, ValueError, KeyError):
        return []


def modelled(row: dict, goal: str | None) -> str:
    """The time model's prediction for a measured goal (bench/results/model_dit_xl.json,
    ``python -m kind_fast.perf.timemodel --json``): "1.33 (e=1.00), 1.52 (e=0.85)", or "" where the
    model has no such row (the dry run's shapes, the CUDA backend's M1 rows)."""
    if goal is None or row.get("section") == "cuda" and goal != "m3_vs_linear":
        return ""
    if goal == "step_time_vs_full_ft":
        name = "transfer step" if row.get("mode") == "transfer" else "pretrain step"
    else:
        name = _MODEL_GOALS.get(goal)
    shape = str(row.get("shape") or "").replace(",", "/")
    for r in _model_rows():
        if r["goal"] != name:
            continue
        if "tokens" in row and (r["what"] != shape or r["M"] != row["tokens"]):
            continue
        if "tokens" not in row and not str(r["what"]).startswith(str(row.get("model", ""))):
            continue
        return f"{r['at_1_00']:.2f} (e=1.00), {r['at_0_85']:.2f} (e=0.85)"
    return ""


def ratio_table(rows: list[dict]) -> list[str]:
    lines = ["| section | row | ratio | goal | met | MODELLED | context |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        sec = r.get("section")
        if r.get("mode") == "self-check" and "passed" in r:
            lines.append(f"| {sec} | {r.get('backend', sec)} self-check {r['dtype']} | - | passes | "
                         f"{'yes' if r['passed'] else 'NO'} | - | {_cell(str(r.get('message', ''))[:60])} |")
            continue
        if r.get("mode") == "self-check":
            name = f"{r.get('backend', sec)} self-check {r['dtype']}"
            lines.append(f"| {sec} | {_cell(name)} | - | - | - | - | "
                         f"{_cell(r.get('skipped') or 'ERROR: ' + str(r.get('error'))[:80])} |")
            continue
        name = " ".join(str(x) for x in (r.get("shape") or r.get("model"), r.get("tokens") and f"M={r['tokens']}",
                                          r.get("mode")) if x)
        if "skipped" in r or "error" in r:
            lines.append(f"| {sec} | {_cell(name)} | - | - | - | - | "
                         f"{_cell(r.get('skipped') or 'ERROR: ' + r['error'][:80])} |")
            continue
        ctx = []
        for key, label in (("reference_vs_linear", "reference"), ("compiled_vs_linear", "compiled ref"),
                           ("cuda_vs_linear", "cuda M1"), ("m3_per_call_vs_linear", "M3 merging per call"),
                           ("m1_vs_dense", "M1"), ("m3_graphed_vs_dense_graphed", "graphed M3/dense"),
                           ("memory_vs_full_ft", "memory"), ("t_step_ms", "step ms"), ("peak_mem_gib", "peak GiB"),
                           ("m3_paths", "paths"), ("kind_backend", "KIND layers on")):
            if key in r and not (sec == "steps" and key == "memory_vs_full_ft" and "step_memory_vs_full_ft"
                                 in r.get("goals", {})):
                ctx.append(f"{label} {_f(r[key])[:60]}")
        if r.get("primary") and r["primary"] != "triton":
            ctx.append(f"(measured: {r['primary']})")
        if isinstance(r.get("triton"), str):
            ctx.append(f"triton {r['triton'][:50]}")
        goals = r.get("goals") or {}
        if not goals:
            lines.append(f"| {sec} | {_cell(name)} | - | - | - | - | {_cell(', '.join(ctx))} |")
        for g, (v, target, met) in goals.items():
            lines.append(f"| {sec} | {_cell(name)}: {g} | {_f(v)} | <= {_f(target)} | {'yes' if met else 'NO'} | "
                         f"{_cell(modelled(r, g) or '-')} | {_cell(', '.join(ctx))} |")
    return lines


def summarize(out: Path) -> int:
    rows, notes = [], []
    for sec in SECTIONS:
        f = out / f"{sec}.json"
        if f.exists():
            rows += json.loads(f.read_text())["rows"]
        else:
            notes.append(f"section {sec}: no results (not run, or it did not finish: see {sec}.log)")
    env = (out / "env.md").read_text() if (out / "env.md").exists() else ""
    tests = (out / "gpu_tests.summary").read_text().strip() if (out / "gpu_tests.summary").exists() else \
        "GPU tests: not run"
    goals = [g for r in rows for g in (r.get("goals") or {}).values()]
    met = sum(1 for g in goals if g[2])
    table = ratio_table(rows)
    (out / "results.json").write_text(json.dumps({"rows": rows, "notes": notes, "tests": tests}, indent=1,
                                                 default=str))
    md = [env.rstrip(), "", f"- {tests}", *[f"- {n}" for n in notes], "",
          "## Ratios (docs/design.md §6 goals)", "",
          "Layers: time ÷ F.linear (forward) or ÷ nn.Linear forward+backward, bf16, K = 32 of 96 tailors, "
          "T = 256. Steps: ÷ the full fine-tuning step. Sampling: ÷ the dense DiT step. MODELLED: the time "
          "model's prediction for the same ratio at our main-loop efficiency e = 1.00 and 0.85 of cuBLAS's "
          "(bench/results/model_dit_xl.json, kind_fast/perf/timemodel.py); the measured ratios calibrate it.",
          "", *table, "",
          f"Goals met: {met} of {len(goals)}."]
    (out / "summary.md").write_text("\n".join(md) + "\n")
    print("\n".join([*[f"note: {n}" for n in notes], tests, "", *table, "", f"goals met: {met} of {len(goals)}"]))
    return 0


# =====================================================================================
def environment(cfg: Config) -> dict:
    import kind_fast

    env = {"python": sys.version.split()[0], "torch": torch.__version__, "kind_fast": kind_fast.__version__,
           "platform": platform.platform(), "device": str(cfg.device), "dry_run": cfg.dry}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = "not installed"
    if cfg.device.type == "cuda":
        p = torch.cuda.get_device_properties(0)
        env["gpu"] = f"{p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB"
    return env


def _deadline_of(spec: str | None, section: str) -> float | None:
    """--deadline's value for ``section``: "EPOCH" or "layers=EPOCH,steps=EPOCH" (None: no limit)."""
    if not spec:
        return None
    if "=" not in spec:
        return float(spec)
    for part in spec.split(","):
        name, _, value = part.partition("=")
        if name.strip() == section:
            return float(value)
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    ap.add_argument("--out", type=Path, required=True, help="results folder (one <section>.json per section)")
    ap.add_argument("--deadline", default=None,
                    help="epoch seconds after which no row starts: one number for every section, or "
                         "SECTION=EPOCH,... per section")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, float32, reference backend")
    ap.add_argument("--summarize", action="store_true", help="merge OUT's section files and print the table")
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.summarize:
        return summarize(a.out)
    cfg = Config(a.dry_run)
    if cfg.device.type == "cuda":  # fp32 GEMMs (W_G built in fp32) on TF32, as the trainer runs them
        torch.backends.cuda.matmul.allow_tf32 = True
    if cfg.dry:
        torch.set_num_threads(1)  # a shared small CPU: idle-waiting threads make tiny ops 10x slower
    if cfg.device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run on a CPU machine", file=sys.stderr)
        return 2
    funcs = {"layers": section_layers, "steps": section_steps, "cuda": section_cuda, "sampling": section_sampling}
    status = 0
    for sec in [s.strip() for s in a.sections.split(",") if s.strip()]:
        if sec not in funcs:
            raise SystemExit(f"unknown section {sec!r}; choose from {SECTIONS}")
        t0 = time.time()
        try:
            rows = funcs[sec](cfg, Deadline(_deadline_of(a.deadline, sec), sec))
        except Exception as e:  # noqa: BLE001 - one broken section must not lose the others
            traceback.print_exc()
            rows, status = [{"section": sec, "error": f"{type(e).__name__}: {e}"}], 1
        (a.out / f"{sec}.json").write_text(json.dumps({"env": environment(cfg), "seconds": time.time() - t0,
                                                       "rows": rows}, indent=1, default=str))
        print(f"== section {sec}: {len(rows)} rows in {time.time() - t0:.0f} s", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
