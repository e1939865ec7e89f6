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


# =====================================================================================
# Scoring an ADM-format .npz (kind-fast sample --eval, also after a torchrun sampling run)
# =====================================================================================
def iter_npz(path, name: str = "arr_0", batch: int = 500):
    """The rows of array ``name`` of an uncompressed .npz (what ``np.savez`` and
    ``sample_ddp.write_npz`` write), ``batch`` rows at a time, without loading it whole."""
    import zipfile

    import numpy as np

    with zipfile.ZipFile(path) as zf:
        try:
            f = zf.open(f"{name}.npy")
        except KeyError:
            raise ValueError(f"{path} has no array {name!r} (it holds {sorted(zf.namelist())})") from None
        with f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(f)
            if fortran:
                raise ValueError(f"{path}:{name} is stored in Fortran order; expected C order")
            row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            for start in range(0, shape[0], batch):
                n = min(batch, shape[0] - start)
                data = f.read(n * row)
                if len(data) != n * row:
                    raise ValueError(f"{path}:{name} is truncated")
                yield np.frombuffer(data, dtype=dtype).reshape(n, *shape[1:])


def uint8_to_images(arr) -> torch.Tensor:
    """uint8 (N, H, W, C) (the .npz layout) → float (N, C, H, W) in [-1, 1] (the inverse of
    ``sampling.to_uint8`` up to its rounding)."""
    import numpy as np

    if arr.dtype != np.uint8 or arr.ndim != 4:
        raise ValueError(f"expected uint8 N×H×W×C images, got {arr.dtype} of shape {arr.shape}")
    return torch.from_numpy(np.array(arr)).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # a writable copy


@torch.no_grad()
def quality_of_batches(real_batches, fake_batches, pooled: nn.Module, spatial: nn.Module, *, k: int = 3,
                       device=None, on_fake=None) -> dict:
    """FID, sFID and precision/recall (k-NN manifolds, ``k``) of two streams of image batches
    ((N, C, H, W) in [-1, 1]) in the feature spaces ``pooled`` and ``spatial``. Features are
    computed once per image; the Fréchet distances accumulate through torchmetrics (float64
    sums), the pooled features are kept for precision/recall. ``on_fake(images)`` sees every
    generated batch (e.g. to count class accuracy)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    from kind_fast.train.metrics import FeatureIdentity, precision_recall

    device = torch.device("cpu") if device is None else torch.device(device)
    pooled, spatial = pooled.to(device).eval(), spatial.to(device).eval()
    fid = FrechetInceptionDistance(feature=FeatureIdentity(pooled.num_features)).to(device)
    sfid = FrechetInceptionDistance(feature=FeatureIdentity(spatial.num_features)).to(device)
    kept = {True: [], False: []}
    counts = {True: 0, False: 0}
    for real, batches in ((True, real_batches), (False, fake_batches)):
        for images in batches:
            images = images.to(device)
            p = pooled(images).double()
            fid.update(p, real=real)
            sfid.update(spatial(images).double(), real=real)
            kept[real].append(p.float().cpu())
            counts[real] += images.shape[0]
            if not real and on_fake is not None:
                on_fake(images)
    if min(counts.values()) < 2:
        raise ValueError(f"need at least 2 real and 2 generated images, got {counts[True]} and {counts[False]}")
    out = {"fid": float(fid.compute()), "sfid": float(sfid.compute())}
    out["precision"], out["recall"] = precision_recall(torch.cat(kept[True]), torch.cat(kept[False]), k=k)
    out["n_real"], out["n_generated"] = counts[True], counts[False]
    return out


def digits_of_run(weights_dir) -> list[int] | None:
    """The digit each class of a digits run stands for (from the run's config.json), else None."""
    import json
    from pathlib import Path

    from kind_fast.train.data import DIGIT_DEFAULTS

    for cand in (Path(weights_dir) / "config.json", Path(weights_dir).parent / "config.json"):
        if cand.is_file():
            try:
                cfg = json.loads(cand.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                return None
            data = cfg.get("data") or {}
            if data.get("source", "digits") != "digits":
                return None
            return list(data.get("classes") or DIGIT_DEFAULTS.get(cfg.get("mode"), []) or []) or None
    return None


def evaluate_npz(npz_path, *, digits: list[int] | None = None, ref=None, inception_weights=None, seed: int = 0,
                 device=None, batch: int = 500) -> dict:
    """Score the samples of an ADM-format .npz (``arr_0`` uint8 N×H×W×C, ``labels``).

    * ``digits`` given (a digits model: ``digits[c]`` is the digit of class c): the digit
      classifier's spaces against the real sklearn digits of those classes, plus class accuracy.
    * otherwise ``ref`` (an .npz with ``arr_0`` reference images, e.g. the ADM evaluator's
      reference batch) and ``inception_weights`` (a local file): Inception's pool features
      (FID, precision/recall) and spatial features (sFID).
    """
    import numpy as np

    from kind_fast.train import metrics as M

    if digits is not None:
        from kind_fast.train.digits import load_digits

        clf, report = M.train_digit_classifier(seed)
        pooled, spatial = M.DigitFeatures(clf), M.DigitSpatialFeatures(clf)
        real_x, _ = load_digits(list(digits))
        real_batches = (real_x[i:i + batch] for i in range(0, real_x.shape[0], batch))
        space = f"digit classifier (held-out acc {report['test_acc']:.3f}) vs real digits {list(digits)}"
    else:
        if ref is None or inception_weights is None:
            raise ValueError("scoring non-digit samples needs --ref (an .npz of reference images, arr_0) and "
                             "--inception-weights (a local Inception-v3 weights file, torch-fidelity's)")
        pooled = M.InceptionFeatures(str(inception_weights), 2048)
        spatial = M.InceptionFeatures(str(inception_weights), "spatial")
        real_batches = (uint8_to_images(a) for a in iter_npz(ref, batch=batch))
        space = f"Inception-v3 ({inception_weights}) vs {ref}"
    labels = np.concatenate(list(iter_npz(npz_path, "labels", batch=1 << 20)))
    hits, seen = [0], [0]

    def on_fake(images):
        if digits is None:
            return
        y = torch.as_tensor(labels[seen[0]:seen[0] + images.shape[0]])
        want = torch.tensor(list(digits))[y].to(images.device)
        hits[0] += int((clf.to(images.device)(images).argmax(1) == want).sum())
        seen[0] += images.shape[0]

    fake_batches = (uint8_to_images(a) for a in iter_npz(npz_path, batch=batch))
    out = quality_of_batches(real_batches, fake_batches, pooled, spatial, device=device, on_fake=on_fake)
    if digits is not None:
        out["class_acc"] = hits[0] / max(1, seen[0])
    out["feature_space"] = space
    return out
