"""Run logging: ``<out>/metrics.csv`` and ``<out>/log.txt`` (always), TensorBoard (``<out>/tb``)
and Weights & Biases (both optional).

* ``metrics.csv``: one row per ``log_every`` steps (full float precision; the resume tests
  compare these); ``eval.csv``: one row per ``--eval-every`` evaluation.
* ``log.txt``: every message of the run and one plain line per logged row, with the time, so
  a run under SLURM, CI or ``nohup`` can be followed with ``tail -f``. The same lines go to
  stdout when no progress bar is shown (stdout is not a terminal, or ``--no-progress``).
* TensorBoard: ``tensorboard: auto`` (if installed) | ``on`` | ``off``.
* W&B: ``wandb: on`` needs the ``wandb`` package; the run id is kept in ``<out>/wandb_id.txt``
  so a resumed run continues the same W&B run. ``WANDB_MODE=offline`` works without a network
  (``wandb sync`` uploads later).

On resume, rows after the resumed step are dropped from the CSV files and TensorBoard (they
belong to the part of the killed run that is being redone).
"""

from __future__ import annotations

import csv
import io
import os
import time
import uuid
from pathlib import Path

from kind_fast.atomic import atomic_write_text

COLUMNS = ("step", "loss", "mse", "vb", "lr", "grad_norm", "samples_per_s", "elapsed_s")


def tensorboard_writer(log_dir: Path, mode: str, purge_step: int | None = None):
    """A SummaryWriter, or None. ``mode``: auto (if installed), on (required), off."""
    if mode == "off":
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if mode == "on":
            raise ImportError(
                "tensorboard=on needs the tensorboard package: pip install tensorboard "
                "(or 'kind_fast[tensorboard]'); metrics.csv is written either way"
            ) from None
        return None
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


def wandb_run(out: Path, mode: str, *, project: str, config: dict | None, resume_step: int | None):
    """A wandb run (resumed when ``<out>/wandb_id.txt`` exists), or None for ``mode='off'``."""
    if mode == "off":
        return None
    try:
        import wandb
    except ImportError:
        raise ImportError("wandb=on needs the wandb package: pip install wandb (WANDB_MODE=offline logs "
                          "without a network); metrics.csv and log.txt are written either way") from None
    id_file = out / "wandb_id.txt"
    run_id = id_file.read_text().strip() if (resume_step is not None and id_file.is_file()) else None
    if run_id is None:
        run_id = uuid.uuid4().hex[:16]  # W&B run ids: letters and digits
        atomic_write_text(run_id + "\n", id_file)
    return wandb.init(project=project, name=out.name, id=run_id, resume="allow", dir=str(out), config=config)


def _truncate_csv(path: Path, columns, resume_step: int | None) -> None:
    """A fresh CSV with a header, or on resume the rows up to ``resume_step``."""
    if resume_step is None or not path.exists():
        with open(path, "w", newline="") as f:
            csv.writer(f).writerow(columns)
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header = rows[0] if rows else list(columns)
    keep = [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= resume_step]
    text = io.StringIO(newline="")
    w = csv.writer(text)
    w.writerow(header)
    w.writerows(keep)
    atomic_write_text(text.getvalue(), path)


def format_row(row: dict, total: int | None = None) -> str:
    """One plain, grep-able line for a metrics row."""
    step = f"step {row['step']}" + (f"/{total}" if total else "")
    parts = [step] + [f"{k} {row[k]:.4f}" for k in ("loss", "mse", "vb") if row.get(k) is not None]
    if row.get("lr") is not None:
        parts.append(f"lr {row['lr']:.2e}")
    if row.get("grad_norm") is not None:
        parts.append(f"grad_norm {row['grad_norm']:.3f}")
    if row.get("samples_per_s") is not None:
        parts.append(f"{row['samples_per_s']:.1f} img/s")
    if row.get("elapsed_s") is not None:
        parts.append(f"elapsed {row['elapsed_s']:.0f}s")
    return "  ".join(parts)


class MetricsLogger:
    """Writes metrics.csv, log.txt and the optional trackers of one run (rank 0 only)."""

    def __init__(self, out: Path, *, resume_step: int | None, tensorboard: str = "auto", wandb: str = "off",
                 wandb_project: str = "kind_fast", config: dict | None = None, total_steps: int | None = None):
        self.out = Path(out)
        self.path = self.out / "metrics.csv"
        self.eval_path = self.out / "eval.csv"
        self.total_steps = total_steps
        _truncate_csv(self.path, COLUMNS, resume_step)
        if resume_step is None:
            self.eval_path.unlink(missing_ok=True)
        elif self.eval_path.exists():
            _truncate_csv(self.eval_path, ("step",), resume_step)
        self.text = open(self.out / "log.txt", "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.note(f"{'resumed at step ' + str(resume_step) if resume_step is not None else 'started'}"
                  f" (pid {os.getpid()})")
        self.tb = tensorboard_writer(self.out / "tb", tensorboard,
                                     purge_step=None if resume_step is None else resume_step + 1)
        self.tb_note = None
        if self.tb is None and tensorboard == "auto":
            self.tb_note = "TensorBoard logging off (pip install tensorboard to enable); metrics.csv has everything"
        self.wb = wandb_run(self.out, wandb, project=wandb_project, config=config, resume_step=resume_step)

    def note(self, message: str) -> None:
        """Append a message to log.txt (with the time)."""
        if self.text is not None:
            for line in str(message).splitlines() or [""]:
                self.text.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {line}\n")

    def log(self, row: dict) -> str:
        """Write a training row everywhere; returns its plain line (also in log.txt)."""
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([_fmt(row.get(c)) for c in COLUMNS])
        scalars = {f"train/{k}": v for k, v in row.items() if k != "step" and v is not None}
        self._scalars(scalars, row["step"])
        line = format_row(row, self.total_steps)
        self.note(line)
        return line

    def log_eval(self, step: int, metrics: dict[str, float]) -> str:
        """Write an evaluation row (eval.csv + trackers); returns its plain line."""
        keys = sorted(metrics)
        new = not self.eval_path.exists() or self.eval_path.stat().st_size == 0
        if not new:
            with open(self.eval_path, newline="") as f:
                header = next(csv.reader(f), [])
            if header[1:] != keys:  # different metrics than before: rewrite with the union of columns
                with open(self.eval_path, newline="") as f:
                    old = list(csv.DictReader(f))
                keys = sorted(set(keys) | set(header[1:]))
                text = io.StringIO(newline="")
                w = csv.writer(text)
                w.writerow(["step", *keys])
                w.writerows([[r.get("step", "")] + [r.get(k, "") for k in keys] for r in old])
                atomic_write_text(text.getvalue(), self.eval_path)
        with open(self.eval_path, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["step", *keys])
            w.writerow([step] + [_fmt(metrics.get(k)) for k in keys])
        self._scalars({f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step)
        line = f"eval step {step}  " + "  ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())
                                                   if isinstance(v, (int, float)))
        self.note(line)
        return line

    def log_image(self, tag: str, path: Path, step: int) -> None:
        """A PNG written to the run folder, shown in the trackers too."""
        self.note(f"{tag} at step {step}: {path}")
        if self.tb is not None or self.wb is not None:
            import numpy as np
            from PIL import Image

            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"))
            if self.tb is not None:
                self.tb.add_image(tag, arr, step, dataformats="HWC")
            if self.wb is not None:
                import wandb

                self.wb.log({tag: wandb.Image(arr)}, step=step)

    def _scalars(self, values: dict[str, float], step: int) -> None:
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if self.wb is not None:
            self.wb.log(values, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
            self.tb = None
        if self.wb is not None:
            self.wb.finish()
            self.wb = None
        if self.text is not None:
            self.text.close()
            self.text = None


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)  # full precision: the resume test compares these
    return str(v)


def read_metrics(out: str | os.PathLike, name: str = "metrics.csv") -> list[dict]:
    """Rows of ``<out>/metrics.csv`` (or ``eval.csv``): step as int, the rest as float or None."""
    with open(Path(out) / name, newline="") as f:
        return [{k: (int(v) if k == "step" else (float(v) if v not in ("",) else None)) for k, v in r.items()}
                for r in csv.DictReader(f)]
