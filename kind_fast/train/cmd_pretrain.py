"""``kind-fast pretrain``: KIND pretraining (or a dense DiT with --method dense).

    kind-fast pretrain --steps 2000 --batch-size 64 --lr 1e-3 --out runs/pretrain
    torchrun --nproc_per_node 8 -m kind_fast pretrain --config pretrain.yaml
"""

from __future__ import annotations

import argparse

from kind_fast.train.cli import add_run_arguments, run_training


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p, "pretrain")


def run(args: argparse.Namespace) -> int:
    return run_training(args, "pretrain")
