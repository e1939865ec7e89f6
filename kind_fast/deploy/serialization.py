"""Save and load KIND models as two parts (safetensors + a JSON config).

A directory written by ``save_kind`` holds:

    kind_config.json        layers, gate config, model architecture (for KIND-DiT), versions
    learngenes.safetensors  what every class shares: the learngene components and biases of
                            every KIND layer, and all class-agnostic dense weights (embedders,
                            adaLN, final layer, ...)
    tailors.safetensors     what is class-specific: tailor components, the gate table, and the
                            label-embedding table

so a transfer run loads only the learngenes (``load_learngenes``) and starts fresh tailors.

Integrity: every file is written to a temporary name and renamed (``kind_fast.atomic``), and
``kind_config.json`` is written last and records each part's SHA-256 and size. Loading checks
them, so an interrupted save (new learngenes beside old tailors), a changed byte in a tensor, or
a part from another save is refused rather than loaded. Each part's safetensors metadata
records the SHA-256 of the config's structural sections (``layers``, ``gate``, ``model``), so
an edited ``kind_config.json`` (say ``num_heads``, which no tensor shape reveals) is refused
too. Saves of format version 1 (before these records) load without the checks.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load, save
from torch import Tensor, nn

from kind_fast._version import __version__
from kind_fast.atomic import atomic_write_bytes, atomic_write_text
from kind_fast.nn.gate import ClassGate
from kind_fast.nn.layers import TAILOR_PARAMS
from kind_fast.nn.utils import kind_layers

__all__ = [
    "save_kind", "load_learngenes", "load_tailors", "split_state_dict",
    "save_pretrained", "load_pretrained", "kindify_from_pretrained",
]

CONFIG_FILE = "kind_config.json"
PART_FILES = {"learngenes": "learngenes.safetensors", "tailors": "tailors.safetensors"}
FORMAT_VERSION = 2  # 2: file hashes and the structural-config digest (see the module docstring)
STRUCTURE_KEYS = ("layers", "gate", "model")
# dense weights that belong to one class set (they move with the tailors, not the learngenes)
CLASS_SPECIFIC = re.compile(r"(^|\.)(y_embedder|class_embedder)\.")


def _gate_prefixes(model: nn.Module) -> list[str]:
    return [n + "." if n else "" for n, m in model.named_modules() if isinstance(m, ClassGate)]


def split_state_dict(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(learngene part, tailor part) of ``model.state_dict()`` (see the module docstring)."""
    state = model.state_dict()
    tailor_keys = set()
    for name, _ in kind_layers(model):
        tailor_keys.update(f"{name}.{p}" for p in TAILOR_PARAMS)
    gate_prefixes = _gate_prefixes(model)
    learn, tail = {}, {}
    for k, v in state.items():
        if any(k.startswith(g) for g in gate_prefixes):
            if k.endswith(".table") or k == "table":  # idx/mask are rebuilt from the table
                tail[k] = v
        elif k in tailor_keys or CLASS_SPECIFIC.search(k):
            tail[k] = v
        else:
            learn[k] = v
    return learn, tail


def _model_config(model: nn.Module) -> dict:
    from kind_fast.models.dit import DiT, kind_config_dict

    layers = {
        n: dict(in_features=m.in_features, out_features=m.out_features, learngene_rank=m.learngene_rank,
                tailor_rank=m.tailor_rank, bias=m.bias is not None)
        for n, m in kind_layers(model)
    }
    gate = getattr(model, "kind_gate", None)
    cfg = {
        "format": "kind_fast",
        "format_version": FORMAT_VERSION,
        "kind_fast_version": __version__,
        "torch_version": torch.__version__,
        "layers": layers,
        "gate": gate.to_config() if isinstance(gate, ClassGate) else None,
        "model": None,
    }
    if isinstance(model, DiT):
        cfg["model"] = {"class": "kind_fast.dit.DiT", "arch": dict(model.arch), "kind": kind_config_dict(model.kind)}
    settings = getattr(model, "_kind_fast_kindify", None)
    if settings:  # kindify's settings: kindify_from_pretrained / load_pretrained rebuild the model
        cfg["kindify"] = dict(settings)
        if cfg["model"] is None:
            cfg["model"] = model_record(model)
    return cfg


# =====================================================================================
# Integrity records
# =====================================================================================
def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_record(data: bytes) -> dict:
    """What a manifest stores about one file: its SHA-256 and size."""
    return {"sha256": sha256_bytes(data), "bytes": len(data)}


def verify_file(path: Path, record: dict, manifest: str) -> bytes:
    """The bytes of ``path`` if they match ``record`` (from ``file_record``), else a ValueError
    that says the save is corrupt or mixed."""
    data = path.read_bytes()
    if not isinstance(record, dict) or len(data) != record.get("bytes") or sha256_bytes(data) != record.get("sha256"):
        raise ValueError(
            f"{path} does not match the SHA-256 and size recorded in {manifest}: the file is corrupt or was "
            "changed after saving, or the save was interrupted (files from two different saves); save the "
            "model again (a training run: rerun it with --resume auto to rewrite its weights)")
    return data


def read_recorded_file(directory: Path, name: str, cfg: dict, manifest: str) -> bytes:
    """The bytes of ``directory/name``, checked against the SHA-256 and size that the config
    ``manifest`` records for it in ``cfg["files"]`` (exports, task folders)."""
    path = directory / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    return verify_file(path, cfg["files"].get(name), manifest)


def read_folder_config(directory: Path, name: str, *, fmt: str, max_version: int, what: str, whole: str,
                       hint: str = "") -> dict:
    """The JSON object ``directory/name`` of a folder of format ``fmt`` (an export, a task) at a
    version this code reads. FileNotFoundError when it is missing, ValueError when it is not
    JSON, not an object, of another format or newer than ``max_version``. The messages call the
    folder a kind_fast ``what`` folder, say that ``whole`` is corrupt, and end with ``hint``
    where the file is missing."""
    path = directory / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {directory} is not a kind_fast {what} folder{hint}")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); {whole} is corrupt") from None
    if not isinstance(cfg, dict) or cfg.get("format") != fmt or not isinstance(cfg.get("format_version"), int) \
            or cfg["format_version"] > max_version:
        raise ValueError(f"{path}: not a kind_fast {what} this version reads")
    return cfg


def config_digest(cfg: dict, ignore: tuple[str, ...] = ()) -> str:
    """SHA-256 of the canonical JSON of ``cfg`` without its top-level keys ``ignore`` (the
    bookkeeping that does not change what the weights mean: file records, versions, sources).
    Export and task folders record it in their weights file's metadata, so a config edited
    after saving (``classes`` reordered, ``num_heads`` changed: nothing a tensor shape reveals)
    is refused by ``check_config_digest``."""
    part = {k: v for k, v in cfg.items() if k not in ignore}
    return sha256_bytes(json.dumps(part, sort_keys=True, separators=(",", ":")).encode())


def check_config_digest(recorded, cfg: dict, ignore: tuple[str, ...], config_path: Path, weights_path: Path,
                        again: str, *, digest: str | None = None) -> None:
    """ValueError unless ``recorded`` (read from the weights file) is ``config_digest(cfg, ignore)``
    (or ``digest``, when the caller computes it its own way)."""
    if recorded != (digest if digest is not None else config_digest(cfg, ignore)):
        raise ValueError(
            f"{config_path} does not describe the weights in {weights_path}: it differs from the config they "
            f"were saved with (edited by hand?). Restore the saved config or {again}")


# names of the dtypes kind_fast writes into its folder configs (``str(dtype)`` without "torch.")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def config_dtype(value, where: Path) -> torch.dtype:
    """The torch dtype a folder config names, or a ValueError at load time for a name kind_fast
    does not write (rather than a late, obscure failure of ``getattr(torch, name)``)."""
    if not isinstance(value, str) or value not in DTYPES:
        raise ValueError(f"{where}: dtype {value!r} is not one kind_fast saves ({', '.join(DTYPES)}); "
                         "the config is corrupt or was edited")
    return DTYPES[value]


def structure_digest(cfg: dict) -> str:
    """SHA-256 of a config's structural sections (canonical JSON)."""
    part = {k: cfg.get(k) for k in STRUCTURE_KEYS}
    if "kindify" in cfg:  # kindify's settings (only when present: other saves keep their digest)
        part["kindify"] = cfg["kindify"]
    return sha256_bytes(json.dumps(part, sort_keys=True, separators=(",", ":")).encode())


def safetensors_metadata(data: bytes) -> dict:
    """The ``__metadata__`` of a safetensors file's bytes ({} if there is none)."""
    n = int.from_bytes(data[:8], "little")
    try:
        return json.loads(data[8:8 + n]).get("__metadata__") or {}
    except (ValueError, AttributeError):
        return {}


# =====================================================================================
# Save / load
# =====================================================================================
def save_kind(model: nn.Module, directory: str | os.PathLike, *, parts=("learngenes", "tailors")) -> Path:
    """Write ``parts`` of ``model`` and its config to ``directory`` (created if needed).

    The config is written last, with every part's SHA-256: a save interrupted at any point
    leaves either the previous save or files that the loaders refuse as mixed.
    """
    unknown = set(parts) - set(PART_FILES)
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}; choose from {sorted(PART_FILES)}")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    learn, tail = split_state_dict(model)
    cfg = _model_config(model)
    meta = {"format": "kind_fast", "kind_fast_version": __version__, "structure_sha256": structure_digest(cfg)}
    files = {}
    for part in parts:
        tensors = {k: v.detach().contiguous().cpu() for k, v in (learn if part == "learngenes" else tail).items()}
        data = save(tensors, metadata=dict(meta, part=part))
        files[PART_FILES[part]] = file_record(data)
        atomic_write_bytes(data, d / PART_FILES[part])
    cfg["parts"] = {p: PART_FILES[p] for p in parts}
    cfg["files"] = files
    atomic_write_text(json.dumps(cfg, indent=2, sort_keys=True), d / CONFIG_FILE)
    return d


def _read_config(directory: Path) -> dict:
    path = directory / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: not a kind_fast save directory")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the save is corrupt") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} must hold a JSON object (the kind_fast save config), got a "
                         f"{type(cfg).__name__}; the save is corrupt")
    version = cfg.get("format_version", 0)
    if cfg.get("format") != "kind_fast" or not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported format {cfg.get('format')!r} v{version}")
    for key, kind in (("layers", dict), ("parts", dict), ("gate", (dict, type(None))), ("model", (dict, type(None))),
                      ("files", dict)):
        if (key in cfg or (key == "files" and version >= 2)) and not isinstance(cfg.get(key), kind):
            raise ValueError(f"{path}: {key!r} is missing or malformed; the save is corrupt")
    return cfg


def _read_part(directory: Path, cfg: dict, part: str) -> dict[str, Tensor]:
    name = cfg.get("parts", {}).get(part)
    if name is None:
        raise FileNotFoundError(f"{directory} was saved without the {part} part")
    path = directory / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing")
    if cfg.get("format_version", 1) < 2:  # written before integrity records
        data = path.read_bytes()
    else:
        data = verify_file(path, cfg["files"].get(name), CONFIG_FILE)
        if safetensors_metadata(data).get("structure_sha256") != structure_digest(cfg):
            raise ValueError(
                f"{directory / CONFIG_FILE} does not describe the weights in {path}: its layers/gate/model "
                "sections differ from the ones saved with them (edited by hand?). Restore the saved config "
                "or save the model again")
    try:
        return load(data)
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for corrupt files
        raise ValueError(f"{path} could not be read ({type(e).__name__}: {e}); the save is corrupt") from e


@torch.no_grad()
def _copy_into(model: nn.Module, tensors: dict[str, Tensor], *, what: str) -> None:
    state = model.state_dict(keep_vars=True)
    missing = [k for k in tensors if k not in state]
    if missing:
        raise ValueError(f"{what}: the model has no {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for k, v in tensors.items():
        dst = state[k]
        if dst.shape != v.shape:
            raise ValueError(f"{what}: {k} has shape {tuple(v.shape)} in the save but {tuple(dst.shape)} in the model")
    for k, v in tensors.items():
        state[k].copy_(v.to(device=state[k].device, dtype=state[k].dtype))
    for _, layer in kind_layers(model):
        layer._wg_cache = None


def load_learngenes(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load the shared part (learngenes, biases, class-agnostic dense weights) into ``model``.

    Every KIND layer of the save must exist in ``model`` with the same learngene shapes;
    tailors, gate and label table of ``model`` are left as they are.
    """
    d = Path(directory)
    cfg = _read_config(d)
    return _load_learngenes(model, d, cfg, _read_part(d, cfg, "learngenes"))


def _load_learngenes(model: nn.Module, d: Path, cfg: dict, tensors: dict[str, Tensor]) -> nn.Module:
    layers = dict(kind_layers(model))
    for name, spec in cfg["layers"].items():
        if name not in layers:
            raise ValueError(f"load_learngenes: the model has no KIND layer {name!r}")
        m = layers[name]
        saved = (spec["in_features"], spec["out_features"], spec["learngene_rank"])
        if (m.in_features, m.out_features, m.learngene_rank) != saved:
            raise ValueError(
                f"load_learngenes: layer {name} is {m.in_features}->{m.out_features} with "
                f"learngene_rank {m.learngene_rank}, the save has {spec['in_features']}->"
                f"{spec['out_features']} with {spec['learngene_rank']}"
            )
    _copy_into(model, tensors, what="load_learngenes")
    return model


def load_tailors(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load the class-specific part: tailors, label table, and the gate (rebuilt from the
    saved config and shared by every KIND layer again)."""
    d = Path(directory)
    cfg = _read_config(d)
    return _load_tailors(model, cfg, _read_part(d, cfg, "tailors"))


def _load_tailors(model: nn.Module, cfg: dict, tensors: dict[str, Tensor]) -> nn.Module:
    gate_tables = {k: v for k, v in tensors.items() if k == "table" or k.endswith(".table")}
    rest = {k: v for k, v in tensors.items() if k not in gate_tables}
    _copy_into(model, rest, what="load_tailors")
    if cfg.get("gate") is not None:
        if len(gate_tables) != 1:
            raise ValueError(f"load_tailors: expected one gate table in the save, found {sorted(gate_tables)}")
        (key, table), = gate_tables.items()
        gate = ClassGate.from_config(cfg["gate"], table)
        prefix = key[: -len("table")].rstrip(".")
        old = model.get_submodule(prefix) if prefix else None
        if not isinstance(old, ClassGate):
            raise ValueError(f"load_tailors: the model has no gate at {prefix!r}")
        gate = gate.to(old.table.device)
        parent, _, child = prefix.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, gate)
        for _, layer in kind_layers(model):
            if layer.gate is old or layer.gate is None:
                layer.set_gate(gate)
    return model


def save_pretrained(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Both parts and the full config (a KIND-DiT can be rebuilt by ``load_pretrained``)."""
    return save_kind(model, directory, parts=("learngenes", "tailors"))


def load_pretrained(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved with ``save_pretrained``: a kind_fast.models.dit.DiT, or a kindified
    model whose base kind_fast can build (a diffusers model; see ``kindify_from_pretrained``)."""
    from kind_fast.models.dit import DiT, KindConfig

    d = Path(directory)
    cfg = _read_config(d)
    mcfg = cfg.get("model")
    if cfg.get("kindify") and not (mcfg and mcfg.get("kind")):  # a kindified (hooked) model
        return load_kindified(d, cfg, map_location)
    if not mcfg or mcfg.get("class") != "kind_fast.dit.DiT":
        raise ValueError(f"{d} does not hold a kind_fast.models.dit.DiT (saved model: {mcfg and mcfg.get('class')})")
    kind = KindConfig(**mcfg["kind"]) if mcfg.get("kind") else None
    learn, tail = _read_part(d, cfg, "learngenes"), _read_part(d, cfg, "tailors")
    gate = None
    if kind is not None and kind.gate == "custom":  # an explicitly given gate (kindify): rebuilt from the save
        tables = [v for k, v in tail.items() if k == "table" or k.endswith(".table")]
        gate = ClassGate.from_config(cfg["gate"], tables[0] if len(tables) == 1 else None)
    with torch.device("meta"):
        model = DiT(**mcfg["arch"], kind=kind, gate=gate)
    model.to_empty(device=map_location)  # every tensor is overwritten below
    covered = set(learn) | set(tail)
    uncovered = [k for k in model.state_dict() if k not in covered and not k.startswith("kind_gate.")]
    if uncovered:
        raise ValueError(f"{d}: the save does not cover {uncovered[:5]}; it is incomplete or from another model")
    _load_learngenes(model, d, cfg, learn)
    _load_tailors(model, cfg, tail)
    return model


# =====================================================================================
# Kindified models (kind_fast.models.kindify): rebuild the base, kindify it again, load
# =====================================================================================
def model_record(model: nn.Module) -> dict | None:
    """How ``load_pretrained`` rebuilds the base (dense) model of a kindified ``model``:
    diffusers models by their config; None for other classes (use kindify_from_pretrained)."""
    cls = type(model)
    record = {"class": f"{cls.__module__}.{cls.__qualname__}", "config": None}
    to_json = getattr(model, "to_json_string", None)
    if cls.__module__.startswith("diffusers.") and callable(to_json):
        record["config"] = json.loads(to_json())
        record["diffusers_class"] = cls.__name__
    return record


def build_base(record: dict) -> nn.Module:
    """The base model of ``model_record``, with fresh (to be overwritten) weights."""
    name = record.get("diffusers_class")
    if not name or record.get("config") is None:
        raise ValueError(f"the save holds a kindified {record.get('class')}, which kind_fast cannot rebuild by "
                         "itself: build the base model and call kind_fast.kindify_from_pretrained(base_model, folder)")
    try:
        import diffusers
    except ImportError:
        raise ImportError(f"the save holds a kindified diffusers {name}: pip install diffusers") from None
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise ValueError(f"diffusers {diffusers.__version__} has no {name}")
    config = {k: v for k, v in record["config"].items() if not k.startswith("_")}
    return cls.from_config(config)


def kindify_from_pretrained(base_model: nn.Module, directory, *, map_location=None) -> nn.Module:
    """Restore a kindified model saved with ``kind_fast.deploy.serialization.save_pretrained``.

    ``base_model`` is the dense model kindify was applied to (its architecture; its weights are
    replaced by the saved ones). It is kindified with the saved settings and gate, then every
    saved tensor is loaded; the result equals the saved model exactly. In place; returns it.
    """
    from kind_fast.models.kindify import kindify

    d = Path(directory)
    cfg = _read_config(d)
    settings = cfg.get("kindify")
    if not settings:
        raise ValueError(f"{d} was not saved from a kindified model (no kindify settings in kind_config.json); "
                         "for a kind_fast.models.dit.DiT use kind_fast.deploy.serialization.load_pretrained")
    if cfg.get("gate") is None:
        raise ValueError(f"{d}: the save has no gate config")
    tensors = _read_part(d, cfg, "tailors")
    tables = [v for k, v in tensors.items() if k == "table" or k.endswith(".table")]
    if len(tables) != 1:
        raise ValueError(f"{d}: expected one gate table in the save, found {len(tables)}")
    gate = ClassGate.from_config(cfg["gate"], tables[0])
    if map_location is not None:
        base_model = base_model.to(map_location)
    targets = settings["target_modules"]
    kindify(base_model, gate=gate, tailor_rank=settings["tailor_rank"], learngene_rank=settings["learngene_rank"],
            target_modules=None if settings.get("native") else targets, label_arg=settings["label_arg"],
            split_qkv=settings["split_qkv"], svd=False)
    learn = _read_part(d, cfg, "learngenes")
    covered = set(learn) | set(tensors)
    uncovered = [k for k in base_model.state_dict() if k not in covered and not _is_gate_key(base_model, k)]
    if uncovered:
        raise ValueError(f"{d}: the save does not cover {uncovered[:5]}; it is from another model")
    _load_learngenes(base_model, d, cfg, learn)
    _load_tailors(base_model, cfg, tensors)
    return base_model


def _is_gate_key(model: nn.Module, key: str) -> bool:
    prefixes = [n + "." for n, m in model.named_modules() if isinstance(m, ClassGate)]
    return any(key.startswith(p) for p in prefixes)


def load_kindified(directory, cfg: dict, map_location="cpu") -> nn.Module:
    """``load_pretrained`` of a save written from a kindified (hooked) model."""
    from kind_fast.models.dit import DiT

    record = cfg.get("model") or {}
    if record.get("class") == "kind_fast.dit.DiT":
        with torch.device("meta"):
            base = DiT(**record["arch"], kind=None)
        base.to_empty(device=map_location)
    else:
        base = build_base(record).to(map_location)
    return kindify_from_pretrained(base, directory).eval()
