"""Classifier-free-guided sampling and PNG grids.

CFG runs the conditional and the null-class halves in one batch (the KIND gate routes each
half: class c's tailors for the first, the null row for the second) and mixes the ε channels:
ε = ε_null + s·(ε_c − ε_null); the learned-variance channels come from the conditional half.
``cfg_scale = 1`` runs the conditional pass only.
"""

from __future__ import annotations

import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from kind_fast.caching import weight_cache
from kind_fast.diffusion import GaussianDiffusion


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
    """ValueError unless steps is an int in [1, num_timesteps] and cfg_scale, eta are finite
    numbers >= 0 (NaN would pass a plain range check and give NaN images). ``names``: how
    the messages call the three (the CLI's flags)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= num_timesteps:
        raise ValueError(f"{names[0]} must be an int in [1, {num_timesteps}] (the diffusion has "
                         f"{num_timesteps} timesteps), got {steps!r}")
    for name, v in ((names[1], cfg_scale), (names[2], eta)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")


@torch.no_grad()
def sample(model: nn.Module, labels: Tensor, *, shape: tuple[int, int, int], diffusion: GaussianDiffusion | None = None,
           sampler: str = "ddim", steps: int = 50, cfg_scale: float = 1.5, eta: float = 0.0, seed: int = 0,
           device: torch.device | str = "cpu", batch_size: int = 256, clip_denoised: bool = True,
           autocast_dtype: torch.dtype | None = None, progress: bool = False,
           null_labels: Tensor | None = None, merged: bool = True, cuda_graphs: bool | None = None) -> Tensor:
    """Samples (N, C, H, W) float32 on the CPU for class ids ``labels`` (N,).

    ``null_labels`` (N,): the label of each sample's unconditional CFG branch; default the
    model's null class ``num_classes`` (multi-task models pass each sample's task's null).

    ``sampler``: ddpm (ancestral, learned variance) or ddim (η = ``eta``), on ``steps``
    respaced steps. Deterministic for a given ``seed``: noise is drawn on the CPU per chunk
    of ``batch_size`` from a generator seeded by (seed, chunk index), so results do not
    depend on the device or on other chunks.

    ``merged``: declare each chunk's classes (and the null class under guidance) to the KIND
    layers, which then run path M3 on per-class weights merged once per chunk (the cost model
    decides per layer; same samples up to rounding). ``cuda_graphs``: capture the model call in
    a CUDA graph per chunk (None: on for CUDA devices; see kind_fast.graphs).
    """
    from contextlib import nullcontext

    from kind_fast.graphs import graphed
    from kind_fast.train.data import derived_seed
    from kind_fast.utils import serving

    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"sampler must be ddpm or ddim, got {sampler!r}")
    if labels.dim() != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(labels.shape)}")
    core = getattr(model, "module", model)
    num_classes = core.num_classes
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must be class ids in [0, {num_classes - 1}], got "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    if null_labels is not None and (not isinstance(null_labels, Tensor) or null_labels.shape != labels.shape):
        raise ValueError(f"null_labels must be a tensor shaped like labels {tuple(labels.shape)}")
    base = diffusion or GaussianDiffusion()
    check_sampling_args(steps, cfg_scale, eta, base.num_timesteps)
    sched = base.respaced(steps)
    was_training = model.training
    model.eval()
    outs = []
    with weight_cache():  # the weights do not change while sampling: W_G is built once per layer
        try:
            for i, start in enumerate(range(0, labels.shape[0], batch_size)):
                y = labels[start:start + batch_size].to(device)
                gen = torch.Generator().manual_seed(derived_seed(seed, "sample", i))
                noise = torch.randn((y.shape[0], *shape), generator=gen).to(device)
                null = num_classes if null_labels is None else null_labels[start:start + batch_size]
                fn = graphed(cfg_model_fn(model, y, cfg_scale, null, shape[0], autocast_dtype), device, cuda_graphs)
                classes = set(labels[start:start + batch_size].tolist())
                if cfg_scale != 1.0:
                    classes |= {num_classes} if null_labels is None else set(null.tolist())
                with serving(core, classes) if merged else nullcontext():
                    if sampler == "ddpm":
                        x = sched.ddpm_sample(fn, noise, generator=gen, clip_denoised=clip_denoised,
                                              progress=progress)
                    else:
                        x = sched.ddim_sample(fn, noise, eta=eta, generator=gen, clip_denoised=clip_denoised,
                                              progress=progress)
                outs.append(x.float().cpu())
        finally:
            model.train(was_training)
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


def _png_bytes_zlib(arr: np.ndarray) -> bytes:
    """A minimal PNG encoder (8-bit gray or RGB, filter 0) for when Pillow is not installed."""
    h, w, c = arr.shape
    color = {1: 0, 3: 2}[c]
    raw = b"".join(b"\x00" + arr[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def save_png(arr: np.ndarray, path: str | os.PathLike, *, use_pil: bool | None = None) -> Path:
    """Write an (H, W, C) uint8 array (C = 1 or 3) as a PNG (Pillow if installed, else zlib)."""
    from kind_fast.atomic import atomic_write_bytes

    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] not in (1, 3):
        raise ValueError(f"expected an (H, W, 1 or 3) uint8 array, got {arr.shape} {arr.dtype}")
    path = Path(path)
    if use_pil is None:
        try:
            import PIL.Image  # noqa: F401

            use_pil = True
        except ImportError:
            use_pil = False
    if use_pil:
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(buf, format="PNG")
        data = buf.getvalue()
    else:
        data = _png_bytes_zlib(np.ascontiguousarray(arr))
    atomic_write_bytes(data, path)
    return path


def save_grid(images: Tensor, path: str | os.PathLike, nrow: int, *, scale: int | None = None) -> Path:
    """PNG grid of images in [-1, 1]; small images are enlarged to about 32 px."""
    if scale is None:
        scale = max(1, 32 // images.shape[-1])
    if images.shape[1] not in (1, 3):  # latents: show the first 3 channels, normalised
        x = images[:, :3] if images.shape[1] >= 3 else images[:, :1]
        x = (x - x.amin()) / (x.amax() - x.amin() + 1e-8) * 2 - 1
        images = x
    return save_png(make_grid(images, nrow, scale=scale), path)
