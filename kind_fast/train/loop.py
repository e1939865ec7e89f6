"""The training loop shared by KIND pretraining, KIND transfer and every baseline.

One step (DiT's recipe, docs/design.md §4):

1. the step's global batch of data indices and, from a CPU generator seeded by (seed, step),
   timesteps t ~ U{0..999}, noise ε, label-dropout flags (probability ``model.class_dropout``)
   and flips, all drawn for the whole global batch; each rank takes its slice;
2. x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε; the model runs under bf16 autocast on GPUs. Dropped labels
   are passed as ``force_drop_ids`` so ``DiT.forward`` turns them into the null class *before*
   it routes labels to the KIND gate: the null row of the gate is what the null class trains;
3. loss = ε-MSE + the learned-Σ VB term (``GaussianDiffusion.loss_terms``), batch mean;
4. AdamW on the trainable parameters only (``_adamw``: PyTorch's fused implementation on the
   CPU, one kernel over every tensor; the default elsewhere), global grad-norm clipping, a warm-up then constant
   (or cosine) learning rate, and an EMA of the trainable parameters (diffusers' ``EMAModel``;
   frozen parameters are their own EMA).

Options that do not change what a step computes (beyond float rounding): ``grad_accum`` N runs
each process's batch as N micro-batches (their draws are the matching slices of the step's
draws, their losses weighted by size, gradients synchronised once, on the last), ``compile``
(``torch.compile`` of the model), ``grad_checkpoint`` (activation checkpointing on the DiT
blocks). ``precision: fp16`` runs fp16 autocast with a ``torch.amp.GradScaler`` whose state is
checkpointed. ``sample_every`` / ``eval_every`` write sample grids / digit metrics during
training from the EMA weights; they draw from their own generators, so the training run is the
same with or without them.

Because every random draw is a function of (seed, step) and the data order of (seed, step),
a run resumed from a checkpoint (which also restores model, EMA, optimiser, schedule and RNG
states) reproduces the losses of an uninterrupted run bit for bit on the same machine, and W
processes with per-rank batch B/W reproduce a one-process run with batch B up to the float
rounding of the gradient all-reduce.

Reliability (``docs/design.md`` §4): one run per output folder (``runlock``: a second run into
the same ``out`` is refused; a killed run's lock is released by the OS); temporary files of
killed writes are swept when a run starts; resuming from an older checkpoint moves newer ones
aside instead of deleting or continuing them (``checkpoint``); ``--resume`` with a changed
``optim.lr``, ``optim.weight_decay`` or ``optim.beta1/beta2`` applies the new values to the
restored optimizer; a non-finite loss stops the run (``NonFiniteError``) and no checkpoint or
export is ever written from non-finite parameters.
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from kind_fast.atomic import remove_stale_temps_under
from kind_fast.nn.caching import training_scope
from kind_fast.models.diffusion import GaussianDiffusion
from kind_fast.train import checkpoint as ck
from kind_fast.train.config import RunConfig
from kind_fast.train.data import GlobalBatchSampler, batch_stream, build_dataset, rank_slice, step_generator
from kind_fast.train.distributed import (
    all_gather_object,
    all_reduce_mean,
    barrier,
    broadcast_object,
    cleanup,
    init_distributed,
    unwrap,
    wrap_model,
)
from kind_fast.train.evaluate import periodic
from kind_fast.train.logger import MetricsLogger
from kind_fast.train.models import build_model, make_spec, model_from_state, record_built_model, save_weights
from kind_fast.train.runlock import RunLock, RunLockedError

# config keys that may change when a run is resumed without changing what it computes
_RESUME_FREE = {"steps", "out", "ckpt_every", "keep_last", "log_every", "tensorboard", "wandb", "wandb_project",
                "progress", "grad_accum", "compile", "grad_checkpoint", "sample_every", "eval_every",
                "device", "distributed", "eval", "data.workers", "data.path", "method.init"}


def lr_factor(step: int, *, warmup: int, total: int, schedule: str) -> float:
    """The learning-rate multiplier of optimizer step ``step`` (0-based, LambdaLR's convention):
    linear warm-up (step + 1) / warmup, then 1 (constant) or a cosine from 1 towards 0 at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return 1.0


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def capture_rng() -> dict:
    st = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": [s for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_initialized() else [],
        "numpy": {"name": st[0], "keys": torch.from_numpy(st[1].astype(np.int64)), "pos": int(st[2]),
                  "has_gauss": int(st[3]), "cached_gaussian": float(st[4])},
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
    }


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    py = state["python"]
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in py))


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor"


def _full(t: Tensor) -> Tensor:
    return t.full_tensor() if _is_dtensor(t) else t


def _local(t: Tensor) -> Tensor:
    return t.to_local() if _is_dtensor(t) else t


def _adamw(params: list[Tensor], o) -> tuple[torch.optim.AdamW, dict]:
    """AdamW over ``params`` (config ``o``) and its implementation settings. On the CPU (every
    parameter a plain CPU floating tensor) PyTorch's fused implementation: one kernel over every
    tensor instead of a Python loop of small ops per tensor (the CPU's for-loop default), which
    matters for runs of many small tensors such as the demo's (per-tensor overhead dominates
    there: bench/results/cpu_demo_wall_time.md). Elsewhere PyTorch's default (foreach on GPUs). The same
    choice is re-applied after a checkpoint's optimizer state is loaded, so a run and its resume
    use one implementation (bit-identical losses); a checkpoint's format does not depend on it."""
    impl: dict = {"fused": None, "foreach": None}  # PyTorch's defaults
    if params and all(p.device.type == "cpu" and not _is_dtensor(p) and p.is_floating_point() for p in params):
        impl = {"fused": True, "foreach": False}
    kw = dict(lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)
    try:
        opt = torch.optim.AdamW(params, **kw, **impl)
    except (RuntimeError, TypeError, ValueError):  # an older torch without the fused CPU kernel
        impl = {"fused": None, "foreach": None}
        opt = torch.optim.AdamW(params, **kw, **impl)
    return opt, impl


def _make_ema(params: list[Tensor], o) -> EMAModel:  # noqa: F821 - diffusers is imported lazily
    """diffusers' EMAModel over the trainable parameters only (``AveragedModel`` would copy the
    whole model, frozen learngenes included). Decay at update k (1-based): 0 for the first (the
    EMA starts as the weights), then min(ema_decay, (1 + k - 1) / (10 + k - 1)) with
    ``ema_warmup``, else ema_decay (``min_decay`` = ema_decay)."""
    try:
        from diffusers.training_utils import EMAModel
    except ImportError:
        raise ImportError("the trainer's EMA uses diffusers: pip install diffusers (or 'kind_fast[train]')") from None
    return EMAModel(params, decay=o.ema_decay, min_decay=0.0 if o.ema_warmup else o.ema_decay,
                    update_after_step=0, use_ema_warmup=False, foreach=not any(_is_dtensor(p) for p in params))


class NonFiniteError(RuntimeError):
    """The loss or the trained parameters became NaN/inf; the run stopped without saving."""


class Trainer:
    """Builds everything a run needs from a ``RunConfig`` and trains it.

    ``resume``: None (a fresh run; the output folder must hold no checkpoints), ``"auto"``
    (the newest checkpoint in ``cfg.out`` if any, else fresh), or a checkpoint file / run folder.

    The run holds ``cfg.out``'s run lock until ``close()`` (RunLockedError if another run
    holds it).
    """

    def __init__(self, cfg: RunConfig, *, resume: str | None = None, log=print):
        cfg.validate()
        self.cfg, self.log_fn = cfg, log
        self.env = init_distributed(cfg.device)
        self.out = Path(cfg.out)
        self.lock = RunLock(self.out)
        refused = None
        if self.env.is_main:
            try:
                self.lock.acquire()
            except RunLockedError as e:
                refused = str(e)
        refused = broadcast_object(refused, self.env)
        if refused:
            raise RunLockedError(refused)
        try:
            self._setup(resume)
        except BaseException:
            self.lock.release()
            raise

    def _setup(self, resume: str | None) -> None:
        cfg = self.cfg
        self.device = self.env.device
        self.amp_dtype = None
        if cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda"):
            self.amp_dtype = torch.bfloat16
        elif cfg.precision == "fp16":
            self.amp_dtype = torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # as DiT trains
            torch.backends.cudnn.allow_tf32 = True

        # ---------------------------------------------------------------- data
        self.data = build_dataset(cfg.data, cfg.mode)
        if cfg.batch_size % self.env.world_size:
            raise ValueError(f"batch_size {cfg.batch_size} (global) is not divisible by the "
                             f"{self.env.world_size} processes")
        self.local_batch = cfg.batch_size // self.env.world_size
        if self.local_batch % cfg.grad_accum:
            raise ValueError(f"the per-process batch {self.local_batch} is not divisible into grad_accum="
                             f"{cfg.grad_accum} micro-batches")
        self.sampler = GlobalBatchSampler(len(self.data), cfg.batch_size, cfg.seed)
        self.diffusion = GaussianDiffusion()
        self.spec = make_spec(cfg, self.data.num_classes, self.data.sample_shape)
        # the config records the model that is built (a preset's or an init's sizes, KIND defaults)
        self.cfg = cfg = record_built_model(cfg, self.spec)

        # ---------------------------------------------------------------- resume?
        ckpt_path = ck.find_resume(self.out, resume) if resume else None
        if resume is None and ck.list_checkpoints(self.out):
            raise FileExistsError(
                f"{self.out} already holds checkpoints of a run: pass --resume auto to continue it, "
                "or choose another --out (nothing there was changed)")
        if ckpt_path is not None:
            ck.check_resume_source(ckpt_path, self.out)
        state = ck.load_checkpoint(ckpt_path) if ckpt_path else None
        if state is not None:
            ck.check_compatible(state, self.spec, ckpt_path)
            if state["step"] > cfg.steps:
                raise ck.CheckpointError(f"checkpoint {ckpt_path} is at step {state['step']}, past steps={cfg.steps}")
            old, new = _flat(state["config"]), _flat(cfg.to_dict())
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k)
                             and k not in _RESUME_FREE and k.split(".")[0] not in _RESUME_FREE)
            if cfg.optim.lr_schedule == "cosine" and old.get("steps") != new.get("steps"):
                changed.append("steps (the length of the cosine schedule)")
            if changed and self.env.is_main:
                self.log_fn(f"note: resuming with changed settings {changed}; the run will differ "
                            "from an uninterrupted one")

        # ---------------------------------------------------------------- model
        model = model_from_state(self.spec, state["model"]) if state is not None else build_model(cfg, self.spec)
        self.model = model.to(self.device)
        if cfg.grad_checkpoint:
            self.model.set_grad_checkpointing(True)
        self.ddp = wrap_model(self.model, self.env, cfg.distributed)
        # what the training step calls: the (wrapped) model, compiled if asked
        self.train_model = self.ddp if cfg.compile == "off" else torch.compile(self.ddp, backend=cfg.compile)
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters")
        self.param_names = [n for n, _ in named]
        self.params = [p for _, p in named]
        o = cfg.optim
        self.opt, self._opt_impl = _adamw(self.params, o)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, functools.partial(
            lr_factor, warmup=o.warmup_steps, total=cfg.steps, schedule=o.lr_schedule))
        self.ema_model = _make_ema(self.params, o)
        self.ema = dict(zip(self.param_names, self.ema_model.shadow_params))  # the same tensors
        self.step = 0
        self.elapsed = 0.0
        self.losses: list[float] = []
        # step of the checkpoint in this run folder that holds the current state (None: none)
        self._saved_step: int | None = None
        if state is not None:
            self._load_state(state)
            applied = self._apply_optim_settings()
            if self.env.is_main:
                self.log_fn(f"resumed from {ckpt_path} at step {self.step}")
                if applied:
                    self.log_fn(f"applied to the restored optimizer: {', '.join(applied)}")
            if ck.in_run_folder(ckpt_path, self.out):
                self._saved_step = self.step
        self.resumed_from = ckpt_path

        if self.env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            remove_stale_temps_under([self.out] + [self.out / d for d in (ck.CKPT_DIR, "model", "ema", "samples")])
            if self._saved_step is not None:
                moved = ck.supersede_newer(self.out, self.step)
                if moved is not None:
                    self.log_fn(f"note: {self.out} held checkpoints newer than step {self.step}; they and the "
                                f"outputs made from them were moved to {moved} (nothing was deleted)")
            cfg.save(self.out / "config.json")
            self.logger = MetricsLogger(self.out, resume_step=self.step if state is not None else None,
                                        tensorboard=cfg.tensorboard, wandb=cfg.wandb, wandb_project=cfg.wandb_project,
                                        config=cfg.to_dict(), total_steps=cfg.steps)
            if self.logger.tb_note and cfg.progress:
                self.log_fn(self.logger.tb_note)
        else:
            self.logger = None
        barrier(self.env)

    # ------------------------------------------------------------------ state
    def _dcp_options(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, cpu_offload=True)

    def _load_state(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        missing = [n for n in self.param_names if n not in state["ema"]]
        if missing or len(state["ema"]) != len(self.param_names):
            raise ck.CheckpointError(f"checkpoint EMA does not match the trainable parameters (missing {missing[:5]})")
        try:
            set_optimizer_state_dict(self.ddp, self.opt, state["optimizer"], options=self._dcp_options())
        except (KeyError, ValueError, RuntimeError) as e:
            raise ck.CheckpointError(f"checkpoint optimizer state does not fit this run: {e}") from None
        for g in self.opt.param_groups:  # this run's implementation, whatever the checkpoint's was
            g.update(self._opt_impl)
        self.sched.load_state_dict(state["scheduler"])
        with torch.no_grad():
            for n, p in zip(self.param_names, self.params):
                src = state["ema"][n]
                if src.shape != _full(p).shape:
                    raise ck.CheckpointError(f"checkpoint EMA {n} has shape {tuple(src.shape)}, model {tuple(p.shape)}")
                if _is_dtensor(p):
                    from torch.distributed.tensor import distribute_tensor

                    self.ema[n] = distribute_tensor(src.to(p.dtype).to(self.device), p.device_mesh, p.placements)
                else:
                    self.ema[n].copy_(src)
        self.ema_model.shadow_params = [self.ema[n] for n in self.param_names]
        self.ema_model.optimization_step = int(state.get("ema_step", state["step"]))
        if self.scaler.is_enabled() and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        rngs = state["rng"]
        restore_rng(rngs[self.env.rank] if len(rngs) == self.env.world_size else rngs[0])
        self.step = int(state["step"])
        self.elapsed = float(state.get("elapsed_s", 0.0))
        self.losses = torch.as_tensor(state.get("losses", [])).tolist()

    def _apply_optim_settings(self) -> list[str]:
        """Resume policy for optimizer hyperparameters: the run's config wins. The restored
        optimizer state carries the checkpoint's lr (as the schedule's base lr), weight decay
        and betas; where the config differs, the config's values are applied (the schedule's
        factor at the current step is kept). Returns what changed, for the log."""
        o = self.cfg.optim
        changed: list[str] = []
        want = {"weight_decay": o.weight_decay, "betas": (o.beta1, o.beta2)}
        for key, value in want.items():
            old = {tuple(g[key]) if key == "betas" else g[key] for g in self.opt.param_groups}
            if old != {value}:
                changed.append(f"optim.{key} {sorted(old)[0]} -> {value}")
                for g in self.opt.param_groups:
                    g[key] = value
        sched = self.sched
        if any(b != o.lr for b in sched.base_lrs):
            changed.append(f"optim.lr {sched.base_lrs[0]} -> {o.lr}")
            sched.base_lrs = [o.lr] * len(self.opt.param_groups)
            for g, factor in zip(self.opt.param_groups, sched.lr_lambdas):
                g["initial_lr"] = o.lr
                g["lr"] = o.lr * factor(sched.last_epoch)
            sched._last_lr = [g["lr"] for g in self.opt.param_groups]
        return changed

    def full_model_state(self) -> dict[str, Tensor]:
        """Full (gathered) model state dict on the CPU; a collective under FSDP."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.ddp, options=self._dcp_options())

    def full_ema_state(self) -> dict[str, Tensor]:
        return {n: _full(v).detach().cpu() for n, v in self.ema.items()}

    def checkpoint_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return {
            "spec": self.spec,
            "config": self.cfg.to_dict(),
            "model": self.full_model_state(),
            "ema": self.full_ema_state(),
            "ema_step": self.ema_model.optimization_step,
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "optimizer": get_optimizer_state_dict(self.ddp, self.opt, options=self._dcp_options()),
            "scheduler": self.sched.state_dict(),
            "rng": all_gather_object(capture_rng(), self.env),
            "data": self.sampler.position(self.step),
            "world_size": self.env.world_size,
            "elapsed_s": self.elapsed,
            "losses": torch.tensor(self.losses, dtype=torch.float64),  # float32 values, exactly
        }

    def save_checkpoint(self) -> Path | None:
        self.check_finite_state("writing a checkpoint")
        state = self.checkpoint_state()  # every rank takes part (FSDP gathers)
        path = None
        if self.env.is_main:
            path = ck.save_checkpoint(state, self.out, self.step, keep_last=self.cfg.keep_last)
        self._saved_step = self.step
        barrier(self.env)
        return path

    def weight_cache_scope(self):
        """``kind_fast.weight_cache()`` (W_G reused across steps) while every learngene is
        frozen: the trainer then writes the live model only through the optimizer, which does
        not hold them. Whoever writes learngenes of the live model through ``.data`` inside
        ``train()`` must call ``kind_fast.nn.caching.invalidate()``. A no-op scope otherwise."""
        return training_scope(unwrap(self.ddp))

    # ------------------------------------------------------------------ non-finite guard
    def _last_good(self) -> str:
        last = ck.list_checkpoints(self.out) if self.env.is_main else []
        return f"the last checkpoint is {last[-1][1]}" if last else "no checkpoint was written"

    def check_finite_state(self, doing: str) -> None:
        """Raise NonFiniteError (on every rank) if a trainable parameter or its EMA holds
        NaN/inf: nothing is written from such a state."""
        ts = [_local(t) for t in (*self.params, *self.ema.values())]
        bad = torch.stack([(~torch.isfinite(t)).any() for t in ts]).any().float()
        if float(all_reduce_mean(bad.to(self.device), self.env)) > 0:
            raise NonFiniteError(
                f"the model's parameters became non-finite (NaN/inf) by step {self.step}; stopped before "
                f"{doing}, nothing was written ({self._last_good()}). Lower the learning rate (--lr) or "
                "check the data, then resume from a good checkpoint (--resume PATH)")

    # ------------------------------------------------------------------ one step
    def _draws(self, step: int) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """This rank's timesteps, noise, drop flags and flips for ``step``."""
        b = self.cfg.batch_size
        g = step_generator(self.cfg.seed, step)
        t = torch.randint(0, self.diffusion.num_timesteps, (b,), generator=g)
        noise = torch.randn((b, *self.data.sample_shape), generator=g)
        drop = torch.rand(b, generator=g) < self.cfg.model.class_dropout
        flip = (torch.rand(b, generator=g) < 0.5) if self.cfg.data.flip else None
        r, w = self.env.rank, self.env.world_size
        return (rank_slice(t, r, w), rank_slice(noise, r, w), rank_slice(drop, r, w),
                None if flip is None else rank_slice(flip, r, w))

    def _forward_loss(self, model: nn.Module, x: Tensor, y: Tensor, step: int,
                      part: slice | None = None) -> dict[str, Tensor]:
        """Batch-mean loss terms of this rank's batch (or of its micro-batch ``part``: x and y are
        that slice, and so are the step's draws)."""
        t, noise, drop, flip = self._draws(step)
        if part is not None:
            t, noise, drop = t[part], noise[part], drop[part]
            flip = None if flip is None else flip[part]
        dev = self.device
        x, y = x.to(dev, non_blocking=True).float(), y.to(dev, non_blocking=True)
        t, noise, drop = t.to(dev), noise.to(dev), drop.to(dev)
        if flip is not None:
            x = torch.where(flip.to(dev).view(-1, 1, 1, 1), x.flip(-1), x)
        xt = self.diffusion.q_sample(x, t, noise)
        with torch.autocast(dev.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            out = model(xt, t, y, force_drop_ids=drop.long())
        terms = self.diffusion.loss_terms(out.float(), x, xt, t, noise)
        return {k: v.mean() for k, v in terms.items()}

    def train_step(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        self.train_model.train()
        self.opt.zero_grad(set_to_none=True)
        n, parts = x.shape[0], self.cfg.grad_accum
        size = n // parts
        terms: dict[str, Tensor] = {}
        for i in range(parts):
            part = slice(i * size, (i + 1) * size) if parts > 1 else None
            with self._grad_sync(i == parts - 1):
                micro = (self._forward_loss(self.train_model, x, y, self.step) if part is None else
                         self._forward_loss(self.train_model, x[part], y[part], self.step, part=part))
                self.scaler.scale(micro["loss"] / parts if parts > 1 else micro["loss"]).backward()
            for k, v in micro.items():
                terms[k] = terms.get(k, 0.0) + v.detach() / parts
        self.scaler.unscale_(self.opt)
        clip = self.cfg.optim.grad_clip
        gn = torch.nn.utils.clip_grad_norm_(self.params, clip if clip > 0 else math.inf)
        self.scaler.step(self.opt)  # skipped (fp16) when a gradient overflowed
        self.scaler.update()
        self.sched.step()
        self.ema_model.step(self.params)
        self.step += 1
        return terms | {"grad_norm": _full(gn).detach()}

    def _grad_sync(self, last: bool):
        """Gradient synchronisation only on the last micro-batch of a step (DDP ``no_sync``,
        FSDP2 ``set_requires_gradient_sync``)."""
        if not self.env.distributed or self.cfg.grad_accum == 1:
            return contextlib.nullcontext()
        if hasattr(self.ddp, "no_sync"):
            return contextlib.nullcontext() if last else self.ddp.no_sync()
        self.ddp.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ the loop
    def train(self, until: int | None = None) -> list[float]:
        """Train to ``cfg.steps`` (or stop after step ``until``: for tests that "kill" a run).
        Returns the per-step losses (global batch means) of the whole run so far."""
        cfg = self.cfg
        stop = cfg.steps if until is None else min(until, cfg.steps)
        main = self.env.is_main
        bar = None
        if main and cfg.progress and sys.stderr.isatty() and stop > self.step:
            from tqdm import tqdm

            bar = tqdm(total=stop, initial=self.step, desc=f"{cfg.mode}/{cfg.method.name}", unit="step",
                       dynamic_ncols=True)
        pending: list[dict[str, Tensor]] = []
        t_win = time.perf_counter()
        stream = batch_stream(self.data, self.sampler, self.step, stop, self.env.rank,
                              self.env.world_size, cfg.data.workers)
        with self.weight_cache_scope():
            try:
                for x, y in stream:
                    pending.append(self.train_step(x, y))
                    if self.step % cfg.log_every == 0 or self.step == stop:
                        t_win = self._flush(pending, t_win, bar)
                        pending = []
                    if cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and self.step < cfg.steps:
                        self.save_checkpoint()
                    if cfg.sample_every or cfg.eval_every:
                        t_win += periodic(self)  # grids / metrics due at this step, off the throughput clock
                    if bar is not None:
                        bar.update(1)
            finally:
                if bar is not None:
                    bar.close()
        if pending:
            self._flush(pending, t_win, bar)
        if self.step == cfg.steps and stop == cfg.steps and self._saved_step != self.step:
            self.save_checkpoint()  # the same decision on every rank (saving is a collective)
        if self.env.is_main and self.logger is not None:
            self._plot()
        return list(self.losses)

    def _plot(self) -> None:
        from kind_fast.train.plot import plot_run

        try:
            path = plot_run(self.out)
        except Exception as e:  # noqa: BLE001 - a failed picture never fails a trained run
            path, msg = None, f"loss curve not drawn ({type(e).__name__}: {e})"
        else:
            msg = f"loss curve: {path}" if path else "loss curve not drawn: matplotlib is not installed"
        self.logger.note(msg)
        if path is None:
            self.log_fn(msg)

    def _flush(self, pending: list[dict[str, Tensor]], t_win: float, bar) -> float:
        keys = ("loss", "mse", "vb")
        stacked = torch.stack([torch.stack([p[k].float() for k in keys]) for p in pending])  # (n, 3)
        stacked = all_reduce_mean(stacked, self.env).cpu()
        bad = (~torch.isfinite(stacked[:, 0])).nonzero()
        gn = float(pending[-1]["grad_norm"])
        now = time.perf_counter()
        dt = max(now - t_win, 1e-9)
        self.elapsed += dt
        self.losses.extend(stacked[:, 0].tolist())
        row = {"step": self.step, "loss": stacked[:, 0].mean().item(), "mse": stacked[:, 1].mean().item(),
               "vb": stacked[:, 2].mean().item(), "lr": self.opt.param_groups[0]["lr"], "grad_norm": gn,
               "samples_per_s": len(pending) * self.cfg.batch_size / dt, "elapsed_s": self.elapsed}
        if self.logger is not None:
            line = self.logger.log(row)
            if bar is None or not sys.stdout.isatty():  # SLURM, CI, nohup: plain lines, not a bar
                self.log_fn(line)
        if bar is not None:
            bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['samples_per_s']:.0f}")
        if len(bad):
            i = int(bad[0])
            raise NonFiniteError(
                f"the loss became non-finite ({stacked[i, 0].item()}) at step {self.step - len(pending) + 1 + i} "
                f"(lr {row['lr']:g}); training stopped, no checkpoint was written from it "
                f"({self._last_good()}). Lower the learning rate (--lr) or check the data, then resume "
                "from a good checkpoint (--resume PATH)")
        return now

    # ------------------------------------------------------------------ outputs
    def export(self) -> dict[str, Path]:
        """Write ``<out>/model`` and ``<out>/ema`` (rank 0), and for a KIND transfer the EMA
        weights' task folder ``<out>/task`` (``kind_fast.deploy.tasks``); returns their paths."""
        self.check_finite_state("exporting the weights")
        state = self.full_model_state()
        ema = self.full_ema_state()
        paths = {}
        if self.env.is_main:
            paths["model"] = save_weights(model_from_state(self.spec, state), self.spec, self.out / "model")
            ema_model = model_from_state(self.spec, {**state, **ema})
            paths["ema"] = save_weights(ema_model, self.spec, self.out / "ema")
            if self.spec["mode"] == "transfer" and self.spec["method"] == "kind":
                from kind_fast.deploy.tasks import save_task  # the task alone, beside its base (docs/design.md §7)
                from kind_fast.train.models import resolve_init

                base = resolve_init(self.cfg.method.init, self.cfg.method.init_weights)
                paths["task"] = save_task(ema_model, self.out / "task", name=self.out.name, overwrite=True,
                                          base_source=str(base))
        barrier(self.env)
        return paths

    def eval_model(self, which: str = "ema") -> nn.Module:
        """A standalone copy of the model (EMA or raw weights) on this rank's device, in eval mode."""
        state = self.full_model_state()
        if which == "ema":
            state = {**state, **self.full_ema_state()}
        elif which != "model":
            raise ValueError(f"which must be ema or model, got {which!r}")
        return model_from_state(self.spec, state).to(self.device).eval()

    def count_train_flops(self) -> dict[str, float]:
        """FLOPs of one training step's forward + backward (FlopCounterMode), per image.

        Attention runs through the math SDPA backend while counting so its matmuls are seen
        (fused CPU SDPA kernels have no FLOP formula); the kind_linear ops count through their
        registered formulas. The model is not updated. Single process only.
        """
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.utils.flop_counter import FlopCounterMode

        if self.env.distributed:
            raise RuntimeError("count_train_flops runs in a single process")
        idx = rank_slice(self.sampler.indices(self.step), 0, 1)
        if hasattr(self.data, "get_batch"):
            x, y = self.data.get_batch(idx)
        else:
            x, y = _stack([self.data[i] for i in idx.tolist()])
        model = unwrap(self.ddp)
        model.train()
        with self.weight_cache_scope():
            with torch.no_grad():  # warm the learngene cache as a step after the first would find it
                self._forward_loss(model, x, y, self.step)
            with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
                terms = self._forward_loss(model, x, y, self.step)
                fwd = fc.get_total_flops()
                terms["loss"].backward()
        total = fc.get_total_flops()
        self.opt.zero_grad(set_to_none=True)
        n = x.shape[0]
        return {"train_per_image": total / n, "forward_per_image": fwd / n, "batch": n}

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()
        self.lock.release()
        cleanup(self.env)


def _stack(items):
    xs, ys = zip(*items)
    return torch.stack(xs), torch.tensor(ys)
