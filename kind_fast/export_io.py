"""Save and load deployment exports (``kind_fast.export``) as a folder.

    export_config.json   form, architecture, served classes, guidance, dtype, and the SHA-256
                         and size of the weights file (checked on load)
    model.safetensors    merged / reduced: the ``ExportedDiT`` state dict
    model.pt             dense: a plain state dict in the facebookresearch DiT layout

The folder is written under a temporary name and renamed into place as a whole
(``kind_fast.atomic.atomic_directory``). This module is apart from ``kind_fast.export``
because it builds ``kind_fast.dit`` modules, and ``kind_fast.dit`` imports ``kind_fast.export``.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import torch
from torch import nn

from kind_fast._version import __version__
from kind_fast.export import FORMAT, FORMAT_VERSION, FORMS, ExportedDiT

__all__ = ["save_export", "load_export", "read_export_config"]

CONFIG_FILE = "export_config.json"
WEIGHTS_FILE = "model.safetensors"
DENSE_PT_FILE = "model.pt"


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
    from kind_fast.dit import DiT
    from kind_fast.serialization import file_record

    if isinstance(model, ExportedDiT):
        cfg = model.config()
        tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        name, data = WEIGHTS_FILE, save(tensors, metadata={"format": FORMAT})
    elif isinstance(model, DiT) and model.kind is None:
        cfg = {"format": FORMAT, "format_version": FORMAT_VERSION, "form": "dense", "arch": dict(model.arch),
               "classes": list(getattr(model, "export_classes", [])), "guidance": False, "split": False,
               "dtype": str(model.pos_embed.dtype).removeprefix("torch."),
               "kind_fast_version": __version__, "torch_version": torch.__version__}
        buf = io.BytesIO()
        torch.save({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, buf)
        name, data = DENSE_PT_FILE, buf.getvalue()
    else:
        raise TypeError(f"save_export takes an ExportedDiT or a dense DiT, got {type(model).__name__}")
    if source is not None:
        cfg["source"] = source
    cfg["files"] = {name: file_record(data)}
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        (tmp / name).write_bytes(data)
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return Path(directory)


def read_export_config(directory: str | os.PathLike) -> dict:
    from kind_fast.serialization import read_folder_config

    path = Path(directory) / CONFIG_FILE
    cfg = read_folder_config(Path(directory), CONFIG_FILE, fmt=FORMAT, max_version=FORMAT_VERSION, what="export",
                             whole="the export")
    if cfg.get("form") not in FORMS:
        raise ValueError(f"{path}: unknown export form {cfg.get('form')!r}")
    if not isinstance(cfg.get("files"), dict):
        raise ValueError(f"{path}: the file records are missing; the export is corrupt")
    return cfg


def _read_weights(d: Path, cfg: dict, name: str) -> bytes:
    """The bytes of the export's weights file, checked against the config's SHA-256."""
    from kind_fast.serialization import read_recorded_file

    return read_recorded_file(d, name, cfg, CONFIG_FILE)


def load_export(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild what ``save_export`` wrote: an ``ExportedDiT`` (merged, reduced) or a dense
    ``kind_fast.dit.DiT`` (dense), in eval mode on ``map_location``."""
    from kind_fast.dit import DiT, FinalLayer, PatchEmbed, TimestepEmbedder

    d = Path(directory)
    cfg = read_export_config(d)
    if cfg["form"] == "dense":
        data = _read_weights(d, cfg, DENSE_PT_FILE)
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        with torch.device("meta"):
            model = DiT(**cfg["arch"], kind=None)
        model.to_empty(device="cpu")
        model.load_state_dict(state, strict=True)
        model.export_classes = list(cfg.get("classes", []))
        return model.to(map_location).eval()
    from safetensors.torch import load

    data = _read_weights(d, cfg, WEIGHTS_FILE)
    try:
        tensors = load(data)
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for corrupt files
        raise ValueError(f"{d / WEIGHTS_FILE} could not be read ({type(e).__name__}: {e}); corrupt export") from e
    dtype = getattr(torch, cfg.get("dtype", "float32"))
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
