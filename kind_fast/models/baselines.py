"""Baselines trained through the same code as KIND: LoRA (through PEFT), SVDiff, and the two
learngene methods Heur-LG and TLEG.

* LoRA (Hu et al.): y = x·Wᵀ + (α/r)·(x·Aᵀ)·Bᵀ + b, W frozen, A random (kaiming-uniform), B
  zero-initialised. It is PEFT's ``LoraConfig`` on the DiT block linears (qkv, proj, fc1, fc2),
  with the label table and the final layer in ``modules_to_save`` (trainable copies), so users
  get everything PEFT offers: ``merge_and_unload()`` (a plain DiT), adapter folders
  (``save_pretrained`` / ``PeftModel.from_pretrained``), ``print_trainable_parameters``.
* SVDiff (Han et al.): W = U·diag(σ + δ)·Vᵀ with U, V frozen from one SVD and only the
  spectral values trainable. It is the special case of a ``FastKindLinear`` with no tailors,
  no gate and only ``sigma_g`` trainable: the layer materialises W every step and autograd
  gives dσ = diag(U·dW·Vᵀ), exactly SVDiff's cost. (SVDiff's ReLU on σ + δ is not applied:
  σ is trained directly, as KIND trains its σ.)

* Heur-LG (Wang et al., "Learngene: From Open-World to Your Learning Task", AAAI 2022): the
  learngene is a few whole layers at the top of a trained ancestry model; a descendant model
  inherits them and stacks randomly initialised layers below, then trains as usual.
  ``heur_lg_descendant``: a fresh DiT (DiT init) with the ancestry's top ``blocks`` DiT blocks
  and its final layer copied in, a new label table, every weight trainable.
* TLEG (Xia et al., "Transformer as Linear Expansion of Learngene", AAAI 2024): the learngene
  is two layer-shaped parameter sets θ_A, θ_B; layer l of L is θ_l = θ_A + (l/L)·θ_B. An
  auxiliary ("ancestry") model constrained to that form is trained first (``TLEGDiT``: every
  DiT block linearly expanded from two learngene blocks, the embedders and final layer as in a
  DiT); a descendant of any depth D is initialised by expanding θ_A, θ_B to D blocks
  (``TLEGDiT.expand``) and then trained without the constraint. The paper trains the auxiliary
  model by soft distillation from a larger teacher; ours trains it with the diffusion loss on
  the pretraining data, as every other ancestry here (docs/design.md §4.2).

Full fine-tuning is the dense model with every parameter trainable; nothing is needed here.

KIND itself is not registered as a PEFT method (``peft.register_peft_method``): see the README
("PEFT") for why. KIND models have their own ``kindify`` / ``save_pretrained``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from kind_fast.models.kindify import _detect_targets, replace_linears
from kind_fast.nn.layers import FastKindLinear

__all__ = ["lora_config", "apply_lora", "apply_svdiff", "HEAD_MODULES", "heur_lg_descendant", "TLEGDiT",
           "as_plain_dit"]

# dense heads that stay trainable in every transfer-style run (new label table, output layer)
HEAD_MODULES = ("y_embedder", "final_layer")


def _peft():
    try:
        import peft
    except ImportError:
        raise ImportError("the LoRA baseline runs through PEFT: pip install peft (or 'kind_fast[train]')") from None
    return peft


def lora_config(rank: int, *, alpha: float | None = None, target_modules=None,
                modules_to_save: Sequence[str] = HEAD_MODULES, model: nn.Module | None = None):
    """PEFT ``LoraConfig`` of the LoRA baseline: rank ``rank`` on ``target_modules`` (default:
    the block linears of the detected DiT layout of ``model``), scaling α/r with α = ``alpha``
    (default: r, i.e. scaling 1), ``modules_to_save`` trained in full."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    if target_modules is None:
        if model is None:
            raise ValueError("pass target_modules= or model= (to detect the DiT layout)")
        target_modules = _detect_targets(model)
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    return _peft().LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, lora_dropout=0.0,
                              target_modules=targets, modules_to_save=list(modules_to_save), bias="none",
                              init_lora_weights=True)


def apply_lora(model: nn.Module, rank: int, *, alpha: float | None = None, target_modules=None,
               trainable_heads: Sequence[str] = HEAD_MODULES):
    """Wrap ``model`` with PEFT LoRA (``lora_config``): the base frozen, adapters on the target
    linears (default: the DiT block linears), ``trainable_heads`` trained in full.

    ``model`` itself is changed in place (PEFT injects its layers); the returned
    ``peft.PeftModel`` adds ``merge_and_unload``, ``save_pretrained`` (adapter folder) etc.
    """
    heads = [h for h in trainable_heads if isinstance(getattr(model, h, None), nn.Module)]
    for name, mod in model.named_modules():
        if isinstance(mod, FastKindLinear):
            raise TypeError(f"{name} is a KIND layer: LoRA baselines wrap a dense model (use DiT.to_dense())")
    cfg = lora_config(rank, alpha=alpha, target_modules=target_modules, modules_to_save=heads, model=model)
    return _peft().get_peft_model(model, cfg)


def _unfreeze_heads(model: nn.Module, heads: Sequence[str]) -> None:
    for name in heads:
        if hasattr(model, name):
            getattr(model, name).requires_grad_(True)


def apply_svdiff(model: nn.Module, *, target_modules=None,
                 trainable_heads: Sequence[str] = HEAD_MODULES) -> nn.Module:
    """Freeze ``model``, turn its target linears into spectral layers (exact SVD, only σ
    trainable), and keep ``trainable_heads`` trainable. In place; returns the model."""
    model.requires_grad_(False)

    def make(name: str, lin: nn.Linear) -> FastKindLinear:
        layer = FastKindLinear.from_linear(lin, tailor_rank=0, gate=None)
        layer.requires_grad_(False)
        layer.sigma_g.requires_grad_(True)
        return layer

    replace_linears(model, target_modules, make)
    _unfreeze_heads(model, trainable_heads)
    return model


# =====================================================================================
# Learngene baselines: Heur-LG and TLEG
# =====================================================================================
def heur_lg_descendant(ancestry: nn.Module, num_classes: int, *, blocks: int | None = None) -> nn.Module:
    """Heur-LG's descendant of a dense ``kind_fast.models.dit.DiT`` ``ancestry``: a new DiT of the same
    architecture for ``num_classes`` classes, initialised as ``DiT`` initialises (draws from the
    global RNG: seed it first), then the ancestry's top ``blocks`` DiT blocks (default: the top
    half) and its final layer copied in. Everything trains (``set_mode("full_finetune")``)."""
    from kind_fast.models.dit import DiT

    if not isinstance(ancestry, DiT) or ancestry.kind is not None or isinstance(ancestry, TLEGDiT):
        raise TypeError(f"Heur-LG inherits from a plain dense DiT, got a {type(ancestry).__name__}"
                        f"{' with KIND layers (use to_dense())' if getattr(ancestry, 'kind', None) else ''}")
    depth = len(ancestry.blocks)
    blocks = max(1, depth // 2) if blocks is None else blocks
    if isinstance(blocks, bool) or not isinstance(blocks, int) or not 1 <= blocks <= depth:
        raise ValueError(f"Heur-LG inherits 1..{depth} blocks of this {depth}-block DiT, got {blocks!r}")
    child = DiT(**dict(ancestry.arch, num_classes=num_classes), kind=None).to(ancestry.pos_embed.device)
    with torch.no_grad():
        for i in range(depth - blocks, depth):
            child.blocks[i].load_state_dict(ancestry.blocks[i].state_dict())
        child.final_layer.load_state_dict(ancestry.final_layer.state_dict())
    return child.set_mode("full_finetune")


class _ExpandedBlock(nn.Module):
    """DiT block ``position`` = l / L of a ``TLEGDiT``: runs the learngene block θ_A with its
    parameters replaced by θ_A + position · θ_B (``torch.func.functional_call``; gradients flow
    to both). Holds no parameters of its own; the learngene belongs to the model."""

    def __init__(self, learngene: nn.ModuleDict, position: float):
        super().__init__()
        self.position = float(position)
        object.__setattr__(self, "_learngene", learngene)  # a reference, not a submodule

    def expanded_parameters(self) -> dict[str, Tensor]:
        a, b = self._learngene["a"], self._learngene["b"]
        pb = dict(b.named_parameters())
        return {n: p + self.position * pb[n] for n, p in a.named_parameters()}

    def forward(self, x: Tensor, c: Tensor, labels: Tensor | None = None) -> Tensor:
        return torch.func.functional_call(self._learngene["a"], self.expanded_parameters(), (x, c, labels))

    def extra_repr(self) -> str:
        return f"θ_A + {self.position:.4g}·θ_B"


def _tleg_base():
    from kind_fast.models.dit import DiT

    return DiT


class TLEGDiT(_tleg_base()):
    """TLEG's ancestry model: a dense DiT whose L blocks are θ_l = θ_A + (l/L)·θ_B, l = 1..L, of
    two learngene blocks ``learngene.a`` (θ_A) and ``learngene.b`` (θ_B). θ_A starts as a DiT
    block starts (xavier linears, zero adaLN), θ_B at zero, so training starts from a
    weight-shared DiT and learns how the blocks differ with depth. The embedders and the final
    layer are ordinary DiT modules. Takes DiT's architecture arguments (no ``kind``)."""

    def __init__(self, **arch):
        if arch.get("kind") is not None or arch.get("gate") is not None:
            raise ValueError("TLEGDiT is a dense model: no kind or gate")
        arch.pop("kind", None)
        arch.pop("gate", None)
        super().__init__(**arch, kind=None)
        a = self.blocks[0]
        b = copy.deepcopy(a)
        if not any(p.is_meta for p in b.parameters()):
            with torch.no_grad():
                for p in b.parameters():
                    p.zero_()
        self.learngene = nn.ModuleDict({"a": a, "b": b})
        depth = len(self.blocks)
        self.blocks = nn.ModuleList(_ExpandedBlock(self.learngene, (i + 1) / depth) for i in range(depth))

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """DiT's init for the embedders and final layer; θ_A as a DiT block, θ_B zero."""
        if not hasattr(self, "learngene"):  # inside DiT.__init__: the blocks are still DiT blocks
            return super().initialize_weights()
        expanded, self.blocks = self.blocks, nn.ModuleList([self.learngene["a"], self.learngene["b"]])
        try:
            super().initialize_weights()
        finally:
            self.blocks = expanded
        for p in self.learngene["b"].parameters():
            p.zero_()

    @torch.no_grad()
    def expand(self, depth: int | None = None) -> nn.Module:
        """A plain dense ``DiT`` of ``depth`` blocks (default: this model's L) whose block l is
        θ_A + (l/depth)·θ_B, with this model's embedders and final layer: TLEG's descendant
        initialisation. With ``depth`` = L it computes exactly what this model computes."""
        from kind_fast.models.dit import DiT

        depth = len(self.blocks) if depth is None else depth
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be an int >= 1, got {depth!r}")
        dense = DiT(**dict(self.arch, depth=depth), kind=None).to(self.pos_embed.device)
        own = {k: v for k, v in self.state_dict().items() if not k.startswith("learngene.")}
        missing, unexpected = dense.load_state_dict(own, strict=False)
        if unexpected or any(not k.startswith("blocks.") for k in missing):
            raise RuntimeError(f"TLEGDiT.expand: unexpected {unexpected}, missing {missing}")
        for i, block in enumerate(dense.blocks):
            params = _ExpandedBlock(self.learngene, (i + 1) / depth).expanded_parameters()
            for name, p in block.named_parameters():
                p.copy_(params[name])
        return dense.train(self.training)


def as_plain_dit(model: nn.Module) -> nn.Module:
    """A TLEG ancestry expanded to a plain DiT (its own depth); any other model unchanged."""
    return model.expand() if isinstance(model, TLEGDiT) else model
