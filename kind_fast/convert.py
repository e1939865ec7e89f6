"""Bring your own DiT: import a dense DiT checkpoint as a KIND-DiT (docs/design.md §3.4).

``from_dense(src, kind=KindConfig(...))`` reads a dense DiT and returns a ``kind_fast.dit.DiT``
whose block linears (q, k, v or fused qkv, attention proj, fc1, fc2) are KIND layers set from
an exact float64 SVD of the dense weights; every other weight is copied. With an all-on gate
(``KindConfig(gate="all_on")``) the result computes what the dense model computes.

``src`` may be:

* a state dict in the facebookresearch DiT layout (``blocks.{i}.attn.qkv.weight`` ...; the
  published ``DiT-XL-2-256x256.pt`` is one), or a training checkpoint dict holding ``ema`` /
  ``model`` (and ``args``); ``module.`` / ``_orig_mod.`` prefixes are stripped;
* the path of such a ``.pt`` / ``.pth`` / ``.bin`` file (read with ``weights_only=True``) or of a
  ``.safetensors`` file in that layout;
* a kind_fast folder holding a dense DiT: a trainer run (its ``ema/`` or ``model/``), a weights
  folder, or a ``save_pretrained`` folder;
* a ``kind_fast.dit.DiT`` with ``kind=None`` (left unchanged: the result is a new model);
* a diffusers ``DiTTransformer2DModel``, as an object or a local folder (a model folder with
  ``config.json`` or a ``DiTPipeline`` folder with ``transformer/``). Nothing is downloaded.

The architecture is read off the weights. The number of attention heads is not in the weights:
it comes from ``num_heads=``, the checkpoint's ``args.model`` (``"DiT-XL/2"``) or the DiT preset
of that hidden size (384: 6, 768: 12, 1024 and 1152: 16).

diffusers' DiT differs from the original in three details, all mapped exactly: its timestep
features divide the frequency exponent by (half - 1) instead of half (``time_freq_shift=1``), the
LayerNorm before the MLP uses ``norm_eps`` (1e-5) instead of 1e-6 (``mlp_norm_eps``), and every
block holds its own copy of the timestep/label embedders. The original DiT shares one, so the
copies must be equal (they are in checkpoints converted from the original); a model whose
copies differ (e.g. trained with diffusers) is refused. Use ``kindify`` on such a model instead.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from kind_fast.dit import _SIZES, DiT, DiT_models, KindConfig
from kind_fast.gate import ClassGate
from kind_fast.layers import FastKindLinear

__all__ = ["from_dense", "load_dense", "dense_from_state_dict", "dense_from_diffusers", "kindify_dit",
           "check_conversion"]

_HEADS_BY_HIDDEN = {hidden: heads for _, hidden, heads in _SIZES.values()}
_REQUIRED = ("x_embedder.proj.weight", "y_embedder.embedding_table.weight", "final_layer.linear.weight",
             "blocks.0.attn.qkv.weight")


# =====================================================================================
# The native conversion (also what kindify does to a kind_fast DiT)
# =====================================================================================
def _kind_layer(weight: Tensor, bias: Tensor | None, kind: KindConfig, gate: ClassGate,
                svd: bool = True) -> FastKindLinear:
    out_f, in_f = weight.shape
    layer = FastKindLinear(in_f, out_f, bias=bias is not None, tailor_rank=kind.tailor_rank,
                           learngene_rank=kind.learngene_rank, gate=gate, device="meta", dtype=weight.dtype)
    layer.to_empty(device=weight.device)
    if not svd:
        return layer
    layer.load_dense_weight(weight.detach())  # float64 SVD
    if bias is not None:
        with torch.no_grad():
            layer.bias.copy_(bias)
    return layer


@torch.no_grad()
def kindify_dit(model: DiT, kind: KindConfig, gate: ClassGate | None = None, *, svd: bool = True) -> DiT:
    """Turn a dense ``kind_fast.dit.DiT`` into a KIND-DiT **in place**: the same modules and
    parameter names as ``DiT(..., kind=kind)``, every block linear set by an exact SVD
    (``svd=False``: left uninitialised, for loading saved weights right after).

    ``gate`` defaults to ``kind.make_gate(model.num_classes)``. Returns ``model``.
    """
    if not isinstance(model, DiT):
        raise TypeError(f"kindify_dit expects a kind_fast.dit.DiT, got {type(model).__name__}")
    if model.kind is not None:
        raise ValueError("the model is already a KIND-DiT (kind is set)")
    if not isinstance(kind, KindConfig):
        raise TypeError(f"kind must be a KindConfig, got {type(kind).__name__}")
    gate = kind.make_gate(model.num_classes) if gate is None else gate
    if not isinstance(gate, ClassGate):
        raise TypeError(f"gate must be a ClassGate, got {type(gate).__name__}")
    if gate.num_classes != model.num_classes:
        raise ValueError(f"gate has {gate.num_classes} classes but the model has {model.num_classes}")
    if gate.tailor_rank != kind.tailor_rank:
        raise ValueError(f"gate has tailor_rank {gate.tailor_rank} but kind.tailor_rank is {kind.tailor_rank}")
    hidden = model.pos_embed.shape[-1]
    if kind.tailor_rank > hidden:
        raise ValueError(f"tailor_rank {kind.tailor_rank} exceeds the hidden size {hidden}")
    gate = gate.to(model.pos_embed.device)
    new = []  # build every layer first: a failing SVD leaves the model unchanged
    for block in model.blocks:
        attn, mlp = block.attn, block.mlp
        if kind.qkv == "split":
            w, b = attn.qkv.weight.chunk(3, 0), attn.qkv.bias.chunk(3, 0)
            qkv = {n: _kind_layer(w[i], b[i], kind, gate, svd) for i, n in enumerate("qkv")}
        else:
            qkv = {"qkv": _kind_layer(attn.qkv.weight, attn.qkv.bias, kind, gate, svd)}
        rest = {n: _kind_layer(getattr(p, n).weight, getattr(p, n).bias, kind, gate, svd)
                for p, n in ((attn, "proj"), (mlp, "fc1"), (mlp, "fc2"))}
        new.append((qkv, rest))
    for block, (qkv, rest) in zip(model.blocks, new):
        attn, mlp = block.attn, block.mlp
        del attn.qkv, attn.proj  # re-added in DiT's own order: q, k, v (or qkv), then proj
        for n, layer in qkv.items():
            setattr(attn, n, layer)
        attn.proj = rest["proj"]
        attn.split = kind.qkv == "split"
        mlp.fc1, mlp.fc2 = rest["fc1"], rest["fc2"]
        for layer in (*qkv.values(), *rest.values()):
            layer.train(block.training)
    model.kind = kind
    model.kind_gate = gate
    return model


# =====================================================================================
# Reading a dense DiT
# =====================================================================================
def _clean(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def _heads_hint(args) -> int | None:
    name = getattr(args, "model", None) if args is not None else None
    if isinstance(args, Mapping):
        name = args.get("model")
    if isinstance(name, str) and name in DiT_models:
        return DiT_models[name][2]
    return None


def dense_from_state_dict(state: Mapping[str, Tensor], *, num_heads: int | None = None,
                          class_dropout_prob: float = 0.1) -> DiT:
    """A dense ``kind_fast.dit.DiT`` holding a facebookresearch-layout state dict; the
    architecture is read off the tensor shapes (``num_heads``: see the module docstring)."""
    if not isinstance(state, Mapping):
        raise TypeError(f"expected a state dict (a mapping of tensors), got {type(state).__name__}")
    state = _clean(state)
    if any(k.endswith((".u_g", ".u_t")) for k in state):
        raise ValueError("this state dict is already a KIND-DiT (it has u_g/u_t components); "
                         "load it with kind_fast.serialization.load_pretrained or DiT.load_state_dict")
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise ValueError(f"not a DiT state dict in the facebookresearch layout: missing {missing} "
                         f"(found e.g. {sorted(state)[:5]})")
    pw = state["x_embedder.proj.weight"]
    hidden, in_ch, patch = pw.shape[0], pw.shape[1], pw.shape[2]
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    if "pos_embed" not in state:
        raise ValueError("the state dict has no pos_embed: cannot tell the input size")
    tokens = state["pos_embed"].shape[-2]
    grid = int(round(tokens ** 0.5))
    if grid * grid != tokens:
        raise ValueError(f"pos_embed has {tokens} positions, not a square grid")
    out_ch = state["final_layer.linear.weight"].shape[0] // (patch * patch)
    if out_ch not in (in_ch, 2 * in_ch):
        raise ValueError(f"final layer gives {out_ch} channels for {in_ch} input channels (expected {in_ch} "
                         f"or {2 * in_ch} with learned sigma)")
    heads = num_heads or _HEADS_BY_HIDDEN.get(hidden)
    if heads is None:
        raise ValueError(f"hidden size {hidden} is not a DiT preset, so the number of attention heads is unknown: "
                         "pass num_heads= (kind-fast convert --num-heads N)")
    arch = dict(input_size=grid * patch, patch_size=patch, in_channels=in_ch, hidden_size=hidden, depth=depth,
                num_heads=heads, mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
                class_dropout_prob=class_dropout_prob,
                num_classes=state["y_embedder.embedding_table.weight"].shape[0] - 1,
                learn_sigma=out_ch == 2 * in_ch)
    with torch.device("meta"):
        model = DiT(**arch, kind=None)
    model.to_empty(device="cpu")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"the state dict does not fit a DiT of the inferred architecture {arch}: "
                         f"{str(e)[:600]}") from None
    return model.eval()


def dense_from_diffusers(transformer: nn.Module) -> DiT:
    """A dense ``kind_fast.dit.DiT`` computing what a diffusers ``DiTTransformer2DModel`` does."""
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
    ref = {k: v for k, v in emb.state_dict().items()}
    for i, blk in enumerate(blocks):
        for k, v in blk.norm1.emb.state_dict().items():
            if not torch.equal(v, ref[k]):
                diff = (v.float() - ref[k].float()).abs().max().item()
                raise ValueError(
                    f"transformer_blocks.{i}.norm1.emb.{k} differs from block 0's (max |diff| {diff:.3g}): "
                    "this DiT has per-block timestep/label embedders, which kind_fast.dit.DiT (one shared "
                    "embedder, as the original DiT) cannot hold. Use kind_fast.kindify(transformer, gate=...) "
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
    with torch.device("meta"):
        model = DiT(**arch, kind=None)
    model.to_empty(device="cpu")

    def lin(dst: nn.Linear, src: nn.Linear) -> None:
        dst.weight.copy_(src.weight)
        if src.bias is not None:
            dst.bias.copy_(src.bias)
        else:
            dst.bias.zero_()

    with torch.no_grad():
        model.x_embedder.proj.weight.copy_(transformer.pos_embed.proj.weight)
        model.x_embedder.proj.bias.copy_(transformer.pos_embed.proj.bias)
        model.pos_embed.copy_(transformer.pos_embed.pos_embed.reshape(model.pos_embed.shape))
        lin(model.t_embedder.mlp[0], emb.timestep_embedder.linear_1)
        lin(model.t_embedder.mlp[2], emb.timestep_embedder.linear_2)
        model.y_embedder.embedding_table.weight.copy_(table)
        for dst, src in zip(model.blocks, blocks):
            a = src.attn1
            dst.attn.qkv.weight.copy_(torch.cat([a.to_q.weight, a.to_k.weight, a.to_v.weight], 0))
            if a.to_q.bias is not None:
                dst.attn.qkv.bias.copy_(torch.cat([a.to_q.bias, a.to_k.bias, a.to_v.bias], 0))
            else:
                dst.attn.qkv.bias.zero_()
            lin(dst.attn.proj, a.to_out[0])
            lin(dst.mlp.fc1, src.ff.net[0].proj)
            lin(dst.mlp.fc2, src.ff.net[2])
            lin(dst.adaLN_modulation[1], src.norm1.linear)
        lin(model.final_layer.adaLN_modulation[1], transformer.proj_out_1)
        lin(model.final_layer.linear, transformer.proj_out_2)
    return model.to(transformer.dtype).eval()


def _load_file(path: Path) -> dict:
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


def _from_checkpoint_dict(obj: Mapping, which: str, num_heads, class_dropout_prob) -> DiT:
    args = obj.get("args")
    if which in obj and isinstance(obj[which], Mapping):
        state = obj[which]
    elif "ema" in obj and isinstance(obj["ema"], Mapping):
        state = obj["ema"]
    elif "model" in obj and isinstance(obj["model"], Mapping):
        state = obj["model"]
    else:
        state = obj
    return dense_from_state_dict(state, num_heads=num_heads or _heads_hint(args), class_dropout_prob=class_dropout_prob)


def _load_diffusers(path: Path) -> nn.Module:
    try:
        from diffusers import DiTTransformer2DModel
    except ImportError:
        raise ImportError(f"{path} is a diffusers folder: pip install diffusers") from None
    sub = "transformer" if (path / "model_index.json").is_file() else None
    return DiTTransformer2DModel.from_pretrained(str(path), subfolder=sub, local_files_only=True)


def _is_diffusers_config(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        return "_class_name" in json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        return False


def _from_folder(path: Path, which: str, num_heads, class_dropout_prob) -> DiT:
    from kind_fast.train.models import SPEC_FILE, load_weights

    if not ((path / "kind_config.json").is_file() or (path / SPEC_FILE).is_file()):
        for sub in (which, "ema", "model"):  # a trainer run folder (its config.json is not diffusers')
            if (path / sub / "kind_config.json").is_file() or (path / sub / SPEC_FILE).is_file():
                return _from_folder(path / sub, which, num_heads, class_dropout_prob)
        if (path / "model_index.json").is_file() or _is_diffusers_config(path / "config.json"):
            return dense_from_diffusers(_load_diffusers(path))
        files = sorted(p.name for p in path.iterdir())[:10]
        raise ValueError(f"{path} is neither a kind_fast save folder, a trainer run, nor a diffusers model "
                         f"folder (it holds {files})")
    model = load_weights(path)
    if not isinstance(model, DiT):
        raise ValueError(f"{path} holds a {type(model).__name__}, not a plain DiT (a LoRA/SVDiff run: "
                         "export it to a dense DiT first)")
    return model.eval()


def load_dense(src, *, which: str = "ema", num_heads: int | None = None,
               class_dropout_prob: float = 0.1) -> DiT:
    """A dense ``kind_fast.dit.DiT`` (``kind=None``) holding ``src``'s weights on the CPU (see
    the module docstring for what ``src`` may be). A KIND source is refused: it is already KIND.
    ``which``: the weights of a training checkpoint or run folder (``ema`` or ``model``)."""
    if which not in ("ema", "model"):
        raise ValueError(f"which must be 'ema' or 'model', got {which!r}")
    if isinstance(src, DiT):
        if src.kind is not None:
            raise ValueError("src is already a KIND-DiT")
        import copy

        return copy.deepcopy(src).cpu().eval()
    if isinstance(src, nn.Module):
        if type(src).__name__ == "DiTTransformer2DModel":
            return dense_from_diffusers(src)
        raise TypeError(f"cannot import a {type(src).__name__}: expected a DiT state dict, a kind_fast DiT or "
                        "a diffusers DiTTransformer2DModel (for other models use kind_fast.kindify)")
    if isinstance(src, Mapping):
        return _from_checkpoint_dict(src, which, num_heads, class_dropout_prob)
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
        if path.is_dir():
            dense = _from_folder(path, which, num_heads, class_dropout_prob)
        else:
            dense = _from_checkpoint_dict(_load_file(path), which, num_heads, class_dropout_prob)
        if dense.kind is not None:
            raise ValueError(f"{path} already holds a KIND-DiT: load it with kind_fast.serialization.load_pretrained")
        return dense
    raise TypeError(f"from_dense: unsupported source of type {type(src).__name__}")


def from_dense(src, kind: KindConfig | None = None, *, gate: ClassGate | None = None, which: str = "ema",
               num_heads: int | None = None, class_dropout_prob: float = 0.1) -> DiT:
    """A KIND-DiT from a dense DiT ``src`` by an exact float64 SVD of every block linear.

    Args:
        src: a state dict, checkpoint file, kind_fast folder, dense DiT, or diffusers
            ``DiTTransformer2DModel`` (object or folder); see the module docstring.
        kind: the decomposition (default ``KindConfig()``: 96 tailors, block gate of 32).
        gate: a ClassGate to use instead of ``kind.make_gate(num_classes)``.
        which, num_heads, class_dropout_prob: see ``load_dense``.
    Returns:
        a new ``kind_fast.dit.DiT`` in eval mode, on the CPU (float32 unless the source was
        another dtype). With ``KindConfig(gate="all_on")`` it reproduces the dense model.
    """
    kind = KindConfig() if kind is None else kind
    dense = load_dense(src, which=which, num_heads=num_heads, class_dropout_prob=class_dropout_prob)
    return kindify_dit(dense, kind, gate).eval()


# =====================================================================================
# kind-fast convert
# =====================================================================================
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="a DiT .pt/.safetensors file (facebookresearch layout), a kind_fast run or weights "
                               "folder with a dense DiT, or a diffusers DiTTransformer2DModel / DiTPipeline folder")
    p.add_argument("--out", required=True, help="output folder (kind_fast save_pretrained layout)")
    p.add_argument("--tailor-rank", type=int, default=96, help="N_T tailors per matrix (default 96)")
    p.add_argument("--active", type=int, default=32, help="tailors each class switches on (default 32)")
    p.add_argument("--gate", choices=("block", "random_k", "all_on"), default="block")
    p.add_argument("--null", choices=("off", "all", "class"), default="off", help="the null (CFG) class's tailors")
    p.add_argument("--qkv", choices=("split", "fused"), default="split")
    p.add_argument("--learngene-rank", type=int, default=None, help="N_G (default: min(in, out) - tailor rank)")
    p.add_argument("--seed", type=int, default=0, help="random_k gate seed")
    p.add_argument("--num-heads", type=int, default=None, help="attention heads (default: from the DiT preset)")
    p.add_argument("--which", choices=("ema", "model"), default="ema", help="weights of a training checkpoint")
    p.add_argument("--check", action="store_true",
                   help="also report how exactly the components encode the dense weights, and the output "
                        "difference with every tailor on (random inputs)")


def _full_weight(layer: FastKindLinear) -> Tensor:
    """Learngenes + every tailor, in float64: the dense weight the components encode."""
    u = torch.cat([layer.u_g, layer.u_t]).double()
    return (u.t() * torch.cat([layer.sigma_g, layer.sigma_t]).double()) @ torch.cat([layer.v_g, layer.v_t]).double()


@torch.no_grad()
def check_conversion(dense: DiT, kind_model: DiT) -> dict[str, float | None]:
    """How exactly ``kind_model`` (from ``kindify_dit(dense copy)``) encodes ``dense``:
    ``weights``, the max over block linears of max|W - U·diag(σ)·V| / max|W| (every component),
    and ``output``, max|KIND(all tailors on) - dense| / max|dense| on a random batch (None when
    the dense output is all zero, as for a freshly initialised DiT whose adaLN-Zero layers are zero)."""
    worst = 0.0
    for db, kb in zip(dense.blocks, kind_model.blocks):
        a = kb.attn
        pairs = [(db.attn.qkv.weight, torch.cat([_full_weight(a.get_submodule(n)) for n in "qkv"])
                  if a.split else _full_weight(a.qkv))]
        pairs += [(db.get_submodule(n).weight, _full_weight(kb.get_submodule(n)))
                  for n in ("attn.proj", "mlp.fc1", "mlp.fc2")]
        for w, got in pairs:
            worst = max(worst, ((got - w.double()).abs().max() / w.abs().max().clamp_min(1e-30)).item())
    all_on = _copy(kind_model).set_gate(ClassGate.all_on(kind_model.num_classes, kind_model.kind.tailor_rank))
    g = torch.Generator().manual_seed(0)
    a = dense.arch
    x = torch.randn(2, a["in_channels"], a["input_size"], a["input_size"], generator=g).to(dense.pos_embed.dtype)
    t = torch.randint(0, 1000, (2,), generator=g)
    y = torch.randint(0, a["num_classes"], (2,), generator=g)
    ref, out = dense(x, t, y), all_on(x, t, y)
    scale = ref.abs().max().item()
    return {"weights": worst, "output": None if scale == 0 else (out - ref).abs().max().item() / scale}


def _copy(model: DiT) -> DiT:
    import copy

    return copy.deepcopy(model)


def run(args: argparse.Namespace) -> int:
    import sys

    from kind_fast.serialization import save_pretrained

    try:
        kind = KindConfig(tailor_rank=args.tailor_rank, active=args.active, gate=args.gate, null=args.null,
                          qkv=args.qkv, learngene_rank=args.learngene_rank, seed=args.seed)
        dense = load_dense(args.src, which=args.which, num_heads=args.num_heads)
        reference = _copy(dense) if args.check else None
        model = kindify_dit(dense, kind)
        check = check_conversion(reference, model) if args.check else None
    except (ValueError, TypeError, FileNotFoundError, ImportError) as e:
        print(f"kind-fast convert: {e}", file=sys.stderr)
        return 2
    out = save_pretrained(model, args.out)
    a = model.arch
    n = sum(1 for _ in model.kind_layers())
    print(f"converted a dense DiT (hidden {a['hidden_size']}, depth {a['depth']}, {a['num_classes']} classes, "
          f"{a['input_size']}x{a['input_size']}x{a['in_channels']}) into a KIND-DiT: {n} KIND layers, "
          f"N_T={kind.tailor_rank}, {kind.gate} gate")
    if check is not None:
        out_text = ("the dense model's output is all zero (an untrained adaLN-Zero DiT): nothing to compare"
                    if check["output"] is None else f"{check['output']:.2e}")
        print(f"check: max relative error of the block weights (learngenes + all tailors) {check['weights']:.2e}; "
              f"of the output with every tailor on {out_text}")
    print(f"wrote {out}/ ({', '.join(sorted(p.name for p in Path(out).iterdir()))})")
    print(f"next: kind-fast pretrain --init {out} ...   or   kind-fast transfer --init {out} ...")
    return 0
