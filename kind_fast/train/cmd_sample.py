"""``kind-fast sample``: classifier-free-guided samples of a trained run as a PNG grid.

    kind-fast sample runs/kind --n-per-class 8 --sampler ddim --steps 50 --cfg-scale 1.5
"""

from __future__ import annotations

import argparse

from kind_fast.train.cli import add_sample_arguments, run_sample


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_sample_arguments(p)


def run(args: argparse.Namespace) -> int:
    return run_sample(args)
