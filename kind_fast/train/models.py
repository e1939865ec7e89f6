"""The model of each training method, and how it is rebuilt from a checkpoint or a save.

Methods (all trained by the same loop):

==================  ===================================================================
pretrain/kind       KIND-DiT, every component trainable; the class gate diverts tailors.
pretrain/dense      a plain DiT (fused qkv), all trainable: the dense reference.
pretrain/tleg       TLEG's ancestry (``kind_fast.models.baselines.TLEGDiT``): every block is
                    θ_A + (l/L)·θ_B of two learngene blocks; θ_A, θ_B, embedders, final layer train.
pretrain + init     ``--init SRC`` continues from existing weights: a dense DiT (facebookresearch
                    ``.pt``, diffusers folder, kind_fast dense save) is converted by exact SVD
                    (``kind_fast.models.dit.kindify_dit``) with the run's KIND settings; a KIND save (e.g. from
                    ``kind-fast convert``) is loaded as it is. The init's architecture wins over
                    ``model.*``; a different class count gets a fresh label table and gate.
transfer/kind       KIND transfer: learngenes only are loaded (``load_learngenes``), fresh
                    tailors, gate and label table (``DiT.prepare_transfer``); trainable:
                    tailors, label table, final layer (learngenes frozen by default).
transfer/full       full fine-tuning of the dense DiT that the pretrained KIND model exports
                    with ``to_dense()`` (learngenes only: the knowledge KIND transfer keeps),
                    new label table (``retarget``), everything trainable.
transfer/lora       that dense DiT, frozen, PEFT LoRA on the block linears (``apply_lora``: a
                    ``peft.PeftModel``), plus the label table and final layer (PEFT's
                    ``modules_to_save``). Its weights folders also hold ``adapter/`` (PEFT's
                    adapter folder); ``load_weights`` gives the PeftModel (``merge_and_unload()``).
transfer/svdiff     that dense DiT, frozen, SVDiff spectral shifts on the block linears
                    (``apply_svdiff``), plus the label table and final layer.
transfer/heur_lg    Heur-LG: a fresh DiT with the top ``method.heur_lg_blocks`` blocks (default:
                    half) and the final layer of that dense DiT (``heur_lg_descendant``), new
                    label table, all trainable.
transfer/tleg       TLEG: the TLEG ancestry (``pretrain --method tleg``) expanded to a plain DiT
                    of ``method.tleg_depth`` blocks (default: its own depth; ``TLEGDiT.expand``),
                    new label table, all trainable.
transfer/scratch    a fresh dense DiT of the pretrained architecture, all trainable.
==================  ===================================================================

A *spec* (a JSON-able dict) records what ``build_from_spec`` needs to rebuild the same module
structure and trainable set; checkpoints carry it, and resuming compares it with the run's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from kind_fast.models.dit import DiT, KindConfig, kind_config_dict
from kind_fast.train.config import ARCH_KEYS, FRESH_KIND, PRESET_KEYS, TINY_ARCH, RunConfig

SPEC_FILE = "train_spec.json"
DENSE_WEIGHTS = "model.safetensors"


# =====================================================================================
# Spec
# =====================================================================================
def _preset(cfg: RunConfig) -> dict:
    """The sizes ``model.name`` fixes ({} without a preset)."""
    from kind_fast.models.dit import DiT_models

    return dict(zip(PRESET_KEYS, DiT_models[cfg.model.name])) if cfg.model.name is not None else {}


def _arch_from_config(cfg: RunConfig, num_classes: int, sample_shape) -> dict:
    m = cfg.model
    given = {k: getattr(m, k) for k in ARCH_KEYS if getattr(m, k) is not None}
    a = {**TINY_ARCH, **given, **_preset(cfg)}  # the preset wins here; check_model_settings refuses a conflict
    depth, hidden, heads, patch = a["depth"], a["hidden_size"], a["num_heads"], a["patch_size"]
    c, h, w = sample_shape
    if h != w:
        raise ValueError(f"images must be square, got {h}×{w}")
    if h % patch:
        raise ValueError(f"image size {h} is not a multiple of the patch size {patch} (model.patch_size)")
    if hidden % heads:
        raise ValueError(f"model.hidden_size {hidden} is not divisible by model.num_heads {heads}")
    if hidden % 4:
        raise ValueError(f"model.hidden_size {hidden} must be a multiple of 4")
    return dict(input_size=h, patch_size=patch, in_channels=c, hidden_size=hidden, depth=depth,
                num_heads=heads, mlp_ratio=a["mlp_ratio"], class_dropout_prob=m.class_dropout,
                num_classes=num_classes, learn_sigma=a["learn_sigma"])


# docs/design.md §1's N_T / active, as KindConfig and kind-fast convert use them
CONVERT_KIND = {"tailor_rank": KindConfig.tailor_rank, "active": KindConfig.active}


def _kind_from_config(cfg: RunConfig, hidden: int, defaults: dict = FRESH_KIND) -> dict:
    m = cfg.model
    rank = m.tailor_rank if m.tailor_rank is not None else defaults["tailor_rank"]
    active = m.active if m.active is not None else defaults["active"]
    src = "" if m.tailor_rank is not None else \
        f" (the default{' for --init, as kind-fast convert' if defaults is CONVERT_KIND else ''})"
    if rank > hidden:
        raise ValueError(f"model.tailor_rank {rank}{src} exceeds the hidden size {hidden}: set a smaller one "
                         "(--set model.tailor_rank=N)")
    if active > rank:
        raise ValueError(f"model.active {active}{'' if m.active is not None else ' (the default)'} exceeds "
                         f"model.tailor_rank {rank}: set --set model.active=N")
    return kind_config_dict(KindConfig(tailor_rank=rank, active=active, gate=m.gate,
                                       null=m.null, qkv=m.qkv, seed=cfg.seed))


def resolve_init(path: str | os.PathLike, which: str = "ema") -> Path:
    """A kind_fast save folder: ``path`` itself, or ``path/<which>`` of a training run."""
    p = Path(path)
    for cand in (p, p / which):
        if (cand / "kind_config.json").is_file() or (cand / SPEC_FILE).is_file():
            return cand
    if not p.exists():
        raise FileNotFoundError(f"method.init {p} does not exist")
    raise FileNotFoundError(
        f"method.init {p}: neither it nor {p / which} holds a kind_fast save "
        f"(kind_config.json or {SPEC_FILE}); point --init at a pretrain run folder or a save folder")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the save is corrupt") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got a {type(data).__name__}; the save is corrupt")
    return data


def init_info(init_dir: Path) -> dict:
    """{"arch", "kind", "method"} of a saved model (KIND save or dense save)."""
    if (init_dir / SPEC_FILE).is_file():
        spec = _read_json(init_dir / SPEC_FILE)
        return {"arch": spec["arch"], "kind": spec.get("kind"), "method": spec.get("method")}
    cfg = _read_json(init_dir / "kind_config.json")
    model = cfg.get("model") or {}
    if not isinstance(model, dict) or model.get("class") != "kind_fast.dit.DiT":
        raise ValueError(f"{init_dir} does not hold a kind_fast.models.dit.DiT save")
    if cfg.get("kindify") and not model.get("kind"):
        raise ValueError(f"{init_dir} holds a DiT kindified with custom target_modules (a partial KIND model); "
                         "the trainer needs a KIND-DiT: kindify with the default targets, or kind_fast.models.dit.from_dense")
    return {"arch": model["arch"], "kind": model.get("kind"), "method": "kind"}


def _is_kind_fast_folder(path: Path, which: str) -> bool:
    return any((c / "kind_config.json").is_file() or (c / SPEC_FILE).is_file() for c in (path, path / which))


def _pretrain_init_spec(cfg: RunConfig, num_classes: int, sample_shape) -> dict:
    """arch / kind of ``pretrain --init``: from the init (dense or KIND), classes from the data."""
    me = cfg.method
    src = Path(me.init)
    if not src.exists():
        raise FileNotFoundError(f"method.init {src} does not exist")
    info = None
    if src.is_dir() and _is_kind_fast_folder(src, me.init_weights):
        info = init_info(resolve_init(src, me.init_weights))
        if info.get("method") not in (None, "kind", "dense", "full", "scratch"):
            raise ValueError(f"{src} holds a {info['method']} baseline, not a DiT to continue pretraining")
    if info is not None and info["kind"]:
        if me.name == "dense":
            raise ValueError(f"{src} is a KIND-DiT; continue it with --method kind (dense would drop the tailors)")
        kind = dict(info["kind"])
        if kind.get("gate") == "custom":
            raise ValueError(f"{src} has an explicitly given (custom) gate, which a run config cannot describe; "
                             "continue it with your own loop (kind_fast.deploy.serialization.load_pretrained)")
        arch, init_kind = dict(info["arch"]), True
    else:
        arch = dict(info["arch"]) if info is not None else dict(_load_dense_init(cfg).arch)
        # a dense init is converted as kind-fast convert converts it (same default N_T / active),
        # so a base converted by either carries the tasks trained on the other
        kind = _kind_from_config(cfg, arch["hidden_size"], CONVERT_KIND) if me.name == "kind" else None
        init_kind = False
    if (arch["in_channels"], arch["input_size"], arch["input_size"]) != tuple(sample_shape):
        raise ValueError(f"the init model takes {arch['in_channels']}×{arch['input_size']}×{arch['input_size']} "
                         f"inputs but the data is {'×'.join(map(str, sample_shape))}")
    spec = {"init_classes": arch["num_classes"], "init_is_kind": init_kind}
    arch["num_classes"] = num_classes
    arch["class_dropout_prob"] = cfg.model.class_dropout
    spec["arch"], spec["kind"] = arch, kind
    return spec


def _load_dense_init(cfg: RunConfig) -> nn.Module:
    """The dense DiT of ``pretrain --init FILE``; the heads come from ``method.init_num_heads``
    when the width is not a preset's (they are not in the weights)."""
    from kind_fast.models.dit import load_dense

    me = cfg.method
    try:
        return load_dense(me.init, which=me.init_weights, num_heads=me.init_num_heads)
    except ValueError as e:
        if me.init_num_heads is None and "number of attention heads is unknown" in str(e):
            raise ValueError(f"method.init {me.init}: {str(e).split(',')[0]}, so its number of attention heads "
                             "is unknown: pass --init-num-heads N (config: method.init_num_heads)") from None
        raise


def _pretrain_init_model(cfg: RunConfig, spec: dict) -> nn.Module:
    """The model of ``pretrain --init``: the init's weights as a KIND-DiT (or dense DiT)."""
    from kind_fast.models.dit import kindify_dit

    me = cfg.method
    src = Path(me.init)
    if spec["init_is_kind"] or (src.is_dir() and _is_kind_fast_folder(src, me.init_weights)):
        model = load_weights(resolve_init(me.init, me.init_weights))  # a kind_fast save (KIND or dense)
    else:
        model = _load_dense_init(cfg)  # a checkpoint file or a diffusers model
    if not spec["init_is_kind"]:
        if not isinstance(model, DiT) or model.kind is not None:
            raise ValueError(f"{src}: expected a dense DiT, got a {type(model).__name__}")
        model = model.eval()
        if spec["kind"]:
            model = kindify_dit(model, KindConfig(**spec["kind"]))  # exact float64 SVD of every block linear
    model.y_embedder.dropout_prob = spec["arch"]["class_dropout_prob"]
    model.arch["class_dropout_prob"] = spec["arch"]["class_dropout_prob"]
    if spec["arch"]["num_classes"] != spec["init_classes"]:
        model.retarget(spec["arch"]["num_classes"])  # a fresh label table (and gate) for the data's classes
    return model.train().set_mode("pretrain")


def make_spec(cfg: RunConfig, num_classes: int, sample_shape) -> dict:
    """The model spec of a run (reads the init save's architecture for transfer). A model
    setting of ``cfg`` that the spec would not honour is a ValueError (``check_model_settings``)."""
    spec = _make_spec(cfg, num_classes, sample_shape)
    check_model_settings(cfg, spec)
    return spec


def check_model_settings(cfg: RunConfig, spec: dict) -> None:
    """Refuse given model settings that the model of ``spec`` would not have: sizes that a
    preset (``model.name``) or an init fixes otherwise, a preset that is not the init's, a
    tailor rank or active count that a KIND init fixes otherwise. Nothing is silently ignored."""
    m, arch, kind = cfg.model, spec["arch"], spec.get("kind")
    init = cfg.method.init
    source = f"the init model ({init})" if init else f"the preset {m.name}"
    if init and cfg.method.name == "tleg" and cfg.method.tleg_depth is not None:
        source = f"the init model ({init}) expanded to method.tleg_depth={cfg.method.tleg_depth} blocks"
    given = {k: getattr(m, k) for k in ARCH_KEYS if getattr(m, k) is not None}
    if init and m.name is not None:
        given = {**_preset(cfg), **given}
    if kind:
        given.update({k: getattr(m, k) for k in ("tailor_rank", "active") if getattr(m, k) is not None})
    built = {**arch, **(kind or {})}
    clash = {k: v for k, v in given.items() if v != built[k]}
    if clash:
        gave = ", ".join(f"{k}={v}" for k, v in clash.items())
        has = ", ".join(f"{k}={built[k]}" for k in clash)
        what = (f"model.name {m.name} fixes" if not init else f"{source} has")
        raise ValueError(f"{what} {has}, but the config gives {gave}: they would be ignored. Drop them"
                         + (" or the preset (--model)" if not init else "") + " (nothing was built)")


def record_built_model(cfg: RunConfig, spec: dict) -> RunConfig:
    """``cfg`` with ``model.*`` set to the model of ``spec`` (what ``<out>/config.json`` records):
    the sizes actually built, and the KIND settings (None for a model without KIND layers)."""
    arch, kind = spec["arch"], spec.get("kind")
    upd: dict = {f"model.{k}": arch[k] for k in ARCH_KEYS}
    upd["model.tailor_rank"] = kind["tailor_rank"] if kind else None
    upd["model.active"] = kind["active"] if kind else None
    if kind and kind.get("gate") != "custom":
        upd.update({"model.gate": kind["gate"], "model.null": kind["null"], "model.qkv": kind["qkv"]})
    return cfg.with_overrides(upd)


def _make_spec(cfg: RunConfig, num_classes: int, sample_shape) -> dict:
    me = cfg.method
    spec: dict = {"mode": cfg.mode, "method": me.name}
    if cfg.mode == "pretrain" and me.name == "tleg" and me.init:
        raise ValueError("pretrain --method tleg trains TLEG's ancestry from a fresh init; --init is not supported")
    if cfg.mode == "pretrain" and me.init:
        spec.update(_pretrain_init_spec(cfg, num_classes, sample_shape))
        return spec
    if cfg.mode == "pretrain":
        arch = _arch_from_config(cfg, num_classes, sample_shape)
        spec["arch"] = arch
        spec["kind"] = _kind_from_config(cfg, arch["hidden_size"]) if me.name == "kind" else None
        return spec
    if me.init:
        info = init_info(resolve_init(me.init, me.init_weights))
        arch = dict(info["arch"])
        if (arch["in_channels"], arch["input_size"], arch["input_size"]) != tuple(sample_shape):
            raise ValueError(
                f"the pretrained model takes {arch['in_channels']}×{arch['input_size']}×{arch['input_size']} "
                f"inputs but the transfer data is {'×'.join(map(str, sample_shape))}")
        spec["pretrain_classes"] = arch["num_classes"]
        arch["num_classes"] = num_classes
        if me.name == "kind" and not info["kind"]:
            raise ValueError(f"method kind needs a KIND pretrained model; {me.init} is a dense DiT "
                             "(use method full, lora, svdiff or scratch, or convert it first: kind-fast convert)")
        if me.name == "tleg" and info.get("method") != "tleg":  # other methods expand a TLEG ancestry first
            raise ValueError(f"method tleg transfers a TLEG ancestry (pretrain --method tleg); {me.init} holds "
                             f"a {info.get('method') or 'kind'} model")
        if me.name == "tleg" and me.tleg_depth is not None:
            arch["depth"] = me.tleg_depth
        if me.name == "heur_lg":
            depth = arch["depth"]
            blocks = max(1, depth // 2) if me.heur_lg_blocks is None else me.heur_lg_blocks
            if not 1 <= blocks <= depth:
                raise ValueError(f"method.heur_lg_blocks must be in [1, {depth}] (the pretrained DiT's depth), "
                                 f"got {blocks}")
            spec["heur_lg_blocks"] = blocks
        kind = info["kind"]
        if kind and kind.get("gate") == "custom":  # an explicit gate (kindify): the run's gate settings
            m = cfg.model
            kind = dict(kind, gate=m.gate, active=m.active if m.active is not None else kind["active"], null=m.null)
    else:  # scratch without an init: the config's architecture
        arch, kind = _arch_from_config(cfg, num_classes, sample_shape), None
    spec["arch"] = arch
    spec["kind"] = kind if me.name == "kind" else None
    if me.name == "kind":
        spec["freeze_learngenes"] = me.freeze_learngenes
    if me.name == "lora":
        spec["lora_rank"], spec["lora_alpha"] = me.lora_rank, me.lora_alpha
    return spec


# =====================================================================================
# Building
# =====================================================================================
def build_from_spec(spec: dict, *, empty: bool = False) -> nn.Module:
    """The module structure and trainable set of ``spec`` on the CPU. Weights are a fresh
    init, or uninitialised memory with ``empty=True`` (built on the meta device: no SVDs; for
    loading a full state dict right after)."""
    if empty:
        with torch.device("meta"):
            model = build_from_spec(spec)
        return model.to_empty(device="cpu")
    from kind_fast.models.baselines import apply_lora, apply_svdiff
    from kind_fast.nn.utils import freeze_learngenes

    method, arch = spec["method"], dict(spec["arch"])
    kind = KindConfig(**spec["kind"]) if spec.get("kind") else None
    if spec["mode"] == "pretrain":
        if method == "tleg":
            from kind_fast.models.baselines import TLEGDiT

            return TLEGDiT(**arch).set_mode("pretrain")
        return DiT(**arch, kind=kind).set_mode("pretrain")
    if method == "kind":
        model = DiT(**arch, kind=kind).set_mode("transfer")
        if not spec.get("freeze_learngenes", True):
            freeze_learngenes(model, False)
        return model
    model = DiT(**arch, kind=None)
    if method in ("full", "scratch", "heur_lg", "tleg"):
        return model.set_mode("full_finetune")
    if method == "lora":
        return apply_lora(model, spec["lora_rank"], alpha=spec.get("lora_alpha"))
    if method == "svdiff":
        return apply_svdiff(model)
    raise ValueError(f"unknown method {method!r} in the model spec")


def build_model(cfg: RunConfig, spec: dict) -> nn.Module:
    """A fresh model for a new run: random init (seeded) or loaded from ``method.init``."""
    from kind_fast.models.baselines import apply_lora, apply_svdiff
    from kind_fast.deploy.serialization import load_learngenes
    from kind_fast.nn.utils import freeze_learngenes

    torch.manual_seed(cfg.seed)
    method, arch = spec["method"], dict(spec["arch"])
    if spec["mode"] == "pretrain" and cfg.method.init:
        return _pretrain_init_model(cfg, spec)
    if spec["mode"] == "pretrain" or method == "scratch":
        return build_from_spec(spec)
    init = resolve_init(cfg.method.init, cfg.method.init_weights)
    if method == "kind":
        kind = KindConfig(**spec["kind"])
        model = DiT(**dict(arch, num_classes=spec["pretrain_classes"]), kind=kind)
        load_learngenes(model, init)  # learngenes, biases, class-agnostic dense weights only
        gen = torch.Generator().manual_seed(cfg.seed)
        model.prepare_transfer(arch["num_classes"], generator=gen)  # fresh tailors, gate, labels
        if not spec.get("freeze_learngenes", True):
            freeze_learngenes(model, False)
        return model
    from kind_fast.models.baselines import TLEGDiT, as_plain_dit, heur_lg_descendant

    if method == "tleg":
        ancestry = load_weights(init)
        if not isinstance(ancestry, TLEGDiT):
            raise ValueError(f"{init}: expected a TLEG ancestry (pretrain --method tleg)")
        dense = ancestry.expand(arch["depth"])  # TLEG's descendant initialisation
        dense.retarget(arch["num_classes"])
        return dense.requires_grad_(True).set_mode("full_finetune")
    dense = load_weights(init).to_dense() if init_info(init)["kind"] else as_plain_dit(load_weights(init))
    if not isinstance(dense, DiT) or dense.kind is not None:
        raise ValueError(f"{init}: expected a DiT")
    if method == "heur_lg":
        return heur_lg_descendant(dense, arch["num_classes"], blocks=spec["heur_lg_blocks"])
    dense.retarget(arch["num_classes"])  # a fresh label table for the new classes
    dense.requires_grad_(True)
    if method == "full":
        return dense.set_mode("full_finetune")
    if method == "lora":
        return apply_lora(dense, spec["lora_rank"], alpha=spec.get("lora_alpha"))
    if method == "svdiff":
        return apply_svdiff(dense)
    raise ValueError(f"unknown method {method!r}")


# =====================================================================================
# Final weights (<out>/model and <out>/ema)
# =====================================================================================
def save_weights(model: nn.Module, spec: dict, directory: str | os.PathLike) -> Path:
    """KIND models: the ``save_pretrained`` layout (so ``--init`` and ``load_learngenes`` read
    it); other models: ``model.safetensors``. Both with ``train_spec.json``, written last: its
    ``files`` entry holds the SHA-256 of the weights file (dense) or of ``kind_config.json``
    (which in turn records its parts), so ``load_weights`` refuses a folder that an interrupted
    save left with files of two different saves."""
    from safetensors.torch import save

    from kind_fast.atomic import atomic_write_bytes, atomic_write_text
    from kind_fast.deploy.serialization import CONFIG_FILE, file_record, save_pretrained

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if spec.get("kind"):
        save_pretrained(model, directory)
        name = CONFIG_FILE
        data = (directory / name).read_bytes()
    else:
        full = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        name, data = DENSE_WEIGHTS, save(full, metadata={"format": "kind_fast.train"})
        atomic_write_bytes(data, directory / DENSE_WEIGHTS)
        if spec.get("method") == "lora":  # PEFT's adapter folder: PeftModel.from_pretrained(base, <dir>/adapter)
            model.save_pretrained(str(directory / "adapter"))
    manifest = dict(spec, files={name: file_record(data)})
    atomic_write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", directory / SPEC_FILE)
    return directory


def model_from_state(spec: dict, state: dict[str, torch.Tensor]) -> nn.Module:
    """A CPU model of ``spec`` holding exactly ``state`` (a full state dict)."""
    model = build_from_spec(spec, empty=True)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"the weights do not fit the model spec ({spec.get('mode')}/{spec.get('method')}): "
                         f"{str(e)[:400]}") from None
    for m in model.modules():
        if hasattr(m, "_wg_cache"):
            m._wg_cache = None
    return model


def load_weights(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model written by ``save_weights`` (or any ``save_pretrained`` KIND-DiT)."""
    from safetensors.torch import load

    from kind_fast.deploy.serialization import load_pretrained, verify_file

    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"weights folder {d} not found")
    spec = _read_json(d / SPEC_FILE) if (d / SPEC_FILE).is_file() else None
    files = (spec or {}).pop("files", None) or {}
    for name, record in files.items():
        if name == DENSE_WEIGHTS:
            continue  # read (and checked) once, below
        if not (d / name).is_file():
            raise FileNotFoundError(f"{d / name} is missing")
        verify_file(d / name, record, SPEC_FILE)
    if spec is None or spec.get("kind"):
        if not (d / "kind_config.json").is_file():
            raise FileNotFoundError(f"{d} holds neither {SPEC_FILE} nor kind_config.json: not a kind_fast save")
        return load_pretrained(d, map_location=map_location)
    path = d / DENSE_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    data = verify_file(path, files[DENSE_WEIGHTS], SPEC_FILE) if DENSE_WEIGHTS in files else path.read_bytes()
    try:
        tensors = load(data)
    except Exception as e:  # noqa: BLE001 - safetensors raises several types
        raise ValueError(f"{path} could not be read ({type(e).__name__}: {e}); the save is corrupt") from e
    return model_from_state(spec, tensors).to(map_location)


def read_spec(directory: str | os.PathLike) -> dict | None:
    """The model spec saved beside weights (without its file records), or None."""
    p = Path(directory) / SPEC_FILE
    if not p.is_file():
        return None
    spec = _read_json(p)
    spec.pop("files", None)
    return spec
