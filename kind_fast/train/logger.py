"""Metrics to ``<out>/metrics.csv`` (always) and TensorBoard (``<out>/tb``, optional)."""

from __future__ import annotations

import csv
import io
import os
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


class MetricsLogger:
    """Appends rows to metrics.csv; on resume, rows after the resumed step are dropped first
    (they belong to the part of the killed run that is being redone)."""

    def __init__(self, out: Path, *, resume_step: int | None, tensorboard: str = "auto"):
        self.path = Path(out) / "metrics.csv"
        if resume_step is None or not self.path.exists():
            with open(self.path, "w", newline="") as f:
                csv.writer(f).writerow(COLUMNS)
        else:
            with open(self.path, newline="") as f:
                rows = list(csv.reader(f))
            keep = [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= resume_step]
            text = io.StringIO(newline="")
            w = csv.writer(text)
            w.writerow(COLUMNS)
            w.writerows(keep)
            atomic_write_text(text.getvalue(), self.path)
        self.tb = tensorboard_writer(Path(out) / "tb", tensorboard,
                                     purge_step=None if resume_step is None else resume_step + 1)
        self.tb_note = None
        if self.tb is None and tensorboard == "auto":
            self.tb_note = "TensorBoard logging off (pip install tensorboard to enable); metrics.csv has everything"

    def log(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([_fmt(row.get(c)) for c in COLUMNS])
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and v is not None:
                    self.tb.add_scalar(f"train/{k}", v, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
            self.tb = None


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)  # full precision: the resume test compares these
    return str(v)


def read_metrics(out: str | os.PathLike) -> list[dict]:
    with open(Path(out) / "metrics.csv", newline="") as f:
        return [{k: (float(v) if v not in ("",) and k != "step" else (int(v) if k == "step" else None))
                 for k, v in r.items()} for r in csv.DictReader(f)]
