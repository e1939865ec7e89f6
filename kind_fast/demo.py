"""``kind-fast demo``: the main job on the embedded default data (sklearn digits).

Pretrain a small KIND-DiT on digits 0-7, save its learngenes, transfer them to digits 8-9 with
fresh tailors and a new gate (learngenes frozen), and print parameter counts and losses.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=300, help="training steps per phase")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/demo", help="output folder")


def _train(model, diffusion, x, y, *, steps: int, batch: int, lr: float, seed: int, desc: str) -> list[float]:
    import torch
    from tqdm import tqdm

    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    bar = tqdm(range(steps), desc=desc, leave=False, disable=not sys.stderr.isatty())
    for _ in bar:
        pick = torch.randint(0, x.shape[0], (batch,), generator=gen)
        loss = diffusion.loss(model, x[pick], y[pick], generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return losses


def run(args: argparse.Namespace) -> int:
    import torch

    if args.steps < 1 or args.batch < 1:
        raise SystemExit("kind-fast demo: --steps and --batch must be >= 1")
    from kind_fast.data import load_digits
    from kind_fast.diffusion import GaussianDiffusion
    from kind_fast.dit import DiT, KindConfig
    from kind_fast.serialization import load_learngenes, save_kind
    from kind_fast.utils import parameter_breakdown, print_trainable_parameters

    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    diffusion = GaussianDiffusion()
    kind = KindConfig(tailor_rank=16, active=4)
    arch = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=4, num_heads=4,
                learn_sigma=False, class_dropout_prob=0.1)
    rows = []

    def window(losses):
        w = max(1, len(losses) // 10)
        return sum(losses[:w]) / w, sum(losses[-w:]) / w

    # 1. KIND pretraining on digits 0-7: every component trains, tailors diverted by class.
    x_pre, y_pre = load_digits(list(range(8)))
    model = DiT(**arch, num_classes=8, kind=kind).set_mode("pretrain")
    print(f"KIND-DiT: {len(model.kind_layers())} KIND layers, gate {model.kind_gate}")
    print("pretrain on digits 0-7:")
    print_trainable_parameters(model)
    t0 = time.perf_counter()
    losses = _train(model, diffusion, x_pre, y_pre, steps=args.steps, batch=args.batch, lr=args.lr,
                    seed=args.seed, desc="pretrain")
    rows.append(("KIND pretrain (0-7)", parameter_breakdown(model)["all"]["trainable"], *window(losses),
                 time.perf_counter() - t0))
    save_kind(model, out / "pretrained")

    # 2. KIND transfer to digits 8-9: learngenes only, fresh tailors and gate, learngenes frozen.
    x_new, y_new = load_digits([8, 9])
    target = DiT(**arch, num_classes=8, kind=kind)
    load_learngenes(target, out / "pretrained")
    target.prepare_transfer(num_classes=2, generator=torch.Generator().manual_seed(args.seed))
    print("transfer to digits 8-9 (learngenes frozen):")
    print_trainable_parameters(target)
    t0 = time.perf_counter()
    losses = _train(target, diffusion, x_new, y_new, steps=args.steps, batch=args.batch, lr=args.lr,
                    seed=args.seed + 1, desc="transfer")
    rows.append(("KIND transfer (8-9)", parameter_breakdown(target)["all"]["trainable"], *window(losses),
                 time.perf_counter() - t0))
    save_kind(target, out / "transferred")

    header = f"{'run':<22} {'trainable':>10} {'loss first 10%':>15} {'loss last 10%':>14} {'wall s':>8}"
    print("\n" + header + "\n" + "-" * len(header))
    for name, n, first, last, wall in rows:
        print(f"{name:<22} {n:>10,d} {first:>15.4f} {last:>14.4f} {wall:>8.1f}")
    summary = [dict(run=r[0], trainable=r[1], loss_first=r[2], loss_last=r[3], wall_s=r[4]) for r in rows]
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nsaved: {out / 'pretrained'}, {out / 'transferred'}, {out / 'demo_summary.json'}")
    return 0
