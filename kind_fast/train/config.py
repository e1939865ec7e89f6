"""Run configuration: defaults ← an optional YAML/JSON file ← command-line flags.

One ``RunConfig`` describes a whole run (data, model, method, optimiser, schedule, outputs).
Sections are plain dataclasses so a config round-trips through JSON exactly; every run writes
its resolved config to ``<out>/config.json``. Unknown keys, wrong types and impossible values
are rejected with a ValueError naming the key.

A file looks like (YAML; JSON with the same structure works too)::

    mode: transfer
    steps: 2000
    batch_size: 256
    data: {source: imagefolder, path: /data/flowers, image_size: 64, flip: true}
    method: {name: kind, init: runs/pretrain}
    optim: {lr: 1.0e-4, ema_decay: 0.9999}
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from kind_fast.nn.gate import DEFAULT_GATE

MODES = ("pretrain", "transfer")
# a fresh model's architecture where neither the config nor a preset gives it: a tiny DiT for digits
TINY_ARCH = {"hidden_size": 64, "depth": 4, "num_heads": 4, "patch_size": 2, "mlp_ratio": 4.0, "learn_sigma": True}
ARCH_KEYS = tuple(TINY_ARCH)
PRESET_KEYS = ("depth", "hidden_size", "num_heads", "patch_size")  # the order of kind_fast.models.dit.DiT_models
# a fresh model's KIND settings where the config does not give them (they suit the tiny model)
FRESH_KIND = {"tailor_rank": 16, "active": 4}
PRETRAIN_METHODS = ("kind", "dense", "tleg")
TRANSFER_METHODS = ("kind", "full", "lora", "svdiff", "heur_lg", "tleg", "scratch")
DATA_SOURCES = ("digits", "imagefolder", "latents")
TRAIN_GATES = ("balanced", "block", "random_k", "all_on")


@dataclass
class DataConfig:
    source: str = "digits"  # digits | imagefolder | latents
    path: str | None = None  # ImageFolder root or latent-shard folder
    classes: list[int] | None = None  # digits / ImageFolder / shards: keep (and renumber) these
    image_size: int | None = None  # ImageFolder: centre crop + resize to this (default: 64)
    channels: int = 3  # ImageFolder: 3 (RGB) or 1 (L)
    flip: bool = False  # random horizontal flip (drawn from the per-step seed)
    workers: int = 0  # DataLoader workers for ImageFolder / shards


@dataclass
class ModelConfig:
    """The model. Its size and KIND settings are never silently overridden: None means "not
    given". A fresh run builds the given sizes (``TINY_ARCH`` for the rest), a preset ``name``
    fixes hidden_size, depth, num_heads and patch_size, an init (transfer, ``pretrain --init``)
    fixes all six; a given value that differs from what is built is refused. The tailor rank
    and active count default to ``FRESH_KIND`` for a fresh model and, for ``pretrain --init`` of
    a dense DiT, to docs/design.md §1's 96 / 32 (``KindConfig``'s, as ``kind-fast convert``); a
    KIND init brings its own. ``<out>/config.json`` records the model that was built."""

    name: str | None = None  # a DiT preset ("DiT-S/2", ...); None: the sizes below
    hidden_size: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    patch_size: int | None = None
    mlp_ratio: float | None = None
    learn_sigma: bool | None = None
    class_dropout: float = 0.1
    tailor_rank: int | None = None
    active: int | None = None
    gate: str = DEFAULT_GATE  # balanced | block | random_k | all_on (docs/design.md §1.4)
    null: str = "off"  # null-class gate: off (learngenes only) | all | class
    qkv: str = "split"


@dataclass
class MethodConfig:
    # pretrain: kind | dense | tleg (TLEG's ancestry); transfer: kind | full | lora | svdiff | heur_lg | tleg | scratch
    name: str = "kind"
    init: str | None = None  # transfer: a pretrain run folder or a kind_fast save folder
    init_weights: str = "ema"  # which weights of a run folder: ema | model
    # pretrain --init of a dense checkpoint whose width is not a DiT preset: its attention heads
    # (not recorded in the weights); None: from the preset of that width
    init_num_heads: int | None = None
    freeze_learngenes: bool = True  # KIND transfer
    lora_rank: int = 4
    lora_alpha: float | None = None
    heur_lg_blocks: int | None = None  # Heur-LG: top DiT blocks inherited (None: half the depth)
    tleg_depth: int | None = None  # TLEG transfer: blocks of the expanded descendant (None: the ancestry's)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    warmup_steps: int = 0  # linear warm-up from lr/warmup_steps to lr
    lr_schedule: str = "constant"  # after warm-up: constant (DiT) | cosine (to 0 at the last step)
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    ema_decay: float = 0.9999
    ema_warmup: bool = True  # decay_t = min(decay, (1 + t) / (10 + t)); off: constant (the 1st update copies)


@dataclass
class EvalConfig:
    sampler: str = "ddim"  # ddpm | ddim
    sample_steps: int = 50
    cfg_scale: float = 1.5
    n_per_class: int = 8  # grid columns
    weights: str = "ema"  # ema | model
    metric_samples: int = 100  # eval_every / --eval (digits): samples per class for FID, KID, IS, accuracy


@dataclass
class RunConfig:
    mode: str = "pretrain"
    out: str = "runs/run"
    steps: int = 1000
    batch_size: int = 64  # global, over all processes
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16 (with loss scaling)
    distributed: str = "ddp"  # ddp | fsdp (only used under torchrun)
    grad_accum: int = 1  # micro-batches per step: each process runs batch_size / processes / grad_accum at once
    compile: str = "off"  # off | a torch.compile backend for the model ("inductor" is what --compile sets)
    grad_checkpoint: bool = False  # activation checkpointing on the DiT blocks (less memory, ~1/3 more compute)
    ckpt_every: int = 0  # 0: only at the end
    sample_every: int = 0  # a sample grid (samples/step_N.png, trackers) every N steps; 0: off
    eval_every: int = 0  # digits: FID / KID / IS / class accuracy (eval.csv, trackers) every N steps; 0: off
    keep_last: int = 3
    log_every: int = 10
    tensorboard: str = "auto"  # auto (if installed) | on | off
    wandb: str = "off"  # on | off: Weights & Biases (needs wandb; WANDB_MODE=offline works without a network)
    wandb_project: str = "kind_fast"
    progress: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, *, base: RunConfig | None = None, validate: bool = True) -> RunConfig:
        """``base`` (default: the defaults) updated by the nested dict ``d``; validated."""
        cfg = _merge(base if base is not None else cls(), d, "")
        if validate:
            cfg.validate()
        return cfg

    def with_overrides(self, overrides: dict[str, Any], *, validate: bool = True) -> RunConfig:
        """Dotted keys (``optim.lr``) → a new validated config."""
        return RunConfig.from_dict(_nest(overrides), base=self, validate=validate)

    def save(self, path: str | os.PathLike) -> None:
        from kind_fast.atomic import atomic_write_text

        atomic_write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", Path(path))

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def need(cond: bool, key: str, msg: str) -> None:
            if not cond:
                raise ValueError(f"config {key}: {msg}")

        for key, value in _flat_items(self):  # nan/inf would pass the range checks below
            if isinstance(value, float):
                need(math.isfinite(value), key, f"must be a finite number, got {value}")
        need(self.mode in MODES, "mode", f"must be one of {MODES}, got {self.mode!r}")
        methods = PRETRAIN_METHODS if self.mode == "pretrain" else TRANSFER_METHODS
        need(self.method.name in methods, "method.name",
             f"{self.mode} supports {methods}, got {self.method.name!r}")
        for key in ("steps", "batch_size", "log_every", "keep_last"):
            need(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        need(self.ckpt_every >= 0, "ckpt_every", f"must be >= 0, got {self.ckpt_every}")
        need(self.precision in ("auto", "fp32", "bf16", "fp16"), "precision",
             f"auto, fp32, bf16 or fp16, got {self.precision!r}")
        need(not (self.precision == "fp16" and self.distributed == "fsdp"), "precision",
             "fp16 loss scaling is not supported with distributed=fsdp; use bf16")
        for key in ("grad_accum",):
            need(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        for key in ("sample_every", "eval_every"):
            need(getattr(self, key) >= 0, key, f"must be >= 0 (0: off), got {getattr(self, key)}")
        need(self.batch_size % self.grad_accum == 0, "grad_accum",
             f"batch_size {self.batch_size} is not divisible into {self.grad_accum} micro-batches")
        need(bool(self.compile), "compile", "off or a torch.compile backend name (inductor, aot_eager, ...)")
        need(self.eval_every == 0 or self.data.source == "digits", "eval_every",
             "scores digits runs only (the digit classifier's features); use sample_every for other data")
        need(self.distributed in ("ddp", "fsdp"), "distributed", f"ddp or fsdp, got {self.distributed!r}")
        need(self.tensorboard in ("auto", "on", "off"), "tensorboard", f"auto, on or off, got {self.tensorboard!r}")
        need(self.wandb in ("on", "off"), "wandb", f"on or off, got {self.wandb!r}")
        need(bool(self.wandb_project), "wandb_project", "must not be empty")
        need(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"), "device",
             f"auto, cpu, cuda or cuda:N, got {self.device!r}")
        need(bool(self.out), "out", "must be a folder path")
        d = self.data
        need(d.source in DATA_SOURCES, "data.source", f"must be one of {DATA_SOURCES}, got {d.source!r}")
        need(d.source == "digits" or bool(d.path), "data.path", f"data.source={d.source} needs a path")
        need(d.image_size is None or d.image_size >= 1, "data.image_size", f"must be >= 1, got {d.image_size}")
        need(d.channels in (1, 3), "data.channels", f"1 or 3, got {d.channels}")
        need(d.workers >= 0, "data.workers", f"must be >= 0, got {d.workers}")
        if d.classes is not None:
            need(len(d.classes) > 0, "data.classes", "must not be empty")
            need(len(set(d.classes)) == len(d.classes), "data.classes", f"has duplicates: {d.classes}")
        m = self.model
        for key in ("hidden_size", "depth", "num_heads", "patch_size", "tailor_rank", "active"):
            v = getattr(m, key)
            need(v is None or v >= 1, f"model.{key}", f"must be >= 1, got {v}")
        need(m.mlp_ratio is None or m.mlp_ratio > 0, "model.mlp_ratio", f"must be > 0, got {m.mlp_ratio}")
        need(m.active is None or m.tailor_rank is None or m.active <= m.tailor_rank, "model.active",
             f"({m.active}) must be <= model.tailor_rank ({m.tailor_rank})")
        need(0.0 <= m.class_dropout < 1.0, "model.class_dropout", f"must be in [0, 1), got {m.class_dropout}")
        need(m.gate in TRAIN_GATES, "model.gate", f"one of {', '.join(TRAIN_GATES)}, got {m.gate!r}")
        need(m.null in ("off", "all", "class"), "model.null", f"off, all or class, got {m.null!r}")
        need(m.qkv in ("split", "fused"), "model.qkv", f"split or fused, got {m.qkv!r}")
        if m.name is not None:
            from kind_fast.models.dit import DiT_models

            need(m.name in DiT_models, "model.name", f"unknown DiT preset {m.name!r}; one of {sorted(DiT_models)}")
        me = self.method
        needs_init = self.mode == "transfer" and me.name != "scratch"
        need(not needs_init or bool(me.init), "method.init",
             f"transfer with method {me.name!r} needs the pretrained run: --init PATH")
        need(me.init_weights in ("ema", "model"), "method.init_weights", f"ema or model, got {me.init_weights!r}")
        need(me.init_num_heads is None or me.init_num_heads >= 1, "method.init_num_heads",
             f"must be >= 1, got {me.init_num_heads}")
        need(me.lora_rank >= 1, "method.lora_rank", f"must be >= 1, got {me.lora_rank}")
        need(me.heur_lg_blocks is None or me.heur_lg_blocks >= 1, "method.heur_lg_blocks",
             f"must be >= 1, got {me.heur_lg_blocks}")
        need(me.tleg_depth is None or me.tleg_depth >= 1, "method.tleg_depth", f"must be >= 1, got {me.tleg_depth}")
        o = self.optim
        need(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
        need(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
        need(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "optim.beta1/beta2", f"must be in [0, 1), got {o.beta1}, {o.beta2}")
        need(o.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
        need(o.lr_schedule in ("constant", "cosine"), "optim.lr_schedule", f"constant or cosine, got {o.lr_schedule!r}")
        need(o.grad_clip >= 0, "optim.grad_clip", f"must be >= 0 (0 disables), got {o.grad_clip}")
        need(0 <= o.ema_decay < 1, "optim.ema_decay", f"must be in [0, 1), got {o.ema_decay}")
        e = self.eval
        need(e.sampler in ("ddpm", "ddim"), "eval.sampler", f"ddpm or ddim, got {e.sampler!r}")
        need(2 <= e.sample_steps <= 1000, "eval.sample_steps", f"must be in [2, 1000], got {e.sample_steps}")
        need(e.cfg_scale >= 0, "eval.cfg_scale", f"must be >= 0, got {e.cfg_scale}")
        need(e.n_per_class >= 1, "eval.n_per_class", f"must be >= 1, got {e.n_per_class}")
        need(e.metric_samples >= 2, "eval.metric_samples", f"must be >= 2, got {e.metric_samples}")
        need(e.weights in ("ema", "model"), "eval.weights", f"ema or model, got {e.weights!r}")


# =====================================================================================
# Merging and type checks
# =====================================================================================
def _flat_items(obj, prefix: str = ""):
    for f in fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            yield from _flat_items(v, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", v


# Hand-written on purpose. OmegaConf structured configs (tried: OmegaConf 2.4) would replace
# _merge/_coerce (~80 lines) with ~35 lines of wrapper, but change today's behaviour: its errors
# name the dataclass, not the dotted key ("Key 'lrr' not in 'OptimConfig'"), so every message
# needs translating; it turns numbers into strings for str fields (data.path=5 → "5") and keeps
# "none" as a string; the command line's "0-7" class ranges still need our parser. That is a
# new runtime dependency for every `kind-fast pretrain` to save about 45 lines. tyro would
# replace the whole argparse front end and its --set/--config layering, not config.py.
def _merge(obj, d: dict, prefix: str):
    if not isinstance(d, dict):
        raise ValueError(f"config {prefix or 'file'}: expected a mapping, got {type(d).__name__}")
    known = {f.name: f for f in fields(obj)}
    hints = typing.get_type_hints(type(obj))
    updates = {}
    for key, value in d.items():
        path = f"{prefix}{key}"
        if key not in known:
            raise ValueError(f"config: unknown key {path!r}; valid keys here: {sorted(known)}")
        cur = getattr(obj, key)
        if dataclasses.is_dataclass(cur):
            updates[key] = _merge(cur, value, path + ".")
        else:
            updates[key] = _coerce(value, hints[key], path)
    return dataclasses.replace(obj, **updates)


def _coerce(value: Any, hint, path: str):
    """Check (and for strings from the command line, convert) a value against a field's type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if errors else f"config {path}: bad value {value!r}")
    if origin is list:
        if isinstance(value, str):
            value = parse_int_list(value, path)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config {path}: expected a list, got {value!r}")
        return [_coerce(v, args[0], path) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ValueError(f"config {path}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ValueError(f"config {path}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ValueError(f"config {path}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, bool):
            raise ValueError(f"config {path}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"config {path}: expected a number, got {value!r}")
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"config {path}: expected a string, got {value!r}")
        return value
    raise ValueError(f"config {path}: unsupported type {hint}")  # pragma: no cover


def parse_int_list(text: str, what: str = "classes") -> list[int]:
    """``"0-7"``, ``"8,9"`` or ``"0-3,7"`` → a list of ints."""
    out: list[int] = []
    try:
        for part in text.replace(" ", "").split(","):
            if not part:
                continue
            if "-" in part:
                lo, hi = part.split("-", 1)
                lo_i, hi_i = int(lo), int(hi)
                if hi_i < lo_i:
                    raise ValueError
                out.extend(range(lo_i, hi_i + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise ValueError(f"config {what}: expected a list like 0-7 or 8,9, got {text!r}") from None
    return out


def _nest(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for key, value in flat.items():
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"config: {key!r} conflicts with another override")
        node[parts[-1]] = value
    return out


def load_config_file(path: str | os.PathLike) -> dict:
    """Read a YAML (.yaml/.yml) or JSON (.json) config file into a dict."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {p} not found")
    text = p.read_text()
    if p.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ImportError(
                f"reading {p} needs PyYAML: pip install pyyaml (or 'kind_fast[train]'), or use a .json config"
            ) from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"config file {p} is not valid YAML: {e}") from None
    elif p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"config file {p} is not valid JSON: {e}") from None
    else:
        raise ValueError(f"config file {p}: use a .yaml, .yml or .json file")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {p} must hold a mapping at the top level, got {type(data).__name__}")
    return data
