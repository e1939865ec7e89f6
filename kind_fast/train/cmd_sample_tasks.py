"""``kind-fast sample-tasks``: samples of several tasks on one learngene base, in mixed batches.

    kind-fast sample-tasks --base runs/pre --task runs/t1/task --task runs/t2/task --n-per-class 8

One ``MultiTaskDiT`` holds every task (tailor banks stacked, one combined gate); each batch
mixes samples of all tasks and every sample is routed to its own task's tailors, label table
and final layer (classifier-free guidance uses each sample's own task's null label). The grid
has one row per (task, class).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, help="the pretrain run (its ema/) or a base folder the tasks share")
    p.add_argument("--task", action="append", required=True, metavar="DIR",
                   help="a task folder (a KIND transfer run's <out>/task, or the run folder); repeatable")
    p.add_argument("--which", choices=("ema", "model"), default="ema", help="weights of the base run folder")
    p.add_argument("--classes", default=None, help="class ids to sample in every task (default: all of each)")
    p.add_argument("--out", default="samples_tasks.png", help="PNG path")
    p.add_argument("--n-per-class", type=int, default=8)
    p.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddim")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--eta", type=float, default=0.0, help="DDIM η")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--npz", action="store_true", help="also write <out>.npz (uint8 NHWC, labels, task ids)")


def _task_dir(path: str) -> Path:
    p = Path(path)
    return p / "task" if not (p / "task.json").is_file() and (p / "task" / "task.json").is_file() else p


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from kind_fast.deploy.tasks import MultiTaskDiT, load_base
    from kind_fast.train.config import parse_int_list
    from kind_fast.train.distributed import resolve_device
    from kind_fast.train.sampling import sample, save_grid, to_uint8

    try:
        if args.n_per_class < 1 or args.batch_size < 1:
            raise ValueError("--n-per-class and --batch-size must be >= 1")
        if args.steps < 2:
            raise ValueError(f"--steps must be >= 2, got {args.steps}")
        device = resolve_device(args.device)
        base = load_base(args.base, which=args.which)
        model = MultiTaskDiT.from_tasks(base, [_task_dir(t) for t in args.task]).to(device)
        picked = parse_int_list(args.classes, "--classes") if args.classes else None
        labels, task_ids = [], []
        for k, n in enumerate(model.task_classes):
            classes = picked if picked is not None else list(range(n))
            labels.append(model.label(k, classes).repeat_interleave(args.n_per_class))
            task_ids.append(torch.full((len(classes) * args.n_per_class,), k))
        labels, task_ids = torch.cat(labels), torch.cat(task_ids)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"kind-fast sample-tasks: {e}", file=sys.stderr)
        return 2
    arch = model.arch
    shape = (arch["in_channels"], arch["input_size"], arch["input_size"])
    images = sample(model, labels, shape=shape, sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg_scale,
                    eta=args.eta, seed=args.seed, device=device, batch_size=args.batch_size,
                    clip_denoised=shape[0] in (1, 3), null_labels=model.null_labels(labels),
                    autocast_dtype=torch.bfloat16 if device.type == "cuda" else None)
    out = Path(args.out)
    save_grid(images, out, nrow=args.n_per_class)
    names = ", ".join(f"{name} ({n} classes)" for name, n in zip(model.task_names, model.task_classes))
    print(f"wrote {out}: tasks {names}; {labels.numel()} samples in mixed batches, {args.sampler} {args.steps} "
          f"steps, cfg {args.cfg_scale}")
    if args.npz:
        npz = out.with_suffix(".npz")
        local = labels - model.label_offset.cpu()[task_ids]
        np.savez(npz, arr_0=to_uint8(images), labels=local.numpy(), tasks=task_ids.numpy())
        print(f"wrote {npz}")
    return 0
