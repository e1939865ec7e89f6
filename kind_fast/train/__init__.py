"""The KIND trainer: pretrain, transfer and the baselines through one loop (docs/design.md §4).

* ``config``: ``RunConfig`` (defaults ← YAML/JSON file ← flags), validated.
* ``data``: sklearn digits, ImageFolder, VAE-latent shards; a (seed, step)-determined order.
* ``models``: the model of each method (KIND pretrain/transfer, full fine-tuning, LoRA,
  SVDiff, scratch) and its spec; final weights (``<out>/model``, ``<out>/ema``).
* ``loop``: ``Trainer`` (DDPM with learned Σ, AdamW, EMA, clipping, bf16 on GPU, DDP/FSDP).
* ``checkpoint``: atomic, keep-last-N, exact resume.
* ``sampling``: CFG sampling (DDPM / DDIM, respaced) and PNG grids.
* ``metrics``: FID / KID / IS through torchmetrics with pluggable features; the digit classifier.

Nothing here is imported by ``import kind_fast``.
"""

from kind_fast.train.config import RunConfig

__all__ = ["RunConfig", "Trainer"]


def __getattr__(name):
    if name == "Trainer":
        from kind_fast.train.loop import Trainer

        return Trainer
    raise AttributeError(name)
