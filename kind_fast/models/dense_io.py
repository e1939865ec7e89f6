"""Reading dense DiT checkpoints into kind_fast's DiT layout (docs/design.md §3.4).

Each reader returns ``(arch, state)``: the ``kind_fast.models.dit.DiT`` constructor arguments and a
state dict with DiT's module names. ``kind_fast.models.dit.load_dense`` / ``from_dense`` build the
model from them (this module does not import ``kind_fast.models.dit``, which imports it).

Sources:

* a state dict in the facebookresearch DiT layout (``blocks.{i}.attn.qkv.weight`` ...; the
  published ``DiT-XL-2-256x256.pt`` is one), or a training checkpoint dict holding ``ema`` /
  ``model`` (and ``args``); ``module.`` / ``_orig_mod.`` prefixes are stripped;
* the path of such a ``.pt`` / ``.pth`` / ``.bin`` file (read with ``weights_only=True``) or of a
  ``.safetensors`` file in that layout;
* a diffusers ``DiTTransformer2DModel``, as an object or a local folder (a model folder with
  ``config.json`` or a ``DiTPipeline`` folder with ``transformer/``). Nothing is downloaded.

The number of attention heads is not in the weights: it comes from ``num_heads=``, the
checkpoint's ``args.model`` (``"DiT-XL/2"``) or the DiT preset of that hidden size.

diffusers' DiT differs from the original in three details, all mapped exactly: its timestep
features divide the frequency exponent by (half - 1) instead of half (``time_freq_shift=1``),
the LayerNorm before the MLP uses ``norm_eps`` (1e-5) instead of 1e-6 (``mlp_norm_eps``), and
every block holds its own copy of the timestep/label embedders. The original DiT shares one, so
the copies must be equal (they are in checkpoints converted from the original); a model whose
copies differ (e.g. trained with diffusers) is refused: use ``kindify`` on it instead.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from kind_fast.nn.gate import ClassGate
from kind_fast.nn.layers import FastKindLinear

__all__ = ["read_dense", "state_from_checkpoint", "state_from_diffusers", "load_diffusers_folder",
           "is_diffusers_folder", "check_conversion"]

_REQUIRED = ("x_embedder.proj.weight", "y_embedder.embedding_table.weight", "final_layer.linear.weight",
             "blocks.0.attn.qkv.weight", "pos_embed")


def _clean(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def state_from_checkpoint(obj: Mapping, *, presets: Mapping[str, tuple], which: str = "ema",
                          num_heads: int | None = None, class_dropout_prob: float = 0.1) -> tuple[dict, dict]:
    """(arch, state) of a facebookresearch-layout state dict or training checkpoint dict.
    ``presets``: ``kind_fast.models.dit.DiT_models`` (name -> (depth, hidden, heads, patch))."""
    if not isinstance(obj, Mapping):
        raise TypeError(f"expected a state dict (a mapping of tensors), got {type(obj).__name__}")
    args = obj.get("args")
    state = obj
    for key in (which, "ema", "model"):
        if isinstance(obj.get(key), Mapping):
            state = obj[key]
            break
    state = _clean(state)
    if any(k.endswith((".u_g", ".u_t")) for k in state):
        raise ValueError("this state dict is already a KIND-DiT (it has u_g/u_t components); "
                         "load it with kind_fast.deploy.serialization.load_pretrained or DiT.load_state_dict")
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise ValueError(f"not a DiT state dict in the facebookresearch layout: missing {missing} "
                         f"(found e.g. {sorted(state)[:5]})")
    pw = state["x_embedder.proj.weight"]
    hidden, in_ch, patch = pw.shape[0], pw.shape[1], pw.shape[2]
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    tokens = state["pos_embed"].shape[-2]
    grid = int(round(tokens ** 0.5))
    if grid * grid != tokens:
        raise ValueError(f"pos_embed has {tokens} positions, not a square grid")
    out_ch = state["final_layer.linear.weight"].shape[0] // (patch * patch)
    if out_ch not in (in_ch, 2 * in_ch):
        raise ValueError(f"final layer gives {out_ch} channels for {in_ch} input channels (expected {in_ch} "
                         f"or {2 * in_ch} with learned sigma)")
    name = args.get("model") if isinstance(args, Mapping) else getattr(args, "model", None)
    heads = num_heads
    if heads is None and isinstance(name, str) and name in presets and presets[name][1] == hidden:
        heads = presets[name][2]
    if heads is None:
        heads = {h: n for _, h, n, _ in presets.values()}.get(hidden)
    if heads is None:
        raise ValueError(f"hidden size {hidden} is not a DiT preset, so the number of attention heads is unknown: "
                         "pass num_heads= (kind-fast convert --num-heads N)")
    arch = dict(input_size=grid * patch, patch_size=patch, in_channels=in_ch, hidden_size=hidden, depth=depth,
                num_heads=heads, mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
                class_dropout_prob=class_dropout_prob,
                num_classes=state["y_embedder.embedding_table.weight"].shape[0] - 1,
                learn_sigma=out_ch == 2 * in_ch)
    return arch, state


def state_from_diffusers(transformer: nn.Module) -> tuple[dict, dict]:
    """(arch, state) of a diffusers ``DiTTransformer2DModel`` in kind_fast's DiT layout."""
    cfg = dict(transformer.config)
    if cfg.get("norm_type", "ada_norm_zero") != "ada_norm_zero":
        raise ValueError(f"only ada_norm_zero DiTs can be converted, got norm_type={cfg['norm_type']!r}")
    if cfg.get("activation_fn", "gelu-approximate") != "gelu-approximate":
        raise ValueError(f"only gelu-approximate MLPs can be converted, got {cfg['activation_fn']!r}")
    if cfg.get("norm_elementwise_affine"):
        raise ValueError("norm_elementwise_affine=True (affine LayerNorms) has no counterpart in DiT")
    blocks = transformer.transformer_blocks
    b0 = blocks[0]
    emb = b0.norm1.emb
    ref = emb.state_dict()
    for i, blk in enumerate(blocks):
        for k, v in blk.norm1.emb.state_dict().items():
            if not torch.equal(v, ref[k]):
                diff = (v.float() - ref[k].float()).abs().max().item()
                raise ValueError(
                    f"transformer_blocks.{i}.norm1.emb.{k} differs from block 0's (max |diff| {diff:.3g}): "
                    "this DiT has per-block timestep/label embedders, which kind_fast.models.dit.DiT (one shared "
                    "embedder, as the original DiT) cannot hold. Use kind_fast.models.kindify(transformer, gate=...) "
                    "to make it a KIND model in diffusers' own layout instead")
    heads, head_dim = cfg["num_attention_heads"], cfg["attention_head_dim"]
    hidden = heads * head_dim
    in_ch = cfg["in_channels"]
    out_ch = cfg.get("out_channels") or in_ch
    if out_ch not in (in_ch, 2 * in_ch):
        raise ValueError(f"out_channels {out_ch} for in_channels {in_ch} (expected {in_ch} or {2 * in_ch})")
    table = emb.class_embedder.embedding_table.weight
    num_classes = cfg["num_embeds_ada_norm"]
    if table.shape[0] != num_classes + 1:
        raise ValueError(f"the label table has {table.shape[0]} rows for {num_classes} classes: no null (CFG) row")
    arch = dict(input_size=cfg["sample_size"], patch_size=cfg["patch_size"], in_channels=in_ch,
                hidden_size=hidden, depth=len(blocks), num_heads=heads,
                mlp_ratio=b0.ff.net[0].proj.out_features / hidden,
                class_dropout_prob=float(emb.class_embedder.dropout_prob), num_classes=num_classes,
                learn_sigma=out_ch == 2 * in_ch, time_freq_shift=1.0, mlp_norm_eps=float(b0.norm3.eps))
    state: dict[str, Tensor] = {}

    def lin(dst: str, src: nn.Linear) -> None:
        state[dst + ".weight"] = src.weight.detach()
        state[dst + ".bias"] = (src.bias.detach() if src.bias is not None
                                else torch.zeros(src.out_features, dtype=src.weight.dtype))

    pe = transformer.pos_embed
    state["x_embedder.proj.weight"], state["x_embedder.proj.bias"] = pe.proj.weight.detach(), pe.proj.bias.detach()
    state["pos_embed"] = pe.pos_embed.detach().reshape(1, -1, hidden).float()
    lin("t_embedder.mlp.0", emb.timestep_embedder.linear_1)
    lin("t_embedder.mlp.2", emb.timestep_embedder.linear_2)
    state["y_embedder.embedding_table.weight"] = table.detach()
    for i, blk in enumerate(blocks):
        a, p = blk.attn1, f"blocks.{i}."
        qkv = (a.to_q, a.to_k, a.to_v)
        state[p + "attn.qkv.weight"] = torch.cat([m.weight.detach() for m in qkv], 0)
        state[p + "attn.qkv.bias"] = torch.cat([m.bias.detach() if m.bias is not None
                                                else torch.zeros(m.out_features, dtype=m.weight.dtype) for m in qkv])
        lin(p + "attn.proj", a.to_out[0])
        lin(p + "mlp.fc1", blk.ff.net[0].proj)
        lin(p + "mlp.fc2", blk.ff.net[2])
        lin(p + "adaLN_modulation.1", blk.norm1.linear)
    lin("final_layer.adaLN_modulation.1", transformer.proj_out_1)
    lin("final_layer.linear", transformer.proj_out_2)
    return arch, state


def read_file(path: Path) -> dict:
    """A state dict / checkpoint dict from a ``.safetensors`` or weights-only torch file."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - pickle errors come in many types
            raise ValueError(f"{path} could not be read as a weights-only torch checkpoint "
                             f"({type(e).__name__}: {str(e)[:300]})") from None
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return dict(obj)


def is_diffusers_folder(path: Path) -> bool:
    if (path / "model_index.json").is_file():
        return True
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        return "_class_name" in json.loads(cfg.read_text())
    except (ValueError, UnicodeDecodeError):
        return False


def load_diffusers_folder(path: Path) -> nn.Module:
    """The ``DiTTransformer2DModel`` of a local model or DiTPipeline folder (no download)."""
    try:
        from diffusers import DiTTransformer2DModel
    except ImportError:
        raise ImportError(f"{path} is a diffusers folder: pip install diffusers") from None
    sub = "transformer" if (path / "model_index.json").is_file() else None
    try:
        return DiTTransformer2DModel.from_pretrained(str(path), subfolder=sub, local_files_only=True)
    except ImportError:
        raise
    except Exception as e:  # noqa: BLE001 - diffusers raises OSError, ValueError, ... for unreadable folders
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise ValueError(f"{path} is a diffusers folder, but diffusers could not load a DiTTransformer2DModel "
                         f"from it ({type(e).__name__}: {first}); its weights or config are corrupt or "
                         "incomplete") from None


def read_dense(src, *, presets: Mapping[str, tuple], which: str = "ema", num_heads: int | None = None,
               class_dropout_prob: float = 0.1) -> tuple[dict, dict]:
    """(arch, state) of a state dict, checkpoint file, diffusers model or diffusers folder."""
    if isinstance(src, nn.Module):
        if type(src).__name__ == "DiTTransformer2DModel":
            return state_from_diffusers(src)
        raise TypeError(f"cannot import a {type(src).__name__}: expected a DiT state dict, a kind_fast DiT or "
                        "a diffusers DiTTransformer2DModel (for other models use kind_fast.models.kindify)")
    kw = dict(presets=presets, which=which, num_heads=num_heads, class_dropout_prob=class_dropout_prob)
    if isinstance(src, Mapping):
        return state_from_checkpoint(src, **kw)
    path = Path(src)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir():
        if is_diffusers_folder(path):
            return state_from_diffusers(load_diffusers_folder(path))
        raise ValueError(f"{path} is not a diffusers folder; a kind_fast run or weights folder is read by "
                         "kind_fast.train.convert.load_dense (or kind_fast.train.models.load_weights)")
    return state_from_checkpoint(read_file(path), **kw)


# =====================================================================================
# How exactly a conversion encodes the dense model
# =====================================================================================
def _full_weight(layer: FastKindLinear) -> Tensor:
    """Learngenes + every tailor, in float64: the dense weight the components encode."""
    u = torch.cat([layer.u_g, layer.u_t]).double()
    return (u.t() * torch.cat([layer.sigma_g, layer.sigma_t]).double()) @ torch.cat([layer.v_g, layer.v_t]).double()


@torch.no_grad()
def check_conversion(dense: nn.Module, kind_model: nn.Module) -> dict[str, float | None]:
    """How exactly the KIND-DiT ``kind_model`` encodes the dense DiT ``dense``: ``weights``, the
    max over block linears of max|W - U·diag(σ)·V| / max|W| (every component), and ``output``,
    max|kind_model with every tailor on - dense| / max|dense| on a random batch (None when the
    dense output is all zero, as for a freshly initialised DiT whose adaLN-Zero layers are zero)."""
    import copy

    worst = 0.0
    for db, kb in zip(dense.blocks, kind_model.blocks):
        a = kb.attn
        pairs = [(db.attn.qkv.weight, torch.cat([_full_weight(a.get_submodule(n)) for n in "qkv"])
                  if a.split else _full_weight(a.qkv))]
        pairs += [(db.get_submodule(n).weight, _full_weight(kb.get_submodule(n)))
                  for n in ("attn.proj", "mlp.fc1", "mlp.fc2")]
        for w, got in pairs:
            worst = max(worst, ((got - w.double()).abs().max() / w.abs().max().clamp_min(1e-30)).item())
    all_on = copy.deepcopy(kind_model).set_gate(ClassGate.all_on(kind_model.num_classes,
                                                                 kind_model.kind.tailor_rank))
    g = torch.Generator().manual_seed(0)
    a = dense.arch
    x = torch.randn(2, a["in_channels"], a["input_size"], a["input_size"], generator=g).to(dense.pos_embed.dtype)
    t = torch.randint(0, 1000, (2,), generator=g)
    y = torch.randint(0, a["num_classes"], (2,), generator=g)
    ref, out = dense(x, t, y), all_on(x, t, y)
    scale = ref.abs().max().item()
    return {"weights": worst, "output": None if scale == 0 else (out - ref).abs().max().item() / scale}
