"""``kind-fast demo``: the main job on the embedded default data (sklearn digits).

1. trains a small digit classifier on real digits (its features define FID, sFID and
   precision/recall here; it also reads the class of generated digits);
2. pretrains a small KIND-DiT on digits 0-7 (``--gate`` picks its class gate) and, when TLEG is
   among the methods, TLEG's ancestry (blocks θ_A + l/L·θ_B) with the same steps;
3. transfers to digits 8-9 with KIND (learngenes loaded and frozen, fresh tailors, gate and
   label table), and trains the baselines with the same loop, steps, batch, learning rate and
   seed: full fine-tuning, LoRA, SVDiff and Heur-LG (on the dense DiT the pretrained KIND model
   exports), TLEG (its ancestry expanded) and training from scratch;
4. samples every model (EMA weights, CFG, DDIM) and prints one table: trainable parameters,
   training GFLOPs per image (FlopCounterMode over one forward + backward of a training step,
   divided by the batch; attention counted through the math SDPA backend), training wall time
   (the trainer's clock over its steps, not the end-of-run checkpoint and plot), FID, sFID,
   precision and recall (k = 3) in the digit classifier's feature spaces and the class accuracy
   of the samples (docs/design.md §4.1).

Everything is computed in the run; nothing in the table is a constant. Sized for 2 CPU cores
(``--pretrain-steps`` / ``--steps`` / ``--methods`` scale it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from kind_fast.train.config import TRAIN_GATES

METHODS = ("kind", "full", "lora", "svdiff", "heur_lg", "tleg", "scratch")
LABELS = {
    "pretrain": "KIND pretrain",
    "tleg_pretrain": "TLEG ancestry",
    "kind": "KIND transfer",
    "full": "full fine-tune",
    "lora": "LoRA",
    "svdiff": "SVDiff",
    "heur_lg": "Heur-LG",
    "tleg": "TLEG",
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
    p.add_argument("--gate", default=None, choices=TRAIN_GATES,
                   help="class gate of KIND pretraining (default: the trainer's, docs/design.md §1.4)")
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads; 0 (default): torch's own count (at most 4) when the machine is idle, "
                        "the cores the load leaves free when other jobs already load it (multi-threaded small "
                        "ops slow down badly on a busy CPU)")


def requirements(methods) -> dict[str, str]:
    """{import name: pip name} the demo needs for ``methods`` (the ``demo`` extra)."""
    need = {"sklearn": "scikit-learn", "torchmetrics": "torchmetrics", "PIL": "pillow"}
    if "lora" in methods:
        need["peft"] = "peft"  # the LoRA baseline runs through PEFT
    return need


def _auto_threads() -> int:
    """The trainer's choice (kind_fast/train/cpu_threads.py: torch's count when idle, the cores
    the load leaves free when busy), at most 4: the demo's ops are too small to use more."""
    from kind_fast.train import cpu_threads

    return min(cpu_threads.choose(0)[0], 4)


DEMO_MARKER = ".kind_fast_demo"  # written into each run folder before its run starts


def _fresh(path: Path, log=print) -> None:
    """Make ``path`` an empty run folder of this demo, marked as such.

    A folder an earlier demo started is the demo's to replace: one that holds the marker, a
    run's ``config.json``, or nothing but a run lock (what a run that died during its set-up
    leaves). An unfinished one (no EMA weights exported) is restarted with a message, never a
    dead end. A folder with anything else in it is refused (the demo never deletes what it did
    not make), and so is one a live run holds.
    """
    from kind_fast.train.runlock import LOCK_FILE, RunLock, RunLockedError

    if path.exists():
        if not path.is_dir():
            raise SystemExit(f"kind-fast demo: {path} exists and is not a folder; choose another --out")
        names = {p.name for p in path.iterdir()}
        if not (DEMO_MARKER in names or "config.json" in names or names <= {LOCK_FILE}):
            raise SystemExit(f"kind-fast demo: {path} exists and is not a demo run folder (it holds "
                             f"{', '.join(sorted(names)[:5])}{', ...' if len(names) > 5 else ''}); choose another "
                             "--out")
        lock = RunLock(path)
        try:
            lock.acquire()  # a live run (another demo) holds it: refuse, never delete under it
        except RunLockedError as e:
            raise SystemExit(f"kind-fast demo: {e}") from None
        try:
            if not (path / "ema").is_dir():
                log(f"  {path} holds an earlier demo run that did not finish; starting it again")
            for p in path.iterdir():
                if p.name != LOCK_FILE:
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        finally:
            lock.release()
    path.mkdir(parents=True, exist_ok=True)
    (path / DEMO_MARKER).write_text("a run folder of `kind-fast demo`: the next demo replaces it\n")


def _config(args, mode: str, method: str, out: Path, init: Path | None):
    from kind_fast.train.config import RunConfig

    d = {
        "mode": mode, "out": str(out), "steps": args.pretrain_steps if mode == "pretrain" else args.steps,
        "batch_size": args.batch, "seed": args.seed, "device": "cpu", "log_every": 50, "progress": True,
        "tensorboard": "off", "ckpt_every": 0, "keep_last": 1,
        "optim": {"lr": args.lr, "ema_decay": 0.999, "grad_clip": 1.0},
        "method": {"name": method, "init": str(init) if init else None, "lora_rank": args.lora_rank},
        "model": {} if getattr(args, "gate", None) is None else {"gate": args.gate},
        "eval": {"sampler": "ddim", "sample_steps": args.sample_steps, "cfg_scale": args.cfg_scale},
    }
    return RunConfig.from_dict(d)


def comparison_figure(groups: list[tuple[str, list[str], object]], path: Path, *, scale: int = 6,
                      title: str = "") -> Path:
    """One PNG of sample rows, each labelled: ``groups`` = [(method label, [row names], images)]
    with images (rows·k, C, H, W) in [-1, 1], k per row. Small digits are enlarged ``scale``×
    (nearest, so every pixel stays a sharp square)."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    from kind_fast.train.sampling import make_grid, save_png

    font = ImageFont.load_default(size=max(12, 2 * scale + 2))
    labels, tiles = [], []
    for method, names, images in groups:
        k = images.shape[0] // len(names)
        for i, name in enumerate(names):
            labels.append(f"{method}: {name}")
            tiles.append(make_grid(images[i * k:(i + 1) * k], nrow=k, scale=scale, pad=2))
    width = max(t.shape[1] for t in tiles)
    text_w = max(int(font.getlength(t)) for t in labels) + 16
    row_h = tiles[0].shape[0]
    title_h = row_h // 2 if title else 0
    canvas = Image.new("RGB", (max(text_w + width, int(font.getlength(title)) + 16), title_h + row_h * len(tiles)),
                       "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((8, title_h // 2), title, fill="black", font=font, anchor="lm")
    for i, (label, tile) in enumerate(zip(labels, tiles)):
        top = title_h + i * row_h
        tile = tile if tile.shape[2] == 3 else np.repeat(tile, 3, axis=2)
        canvas.paste(Image.fromarray(tile), (text_w, top))
        draw.text((8, top + row_h // 2), label, fill="black", font=font, anchor="lm")
    return save_png(np.asarray(canvas), path)


COLUMNS = (("fid", "FID", "{:>8.3f}"), ("sfid", "sFID", "{:>8.3f}"), ("precision", "prec", "{:>6.3f}"),
           ("recall", "recall", "{:>6.3f}"), ("class_acc", "class acc", "{:>9.3f}"))


def format_table(rows: list[dict], real: dict) -> str:
    """The demo's table: one line per run, then the real-digit reference (``real``: half of the
    real 8s and 9s against the other half, and the classifier's accuracy on them)."""
    widths = [int(fmt[3:].split(".")[0]) for _, _, fmt in COLUMNS]
    head = (f"{'method':<15} {'digits':<7} {'trainable':>10} {'train GFLOP/img':>16} {'wall s':>7} "
            + " ".join(f"{title:>{w}}" for (_, title, _), w in zip(COLUMNS, widths)))
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['label']:<15} {r['data']:<7} {r['trainable']:>10,d} {r['train_gflops_per_image']:>16.4f} "
                     f"{r['wall_s']:>7.1f} " + " ".join(fmt.format(r[key]) for key, _, fmt in COLUMNS))
    lines.append(f"{'real digits':<15} {'8,9':<7} {'-':>10} {'-':>16} {'-':>7} "
                 + " ".join(fmt.format(real[key]) for key, _, fmt in COLUMNS))
    return "\n".join(lines)


def metrics_chart(rows: list[dict], real: dict, path: Path) -> Path | None:
    """One PNG of FID, sFID, precision, recall, class accuracy and training wall time per
    transfer method (bars; the real-digit reference as a dashed line). None when matplotlib is
    not installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    import io

    from kind_fast.atomic import atomic_write_bytes

    names = [r["label"] for r in rows]
    fig = Figure(figsize=(13, 7.2), layout="constrained")
    axes = fig.subplots(2, 3).ravel()
    panels = (("fid", "FID (digit-classifier features), lower is better", real.get("fid")),
              ("sfid", "sFID (spatial features), lower is better", real.get("sfid")),
              ("class_acc", "class accuracy of samples, higher is better", real.get("class_acc")),
              ("precision", "precision (k = 3), higher is better", real.get("precision")),
              ("recall", "recall (k = 3), higher is better", real.get("recall")),
              ("wall_s", "training wall time (s), this machine", None))
    colors = ["tab:green" if r["method"] == "kind" else "tab:gray" for r in rows]
    for ax, (key, title, ref) in zip(axes, panels):
        vals = [r[key] for r in rows]
        bars = ax.bar(range(len(rows)), vals, color=colors)
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        if ref is not None:
            ax.axhline(ref, color="black", linestyle="--", linewidth=1)
            ax.annotate(f"real digits {ref:.3g}", (1.0, ref), xycoords=("axes fraction", "data"),
                        xytext=(-4, 3), textcoords="offset points", ha="right", fontsize=8)
        ax.set_xticks(range(len(rows)), names, rotation=25, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(buf.getvalue(), path)
    return path


def step_breakdown(kind_model, full_model, batch: int, sample_shape, *, reps: int = 11) -> dict:
    """Where KIND transfer's wall time goes at this size, measured interleaved (so both methods
    see the same machine load): forward + backward of one training step of each model (the
    batch at the step's shape, labels, timesteps) and, inside it, of the decomposed layers alone:
    the KIND model's layer calls as the model makes them (q, k, v of a block as one group,
    ``kind_fast.nn.layers.kind_group``; proj, fc1, fc2 one by one; learngenes frozen, tailors
    training) against the nn.Linear layers full fine-tuning trains in their place (weights
    training), each on an input that needs its gradient, as inside the model. Medians of ``reps``
    rounds after a warm-up; milliseconds per training step."""
    import statistics

    import torch
    from torch import nn

    from kind_fast.models.dit import Attention
    from kind_fast.nn.layers import FastKindLinear, _group_problem, kind_group

    patch = kind_model.patch_size
    tokens = (sample_shape[1] // patch) * (sample_shape[2] // patch)
    # the decomposed positions: attention and MLP linears of every block; KIND's q, k, v are three
    # layers run as one group (the dense DiT that full fine-tuning trains has one qkv layer)
    calls = []
    for block in kind_model.blocks:
        attn = block.attn
        qkv = [attn.q, attn.k, attn.v] if attn.split else [attn.qkv]
        if attn.split and Attention.group_qkv and _group_problem(qkv) is None:
            calls.append(qkv)
        else:
            calls += [[m] for m in qkv]
        calls += [[attn.proj], [block.mlp.fc1], [block.mlp.fc2]]
    calls = [c for c in calls if all(isinstance(m, FastKindLinear) for m in c)]
    dense_layers = [m for n, m in full_model.named_modules()
                    if isinstance(m, nn.Linear) and n.startswith("blocks.") and (".attn." in n or ".mlp." in n)]
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, kind_model.num_classes, (batch,), generator=g)
    x0 = torch.randn(batch, *sample_shape, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)

    def kind_run(layers):
        x = torch.randn(batch, tokens, layers[0].in_features, generator=g, requires_grad=True)
        grads = [torch.randn(batch, tokens, m.out_features, generator=g) for m in layers]
        if len(layers) == 1:
            return lambda: layers[0](x, labels=labels).backward(grads[0])
        return lambda: torch.autograd.backward(kind_group(layers, x, labels), grads)

    def dense_run(layer):
        x = torch.randn(batch, tokens, layer.in_features, generator=g, requires_grad=True)
        grad = torch.randn(batch, tokens, layer.out_features, generator=g)
        return lambda: layer(x).backward(grad)

    def step_run(model):
        return lambda: model(x0, t, labels).square().mean().backward()

    runs = {"kind_step": [step_run(kind_model)], "full_step": [step_run(full_model)],
            "kind_layers": [kind_run(c) for c in calls], "full_layers": [dense_run(m) for m in dense_layers]}
    times: dict[str, list[float]] = {k: [] for k in runs}
    was = kind_model.training, full_model.training
    kind_model.train()
    full_model.train()
    try:
        for i in range(reps + 2):
            for key, fns in runs.items():  # interleaved: one round of each, again and again
                t0 = time.perf_counter()
                for fn in fns:
                    fn()
                if i >= 2:
                    times[key].append(time.perf_counter() - t0)
            kind_model.zero_grad(set_to_none=True)
            full_model.zero_grad(set_to_none=True)
    finally:
        kind_model.train(was[0])
        full_model.train(was[1])
    out = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    kind_layers = [m for c in calls for m in c]
    return out | {"kind_n": len(kind_layers), "kind_calls": len(calls), "full_n": len(dense_layers),
                  "rows": batch * tokens, "shapes": sorted({(k.in_features, k.out_features) for k in kind_layers})}


def wall_time_note(kind: dict, full: dict, kind_model, full_model, batch: int, sample_shape) -> str:
    """The table's wall-time comparison of KIND transfer and full fine-tuning, with a measurement
    of where a step's time goes (both ways: when KIND took longer, it says why)."""
    ratio = kind["wall_s"] / full["wall_s"]
    flops = kind["train_gflops_per_image"] / full["train_gflops_per_image"]
    t = step_breakdown(kind_model, full_model, batch, sample_shape)
    gap, layer_gap = t["kind_step"] - t["full_step"], t["kind_layers"] - t["full_layers"]
    measured = (f"Measured now, interleaved, forward + backward of one step (batch {batch}, {t['rows']} token rows): "
                f"KIND {t['kind_step']:.1f} ms, full fine-tuning {t['full_step']:.1f} ms "
                f"({t['kind_step'] / t['full_step']:.2f}×). Of that, the {t['kind_n']} KIND layers in "
                f"{t['kind_calls']} calls (q, k, v of a block as one group; proj, fc1, fc2; (in, out) in "
                f"{t['shapes']}) take {t['kind_layers']:.1f} ms and the {t['full_n']} nn.Linear layers full "
                f"fine-tuning trains in their place (qkv fused) {t['full_layers']:.1f} ms")
    if ratio <= 1.0:
        return (f"\nwall time: KIND transfer trained in {ratio:.2f}× full fine-tuning's time "
                f"({kind['wall_s']:.1f} s vs {full['wall_s']:.1f} s) for {flops:.2f}× its FLOPs. {measured}.")
    share = f"{layer_gap / gap:.0%} of" if gap > 0 else "more than"
    return (f"\nwall time: KIND transfer took {ratio:.2f}× full fine-tuning's time ({kind['wall_s']:.1f} s vs "
            f"{full['wall_s']:.1f} s) for {flops:.2f}× its FLOPs. {measured}: {share} the difference. At these "
            "widths (64) a layer is a few tiny GEMMs: KIND skips the weight-gradient GEMM but pays the tailor "
            "term (the tailors the batch's classes switch on, in skinny GEMMs that run well below the dense rate) "
            "and the fixed per-call work of a Python op, and its optimizer steps more, smaller tensors; the "
            "training loop's own work (data, noise draws, loss, EMA) is the same for both. "
            "bench/results/cpu_demo_wall_time.md has the per-layer and per-step numbers, and the floor that "
            "the tailor term's bare tensor ops set for any eager implementation at this width "
            "(bench/cpu_demo_floor.py measures it on this machine).")


def run(args: argparse.Namespace) -> int:
    import torch

    from kind_fast.train.data import DIGIT_DEFAULTS
    from kind_fast.train.loop import Trainer
    from kind_fast.train.metrics import (
        DigitFeatures,
        DigitSpatialFeatures,
        class_accuracy,
        features_of,
        frechet_distance,
        precision_recall,
        train_digit_classifier,
    )
    from kind_fast.train.sampling import sample, save_grid
    from kind_fast.nn.utils import parameter_breakdown

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
    feats, spatial = DigitFeatures(clf), DigitSpatialFeatures(clf)
    rows, grids, models = [], {}, {}

    def quality(real_x, fake) -> dict:
        """FID, sFID and precision/recall (k = 3) of ``fake`` against ``real_x``."""
        out = {"fid": frechet_distance(real_x, fake, feats), "sfid": frechet_distance(real_x, fake, spatial)}
        out["precision"], out["recall"] = precision_recall(features_of(real_x, feats), features_of(fake, feats))
        return out

    def evaluate(trainer, name: str, digits: list[int], per_class: int) -> dict:
        model = trainer.eval_model("ema")
        k = len(digits)
        labels = torch.arange(k).repeat_interleave(per_class)
        t0 = time.perf_counter()
        fake = sample(model, labels, shape=trainer.data.sample_shape, sampler="ddim", steps=args.sample_steps,
                      cfg_scale=args.cfg_scale, seed=args.seed + 1)
        t_sample = time.perf_counter() - t0
        q = quality(trainer.data.x, fake)
        # per class: each digit's samples against the real digits of that class
        fid_per = {str(d): frechet_distance(trainer.data.x[trainer.data.y == c], fake[labels == c], feats)
                   for c, d in enumerate(digits)}
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
                "wall_s": trainer.wall, "sample_s": t_sample, **q, "class_acc": acc,
                "fid_per_digit": fid_per, "fid_class_mean": sum(fid_per.values()) / len(fid_per),
                "class_acc_per_digit": {str(c): v for c, v in per.items()},
                "steps": trainer.cfg.steps, "grid": str(grid), "fake_for_grid": show, "k": k}

    def train(mode: str, method: str, init: Path | None) -> Trainer:
        if mode == "pretrain":
            run_dir = out / ("pretrain" if method == "kind" else f"{method}_pretrain")
        else:
            run_dir = out / method
        _fresh(run_dir)
        trainer = Trainer(_config(args, mode, method, run_dir, init), log=lambda *a: None)
        trainer.train()
        # the trainer's own clock over its steps (what `elapsed_s` logs): not the end-of-run
        # checkpoint and loss-curve plot, which every method pays alike
        trainer.wall = trainer.elapsed
        trainer.export()
        return trainer

    def report_row(r: dict) -> None:
        print(f"  {r['wall_s']:.0f} s, FID {r['fid']:.2f}, sFID {r['sfid']:.2f}, precision {r['precision']:.3f}, "
              f"recall {r['recall']:.3f}, class accuracy {r['class_acc']:.3f}", flush=True)

    # 1. pretraining on digits 0-7: KIND, and the ancestry models the learngene baselines need
    #    (TLEG's expansion-constrained one; Heur-LG inherits blocks of the same pretrained model
    #    the other baselines start from), same steps, batch, learning rate and seed
    pre_digits = DIGIT_DEFAULTS["pretrain"]
    pre_per_class = max(2, args.samples_per_class // 2)
    ancestries = [("pretrain", "kind")] + ([("tleg_pretrain", "tleg")] if "tleg" in methods else [])
    for name, method in ancestries:
        print(f"{LABELS[name]}ing on digits 0-7: {args.pretrain_steps} steps × batch {args.batch} ..."
              if name == "pretrain" else
              f"{LABELS[name]} (pretraining for TLEG) on digits 0-7: {args.pretrain_steps} steps × batch "
              f"{args.batch} ...", flush=True)
        tr = train("pretrain", method, None)
        rows.append(evaluate(tr, name, pre_digits, pre_per_class))
        tr.close()
        report_row(rows[-1])

    # 2. transfer to digits 8-9: KIND and the baselines, same loop and budget
    new_digits = DIGIT_DEFAULTS["transfer"]
    for method in methods:
        print(f"{LABELS[method]} on digits 8-9: {args.steps} steps × batch {args.batch} ...", flush=True)
        tr = train("transfer", method, out / ("tleg_pretrain" if method == "tleg" else "pretrain"))
        rows.append(evaluate(tr, method, new_digits, args.samples_per_class))
        models[method] = tr.model
        tr.close()
        report_row(rows[-1])

    # reference: two halves of the real 8-9 digits against each other, and the classifier on them
    from kind_fast.train.data import digits_dataset

    real = digits_dataset(new_digits, "transfer")
    g = torch.Generator().manual_seed(args.seed)
    perm = torch.randperm(len(real), generator=g)
    half = len(real) // 2
    ref = quality(real.x[perm[:half]], real.x[perm[half:]])
    ref["class_acc"], _ = class_accuracy(real.x, torch.tensor(new_digits)[real.y], clf)

    # one comparison figure: real 8s and 9s, then two labelled rows (8, 9) per transfer method
    tr_rows = [r for r in rows if r["method"] in METHODS]
    if tr_rows:
        per = min(12, args.samples_per_class)
        names = [str(d) for d in new_digits]
        real_show = torch.cat([real.x[real.y == c][:per] for c in range(len(new_digits))])
        groups = [("real digits", names, real_show)] + [(r["label"], names, r["fake_for_grid"]) for r in tr_rows]
        grids["all transfer methods (labelled rows, in table order)"] = comparison_figure(
            groups, out / "transfer_grid.png", title=f"{args.steps} steps each; EMA samples, DDIM "
            f"{args.sample_steps} steps, CFG {args.cfg_scale}; 8x8 digits shown 6x")

    # the table
    print()
    print(format_table(rows, ref))
    print(f"\nTransfer rows: {args.steps} steps × batch {args.batch}, AdamW lr {args.lr}, same seed; "
          f"pretrain rows: {args.pretrain_steps} steps on 0-7 (their metrics are on 0-7, "
          f"{pre_per_class} samples per class).")
    print("FID: torchmetrics FrechetInceptionDistance in the 64-d feature space of a CNN trained on real "
          f"digits (held-out acc {report['test_acc']:.3f}), {args.samples_per_class} EMA samples per class "
          f"(DDIM {args.sample_steps} steps, CFG {args.cfg_scale}) against all real digits of those classes; "
          "'real digits' = one half of the real 8s and 9s against the other.")
    print("sFID: the same Fréchet distance on that CNN's spatial features (first 8 channels of its last 4×4 "
          "map, 128 values; ADM's sFID keeps 7 channels of Inception's 17×17 mixed_6/conv). prec/recall: "
          "k-NN manifolds (k = 3, Kynkäänniemi et al. 2019) in the 64-d space: the share of samples on the "
          "real digits' manifold, and of real digits on the samples' manifold.")
    print("class acc: the fraction of samples that classifier reads as the digit they were generated for.")
    print("train GFLOP/img: FlopCounterMode over one forward + backward of a training step / batch "
          "(FLOPs = 2 × MACs; KIND ops through their registered formulas; attention via the math SDPA "
          "backend; learngene weights cached when frozen). wall s: the trainer's clock over its training steps only "
          "(data, forward, backward, optimizer, EMA, logging; not the end-of-run checkpoint and loss plot), "
          "on this machine.")
    print("Heur-LG: a fresh DiT that inherits the top blocks and final layer of the pretrained model; TLEG: a "
          "DiT whose blocks are expanded from TLEG's two learngene blocks (θ_l = θ_A + l/L·θ_B); both then "
          "train every weight (docs/design.md §4.2).")
    by = {r["method"]: r for r in rows}
    wall_note = None
    if "kind" in by and "full" in by:
        wall_note = wall_time_note(by["kind"], by["full"], models["kind"], models["full"], args.batch,
                                   real.sample_shape)
        print(wall_note)
    print("\nsample grids:")
    for name, path in grids.items():
        print(f"  {name}: {path}")
    if tr_rows:
        chart = metrics_chart(tr_rows, ref, out / "demo_chart.png")
        print(f"chart of FID, sFID, precision, recall, class accuracy and wall time per method: {chart}" if chart else
              "no chart (demo_chart.png): matplotlib is not installed (pip install matplotlib)")
    summary = [{k: v for k, v in r.items() if k not in ("fake_for_grid", "k")} for r in rows]
    summary.append({"method": "real", **ref})
    from kind_fast.atomic import atomic_write_text

    atomic_write_text(json.dumps({"rows": summary, "classifier": report, "args": vars(args),
                                  "wall_time_note": wall_note}, indent=2,
                                 default=str) + "\n", out / "demo_summary.json")
    print(f"table as JSON: {out / 'demo_summary.json'}; trained weights: {out}/<run>/ema "
          f"(e.g. kind-fast sample {out / 'kind'})")
    print(f"demo wall time {time.perf_counter() - t_all:.0f} s")
    sys.stdout.flush()
    return 0
