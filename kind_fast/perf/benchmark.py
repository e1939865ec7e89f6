"""Model-level measurements: one DiT training step per mode, and CFG sampling throughput.

Modes are those of ``kind_fast.perf.flops``: full_ft (dense DiT, everything trains), pretrain
(KIND-DiT, everything trains), transfer (KIND-DiT, learngenes frozen, tailors + label table +
final layer train), lora (dense DiT + rank-r adapters), svdiff (dense DiT whose block linears
train only σ). One step = forward + DDPM ε-loss + backward + AdamW step.

``build_model`` builds the model of a mode. FLOPs and timings do not depend on the values, so
``init="cheap"`` builds on the meta device and fills every tensor with random values of the
right scale instead of DiT's init (one float64 SVD per KIND layer: ~72 for KIND-DiT-B/2, seconds
each).

``measure_step`` returns time per step, images/s, peak device memory (CUDA), bytes held for
backward, optimizer-state bytes and achieved TFLOP/s (analytic FLOPs of ``kind_fast.perf.flops``
divided by the time). ``kind-fast bench --report`` runs (or loads) such measurements and writes
a markdown table and a PNG plot. The pytest-benchmark suite is ``bench/bench_model_step.py``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.optim import Optimizer

from kind_fast.nn.caching import training_scope, weight_cache
from kind_fast.models.dit import DiT, KindConfig, build_dit
from kind_fast.perf.flops import MODE_TITLES, SIZES, TRAIN_MODES, dit_flops

__all__ = [
    "build_model",
    "make_batch",
    "make_train_step",
    "make_cfg_sample_step",
    "make_reference_layer_step",
    "optimizer_state_bytes",
    "saved_tensor_bytes",
    "peak_memory_bytes",
    "time_fn",
    "measure_step",
    "measure_sampling",
    "write_bench_report",
]

SAMPLE_MODES = ("dense", "kind")


# =====================================================================================
# Models
# =====================================================================================
@torch.no_grad()
def _materialize(model: nn.Module, device: torch.device) -> None:
    """Give every meta tensor storage on ``device`` and cheap values of the right scale.

    Matrices (and KIND's U/V rows) get N(0, 1/fan_in), singular values U(0.5, 1.5), biases
    zero. The scale matters for CPU timing: values that shrink layer after layer end up as
    subnormal floats, which CPUs process many times slower.
    """
    for m in model.modules():
        own = itertools.chain(m.parameters(recurse=False), m.buffers(recurse=False))
        if any(t.is_meta for t in own):
            m.to_empty(device=device, recurse=False)
    model.to(device)  # what was built for real (gate, position table) follows
    for name, p in model.named_parameters():
        if name.endswith(("sigma_g", "sigma_t")):
            p.uniform_(0.5, 1.5)
        elif p.dim() == 1 or p.numel() == 0:
            p.zero_()
        else:
            p.normal_(0.0, p[0].numel() ** -0.5)


def build_model(
    name: str,
    mode: str,
    *,
    device: str | torch.device = "cpu",
    depth: int | None = None,
    num_classes: int = 10,
    input_size: int = 32,
    lora_rank: int = 8,
    kind: KindConfig | None = None,
    init: str = "cheap",
    seed: int = 0,
) -> DiT:
    """The DiT of ``mode`` (see the module docstring), with its trainable set, in train mode.

    ``init="cheap"`` (meta build + random values of the right scale, for FLOPs and timing) or
    ``"real"`` (DiT's init with SVDs; transfer re-initialises tailors as ``prepare_transfer``).
    Inference modes ``dense`` / ``kind`` return an eval-mode model with nothing trainable.
    """
    from kind_fast.models.baselines import apply_lora, apply_svdiff
    from kind_fast.perf.flops import MODES

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if init not in ("cheap", "real"):
        raise ValueError(f"init must be 'cheap' or 'real', got {init!r}")
    device = torch.device(device)
    kw = dict(num_classes=num_classes, input_size=input_size)
    if depth is not None:
        kw["depth"] = depth
    use_kind = mode in ("pretrain", "transfer", "kind")
    kcfg = (KindConfig() if kind is None else kind) if use_kind else None
    torch.manual_seed(seed)
    if init == "cheap":
        with torch.device("meta"):
            model = build_dit(name, kind=kcfg, **kw)
            if mode == "lora":
                apply_lora(model, lora_rank)
            elif mode == "svdiff":
                apply_svdiff(model)
        _materialize(model, device)
    else:
        with torch.device(device):
            model = build_dit(name, kind=kcfg, **kw)
        if mode == "lora":
            apply_lora(model, lora_rank)
        elif mode == "svdiff":
            apply_svdiff(model)
    if mode in ("full_ft", "pretrain"):
        model.set_mode("full_finetune" if mode == "full_ft" else "pretrain")
    elif mode == "transfer":
        if init == "real":
            model.prepare_transfer(num_classes, generator=torch.Generator().manual_seed(seed))
        else:  # tailors are already random; only the gate and label table are new
            model.retarget(num_classes)
            model.set_mode("transfer")
    elif mode in ("dense", "kind"):
        model.requires_grad_(False).eval()
        return model
    return model.train()


def make_batch(model: DiT, batch: int, *, device=None, seed: int = 0):
    """(x, t, y): latents (batch, C, H, W), timesteps and labels for ``model``."""
    dev = model.pos_embed.device if device is None else torch.device(device)
    g = torch.Generator().manual_seed(seed)
    size = int(round(model.pos_embed.shape[1] ** 0.5)) * model.patch_size
    x = torch.randn(batch, model.in_channels, size, size, generator=g).to(dev)
    t = torch.randint(0, 1000, (batch,), generator=g).to(dev)
    y = torch.randint(0, model.num_classes, (batch,), generator=g).to(dev)
    return x, t, y


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def make_train_step(model: DiT, batch: int, *, autocast: torch.dtype | None = None,
                    lr: float = 1e-4, seed: int = 0) -> tuple[Callable[[], None], Optimizer]:
    """A closure running one step (DDPM ε-loss, backward, AdamW) on a fixed batch."""
    from kind_fast.models.diffusion import GaussianDiffusion

    diffusion = GaussianDiffusion()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameter (an inference mode?)")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    x, _, y = make_batch(model, batch, seed=seed)
    dev = x.device

    def step() -> None:
        with _autocast(dev, autocast):
            loss = diffusion.loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, opt


def make_cfg_sample_step(model: DiT, batch: int, *, cfg_scale: float = 4.0,
                         autocast: torch.dtype | None = None,
                         seed: int = 0) -> Callable[[], torch.Tensor]:
    """One guided denoising evaluation for ``batch`` images: ``forward_with_cfg`` on 2·batch
    rows (class labels, then the null class), as DiT's sampler calls it each step."""
    x, t, y = make_batch(model, batch, seed=seed)
    x2 = torch.cat([x, x])
    t2 = torch.cat([t, t])
    y2 = torch.cat([y, torch.full_like(y, model.num_classes)])
    dev = x.device

    @torch.no_grad()
    def step() -> torch.Tensor:
        with _autocast(dev, autocast):
            return model.forward_with_cfg(x2, t2, y2, cfg_scale)

    return step


def make_reference_layer_step(layer: nn.Module, x: torch.Tensor, labels: torch.Tensor, g: torch.Tensor,
                              mode: str) -> Callable[[], object]:
    """One pass of a ``FastKindLinear`` as the reference in plain PyTorch ops (``kind_linear_ref``,
    autograd through it): what torch.compile can see into, unlike the registered op. ``mode``
    "forward" runs under no_grad; any other mode also backpropagates ``g``."""
    from kind_fast.ops.kind_linear import kind_linear_ref

    def step():
        idx, val = layer.gate.compiled(x.device)
        w_g = layer.learngene_weight(x.dtype)
        y, _ = kind_linear_ref(x.reshape(-1, x.shape[-1]), w_g, layer.bias, layer.u_t, layer.sigma_t.float(),
                               layer.v_t, idx, val.float(), labels)
        if mode == "forward":
            return y
        y.backward(g.reshape(y.shape))

    return torch.no_grad()(step) if mode == "forward" else step


# =====================================================================================
# Memory
# =====================================================================================
def optimizer_state_bytes(opt: Optimizer) -> int:
    """Bytes of the optimizer's state tensors (AdamW: exp_avg, exp_avg_sq, step)."""
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))


def saved_tensor_bytes(model: nn.Module, fn: Callable[[], object]) -> tuple[int, object]:
    """Run ``fn()`` (a forward) and return (bytes of the distinct non-parameter storages that
    autograd saved for backward, fn's result). A device-independent activation-memory gauge."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def peak_memory_bytes(fn: Callable[[], object], device: torch.device | str) -> int:
    """CUDA max_memory_allocated over one call of ``fn`` (absolute bytes)."""
    device = torch.device(device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


# =====================================================================================
# Timing
# =====================================================================================
def time_fn(fn: Callable[[], object], device: torch.device | str, *, reps: int = 5,
            warmup: int = 2) -> float:
    """Median seconds per call of ``fn``: CUDA events on a GPU, perf_counter on the CPU."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1e-3)
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _flop_kwargs(model: DiT, batch: int, lora_rank: int, kind: KindConfig | None) -> dict:
    size = int(round(model.pos_embed.shape[1] ** 0.5)) * model.patch_size * 8
    return dict(image_size=size, batch=batch, depth=len(model.blocks), lora_rank=lora_rank,
                num_classes=model.num_classes, kind=kind,
                in_channels=model.in_channels, learn_sigma=model.out_channels != model.in_channels)


def measure_step(
    name: str,
    mode: str,
    *,
    batch: int,
    device: str | torch.device = "cpu",
    depth: int | None = None,
    autocast: torch.dtype | None = None,
    lora_rank: int = 8,
    kind: KindConfig | None = None,
    reps: int = 5,
    warmup: int = 2,
    timer: Callable[[Callable[[], object]], float] | None = None,
    model: DiT | None = None,
    mem_offset: int | None = None,
) -> dict:
    """Measure one training step of ``name`` in ``mode``; returns a flat dict of numbers.

    ``timer(fn) -> seconds`` replaces the built-in median timer (the bench suite passes its
    interleaved timers). ``model`` reuses a model built by ``build_model``; then pass as
    ``mem_offset`` the CUDA bytes allocated before it was built (other models that stay
    resident), so that ``peak_mem_mb`` is this model's own peak: parameters, gradients,
    optimizer state and activations.
    """
    if mode not in TRAIN_MODES:
        raise ValueError(f"mode must be one of {TRAIN_MODES}, got {mode!r}")
    device = torch.device(device)
    if model is None:
        mem_offset = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        model = build_model(name, mode, device=device, depth=depth, lora_rank=lora_rank, kind=kind)
    step, opt = make_train_step(model, batch, autocast=autocast)
    from kind_fast.models.diffusion import GaussianDiffusion

    x, _, y = make_batch(model, batch)
    with _autocast(device, autocast):
        saved, loss = saved_tensor_bytes(model, lambda: GaussianDiffusion().loss(model, x, y))
    loss.backward()
    opt.zero_grad(set_to_none=True)
    step()  # optimizer state exists after the first step
    if device.type == "cuda":
        peak = peak_memory_bytes(step, device) - (mem_offset or 0)
        resident = torch.cuda.memory_allocated(device) - (mem_offset or 0)
    else:
        resident = peak = None
    with training_scope(model):  # as the trainer runs: W_G reused while learngenes are frozen
        t = timer(step) if timer is not None else time_fn(step, device, reps=reps, warmup=warmup)
    fl = dit_flops(name, mode, **_flop_kwargs(model, batch, lora_rank, kind))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return dict(
        model=name, mode=mode, depth=len(model.blocks), batch=batch, device=_device_name(device),
        dtype=str(autocast).replace("torch.", "") if autocast else "float32",
        step_ms=t * 1e3, images_per_s=batch / t,
        peak_mem_mb=None if peak is None else peak / 2**20,
        resident_mem_mb=None if resident is None else resident / 2**20,
        saved_for_backward_mb=saved / 2**20, optimizer_state_mb=optimizer_state_bytes(opt) / 2**20,
        trainable_params=trainable, params=sum(p.numel() for p in model.parameters()),
        train_tflop_per_step=fl.flops("train", "step") / 1e12,
        achieved_tflops=fl.flops("train", "step") / t / 1e12,
    )


def measure_sampling(
    name: str,
    mode: str = "dense",
    *,
    batch: int,
    device: str | torch.device = "cpu",
    depth: int | None = None,
    autocast: torch.dtype | None = None,
    kind: KindConfig | None = None,
    reps: int = 5,
    warmup: int = 2,
    timer: Callable[[Callable[[], object]], float] | None = None,
    model: DiT | None = None,
) -> dict:
    """CFG sampling throughput of ``name`` (``dense`` DiT or ``kind`` KIND-DiT): images per
    second per denoising step, for ``batch`` images (2·batch rows through the model)."""
    if mode not in SAMPLE_MODES:
        raise ValueError(f"sampling mode must be one of {SAMPLE_MODES}, got {mode!r}")
    device = torch.device(device)
    if model is None:
        model = build_model(name, mode, device=device, depth=depth, kind=kind)
    step = make_cfg_sample_step(model, batch, autocast=autocast)
    with weight_cache():  # as kind_fast.train.sampling.sample runs
        t = timer(step) if timer is not None else time_fn(step, device, reps=reps, warmup=warmup)
    fl = dit_flops(name, mode, **_flop_kwargs(model, 2 * batch, 8, kind))
    return dict(model=name, mode=mode, depth=len(model.blocks), batch=batch,
                device=_device_name(device), step_ms=t * 1e3, images_per_s=batch / t,
                achieved_tflops=fl.flops("fwd", "step") / t / 1e12)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def environment() -> dict:
    """Versions and device of this run (stored with the results)."""
    env = dict(torch=torch.__version__, python=platform.python_version(),
               cuda=torch.version.cuda, platform=platform.platform())
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["driver"] = _nvidia_driver()
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def _nvidia_driver() -> str | None:
    import subprocess

    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# =====================================================================================
# Report
# =====================================================================================
STEP_COLUMNS = (("model", "model"), ("depth", "depth"), ("mode", "mode"), ("batch", "batch"),
                ("step_ms", "step ms"), ("ratio", "× full FT"), ("images_per_s", "img/s"),
                ("achieved_tflops", "TFLOP/s"), ("train_tflop_per_step", "TFLOP/step"),
                ("peak_mem_mb", "peak MiB"), ("saved_for_backward_mb", "saved-for-bwd MiB"),
                ("optimizer_state_mb", "optim MiB"), ("trainable_params", "trainable"))


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int) and v >= 10_000:
        return f"{v / 1e6:.2f}M"
    return str(v)


def _spread(s: dict, key: str, lo: str, hi: str) -> str:
    """``median (min–max)`` when the bench suite recorded the spread of its paired rounds."""
    if s.get(key) is None:
        return "-"
    if s.get(lo) is None or s.get(hi) is None:
        return _fmt(s[key])
    return f"{_fmt(s[key])} ({_fmt(s[lo])}–{_fmt(s[hi])})"


def _load(s: dict) -> str:
    a, b = s.get("load_before"), s.get("load_after")
    return "-" if a is None and b is None else f"{_fmt(a)} → {_fmt(b)}"


def _paired_table(rows: Sequence[dict], *, base: str, base_key: str) -> list[str]:
    lines = [f"| model | depth | mode | batch | rounds | step ms, median (min–max) | paired {base} ms, median "
             f"(min–max) | × {base} per round, median (min–max) | load 1-min before → after |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in rows:
        lines.append(
            f"| {s['model']} | {s['depth']} | {s['mode']} | {s['batch']} | {_fmt(s.get('rounds'))} | "
            f"{_spread(s, 'step_ms', 'step_ms_min', 'step_ms_max')} | "
            f"{_spread(s, base_key, base_key + '_min', base_key + '_max')} | "
            f"{_spread(s, 'ratio', 'time_ratio_min', 'time_ratio_max') if s.get(base_key) else 'baseline'} | "
            f"{_load(s)} |")
    return lines


def _with_ratios(steps: Sequence[dict]) -> list[dict]:
    base = {(s["model"], s["depth"], s["batch"], s["device"]): s["step_ms"] for s in steps
            if s["mode"] == "full_ft"}
    out = []
    for s in steps:
        b = base.get((s["model"], s["depth"], s["batch"], s["device"]))
        ratio = s.get("time_ratio_vs_full_ft")  # measured interleaved (bench_model_step.py)
        if ratio is None and b is not None:
            ratio = s["step_ms"] / b
        out.append(dict(s, ratio=ratio))
    return out


def format_bench_markdown(results: dict) -> str:
    steps = _with_ratios(results.get("steps", []))
    env = results.get("environment", {})
    lines = ["# Model-level benchmark: one DiT training step per mode", ""]
    lines.append("Environment: " + ", ".join(f"{k} {v}" for k, v in env.items() if v is not None))
    lines.append("")
    if results.get("note"):
        lines += [results["note"], ""]
    if any(s.get("time_ratio_min") is not None or s.get("rounds") for s in steps):
        lines += ["Time: each round times the mode's step and the full fine-tuning step back to back "
                  "(same machine load); the ratio is taken per round, then the median and the spread "
                  "(min–max) over rounds are shown. Ratios of times from different rounds are never formed.",
                  ""]
        lines += _paired_table(steps, base="full FT", base_key="full_ft_ms")
        lines += ["", "Costs of each mode (one step, the same runs):", ""]
    if steps:
        lines.append("| " + " | ".join(h for _, h in STEP_COLUMNS) + " |")
        lines.append("|" + "|".join("---" for _ in STEP_COLUMNS) + "|")
        for s in steps:
            lines.append("| " + " | ".join(_fmt(s.get(k)) for k, _ in STEP_COLUMNS) + " |")
        lines.append("")
    samp = results.get("sampling", [])
    if samp and any(s.get("time_ratio_min") is not None for s in samp):
        lines += ["## CFG sampling (forward_with_cfg, 2·batch rows per denoising step), KIND-DiT vs dense", ""]
        lines += _paired_table([dict(s, ratio=s.get("time_ratio_vs_dense")) for s in samp],
                               base="dense", base_key="dense_ms")
        lines.append("")
    elif samp:
        lines += ["## CFG sampling (forward_with_cfg, 2·batch rows per denoising step)", "",
                  "| model | depth | mode | batch | ms per step | images/s per step | TFLOP/s "
                  "| × dense |", "|---|---|---|---|---|---|---|---|"]
        dense = {(s["model"], s["depth"], s["batch"]): s["step_ms"] for s in samp
                 if s["mode"] == "dense"}
        for s in samp:
            r = s.get("time_ratio_vs_dense")
            d = dense.get((s["model"], s["depth"], s["batch"]))
            r = r if r is not None else (s["step_ms"] / d if d else None)
            lines.append(f"| {s['model']} | {s['depth']} | {s['mode']} | {s['batch']} | "
                         f"{s['step_ms']:.4g} | {s['images_per_s']:.4g} | "
                         f"{s['achieved_tflops']:.4g} | {_fmt(r)} |")
        lines.append("")
    lines += ["Columns: `step ms` median time of forward + loss + backward + AdamW step; "
              "`× full FT` against the full fine-tuning step of the same model, batch and device "
              "(timed interleaved in one process where the bench suite measured it); "
              "`TFLOP/s` analytic FLOPs (`kind_fast.perf.flops`, per step) / time; `peak MiB` CUDA "
              "max_memory_allocated over one step (GPU only); `saved-for-bwd MiB` non-parameter "
              "tensors autograd keeps for backward; `optim MiB` AdamW state.", ""]
    return "\n".join(lines)


def plot_bench(results: dict, path: str | Path) -> Path:
    """Two panels: step time by mode and model, and analytic TFLOP per step by mode and model."""
    from kind_fast.perf.flops import pyplot

    plt = pyplot()
    steps = results.get("steps", [])
    keys = list(dict.fromkeys(f"{s['model']} d{s['depth']} b{s['batch']}" for s in steps))
    modes = [m for m in TRAIN_MODES if any(s["mode"] == m for s in steps)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / max(len(modes), 1)
    for j, mode in enumerate(modes):
        for ax, field_ in ((axes[0], "step_ms"), (axes[1], "train_tflop_per_step")):
            vals = []
            for k in keys:
                s = next((s for s in steps if s["mode"] == mode
                          and f"{s['model']} d{s['depth']} b{s['batch']}" == k), None)
                vals.append(float("nan") if s is None else s[field_])
            ax.bar([i + j * width for i in range(len(keys))], vals, width, label=MODE_TITLES[mode])
    for ax, title in ((axes[0], "step time (ms)"), (axes[1], "analytic TFLOP per step")):
        centres = [i + width * (len(modes) - 1) / 2 for i in range(len(keys))]
        ax.set_xticks(centres, keys, fontsize=8)
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=7)
    dev = steps[0]["device"] if steps else ""
    fig.suptitle(f"One training step by mode and model ({dev})", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def load_results(path: str | Path) -> dict:
    """Results written by ``kind-fast bench`` or a pytest-benchmark JSON of bench_model_step."""
    data = json.loads(Path(path).read_text())
    if "benchmarks" in data:  # pytest-benchmark: the numbers live in extra_info
        steps, samp = [], []
        for b in data["benchmarks"]:
            info = b.get("extra_info", {})
            if info.get("kind") == "model_step":
                steps.append(info)
            elif info.get("kind") == "cfg_sampling":
                samp.append(info)
        env = dict(torch=data.get("machine_info", {}).get("torch"),
                   machine=data.get("machine_info", {}).get("cpu", {}).get("brand_raw"))
        if steps and "torch" in steps[0]:
            env["torch"] = steps[0]["torch"]
        if steps and "threads" in steps[0]:
            env["threads"] = steps[0]["threads"]
        return dict(steps=steps, sampling=samp, environment=env)
    return data


def write_bench_report(results: dict, out_dir: str | Path, *, plot: bool = True) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "bench_model_step.json", "markdown": out / "bench_model_step.md"}
    paths["json"].write_text(json.dumps(results, indent=2))
    paths["markdown"].write_text(format_bench_markdown(results))
    if plot and results.get("steps"):
        paths["plot"] = plot_bench(results, out / "bench_model_step.png")
    return paths


# =====================================================================================
# CLI: kind-fast bench
# =====================================================================================
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--report", action="store_true", help="write markdown + PNG (and JSON) to --out")
    p.add_argument("--load", metavar="JSON",
                   help="report on saved results (kind-fast bench JSON or pytest-benchmark JSON "
                   "of bench/bench_model_step.py) instead of measuring")
    p.add_argument("--models", nargs="+", default=None,
                   help="DiT configs (default: DiT-S/2 on CPU, S/B/L/XL /2 on a GPU)")
    p.add_argument("--modes", nargs="+", default=list(TRAIN_MODES), choices=TRAIN_MODES)
    p.add_argument("--depth", type=int, default=None,
                   help="blocks (default: 2 on CPU, full on GPU)")
    p.add_argument("--batch", type=int, default=None,
                   help="images per step (default: 4 on CPU, 32 on GPU)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's; 1 is steadier on a shared machine)")
    p.add_argument("--no-sampling", action="store_true", help="skip the CFG sampling measurement")
    p.add_argument("--out", default="runs/bench", help="output folder")
    p.add_argument("--note", help="a line for the report (machine, load, what was measured)")
    p.add_argument("--no-plot", action="store_true")


def run(args: argparse.Namespace) -> int:
    if args.load:
        results = load_results(args.load)
    else:
        if args.threads:
            torch.set_num_threads(args.threads)
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        gpu = device.type == "cuda"
        models = args.models or (list(SIZES) if gpu else ["DiT-S/2"])
        depth = args.depth if args.depth is not None else (None if gpu else 2)
        batch = args.batch or (32 if gpu else 4)
        amp = torch.bfloat16 if gpu else None
        steps, samp = [], []
        for name in models:
            for mode in args.modes:
                r = measure_step(name, mode, batch=batch, device=device, depth=depth, autocast=amp,
                                 reps=args.reps, warmup=1)
                steps.append(r)
                print(f"{name} depth {r['depth']} {mode:<9} step {r['step_ms']:9.1f} ms  "
                      f"{r['images_per_s']:8.2f} img/s  {r['achieved_tflops']:.3f} TFLOP/s",
                      flush=True)
                if gpu:
                    torch.cuda.empty_cache()
            if not args.no_sampling:
                for mode in SAMPLE_MODES:
                    s = measure_sampling(name, mode, batch=batch, device=device, depth=depth,
                                         autocast=amp, reps=args.reps, warmup=1)
                    samp.append(s)
                    print(f"{name} depth {s['depth']} CFG sampling {mode:<5} "
                          f"{s['images_per_s']:8.2f} img/s per denoising step", flush=True)
        note = None if gpu else (
            f"CPU measurement ({torch.get_num_threads()} threads), fp32, depth {depth}, "
            f"batch {batch}: relative costs on the reference backend, not GPU performance.")
        results = dict(steps=steps, sampling=samp, environment=environment(), note=note)
    if args.note:
        results["note"] = args.note
    print(format_bench_markdown(results))
    if args.report or not args.load:
        from kind_fast._optional import available

        plot = not args.no_plot and available("matplotlib")
        paths = write_bench_report(results, args.out, plot=plot)
        for k, v in paths.items():
            print(f"wrote {k}: {v}")
        if not args.no_plot and not plot:
            print("skipped the PNG: matplotlib is not installed (pip install 'kind_fast[report]')")
    return 0
