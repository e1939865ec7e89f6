"""Classifier-free-guided sampling and PNG grids.

CFG runs the conditional and the null-class halves in one batch (the KIND gate routes each
half: class c's tailors for the first, the null row for the second) and mixes the ε channels:
ε = ε_null + s·(ε_c − ε_null); the learned-variance channels come from the conditional half.
``cfg_scale = 1`` runs the conditional pass only.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from kind_fast.nn.caching import weight_cache
from kind_fast.models.diffusion import GaussianDiffusion, space_timesteps


def cfg_model_fn(model: nn.Module, y: Tensor, cfg_scale: float, null_id: int | Tensor, channels: int,
                 autocast_dtype: torch.dtype | None = None):
    """``fn(x_t, t)`` → guided output (N, C or 2C, H, W) for labels ``y``; ``null_id``: the null
    label, or one per sample (multi-task models: each sample's own task's null label)."""
    guided = cfg_scale != 1.0
    nulls = null_id.to(y.device) if isinstance(null_id, Tensor) else torch.full_like(y, null_id)
    y_both = torch.cat([y, nulls]) if guided else y

    def fn(x: Tensor, t: Tensor) -> Tensor:
        xin, tin = (torch.cat([x, x]), torch.cat([t, t])) if guided else (x, t)
        with torch.autocast(x.device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            out = model(xin, tin, y_both).float()
        if not guided:
            return out
        cond, uncond = out.chunk(2)
        eps = uncond[:, :channels] + cfg_scale * (cond[:, :channels] - uncond[:, :channels])
        return torch.cat([eps, cond[:, channels:]], dim=1)

    return fn


def check_sampling_args(steps, cfg_scale, eta: float = 0.0, num_timesteps: int = 1000, *,
                        names=("steps", "cfg_scale", "eta")) -> None:
    """ValueError unless steps is an int in [2, num_timesteps] (a sampler needs a first and a last
    timestep) and cfg_scale, eta are finite numbers >= 0 (NaN would pass a plain range check and
    give NaN images). ``names``: how the messages call the three (the CLI's flags)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 2 <= steps <= num_timesteps:
        raise ValueError(f"{names[0]} must be an int in [2, {num_timesteps}] (the diffusion has "
                         f"{num_timesteps} timesteps), got {steps!r}")
    for name, v in ((names[1], cfg_scale), (names[2], eta)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")


def make_scheduler(sampler: str, steps: int, *, diffusion: GaussianDiffusion | None = None,
                   learned_sigma: bool = True, clip_denoised: bool = True):
    """A diffusers scheduler that samples ``diffusion``'s process (default: DiT's linear betas).

    * ``ddpm``: ``DDPMScheduler`` with ``variance_type="learned_range"`` (the model's extra
      channels interpolate log Σ between β̃_t and β_t, as DiT/ADM sample) or ``"fixed_small"``
      without learned sigma, on the ``steps`` timesteps of ``space_timesteps`` (evenly spaced,
      both ends kept: ADM's respacing for DDPM, passed as custom timesteps). It computes
      what ADM's respaced ``p_sample_loop`` computes, in float32 tables.
    * ``ddim``: ``DDIMScheduler`` with ``timestep_spacing="leading"``: timesteps
      0, s, 2s, …, (steps-1)·s with s = T // steps, each step going to the previous one
      (DiT/ADM's "ddimN" when T is a multiple of N), x_0 clipped and ε re-derived from the
      clipped x_0 (``use_clipped_model_output``), as ADM's ``ddim_sample`` does.

    The betas are passed as ``trained_betas``, so any ``GaussianDiffusion`` schedule carries over.
    """
    try:
        from diffusers import DDIMScheduler, DDPMScheduler
    except ImportError:
        raise ImportError("sampling uses diffusers' schedulers: pip install diffusers "
                          "(or 'kind_fast[train]')") from None
    base = diffusion or GaussianDiffusion()
    n = base.num_timesteps
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"sampler must be ddpm or ddim, got {sampler!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 2 <= steps <= n:
        raise ValueError(f"{sampler} needs an int number of steps in [2, {n}], got {steps!r}")
    common = dict(num_train_timesteps=n, trained_betas=base.betas.numpy(), clip_sample=clip_denoised,
                  clip_sample_range=1.0, prediction_type="epsilon")
    if sampler == "ddpm":
        sched = DDPMScheduler(variance_type="learned_range" if learned_sigma else "fixed_small", **common)
        sched.set_timesteps(timesteps=space_timesteps(n, steps)[::-1])
    else:
        sched = DDIMScheduler(timestep_spacing="leading", steps_offset=0, set_alpha_to_one=True, **common)
        sched.set_timesteps(steps)
    return sched


def run_scheduler(sched, model_fn, noise: Tensor, *, channels: int, eta: float = 0.0,
                  generator: torch.Generator | None = None, progress: bool = False) -> Tensor:
    """Denoise ``noise`` (x_T) with ``model_fn(x_t, t)`` (original timestep ids) over the
    scheduler's timesteps. Fresh noise comes from ``generator`` on the CPU, so results do not
    depend on the device."""
    from diffusers import DDIMScheduler

    ddim = isinstance(sched, DDIMScheduler)
    x = noise.float()
    n = x.shape[0]
    steps = sched.timesteps.tolist()
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="ddim" if ddim else "ddpm", leave=False)
    for t in steps:
        out = model_fn(x, torch.full((n,), int(t), dtype=torch.long, device=x.device)).float()
        if ddim:
            x = sched.step(out[:, :channels], int(t), x, eta=eta, use_clipped_model_output=True,
                           generator=generator).prev_sample
        else:
            x = sched.step(out, int(t), x, generator=generator).prev_sample
    return x


@torch.no_grad()
def sample_chunks(model: nn.Module, labels: Tensor, chunk_ids, *, shape: tuple[int, int, int],
                  diffusion: GaussianDiffusion | None = None, sampler: str = "ddim", steps: int = 50,
                  cfg_scale: float = 1.5, eta: float = 0.0, seed: int = 0,
                  device: torch.device | str = "cpu", batch_size: int = 256, clip_denoised: bool = True,
                  autocast_dtype: torch.dtype | None = None, progress: bool = False,
                  null_labels: Tensor | None = None, merged: bool = True, cuda_graphs: bool | None = None):
    """Yield ``(k, images)`` for chunks ``k`` of ``labels`` (chunk k = labels[k·B:(k+1)·B]).

    Chunk k's noise comes from a CPU generator seeded by (seed, k) alone, so a chunk's samples
    do not depend on the device, on the other chunks or on which process samples it
    (``kind-fast sample`` under torchrun hands the chunks round-robin to the ranks).

    ``null_labels`` (N,): the label of each sample's unconditional CFG branch; default the
    model's null class ``num_classes`` (multi-task models pass each sample's task's null).

    ``merged``: declare each chunk's classes (and the null class under guidance) to the KIND
    layers, which then run path M3 on per-class weights merged once per chunk (the cost model
    decides per layer; same samples up to rounding). ``cuda_graphs``: capture the model call in
    a CUDA graph per chunk (None: on for CUDA devices; see kind_fast.deploy.graphs). Each chunk runs
    in its own ``weight_cache()`` scope (the weights do not change while it samples; no scope
    stays open while the generator is suspended).
    """
    from contextlib import nullcontext

    from kind_fast.deploy.graphs import graphed
    from kind_fast.train.data import derived_seed
    from kind_fast.nn.utils import serving

    if labels.dim() != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(labels.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    core = getattr(model, "module", model)
    num_classes = core.num_classes
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must be class ids in [0, {num_classes - 1}], got "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    if null_labels is not None and (not isinstance(null_labels, Tensor) or null_labels.shape != labels.shape):
        raise ValueError(f"null_labels must be a tensor shaped like labels {tuple(labels.shape)}")
    base = diffusion or GaussianDiffusion()
    check_sampling_args(steps, cfg_scale, eta, base.num_timesteps)
    learned = getattr(core, "out_channels", shape[0]) == 2 * shape[0]
    sched = make_scheduler(sampler, steps, diffusion=base, learned_sigma=learned, clip_denoised=clip_denoised)
    was_training = model.training
    model.eval()
    try:
        for k in chunk_ids:
            part = slice(k * batch_size, (k + 1) * batch_size)
            y = labels[part].to(device)
            if y.numel() == 0:
                raise ValueError(f"chunk {k} is past the end of {labels.numel()} labels")
            gen = torch.Generator().manual_seed(derived_seed(seed, "sample", k))
            noise = torch.randn((y.shape[0], *shape), generator=gen).to(device)
            null = num_classes if null_labels is None else null_labels[part]
            fn = graphed(cfg_model_fn(model, y, cfg_scale, null, shape[0], autocast_dtype), device, cuda_graphs)
            classes = set(labels[part].tolist())
            if cfg_scale != 1.0:
                classes |= {num_classes} if null_labels is None else set(null.tolist())
            with weight_cache(), (serving(core, classes) if merged else nullcontext()):
                x = run_scheduler(sched, fn, noise, channels=shape[0], eta=eta, generator=gen, progress=progress)
            yield k, x.float().cpu()
    finally:
        model.train(was_training)


@torch.no_grad()
def sample(model: nn.Module, labels: Tensor, *, shape: tuple[int, int, int], batch_size: int = 256,
           **kwargs) -> Tensor:
    """Samples (N, C, H, W) float32 on the CPU for class ids ``labels`` (N,).

    Keyword arguments as ``sample_chunks``: ``sampler`` (ddpm or ddim, diffusers' schedulers,
    see ``make_scheduler``) on ``steps`` steps, ``cfg_scale``, ``eta``, ``seed``, ``device``,
    ``null_labels``, ``merged``, ``cuda_graphs``, ... Deterministic for a seed: noise is drawn on
    the CPU per chunk of ``batch_size`` from a generator seeded by (seed, chunk index), so results
    do not depend on the device or on other chunks.
    """
    n_chunks = -(-labels.shape[0] // max(1, batch_size)) if labels.dim() == 1 else 1
    outs = [x for _, x in sample_chunks(model, labels, range(n_chunks), shape=shape, batch_size=batch_size,
                                        **kwargs)]
    return torch.cat(outs) if outs else torch.zeros(0, *shape)


# =====================================================================================
# Images and grids
# =====================================================================================
def to_uint8(images: Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] → (N, H, W, C) uint8 (DiT's sample .npz layout)."""
    x = ((images.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def make_grid(images: Tensor, nrow: int, *, pad: int = 1, scale: int = 1) -> np.ndarray:
    """Tile (N, C, H, W) images in [-1, 1] into an (H', W', C) uint8 array, ``nrow`` per row,
    each enlarged ``scale``× (nearest) so tiny digits stay visible."""
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty (N, C, H, W) tensor, got {tuple(images.shape)}")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels for a PNG grid, got {images.shape[1]}")
    arr = to_uint8(images)
    if scale > 1:
        arr = arr.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w, c = arr.shape
    ncol = max(1, nrow)
    rows = (n + ncol - 1) // ncol
    grid = np.full((rows * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = arr[i]
    return grid


def save_png(arr: np.ndarray, path: str | os.PathLike) -> Path:
    """Write an (H, W, C) uint8 array (C = 1 or 3) as a PNG with Pillow, atomically."""
    import io

    from kind_fast.atomic import atomic_write_bytes

    if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] not in (1, 3):
        raise ValueError(f"expected an (H, W, 1 or 3) uint8 array, got {getattr(arr, 'shape', type(arr))} "
                         f"{getattr(arr, 'dtype', '')}")
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("writing PNG images needs Pillow: pip install pillow (or 'kind_fast[train]')") from None
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)).save(buf, format="PNG")
    atomic_write_bytes(buf.getvalue(), Path(path))
    return Path(path)


def save_grid(images: Tensor, path: str | os.PathLike, nrow: int, *, scale: int | None = None) -> Path:
    """PNG grid of images in [-1, 1]; small images are enlarged to about 32 px."""
    if scale is None:
        scale = max(1, 32 // images.shape[-1])
    if images.shape[1] not in (1, 3):  # latents: show the first 3 channels, normalised
        x = images[:, :3] if images.shape[1] >= 3 else images[:, :1]
        x = (x - x.amin()) / (x.amax() - x.amin() + 1e-8) * 2 - 1
        images = x
    return save_png(make_grid(images, nrow, scale=scale), path)
