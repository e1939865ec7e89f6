"""Baselines trained through the same code as KIND: LoRA and SVDiff layers and converters.

* LoRA (Hu et al.): y = x·Wᵀ + (α/r)·(x·Aᵀ)·Bᵀ + b, W frozen, A random, B zero-initialised.
* SVDiff (Han et al.): W = U·diag(σ + δ)·Vᵀ with U, V frozen from one SVD and only the
  spectral values trainable. It is the special case of a ``FastKindLinear`` with no tailors,
  no gate and only ``sigma_g`` trainable: the layer materialises W every step and autograd
  gives dσ = diag(U·dW·Vᵀ), exactly SVDiff's cost. (SVDiff's ReLU on σ + δ is not applied:
  σ is trained directly, as KIND trains its σ.)

Full fine-tuning is the dense model with every parameter trainable; nothing is needed here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kind_fast.kindify import replace_linears
from kind_fast.layers import FastKindLinear

__all__ = ["LoRALinear", "apply_lora", "apply_svdiff", "HEAD_MODULES"]

# dense heads that stay trainable in every transfer-style run (new label table, output layer)
HEAD_MODULES = ("y_embedder", "final_layer")


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable rank-r update (α/r)·B·A, B initialised to zero."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        r_max = min(base.in_features, base.out_features)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= r_max:
            raise ValueError(f"rank must be an int in [1, {r_max}], got {rank!r}")
        self.base = base
        self.base.requires_grad_(False)
        self.rank = rank
        self.scaling = (rank if alpha is None else alpha) / rank
        fk = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **fk))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **fk))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A plain nn.Linear with the update merged in."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None,
                        device=self.base.weight.device, dtype=self.base.weight.dtype)
        lin.weight.copy_(self.base.weight + self.scaling * self.lora_B @ self.lora_A)
        if self.base.bias is not None:
            lin.bias.copy_(self.base.bias)
        return lin


def _unfreeze_heads(model: nn.Module, heads: Sequence[str]) -> None:
    for name in heads:
        if hasattr(model, name):
            getattr(model, name).requires_grad_(True)


def apply_lora(model: nn.Module, rank: int, *, alpha: float | None = None, target_modules=None,
               trainable_heads: Sequence[str] = HEAD_MODULES) -> nn.Module:
    """Freeze ``model``, wrap its target linears (default: the DiT block linears) with LoRA,
    and keep ``trainable_heads`` trainable. In place; returns the model."""
    model.requires_grad_(False)
    replace_linears(model, target_modules, lambda name, lin: LoRALinear(lin, rank, alpha))
    _unfreeze_heads(model, trainable_heads)
    return model


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
