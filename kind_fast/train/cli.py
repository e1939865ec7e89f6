"""Command-line front ends: ``kind-fast pretrain``, ``kind-fast transfer``, ``kind-fast sample``.

Settings resolve as: built-in defaults ← ``--config FILE`` (YAML or JSON) ← the flags below
← ``--set key=value`` (any config key, dotted: ``--set optim.ema_decay=0.999``). The resolved
config is written to ``<out>/config.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kind_fast.train.config import RunConfig, load_config_file, parse_int_list

# flag -> config key (flags default to None: only flags the user gave override the file)
_FLAGS = {
    "out": ("out", str, "output folder (checkpoints, metrics.csv, config.json, weights, samples)"),
    "steps": ("steps", int, "training steps"),
    "batch_size": ("batch_size", int, "global batch size (over all processes)"),
    "lr": ("optim.lr", float, "learning rate (AdamW)"),
    "seed": ("seed", int, "seed of init, data order and noise"),
    "device": ("device", str, "auto | cpu | cuda | cuda:N"),
    "precision": ("precision", str, "auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16 (GradScaler loss scaling)"),
    "grad_accum": ("grad_accum", int, "N micro-batches per step (same update as one batch, 1/N of the memory)"),
    "lr_schedule": ("optim.lr_schedule", str, "constant (default) | cosine (to 0 at the last step), after warm-up"),
    "warmup_steps": ("optim.warmup_steps", int, "linear learning-rate warm-up steps"),
    "data": ("data.source", str, "digits (default) | imagefolder | latents"),
    "data_path": ("data.path", str, "ImageFolder root or latent-shard folder"),
    "classes": ("data.classes", str, "classes to keep, renumbered in order: e.g. 0-7 or 8,9"),
    "image_size": ("data.image_size", int, "ImageFolder: resize/crop to this size"),
    "model": ("model.name", str, "DiT preset, e.g. DiT-S/2 (default: a tiny DiT for digits)"),
    "method": ("method.name", str, None),
    "init": ("method.init", str, "transfer: the pretrain run folder (or a kind_fast save folder)"),
    "init_num_heads": ("method.init_num_heads", int,
                       "pretrain --init of a dense DiT whose width is not a preset: its attention heads"),
    "ckpt_every": ("ckpt_every", int, "checkpoint every N steps (0: only at the end)"),
    "sample_every": ("sample_every", int, "sample grid every N steps: <out>/samples/step_N.png and the trackers"),
    "eval_every": ("eval_every", int, "digits: FID / KID / IS / class accuracy every N steps (eval.csv, trackers)"),
    "keep_last": ("keep_last", int, "checkpoints to keep"),
    "log_every": ("log_every", int, "a metrics.csv / log.txt / tracker row every N steps (printed when no bar)"),
    "tensorboard": ("tensorboard", str, "auto | on | off"),
    "wandb": ("wandb", str, "on | off (default): Weights & Biases; WANDB_MODE=offline logs without a network"),
    "wandb_project": ("wandb_project", str, "W&B project (default kind_fast)"),
    "distributed": ("distributed", str, "under torchrun: ddp | fsdp"),
}


def add_run_arguments(p: argparse.ArgumentParser, mode: str) -> None:
    p.add_argument("--config", help="YAML or JSON config file")
    for name, (_key, typ, help_text) in _FLAGS.items():
        if name == "method":
            help_text = ("kind (default) | dense | tleg (TLEG's ancestry)" if mode == "pretrain"
                         else "kind (default) | full | lora | svdiff | heur_lg | tleg | scratch")
        if name == "init" and mode == "pretrain":
            help_text = ("continue from existing weights: a dense DiT (.pt/.safetensors, diffusers folder, "
                         "kind_fast run) converted to KIND by exact SVD, or a KIND save (kind-fast convert); "
                         "its architecture replaces model.*")
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None, help=help_text)
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the model (backend: inductor, or e.g. aot_eager)")
    p.add_argument("--grad-checkpoint", action="store_true", default=None,
                   help="activation checkpointing on the DiT blocks: less memory, about 1/3 more compute")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set optim.ema_decay=0.999 (repeatable)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="auto|PATH",
                   help="continue from the newest checkpoint in --out (auto) or from PATH")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU runs: torch threads; 0 (default): torch's own count, fewer when the machine is "
                        "already busy (kind_fast/train/cpu_threads.py)")
    p.add_argument("--no-sample", action="store_true", help="skip the sample grid at the end")
    p.add_argument("--eval", action="store_true",
                   help="digits: FID / KID / IS and class accuracy of samples (digit-classifier features)")
    p.add_argument("--eval-samples", type=int, default=100, help="--eval: samples per class")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def config_from_args(args: argparse.Namespace, mode: str) -> RunConfig:
    base = RunConfig(mode=mode, out=f"runs/{mode}")
    if args.config:
        cfg = RunConfig.from_dict(load_config_file(args.config), base=base, validate=False)
        if cfg.mode != mode:
            raise ValueError(f"config file {args.config} says mode={cfg.mode!r} but this is `kind-fast {mode}`")
    else:
        cfg = base
    flat = {}
    for name, (key, _, _) in _FLAGS.items():
        v = getattr(args, name, None)
        if v is not None:
            flat[key] = parse_int_list(v, "--classes") if name == "classes" else v
    if args.no_progress:
        flat["progress"] = False
    if args.compile is not None:
        flat["compile"] = args.compile
    if args.grad_checkpoint:
        flat["grad_checkpoint"] = True
    for item in args.set:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        flat[k.strip()] = v.strip()
    cfg = cfg.with_overrides(flat, validate=False) if flat else cfg
    cfg.validate()
    return cfg


def run_training(args: argparse.Namespace, mode: str) -> int:
    from kind_fast.train import cpu_threads
    from kind_fast.train.loop import NonFiniteError, Trainer

    try:
        cfg = config_from_args(args, mode)
        cpu_threads.check(args.threads)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"kind-fast {mode}: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
        return 0
    try:
        trainer = Trainer(cfg, resume=args.resume)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
        print(f"kind-fast {mode}: {e}", file=sys.stderr)
        return 2

    def say(text: str) -> None:  # rank 0: to stdout and to <out>/log.txt
        print(text, flush=True)
        if trainer.logger is not None:
            trainer.logger.note(text)

    try:
        main = trainer.env.is_main
        if main:
            import contextlib
            import io

            from kind_fast.nn.utils import print_trainable_parameters

            say(f"{mode}/{cfg.method.name}: {len(trainer.data)} samples, {trainer.data.num_classes} classes, "
                f"{cfg.steps} steps × batch {cfg.batch_size} on {trainer.device}"
                f"{f' × {trainer.env.world_size} processes' if trainer.env.distributed else ''}")
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                print_trainable_parameters(trainer.model)
            say(buf.getvalue().rstrip())
        threads = cpu_threads.apply(args.threads, trainer.device)
        if main and threads:
            say(threads)
        try:
            losses = trainer.train()
            paths = trainer.export()
        except NonFiniteError as e:
            if trainer.logger is not None:
                trainer.logger.note(f"stopped: {e}")
            print(f"kind-fast {mode}: {e}", file=sys.stderr)
            return 3
        if main:
            w = max(1, len(losses) // 10)
            say(f"loss: first {w} steps {sum(losses[:w]) / w:.4f}, last {w} steps {sum(losses[-w:]) / w:.4f}")
            say(f"outputs in {trainer.out}: config.json, metrics.csv, log.txt, checkpoints/, "
                f"{', '.join(p.name + '/' for p in paths.values())}")
        if main and not args.no_sample:
            grid = write_grid(trainer, trainer.out / "samples" / "grid.png")
            say(f"sample grid: {grid}")
        if main and args.eval:
            say(json.dumps(evaluate_digits(trainer, args.eval_samples), indent=2))
    finally:
        trainer.close()
    return 0


def write_grid(trainer, path: Path):
    from kind_fast.train.evaluate import sample_grid

    return sample_grid(trainer, path)


def evaluate_digits(trainer, per_class: int) -> dict:
    """Digits runs: sample ``per_class`` per class and score them (written to eval.json)."""
    from kind_fast.atomic import atomic_write_text
    from kind_fast.train.evaluate import digits_metrics

    if trainer.cfg.data.source != "digits":
        raise ValueError("--eval scores digits runs only (for real data use kind_fast.train.metrics "
                         "with InceptionFeatures and your own reference set)")
    out = digits_metrics(trainer, per_class)
    atomic_write_text(json.dumps(out, indent=2) + "\n", trainer.out / "eval.json")
    return out


# =====================================================================================
# kind-fast sample
# =====================================================================================
def add_sample_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("weights", help="a run folder (uses its ema/ or model/), a weights folder or an export folder")
    p.add_argument("--which", choices=("ema", "model"), default="ema", help="weights of a run folder")
    p.add_argument("--out", default=None, help="PNG path (default: <run>/samples/sample_grid.png)")
    p.add_argument("--classes", default=None, help="class ids of the model to sample (default: all)")
    p.add_argument("--n-per-class", type=int, default=8, help="samples per class (grid columns)")
    p.add_argument("--num-samples", type=int, default=None,
                   help="sample N images, classes cycled (e.g. 50000 for FID); the grid shows the first 100")
    p.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddim")
    p.add_argument("--steps", type=int, default=50,
                   help="sampling steps, >= 2 (DiT: 250 DDPM); DDIM runs timesteps 0, s, 2s, ... (s = 1000 // steps)")
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--eta", type=float, default=0.0, help="DDIM η")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU: torch threads; 0 (default): torch's own count, fewer when the machine is already busy")
    p.add_argument("--batch-size", type=int, default=256,
                   help="samples per forward pass on each process; the noise is seeded per batch, so this "
                        "(not the number of processes) fixes the result for a seed")
    p.add_argument("--npz", action="store_true",
                   help="also write <out>.npz (uint8 NHWC arr_0 + labels: the ADM evaluator's layout); "
                        "under torchrun every rank samples its share and rank 0 assembles it")
    p.add_argument("--vae", default=None, help="latent models: a local diffusers AutoencoderKL folder to decode with")
    p.add_argument("--latent-scale", type=float, default=0.18215, help="latent scale factor used at encoding")
    p.add_argument("--no-merged", action="store_true",
                   help="KIND layers keep path M1 instead of merged per-class weights (path M3)")
    p.add_argument("--cuda-graphs", choices=("auto", "on", "off"), default="auto",
                   help="capture each sampling step's model call in a CUDA graph (auto: on CUDA devices)")
    p.add_argument("--eval", action="store_true",
                   help="score the samples (writes the .npz, then FID, sFID, precision/recall k=3 to <out>.eval.json): "
                        "digits models against real digits in the digit classifier's spaces (+ class accuracy); "
                        "other models need --ref and --inception-weights")
    p.add_argument("--ref", default=None, help="--eval: reference images, an .npz with arr_0 uint8 N×H×W×C")
    p.add_argument("--inception-weights", default=None,
                   help="--eval: local Inception-v3 weights "
                        "(torch-fidelity's weights-inception-2015-12-05-6726825d.pth)")
    p.add_argument("--digit-classes", default=None,
                   help="--eval of a digits model: the digit of each class id (default: from the run's config.json)")


def run_sample(args: argparse.Namespace) -> int:
    import torch

    from kind_fast.train import cpu_threads
    from kind_fast.train.distributed import cleanup, init_distributed
    from kind_fast.train.models import SPEC_FILE, load_weights
    from kind_fast.train.sample_ddp import sample_labels, sample_to_files
    from kind_fast.train.sampling import check_sampling_args

    try:
        from kind_fast.atomic import refuse_missing_folder

        src = Path(args.weights)
        refuse_missing_folder(src, "export", "export it again")  # an export killed while it replaced src
        wdir = src
        export = (src / "export_config.json").is_file()  # a kind-fast export folder
        if not (export or (src / SPEC_FILE).is_file() or (src / "kind_config.json").is_file()):
            wdir = src / args.which
        if not wdir.is_dir():
            raise FileNotFoundError(f"{src}: not a weights folder and it has no {args.which}/ folder")
        if args.n_per_class < 1 or args.batch_size < 1:
            raise ValueError("--n-per-class and --batch-size must be >= 1")
        check_sampling_args(args.steps, args.cfg_scale, args.eta, names=("--steps", "--cfg-scale", "--eta"))
        cpu_threads.check(args.threads)
        env = init_distributed(args.device)  # under torchrun: every rank samples its share
    except (ValueError, FileNotFoundError) as e:
        print(f"kind-fast sample: {e}", file=sys.stderr)
        return 2
    threads = cpu_threads.apply(args.threads, env.device)
    if threads and env.is_main:
        print(threads, flush=True)
    try:
        if args.cuda_graphs == "on" and env.device.type != "cuda":
            raise ValueError(f"--cuda-graphs on needs a CUDA device, got {env.device}")
        if export:
            from kind_fast.deploy.export_io import load_export

            model = load_export(wdir, map_location=env.device)
            served = getattr(model, "classes", None) or getattr(model, "export_classes", None)
        else:
            model = load_weights(wdir).to(env.device).eval()
            served = None
        n = model.num_classes
        default = served or list(range(n))
        classes = parse_int_list(args.classes, "--classes") if args.classes else default
        bad = [c for c in classes if not 0 <= c < n]
        if bad:
            raise ValueError(f"--classes {bad} out of range: the model has classes 0..{n - 1}")
        if export:
            unserved = [c for c in classes if c not in served]
            if unserved:
                raise ValueError(f"--classes {unserved}: the export {src} serves classes {served} only")
            if args.cfg_scale != 1.0 and not getattr(model, "guidance", False):
                raise ValueError(f"the export {src} has no null label (exported without guidance), so it cannot "
                                 "run classifier-free guidance: sample it with --cfg-scale 1")
        labels = sample_labels(classes, num_samples=args.num_samples, n_per_class=args.n_per_class)
        arch = model.arch
        shape = (arch["in_channels"], arch["input_size"], arch["input_size"])
        if args.eval:
            args.npz = True  # the .npz (ADM layout) is what --eval scores
            digits = None
            if args.ref is None:
                digits = (parse_int_list(args.digit_classes, "--digit-classes") if args.digit_classes
                          else _digits_of(wdir))
                if digits is None or shape != (1, 8, 8):
                    raise ValueError("--eval needs --ref and --inception-weights (or, for a digits model, its "
                                     "run's config.json or --digit-classes)")
                if len(digits) != n:
                    raise ValueError(f"--digit-classes names {len(digits)} digits but the model has {n} classes")
            elif args.inception_weights is None:
                raise ValueError("--eval with --ref needs --inception-weights (a local Inception-v3 weights file)")
        if args.npz and args.vae is None and shape[0] not in (1, 3):
            raise ValueError(f"--npz writes uint8 images; this model makes {shape[0]}-channel latents: "
                             "add --vae FOLDER to decode them")
    except (ValueError, FileNotFoundError) as e:
        cleanup(env)
        print(f"kind-fast sample: {e}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else (wdir.parent / "samples" / "sample_grid.png")
    grid_rows = args.n_per_class if args.num_samples is None else 10
    try:
        written = sample_to_files(
            model, labels, shape=shape, env=env, grid_path=out, npz_path=out.with_suffix(".npz") if args.npz else None,
            nrow=grid_rows, grid_max=None if args.num_samples is None else 100, batch_size=args.batch_size,
            decode=(lambda x: decode_latents(x, args.vae, args.latent_scale, env.device)) if args.vae else None,
            sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg_scale, eta=args.eta, seed=args.seed,
            device=env.device, clip_denoised=args.vae is None and shape[0] in (1, 3),
            autocast_dtype=torch.bfloat16 if env.device.type == "cuda" else None, merged=not args.no_merged,
            cuda_graphs={"auto": None, "on": True, "off": False}[args.cuda_graphs])
    finally:
        cleanup(env)
    if env.is_main:
        what = (f"{labels.numel()} samples over {len(classes)} classes" if args.num_samples is not None
                else f"{len(classes)} classes × {args.n_per_class}")
        procs = f" on {env.world_size} processes" if env.distributed else ""
        print(f"wrote {written['grid']} ({what}, {args.sampler} {args.steps} steps, cfg {args.cfg_scale}{procs})")
        if "npz" in written:
            print(f"wrote {written['npz']} (arr_0: uint8 N×H×W×C, labels)")
        if args.eval:
            from kind_fast.atomic import atomic_write_text
            from kind_fast.train.evaluate import evaluate_npz

            scores = evaluate_npz(written["npz"], digits=digits, ref=args.ref, inception_weights=args.inception_weights,
                                  seed=args.seed, device=env.device)
            path = written["npz"].with_suffix(".eval.json")
            atomic_write_text(json.dumps(scores, indent=2) + "\n", path)
            print(json.dumps(scores, indent=2))
            print(f"wrote {path}")
    return 0


def _digits_of(weights_dir):
    from kind_fast.train.evaluate import digits_of_run

    return digits_of_run(weights_dir)


def decode_latents(latents, vae_path: str, scale: float, device):
    """Decode latents with a local diffusers AutoencoderKL (not exercised in CI)."""
    import torch

    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise ImportError("--vae needs diffusers: pip install diffusers") from None
    vae = AutoencoderKL.from_pretrained(vae_path, local_files_only=True).to(device).eval()
    outs = []
    with torch.no_grad():
        for i in range(0, latents.shape[0], 16):
            outs.append(vae.decode(latents[i:i + 16].to(device) / scale).sample.float().clamp(-1, 1).cpu())
    return torch.cat(outs)
