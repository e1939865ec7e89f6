"""Loss curves of a run: ``<run>/loss.png`` from ``metrics.csv`` (and ``eval.csv`` if present).

Written at the end of every training run and by ``kind-fast plot RUN``. matplotlib is optional:
without it nothing is drawn and the caller says so in one line.
"""

from __future__ import annotations

import io
import os
from pathlib import Path


def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_run(run: str | os.PathLike, out: str | os.PathLike | None = None) -> Path | None:
    """Draw the run's training curves (loss, its MSE and VB terms, grad norm, learning rate) and
    its evaluation metrics over the steps into ``out`` (default ``<run>/loss.png``).
    Returns the path, or None when matplotlib is not installed."""
    from kind_fast.atomic import atomic_write_bytes
    from kind_fast.train.logger import read_metrics

    run = Path(run)
    if not (run / "metrics.csv").is_file():
        raise FileNotFoundError(f"{run} has no metrics.csv: not a kind_fast run folder")
    rows = read_metrics(run)
    if not rows:
        raise ValueError(f"{run / 'metrics.csv'} has no rows yet")
    evals = read_metrics(run, "eval.csv") if (run / "eval.csv").is_file() else []
    if not _have_matplotlib():
        return None
    from matplotlib.figure import Figure

    eval_keys = sorted({k for r in evals for k, v in r.items() if k != "step" and v is not None})
    n = 2 + (1 if eval_keys else 0)
    fig = Figure(figsize=(5.0 * n, 3.6), layout="constrained")
    axes = fig.subplots(1, n)
    steps = [r["step"] for r in rows]
    mark = "o" if len(rows) < 30 else None  # a few rows: show the points

    ax = axes[0]
    for key, style in (("loss", "-"), ("mse", "--"), ("vb", ":")):
        ys = [r[key] for r in rows]
        if any(y is not None for y in ys):
            ax.plot(steps, ys, style, marker=mark, label=key)
    if all(r["loss"] is not None and r["loss"] > 0 for r in rows):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title("training loss (mean per logged window)")
    ax.legend()
    ax.grid(alpha=0.3)

    ax = axes[1]
    ax.plot(steps, [r["grad_norm"] for r in rows], color="tab:red", marker=mark)
    ax.set_xlabel("step")
    ax.set_ylabel("grad norm", color="tab:red")
    lr = ax.twinx()
    lr.plot(steps, [r["lr"] for r in rows], color="tab:blue", marker=mark)
    lr.set_ylabel("learning rate", color="tab:blue")
    ax.set_title("grad norm (before clipping) and learning rate", fontsize=10)
    ax.grid(alpha=0.3)

    if eval_keys:
        ax = axes[2]
        for k in eval_keys:
            pts = [(r["step"], r[k]) for r in evals if r.get(k) is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=k)
        ax.set_xlabel("step")
        ax.set_title("evaluation")
        ax.legend()
        ax.grid(alpha=0.3)

    fig.suptitle(f"{run.name}: {len(rows)} rows to step {steps[-1]}")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    out = Path(out) if out is not None else run / "loss.png"
    atomic_write_bytes(buf.getvalue(), out)
    return out
