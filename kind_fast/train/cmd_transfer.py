"""``kind-fast transfer``: KIND transfer from a pretrain run, or a baseline at the same budget.

    kind-fast transfer --init runs/pretrain --classes 8,9 --method kind --out runs/kind
    kind-fast transfer --init runs/pretrain --classes 8,9 --method lora --out runs/lora
"""

from __future__ import annotations

import argparse

from kind_fast.train.cli import add_run_arguments, run_training


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p, "transfer")


def run(args: argparse.Namespace) -> int:
    return run_training(args, "transfer")
