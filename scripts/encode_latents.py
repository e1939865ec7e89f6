#!/usr/bin/env python
"""Encode an ImageFolder into VAE-latent shards for ``--data latents`` (not exercised in CI).

    python scripts/encode_latents.py --vae /models/sd-vae-ft-ema --data /data/imagenet/train \
        --image-size 256 --out /data/latents/in256 [--flip-copies] [--device cuda] [--batch 64]

``--vae`` is a local diffusers ``AutoencoderKL`` folder (nothing is downloaded). Each image is
centre-cropped and resized (kind_fast.train.data.ImageFolder), encoded, and the latent
distribution is *sampled* and multiplied by ``--scale`` (0.18215 for the SD VAEs DiT uses), as
DiT does inside its loop. ``--flip-copies`` also encodes every mirrored image (the random flip
of DiT's loop, frozen into the data as fast-DiT does). Output: shards of ``--shard-size``
latents plus index.json (layout in kind_fast/train/data.py). Then train with

    kind-fast pretrain --data latents --data-path /data/latents/in256 --model DiT-XL/2 ...

and decode samples with ``kind-fast sample RUN --vae /models/sd-vae-ft-ema``.
"""

from __future__ import annotations

import argparse
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--vae", required=True, help="local diffusers AutoencoderKL folder")
    p.add_argument("--data", required=True, help="ImageFolder root (root/<class>/<image>)")
    p.add_argument("--out", required=True, help="output folder for the shards")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=10000)
    p.add_argument("--scale", type=float, default=0.18215)
    p.add_argument("--flip-copies", action="store_true", help="also encode mirrored images")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="stored latent dtype")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=4)
    args = p.parse_args(argv)

    try:
        from diffusers import AutoencoderKL
    except ImportError:
        print("encode_latents.py needs diffusers: pip install diffusers", file=sys.stderr)
        return 2
    from kind_fast.train.data import ImageFolder, write_latent_shards

    data = ImageFolder(args.data, image_size=args.image_size, channels=3)
    vae = AutoencoderKL.from_pretrained(args.vae, local_files_only=True).to(args.device).eval()
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch, shuffle=False, num_workers=args.workers)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)

    def chunks():
        done = 0
        for x, y in loader:
            views = [x, x.flip(-1)] if args.flip_copies else [x]
            for v in views:
                with torch.no_grad():
                    dist = vae.encode(v.to(args.device)).latent_dist
                    z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen, device=args.device)
                yield (z * args.scale).to(dtype).cpu(), y
            done += x.shape[0]
            print(f"\r{done}/{len(data)} images", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)

    out = write_latent_shards(args.out, chunks(), class_names=data.class_names, scale_factor=args.scale,
                              shard_size=args.shard_size,
                              extra={"vae": str(args.vae), "image_size": args.image_size,
                                     "flip_copies": args.flip_copies, "source": str(args.data)})
    print(f"wrote {out}/index.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
