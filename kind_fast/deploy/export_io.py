"""Save and load deployment exports (``kind_fast.models.export``) as a folder.

    export_config.json   form, architecture, served classes, guidance, dtype, and the SHA-256
                         and size of the weights file (checked on load)
    model.safetensors    merged / reduced: the ``ExportedDiT`` state dict
    model.pt             dense: a plain state dict in the facebookresearch DiT layout

The config is bound to its weights both ways: it records the weights file's SHA-256, and the
weights file records the SHA-256 of the config's content (``CONFIG_IGNORED`` aside: file
records, versions, source) in its metadata (safetensors ``__metadata__``; for ``model.pt``
the state dict's ``_metadata``, which ``load_state_dict`` ignores). So a changed byte in the
weights, and an edited config (classes reordered, ``num_heads`` changed, which no tensor
shape reveals), are both refused on load. Exports of format version 1 (before the binding)
load without the second check. An unknown ``dtype`` is refused at load.

The folder is written under a temporary name and renamed into place as a whole
(``kind_fast.atomic.atomic_directory``); a re-export killed between its two renames leaves
the previous export in a hidden ``.<name>.old-<pid>-<host>`` sibling, and ``load_export``
says where it is and how to restore it. This module is apart from ``kind_fast.models.export``
because it builds ``kind_fast.models.dit`` modules, and ``kind_fast.models.dit`` imports ``kind_fast.models.export``.
"""

from __future__ import annotations

import io
import json
import os
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from kind_fast._version import __version__
from kind_fast.models.export import FORMAT, FORMAT_VERSION, FORMS, ExportedDiT

__all__ = ["save_export", "load_export", "read_export_config"]

CONFIG_FILE = "export_config.json"
WEIGHTS_FILE = "model.safetensors"
DENSE_PT_FILE = "model.pt"
# config keys outside the digest bound to the weights (they do not change what the weights mean)
CONFIG_IGNORED = ("files", "source", "kind_fast_version", "torch_version")
DIGEST_KEY = "config_sha256"
PT_METADATA_KEY = "kind_fast.export"  # model.pt: the entry of the state dict's _metadata holding it


def save_export(model: nn.Module, directory: str | os.PathLike, *, overwrite: bool = False,
                source: str | None = None) -> Path:
    """Write an export as a folder, atomically as a whole.

    ``ExportedDiT``: ``export_config.json`` + ``model.safetensors``. A dense DiT (form dense):
    ``export_config.json`` + ``model.pt``, a plain state dict in the facebookresearch DiT
    layout (``torch.load`` it into their ``DiT_models[...]``, or ``load_export`` it). The config
    records the weights file's SHA-256 and size; ``load_export`` checks them.
    """
    from safetensors.torch import save

    from kind_fast.atomic import atomic_directory
    from kind_fast.models.dit import DenseExportDiT
    from kind_fast.deploy.serialization import config_digest, file_record

    if isinstance(model, ExportedDiT):
        cfg = model.config()
        digest = config_digest(cfg, CONFIG_IGNORED)
        tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        name, data = WEIGHTS_FILE, save(tensors, metadata={"format": FORMAT, DIGEST_KEY: digest})
    elif isinstance(model, DenseExportDiT):
        cfg = {"format": FORMAT, "format_version": FORMAT_VERSION, "form": "dense", "arch": dict(model.arch),
               "classes": list(model.export_classes), "guidance": False, "split": False,
               "dtype": str(model.pos_embed.dtype).removeprefix("torch."),
               "kind_fast_version": __version__, "torch_version": torch.__version__}
        digest = config_digest(cfg, CONFIG_IGNORED)
        src = model.state_dict()
        state = OrderedDict((k, v.detach().contiguous().cpu()) for k, v in src.items())
        # a plain state dict (facebookresearch DiT loads it as is); the digest rides in its
        # _metadata, the per-module record that load_state_dict reads and otherwise ignores
        state._metadata = OrderedDict(getattr(src, "_metadata", {}), **{PT_METADATA_KEY: {DIGEST_KEY: digest}})
        buf = io.BytesIO()
        torch.save(state, buf)
        name, data = DENSE_PT_FILE, buf.getvalue()
    else:
        raise TypeError(f"save_export takes what DiT.export returns (an ExportedDiT or, for form dense, a "
                        f"DenseExportDiT), got {type(model).__name__}")
    if source is not None:
        cfg["source"] = source
    cfg["files"] = {name: file_record(data)}
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        (tmp / name).write_bytes(data)
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return Path(directory)


def read_export_config(directory: str | os.PathLike) -> dict:
    """The checked ``export_config.json`` of an export folder (format, form, file records, dtype)."""
    from kind_fast.atomic import refuse_missing_folder
    from kind_fast.deploy.serialization import config_dtype, read_folder_config

    refuse_missing_folder(directory, "export", "export it again")
    path = Path(directory) / CONFIG_FILE
    cfg = read_folder_config(Path(directory), CONFIG_FILE, fmt=FORMAT, max_version=FORMAT_VERSION, what="export",
                             whole="the export")
    if cfg.get("form") not in FORMS:
        raise ValueError(f"{path}: unknown export form {cfg.get('form')!r}")
    if not isinstance(cfg.get("files"), dict):
        raise ValueError(f"{path}: the file records are missing; the export is corrupt")
    for key, kind in (("arch", dict), ("classes", list), ("guidance", bool)):
        if not isinstance(cfg.get(key), kind):
            raise ValueError(f"{path}: {key!r} is missing or malformed; the export is corrupt")
    config_dtype(cfg.get("dtype", "float32"), path)
    return cfg


def _read_weights(d: Path, cfg: dict, name: str) -> bytes:
    """The bytes of the export's weights file, checked against the config's SHA-256."""
    from kind_fast.deploy.serialization import read_recorded_file

    return read_recorded_file(d, name, cfg, CONFIG_FILE)


def _check_bound(d: Path, cfg: dict, name: str, recorded) -> None:
    """The weights' record of their config must match the config (format version >= 2)."""
    from kind_fast.deploy.serialization import check_config_digest

    if cfg["format_version"] >= 2:
        check_config_digest(recorded, cfg, CONFIG_IGNORED, d / CONFIG_FILE, d / name, "export it again")


def load_export(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild what ``save_export`` wrote: an ``ExportedDiT`` (merged, reduced) or a
    ``DenseExportDiT`` (dense: a DiT that serves its one class only), in eval mode on
    ``map_location``."""
    from kind_fast.models.dit import DenseExportDiT, FinalLayer, PatchEmbed, TimestepEmbedder
    from kind_fast.deploy.serialization import config_dtype, safetensors_metadata

    d = Path(directory)
    cfg = read_export_config(d)
    dtype = config_dtype(cfg.get("dtype", "float32"), d / CONFIG_FILE)
    if cfg["form"] == "dense":
        data = _read_weights(d, cfg, DENSE_PT_FILE)
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - pickle errors come in many types
            raise ValueError(f"{d / DENSE_PT_FILE} could not be read ({type(e).__name__}: {str(e)[:200]}); "
                             "corrupt export") from None
        meta = getattr(state, "_metadata", None) or {}
        _check_bound(d, cfg, DENSE_PT_FILE, (meta.get(PT_METADATA_KEY) or {}).get(DIGEST_KEY))
        if len(cfg["classes"]) != 1:
            raise ValueError(f"{d / CONFIG_FILE}: a dense export serves one class, the config lists {cfg['classes']}")
        found = sorted({str(v.dtype).removeprefix("torch.") for v in state.values() if v.is_floating_point()})
        if found != [str(dtype).removeprefix("torch.")]:
            raise ValueError(f"{d / CONFIG_FILE} says dtype {str(dtype).removeprefix('torch.')}, the weights in "
                             f"{d / DENSE_PT_FILE} are {', '.join(found)}; the export is corrupt")
        with torch.device("meta"):
            model = DenseExportDiT(**cfg["arch"], kind=None)
        model.to_empty(device="cpu").to(dtype)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{d / DENSE_PT_FILE} does not match its config ({str(e)[:300]})") from None
        return model.serving(cfg["classes"][0]).to(map_location).eval()
    from safetensors.torch import load

    data = _read_weights(d, cfg, WEIGHTS_FILE)
    try:
        tensors = load(data)
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for corrupt files
        raise ValueError(f"{d / WEIGHTS_FILE} could not be read ({type(e).__name__}: {e}); corrupt export") from e
    _check_bound(d, cfg, WEIGHTS_FILE, safetensors_metadata(data).get(DIGEST_KEY))
    found = sorted({str(v.dtype).removeprefix("torch.") for k, v in tensors.items()
                    if v.is_floating_point() and k != "gate_val"})  # gate values stay float32
    if found != [str(dtype).removeprefix("torch.")]:
        raise ValueError(f"{d / CONFIG_FILE} says dtype {str(dtype).removeprefix('torch.')}, the weights in "
                         f"{d / WEIGHTS_FILE} are {', '.join(found)}; the export is corrupt")
    a = cfg["arch"]
    d_model, p, c_in = a["hidden_size"], a["patch_size"], a["in_channels"]
    with torch.device("meta"):
        shared = dict(x_embedder=PatchEmbed(a["input_size"], p, c_in, d_model),
                      t_embedder=TimestepEmbedder(d_model),
                      final_layer=FinalLayer(d_model, p, 2 * c_in if a["learn_sigma"] else c_in))
        shared = {k: m.to(dtype) for k, m in shared.items()}
        model = ExportedDiT(a, cfg["classes"], form=cfg["form"], guidance=cfg["guidance"],
                            split=cfg.get("split", False), tailors=cfg.get("tailors", 0),
                            active=cfg.get("active", 1), dtype=dtype, **shared)
    model.to_empty(device="cpu")
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{d / WEIGHTS_FILE} does not match its config ({str(e)[:300]})") from None
    model._plan_cache = None
    return model.to(map_location).eval().requires_grad_(False)
