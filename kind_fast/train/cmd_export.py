"""``kind-fast export``: a CFG-exact standalone model for some classes of a KIND run.

    kind-fast export runs/kind --classes 0,1 --form merged --out exports/kind_m
    kind-fast export runs/kind --classes 0,1 --form reduced --out exports/kind_r
    kind-fast export runs/pre --task runs/kind/task --classes 1 --form merged --out exports/t
    kind-fast export runs/kind --classes 1 --form dense --out exports/dense   # DiT-layout .pt

merged / reduced write ``model.safetensors`` + ``export_config.json`` (read back with
``kind_fast.load_export``); dense writes a facebookresearch-layout state dict ``model.pt``
for one class without guidance. See ``kind_fast.models.export``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a KIND run folder (its ema/ or model/), a weights folder, or with --task the base")
    p.add_argument("--classes", default=None, help="class ids to serve, e.g. 0,3 or 0-7 (default: all)")
    p.add_argument("--form", choices=("merged", "reduced", "dense"), default="merged",
                   help="merged: a dense weight per served label (dense speed); reduced: W_G + the tailors "
                        "the classes use (small); dense: one class, no guidance, DiT-layout model.pt")
    p.add_argument("--no-guidance", action="store_true",
                   help="do not serve the null label (no classifier-free guidance); implied by --form dense")
    p.add_argument("--out", required=True, help="export folder (written atomically)")
    p.add_argument("--task", default=None, help="a task folder (kind_fast.deploy.tasks) to put on the base RUN first")
    p.add_argument("--which", choices=("ema", "model"), default="ema", help="weights of a run folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")


def load_kind_model(run: str, which: str = "ema", task: str | None = None):
    """A KIND-DiT from a run / weights folder, or a base with a task on it."""
    from kind_fast.train.models import SPEC_FILE, load_weights

    if task is not None:
        from kind_fast.deploy.tasks import load_base, load_task

        return load_task(load_base(run, which=which), task)
    src = Path(run)
    wdir = src if ((src / SPEC_FILE).is_file() or (src / "kind_config.json").is_file()) else src / which
    if not wdir.is_dir():
        raise FileNotFoundError(f"{src}: not a weights folder and it has no {which}/ folder")
    return load_weights(wdir)


def run(args: argparse.Namespace) -> int:
    from kind_fast.deploy.export_io import save_export
    from kind_fast.train.config import parse_int_list

    try:
        model = load_kind_model(args.run, args.which, args.task).eval()
        if getattr(model, "kind", None) is None:
            raise ValueError(f"{args.run} holds a dense model: export serves KIND models (a dense DiT is "
                             "already its own export)")
        classes = parse_int_list(args.classes, "--classes") if args.classes is not None \
            else list(range(model.num_classes))
        if not classes:
            raise ValueError(f"--classes {args.classes!r} names no class (leave it out to export all "
                             f"{model.num_classes})")
        guidance = not (args.no_guidance or args.form == "dense")
        exported = model.export(classes, args.form, guidance=guidance)
        classes = list(getattr(exported, "classes", None) or exported.export_classes)  # as served: no repeats
        out = save_export(exported, args.out, overwrite=args.overwrite,
                          source=str(args.task or args.run))
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as e:
        print(f"kind-fast export: {e}", file=sys.stderr)
        return 2
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    served = f"classes {classes}" + (f" + null label {model.num_classes}" if guidance else "")
    print(f"wrote {out} ({args.form}, {served}, {size / 2**20:.2f} MiB)")
    if args.form == "dense":
        print("note: a dense export is exact for its class only; classifier-free guidance also needs the "
              "null label's weights (use --form merged or reduced for CFG-exact samples)")
    return 0
