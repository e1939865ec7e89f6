"""Samples and metrics of a training run: the end-of-run grid, ``--eval`` (digits), and the
periodic ``sample_every`` / ``eval_every`` outputs written during training.

Every sample here is drawn from generators seeded by the run's seed (``sampling.sample``), never
from the global RNG, so sampling during training leaves the training run unchanged.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn


def sample_grid(trainer, path: Path, model: nn.Module | None = None) -> Path:
    """A grid of ``eval.n_per_class`` samples per class (rows) of the run's EMA (or raw) model."""
    from kind_fast.train.sampling import sample, save_grid

    e = trainer.cfg.eval
    model = model if model is not None else trainer.eval_model(e.weights)
    labels = torch.arange(trainer.data.num_classes).repeat_interleave(e.n_per_class)
    images = sample(model, labels, shape=trainer.data.sample_shape, sampler=e.sampler, steps=e.sample_steps,
                    cfg_scale=e.cfg_scale, seed=trainer.cfg.seed, device=trainer.device,
                    autocast_dtype=trainer.amp_dtype)
    return save_grid(images, path, nrow=e.n_per_class)


def digits_metrics(trainer, per_class: int, model: nn.Module | None = None) -> dict:
    """Digits runs: FID / KID / IS in the digit classifier's feature space and the class accuracy
    of ``per_class`` samples per class (the classifier is trained once per run and kept)."""
    from kind_fast.train.data import DIGIT_DEFAULTS
    from kind_fast.train.metrics import digits_quality, train_digit_classifier
    from kind_fast.train.sampling import sample

    if trainer.cfg.data.source != "digits":
        raise ValueError("digit metrics score digits runs only (for real data use kind_fast.train.metrics "
                         "with InceptionFeatures and your own reference set)")
    e = trainer.cfg.eval
    if getattr(trainer, "_digit_clf", None) is None:
        trainer._digit_clf = train_digit_classifier(trainer.cfg.seed)
    clf, report = trainer._digit_clf
    digits = trainer.cfg.data.classes or DIGIT_DEFAULTS[trainer.cfg.mode]
    labels = torch.arange(len(digits)).repeat_interleave(per_class)
    model = model if model is not None else trainer.eval_model(e.weights)
    fake = sample(model, labels, shape=trainer.data.sample_shape, sampler=e.sampler, steps=e.sample_steps,
                  cfg_scale=e.cfg_scale, seed=trainer.cfg.seed + 1, device=trainer.device)
    out = digits_quality(fake, torch.tensor(digits)[labels], trainer.data.x, clf)
    out["classifier_test_acc"] = report["test_acc"]
    return out


def periodic(trainer) -> float:
    """After a step: the ``sample_every`` grid and the ``eval_every`` metrics that are due
    (every rank calls this: building the EMA model is a collective under FSDP; rank 0 samples).
    Returns the seconds it took (kept out of the training throughput)."""
    cfg, step = trainer.cfg, trainer.step
    do_sample = bool(cfg.sample_every) and step % cfg.sample_every == 0
    do_eval = bool(cfg.eval_every) and step % cfg.eval_every == 0
    if not (do_sample or do_eval):
        return 0.0
    from kind_fast.train.distributed import barrier

    t0 = time.perf_counter()
    model = trainer.eval_model(cfg.eval.weights)
    if trainer.env.is_main:
        if do_sample:
            path = sample_grid(trainer, trainer.out / "samples" / f"step_{step:08d}.png", model)
            trainer.logger.log_image("samples", path, step)
        if do_eval:
            m = digits_metrics(trainer, cfg.eval.metric_samples, model)
            scalars = {k: v for k, v in m.items() if isinstance(v, (int, float))}
            trainer.log_fn(trainer.logger.log_eval(step, scalars))
    del model
    barrier(trainer.env)
    return time.perf_counter() - t0
