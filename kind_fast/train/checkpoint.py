"""Training checkpoints: atomic, keep-last-N, validated on load.

A checkpoint is one ``torch.save`` file ``<out>/checkpoints/step_XXXXXXXX.pt`` holding only
tensors and plain Python containers (so it loads with ``weights_only=True``)::

    format, format_version, step, spec (how to rebuild the model), config (the run config),
    model (full state dict), ema ({param name: tensor}, trainable parameters only),
    optimizer (FQN-keyed, torch.distributed.checkpoint layout), scheduler,
    rng (per rank: torch CPU, CUDA, numpy, python), data (samples consumed)

Writes go to a temporary file in the same folder, are flushed and fsync'ed, then renamed over
the final name (``os.replace`` is atomic on POSIX and Windows): a crash mid-write leaves the
previous checkpoints untouched and no partial file under a checkpoint name. Old checkpoints
are deleted only after the new one is in place.
"""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path

import torch

from kind_fast.atomic import atomic_torch_save

FORMAT = "kind_fast.train"
FORMAT_VERSION = 1
CKPT_DIR = "checkpoints"
_NAME = re.compile(r"^step_(\d{8,})\.pt$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: corrupt, not ours, or from an incompatible run."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}.pt"


def list_checkpoints(out: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint under ``<out>/checkpoints``, oldest first."""
    d = Path(out) / CKPT_DIR
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def prune_checkpoints(out: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints; returns the deleted paths."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    ckpts = list_checkpoints(out)
    doomed = [p for _, p in ckpts[:-keep_last]]
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed


def save_checkpoint(state: dict, out: str | os.PathLike, step: int, *, keep_last: int) -> Path:
    """Write ``state`` as the checkpoint of ``step`` atomically, then prune to ``keep_last``."""
    state = dict(state, format=FORMAT, format_version=FORMAT_VERSION, step=int(step))
    path = Path(out) / CKPT_DIR / checkpoint_name(step)
    atomic_torch_save(state, path)
    prune_checkpoints(out, keep_last)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load and sanity-check a checkpoint file (``weights_only=True``: no code runs).

    Raises FileNotFoundError if it is missing and CheckpointError (a ValueError) if it is
    truncated, corrupt, or not a kind_fast training checkpoint.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {p} not found")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint {p} is corrupt or truncated ({type(e).__name__}: {str(e)[:200]}); "
            "resume from an earlier checkpoint (--resume PATH) or start a new run"
        ) from e
    except Exception as e:  # noqa: BLE001 - e.g. pickle.UnpicklingError for foreign objects
        raise CheckpointError(
            f"checkpoint {p} could not be loaded safely ({type(e).__name__}: {str(e)[:200]}); "
            "it is not a kind_fast training checkpoint"
        ) from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        what = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{p} is not a kind_fast training checkpoint (format {what!r})")
    if state.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{p} has format version {state['format_version']}; this kind_fast reads <= {FORMAT_VERSION}")
    keys = ("step", "spec", "config", "model", "ema", "optimizer", "scheduler", "rng", "data")
    missing = [k for k in keys if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {p} lacks {missing}; it is incomplete")
    return state


def find_resume(out: str | os.PathLike, resume: str) -> Path | None:
    """The checkpoint to resume from: ``auto`` → the newest one in ``out`` (None if there is
    none), otherwise ``resume`` is a checkpoint file or a run folder."""
    if resume == "auto":
        ckpts = list_checkpoints(out)
        return ckpts[-1][1] if ckpts else None
    p = Path(resume)
    if p.is_dir():
        ckpts = list_checkpoints(p)
        if not ckpts:
            raise FileNotFoundError(f"--resume {p}: no checkpoints under {p / CKPT_DIR}")
        return ckpts[-1][1]
    if not p.is_file():
        raise FileNotFoundError(f"--resume {p}: no such checkpoint file or run folder")
    return p


def check_compatible(state: dict, spec: dict, path: Path | str) -> None:
    """The checkpoint's model spec must equal the run's (method, architecture, KIND layout,
    classes, adapters); otherwise its weights would not fit, or fit and mean something else."""
    saved = state["spec"]
    diffs = sorted(k for k in set(saved) | set(spec) if saved.get(k) != spec.get(k))
    if diffs:
        detail = "; ".join(f"{k}: checkpoint {saved.get(k)!r} vs run {spec.get(k)!r}" for k in diffs)
        raise CheckpointError(f"checkpoint {path} is from an incompatible run ({detail})")
