"""Baselines trained through the same code as KIND: LoRA (through PEFT) and SVDiff.

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

Full fine-tuning is the dense model with every parameter trainable; nothing is needed here.

KIND itself is not registered as a PEFT method (``peft.register_peft_method``): see the README
("PEFT") for why. KIND models have their own ``kindify`` / ``save_pretrained``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from kind_fast.kindify import _detect_targets, replace_linears
from kind_fast.layers import FastKindLinear

__all__ = ["lora_config", "apply_lora", "apply_svdiff", "HEAD_MODULES"]

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
