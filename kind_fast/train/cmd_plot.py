"""``kind-fast plot RUN``: draw a run's loss curves (``<run>/loss.png``) from its metrics.csv.

    kind-fast plot runs/pretrain            # also while the run is still training
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a run folder (holds metrics.csv)")
    p.add_argument("--out", default=None, help="PNG path (default: <run>/loss.png)")


def run(args: argparse.Namespace) -> int:
    from kind_fast.train.plot import plot_run

    try:
        path = plot_run(args.run, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"kind-fast plot: {e}", file=sys.stderr)
        return 2
    if path is None:
        print("kind-fast plot: matplotlib is not installed (pip install matplotlib); nothing drawn", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0
