"""Training checkpoints: atomic, keep-last-N, verified on load, never lost on resume.

A checkpoint is one ``torch.save`` file ``<out>/checkpoints/step_XXXXXXXX.pt`` holding only
tensors and plain Python containers (so it loads with ``weights_only=True``)::

    format, format_version, step, spec (how to rebuild the model), config (the run config),
    model (full state dict), ema ({param name: tensor}, trainable parameters only),
    ema_step (diffusers EMAModel's optimization_step: its decay warm-up),
    scaler (torch.amp.GradScaler state under --precision fp16, else {}),
    optimizer (FQN-keyed, torch.distributed.checkpoint layout), scheduler,
    rng (per rank: torch CPU, CUDA, numpy, python), data (samples consumed),
    world_size (recorded for reading, not used on resume), elapsed_s (training wall time so far),
    losses (per-step losses so far)

``load_checkpoint`` requires the keys up to ``data``; the later ones default when absent
(checkpoints written before they existed).

Writes go to a temporary file in the same folder, are flushed and fsync'ed, then renamed over
the final name (``kind_fast.atomic``): a crash mid-write leaves the previous checkpoints
untouched and no partial file under a checkpoint name (the orphaned temporary file is removed
by the next write or the next run). Every zip record carries a CRC-32 that ``load_checkpoint``
verifies, so a flipped bit in tensor data is refused, not loaded.

Policy (``docs/design.md`` §4):

* pruning keeps the newest ``keep_last`` checkpoints *at or below the step just written*; it
  never deletes the checkpoint it just wrote, nor anything newer;
* resuming from a checkpoint when the run folder holds newer ones (for example after the
  newest was found truncated) moves the newer ones, and the outputs that came from them
  (``RUN_OUTPUTS``: ``model/``, ``ema/``, ``task/``, ``samples/``, ``eval.json``, ``loss.png``;
  copies of the records ``RUN_RECORDS``: ``metrics.csv``, ``eval.csv``, ``config.json``), to
  ``<out>/superseded/<time>-after-step-N/``: nothing is deleted, and the resumed run can
  neither continue the old one nor be mistaken for it (no ``export --task`` or
  ``sample-tasks`` serves the abandoned run's task). Everything else a run writes is
  ``RUN_KEPT``: it stays and is continued (``log.txt`` appends, TensorBoard purges the
  redone steps, W&B resumes);
* resuming into a run folder from a checkpoint of *another* folder is refused while the run
  folder holds checkpoints of its own.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import zipfile
from pathlib import Path

import torch

from kind_fast.atomic import atomic_torch_save
from kind_fast.train.runlock import LOCK_FILE

FORMAT = "kind_fast.train"
FORMAT_VERSION = 1
CKPT_DIR = "checkpoints"
SUPERSEDED_DIR = "superseded"
# outputs of a run that a resume from an older checkpoint supersedes (moved aside) ...
RUN_OUTPUTS = ("model", "ema", "task", "samples", "eval.json", "loss.png")
# ... records it keeps writing into (copied aside: the resumed run truncates/overwrites them) ...
RUN_RECORDS = ("metrics.csv", "eval.csv", "config.json")
# ... and what stays (every name a run writes is in exactly one of the three; tests check it)
RUN_KEPT = (CKPT_DIR, SUPERSEDED_DIR, "log.txt", "tb", "wandb", "wandb_id.txt", LOCK_FILE)
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


def prune_checkpoints(out: str | os.PathLike, keep_last: int, *, newest: int | None = None) -> list[Path]:
    """Delete the oldest checkpoints so that ``keep_last`` remain at or below step ``newest``
    (default: the newest checkpoint). Checkpoints above ``newest`` are never touched, so a
    save followed by a prune can never delete what it just wrote. Returns the deleted paths."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    ckpts = list_checkpoints(out)
    if newest is not None:
        ckpts = [(s, p) for s, p in ckpts if s <= newest]
    doomed = [p for _, p in ckpts[:-keep_last]]
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed


def save_checkpoint(state: dict, out: str | os.PathLike, step: int, *, keep_last: int) -> Path:
    """Write ``state`` as the checkpoint of ``step`` atomically, then prune older ones to
    ``keep_last`` (see ``prune_checkpoints``)."""
    state = dict(state, format=FORMAT, format_version=FORMAT_VERSION, step=int(step))
    path = Path(out) / CKPT_DIR / checkpoint_name(step)
    atomic_torch_save(state, path)
    prune_checkpoints(out, keep_last, newest=int(step))
    return path


def _verify_zip(p: Path) -> None:
    """Check every record of a ``torch.save`` zip against its CRC-32 (torch.load does not)."""
    try:
        with zipfile.ZipFile(p) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
        raise CheckpointError(
            f"checkpoint {p} is corrupt or truncated ({type(e).__name__}: {str(e)[:200]}); "
            "resume from an earlier checkpoint (--resume PATH) or start a new run"
        ) from e
    if bad is not None:
        raise CheckpointError(
            f"checkpoint {p} is corrupt: its record {bad!r} fails the CRC-32 check (a changed byte: "
            "disk or copy error); resume from an earlier checkpoint (--resume PATH)")


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load and sanity-check a checkpoint file (``weights_only=True``: no code runs).

    Raises FileNotFoundError if it is missing and CheckpointError (a ValueError) if it is
    truncated, corrupt (any record failing its CRC-32), or not a kind_fast training checkpoint.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {p} not found")
    _verify_zip(p)
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
        old, new = (saved.get("kind") or {}).get("gate"), (spec.get("kind") or {}).get("gate")
        if old and new and old != new:  # e.g. a run started before the default gate changed (docs/design.md §1.4)
            detail += f"; the checkpoint's class gate is {old!r}: resume with --set model.gate={old}"
        raise CheckpointError(f"checkpoint {path} is from an incompatible run ({detail})")


def in_run_folder(path: str | os.PathLike, out: str | os.PathLike) -> bool:
    """Whether checkpoint ``path`` lies in ``<out>/checkpoints``."""
    return Path(path).resolve().parent == (Path(out) / CKPT_DIR).resolve()


def check_resume_source(path: Path, out: str | os.PathLike) -> None:
    """Refuse to resume into a run folder that holds its own checkpoints from a checkpoint
    of another folder (the two runs' checkpoints would mix, and pruning would mix them up)."""
    if not in_run_folder(path, out) and list_checkpoints(out):
        raise FileExistsError(
            f"--resume {path}: the output folder {out} already holds checkpoints of another run; "
            f"resume from one of those (--resume auto) or choose an empty --out (nothing was changed)")


def supersede_newer(out: str | os.PathLike, step: int) -> Path | None:
    """Move the checkpoints of ``out`` newer than ``step`` and the outputs made from them
    aside, to ``<out>/superseded/<time>-after-step-<step>/`` (nothing is deleted); returns
    that folder, or None when there are no newer checkpoints."""
    out = Path(out)
    newer = [p for s, p in list_checkpoints(out) if s > step]
    if not newer:
        return None
    base = out / SUPERSEDED_DIR / f"{time.strftime('%Y%m%d-%H%M%S')}-after-step-{step}"
    dest, n = base, 1
    while dest.exists():
        dest, n = base.with_name(f"{base.name}-{n}"), n + 1
    (dest / CKPT_DIR).mkdir(parents=True)
    for name in RUN_RECORDS:
        if (out / name).is_file():
            shutil.copy2(out / name, dest / name)
    # the outputs first, the newer checkpoints last: they are what makes the next start
    # supersede again, so a process killed in between never leaves stale outputs live
    for name in RUN_OUTPUTS:
        if (out / name).exists():
            os.replace(out / name, dest / name)
    for p in newer:
        os.replace(p, dest / CKPT_DIR / p.name)
    return dest
