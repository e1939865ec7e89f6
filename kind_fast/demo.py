"""``kind-fast demo``: the main job on the embedded default data (sklearn digits).

1. trains a small digit classifier on real digits (its features define FID here; it also
   reads the class of generated digits);
2. pretrains a small KIND-DiT on digits 0-7;
3. transfers it to digits 8-9 with KIND (learngenes loaded and frozen, fresh tailors, gate and
   label table), and trains the baselines with the same loop, steps, batch, learning rate and
   seed: full fine-tuning, LoRA and SVDiff (on the dense DiT the pretrained KIND model exports)
   and training from scratch;
4. samples every model (EMA weights, CFG, DDIM) and prints one table: trainable parameters,
   training GFLOPs per image (FlopCounterMode over one forward + backward of a training step,
   divided by the batch; attention counted through the math SDPA backend), training wall time,
   FID in the digit classifier's feature space and the class accuracy of the samples.

Everything is computed in the run; nothing in the table is a constant. Sized for 2 CPU cores
in about five minutes (``--pretrain-steps`` / ``--steps`` scale it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

METHODS = ("kind", "full", "lora", "svdiff", "scratch")
LABELS = {
    "pretrain": "KIND pretrain",
    "kind": "KIND transfer",
    "full": "full fine-tune",
    "lora": "LoRA",
    "svdiff": "SVDiff",
    "scratch": "from scratch",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pretrain-steps", type=int, default=1500, help="KIND pretraining steps on digits 0-7")
    p.add_argument("--steps", type=int, default=500, help="training steps of every transfer method (8-9)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lora-rank", type=int, default=4)
    p.add_argument("--samples-per-class", type=int, default=100, help="generated samples per class for FID")
    p.add_argument("--sample-steps", type=int, default=25, help="DDIM steps")
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads; 0 (default): all cores when the machine is idle, 1 when other "
                        "jobs already load it (multi-threaded small ops slow down badly on a busy CPU)")


def requirements(methods) -> dict[str, str]:
    """{import name: pip name} the demo needs for ``methods`` (the ``demo`` extra)."""
    need = {"sklearn": "scikit-learn", "torchmetrics": "torchmetrics", "PIL": "pillow"}
    if "lora" in methods:
        need["peft"] = "peft"  # the LoRA baseline runs through PEFT
    return need


def _auto_threads() -> int:
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = os.getloadavg()[0] >= 0.5 * cores
    except OSError:  # pragma: no cover - no load average on this platform
        busy = False
    return 1 if busy else max(1, min(cores, 4))


def _fresh(path: Path) -> None:
    """Remove a run folder of an earlier demo (only folders that look like one)."""
    if path.exists():
        if not (path / "config.json").is_file():
            raise SystemExit(f"kind-fast demo: {path} exists and is not a demo run folder; choose another --out")
        shutil.rmtree(path)


def _config(args, mode: str, method: str, out: Path, init: Path | None):
    from kind_fast.train.config import RunConfig

    d = {
        "mode": mode, "out": str(out), "steps": args.pretrain_steps if mode == "pretrain" else args.steps,
        "batch_size": args.batch, "seed": args.seed, "device": "cpu", "log_every": 50, "progress": True,
        "tensorboard": "off", "ckpt_every": 0, "keep_last": 1,
        "optim": {"lr": args.lr, "ema_decay": 0.999, "grad_clip": 1.0},
        "method": {"name": method, "init": str(init) if init else None, "lora_rank": args.lora_rank},
        "eval": {"sampler": "ddim", "sample_steps": args.sample_steps, "cfg_scale": args.cfg_scale},
    }
    return RunConfig.from_dict(d)


def run(args: argparse.Namespace) -> int:
    import torch

    from kind_fast.train.data import DIGIT_DEFAULTS
    from kind_fast.train.loop import Trainer
    from kind_fast.train.metrics import DigitFeatures, class_accuracy, frechet_distance, train_digit_classifier
    from kind_fast.train.sampling import make_grid, sample, save_grid, save_png
    from kind_fast.utils import parameter_breakdown

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or args.pretrain_steps < 1 or args.steps < 1 or args.batch < 1 or args.samples_per_class < 2:
        raise SystemExit(f"kind-fast demo: bad arguments (unknown methods {bad}; steps, batch >= 1; "
                         "samples per class >= 2)")
    if args.threads < 0:
        raise SystemExit("kind-fast demo: --threads must be >= 0")
    from kind_fast._optional import missing

    lacking = missing(requirements(methods))  # before anything trains (it would fail minutes in)
    if lacking:
        raise SystemExit(f"kind-fast demo needs {', '.join(lacking)}: pip install 'kind_fast[demo]' "
                         f"(or pip install {' '.join(lacking)})")
    threads = args.threads or _auto_threads()
    torch.set_num_threads(threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    torch.manual_seed(args.seed)

    print(f"torch {torch.__version__}, {threads} CPU thread{'s' if threads > 1 else ''}", flush=True)
    print("digit classifier (FID features, class accuracy) on real sklearn digits ...", flush=True)
    clf, report = train_digit_classifier(args.seed)
    print(f"  held-out accuracy {report['test_acc']:.3f} on {report['n_test']} real digits")
    feats = DigitFeatures(clf)
    rows, grids = [], {}

    def evaluate(trainer, name: str, digits: list[int], per_class: int) -> dict:
        model = trainer.eval_model("ema")
        k = len(digits)
        labels = torch.arange(k).repeat_interleave(per_class)
        t0 = time.perf_counter()
        fake = sample(model, labels, shape=trainer.data.sample_shape, sampler="ddim", steps=args.sample_steps,
                      cfg_scale=args.cfg_scale, seed=args.seed + 1)
        t_sample = time.perf_counter() - t0
        fid = frechet_distance(trainer.data.x, fake, feats)
        acc, per = class_accuracy(fake, torch.tensor(digits)[labels], clf)
        show = torch.cat([fake[labels == c][:12] for c in range(k)])
        grid = save_grid(show, trainer.out / "samples" / "grid.png", nrow=min(12, per_class))
        grids[name] = grid
        flops = trainer.count_train_flops()
        trainable = parameter_breakdown(trainer.model)["all"]["trainable"]
        return {"method": name, "label": LABELS[name], "data": ",".join(map(str, digits)) if k <= 2 else
                f"{digits[0]}-{digits[-1]}", "trainable": trainable,
                "train_gflops_per_image": flops["train_per_image"] / 1e9,
                "fwd_gflops_per_image": flops["forward_per_image"] / 1e9,
                "wall_s": trainer.wall, "sample_s": t_sample, "fid": fid, "class_acc": acc,
                "class_acc_per_digit": {str(c): v for c, v in per.items()},
                "steps": trainer.cfg.steps, "grid": str(grid), "fake_for_grid": show, "k": k}

    def train(mode: str, method: str, init: Path | None) -> Trainer:
        run_dir = out / ("pretrain" if mode == "pretrain" else method)
        _fresh(run_dir)
        trainer = Trainer(_config(args, mode, method, run_dir, init), log=lambda *a: None)
        t0 = time.perf_counter()
        trainer.train()
        trainer.wall = time.perf_counter() - t0
        trainer.export()
        return trainer

    # 1. KIND pretraining on digits 0-7
    pre_digits = DIGIT_DEFAULTS["pretrain"]
    print(f"KIND pretraining on digits 0-7: {args.pretrain_steps} steps × batch {args.batch} ...", flush=True)
    tr = train("pretrain", "kind", None)
    rows.append(evaluate(tr, "pretrain", pre_digits, max(2, args.samples_per_class // 2)))
    tr.close()
    print(f"  {rows[-1]['wall_s']:.0f} s, FID {rows[-1]['fid']:.2f}, class accuracy {rows[-1]['class_acc']:.3f}")

    # 2. transfer to digits 8-9: KIND and the baselines, same loop and budget
    new_digits = DIGIT_DEFAULTS["transfer"]
    for method in methods:
        print(f"{LABELS[method]} on digits 8-9: {args.steps} steps × batch {args.batch} ...", flush=True)
        tr = train("transfer", method, out / "pretrain")
        rows.append(evaluate(tr, method, new_digits, args.samples_per_class))
        tr.close()
        print(f"  {rows[-1]['wall_s']:.0f} s, FID {rows[-1]['fid']:.2f}, class accuracy {rows[-1]['class_acc']:.3f}")

    # reference: two halves of the real 8-9 digits against each other, and the classifier on them
    from kind_fast.train.data import digits_dataset

    real = digits_dataset(new_digits, "transfer")
    g = torch.Generator().manual_seed(args.seed)
    perm = torch.randperm(len(real), generator=g)
    half = len(real) // 2
    ref_fid = frechet_distance(real.x[perm[:half]], real.x[perm[half:]], feats)
    ref_acc, _ = class_accuracy(real.x, torch.tensor(new_digits)[real.y], clf)

    # one comparison grid: two rows (8, 9) per transfer method
    tr_rows = [r for r in rows if r["method"] != "pretrain"]
    if tr_rows:
        per = min(12, args.samples_per_class)
        arr = make_grid(torch.cat([r["fake_for_grid"] for r in tr_rows]), nrow=per, scale=4)
        grids["all transfer methods (rows: 8, 9 per method, in table order)"] = save_png(arr, out / "transfer_grid.png")

    # the table
    head = (f"{'method':<15} {'digits':<7} {'trainable':>10} {'train GFLOP/img':>16} {'wall s':>7} "
            f"{'FID':>8} {'class acc':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['label']:<15} {r['data']:<7} {r['trainable']:>10,d} {r['train_gflops_per_image']:>16.4f} "
                     f"{r['wall_s']:>7.1f} {r['fid']:>8.3f} {r['class_acc']:>9.3f}")
    lines.append(f"{'real digits':<15} {'8,9':<7} {'-':>10} {'-':>16} {'-':>7} {ref_fid:>8.3f} {ref_acc:>9.3f}")
    print()
    print("\n".join(lines))
    print(f"\nTransfer rows: {args.steps} steps × batch {args.batch}, AdamW lr {args.lr}, same seed; "
          f"pretrain row: {args.pretrain_steps} steps on 0-7 (its FID/accuracy are on 0-7, "
          f"{max(2, args.samples_per_class // 2)} samples per class).")
    print("FID: torchmetrics FrechetInceptionDistance in the 64-d feature space of a CNN trained on real "
          f"digits (held-out acc {report['test_acc']:.3f}), {args.samples_per_class} EMA samples per class "
          f"(DDIM {args.sample_steps} steps, CFG {args.cfg_scale}) against all real digits of those classes; "
          "'real digits' = one half of the real 8s and 9s against the other.")
    print("class acc: the fraction of samples that classifier reads as the digit they were generated for.")
    print("train GFLOP/img: FlopCounterMode over one forward + backward of a training step / batch "
          "(FLOPs = 2 × MACs; KIND ops through their registered formulas; attention via the math SDPA "
          "backend; learngene weights cached when frozen). wall s: training only, on this machine.")
    print("\nsample grids:")
    for name, path in grids.items():
        print(f"  {name}: {path}")
    summary = [{k: v for k, v in r.items() if k not in ("fake_for_grid", "k")} for r in rows]
    summary.append({"method": "real", "fid": ref_fid, "class_acc": ref_acc})
    from kind_fast.atomic import atomic_write_text

    atomic_write_text(json.dumps({"rows": summary, "classifier": report, "args": vars(args)}, indent=2,
                                 default=str) + "\n", out / "demo_summary.json")
    print(f"table as JSON: {out / 'demo_summary.json'}; trained weights: {out}/<run>/ema "
          f"(e.g. kind-fast sample {out / 'kind'})")
    print(f"demo wall time {time.perf_counter() - t_all:.0f} s")
    sys.stdout.flush()
    return 0
