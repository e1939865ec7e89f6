"""The KIND trainer: pretrain, transfer and the baselines through one loop (docs/design.md §4),
its data, the demo and the ``kind-fast`` commands that run them. The top layer: may import every
other subpackage; nothing below it imports ``train`` (tests/test_layering.py).

* ``config``: ``RunConfig`` (defaults ← YAML/JSON file ← flags), validated.
* ``data``: sklearn digits, ImageFolder, VAE-latent shards; a (seed, step)-determined order;
  ``digits``: sklearn's 8×8 digits as a tensor data set (``load_digits``).
* ``models``: the model of each method (KIND pretrain/transfer, full fine-tuning, LoRA,
  SVDiff, scratch) and its spec; final weights (``<out>/model``, ``<out>/ema``).
* ``loop``: ``Trainer`` (DDPM with learned Σ, AdamW, EMA, clipping, bf16/fp16 autocast,
  gradient accumulation, torch.compile, activation checkpointing, DDP/FSDP).
* ``checkpoint``: atomic, keep-last-N, verified on load, exact resume; newer checkpoints of a
  resumed-from-older run moved to ``superseded/``. ``runlock``: one run per output folder.
* ``distributed``: torchrun set-up, DDP / FSDP2 wrapping, small collectives.
* ``sampling``: CFG sampling through diffusers' DDPM / DDIM schedulers, PNG grids;
  ``sample_ddp``: many samples over torchrun ranks into one ADM-format .npz.
* ``evaluate``: grids and digit metrics at the end of a run and every N steps during it.
* ``logger`` / ``plot``: metrics.csv, log.txt, TensorBoard, W&B; loss curves (loss.png).
* ``metrics``: FID / KID / IS through torchmetrics with pluggable features; the digit classifier.
* ``cli`` and ``cmd_*``: the ``kind-fast`` commands pretrain, transfer, sample, sample-tasks,
  export and plot (each ``cmd_*`` module: ``add_arguments(parser)`` and ``run(args)``).
* ``convert``: ``kind-fast convert``, a dense DiT checkpoint as a KIND-DiT save folder.
* ``demo``: ``kind-fast demo``, the main job (pretrain on digits 0-7, transfer to 8-9, baselines).

Nothing here is imported by ``import kind_fast``.
"""

from kind_fast.train.config import RunConfig

__all__ = ["RunConfig", "Trainer"]


def __getattr__(name):
    if name == "Trainer":
        from kind_fast.train.loop import Trainer

        return Trainer
    raise AttributeError(name)
