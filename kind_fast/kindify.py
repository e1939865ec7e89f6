"""kindify: convert an existing dense DiT to KIND in place.

Each target ``nn.Linear`` becomes a ``FastKindLinear`` by an exact float64 SVD of its weight,
the shared ``ClassGate`` is registered once as ``model.kind_gate``, and a forward pre-hook
copies the model's class-label argument (a tensor: no host sync) into ``gate.labels`` where
every converted layer reads it; a forward hook clears it again when the forward ends (also
when it raises), so a later call of a layer without labels is an error, not a call with the
previous batch's labels. With an all-on gate the converted model reproduces the original
output to float tolerance.

Known layouts (target modules detected automatically):
    DiT (facebookresearch layout, and kind_fast.dit.DiT with kind=None):
        blocks.{i}.attn.qkv, blocks.{i}.attn.proj, blocks.{i}.mlp.fc1, blocks.{i}.mlp.fc2
    diffusers DiTTransformer2DModel:
        transformer_blocks.{i}.attn1.to_q/to_k/to_v, attn1.to_out.0, ff.net.0.proj, ff.net.2

The hook routes the label *argument*. A model that replaces labels by the null class inside
its forward (label dropout) gates those samples by their real class; do label dropout
before calling the model (kind_fast's trainer does) or use kind_fast.dit.DiT with ``kind``.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from kind_fast.gate import ClassGate
from kind_fast.layers import FastKindLinear

__all__ = ["kindify", "SplitLinear", "DIT_TARGETS", "DIFFUSERS_DIT_TARGETS"]

DIT_TARGETS = r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc[12])"
DIFFUSERS_DIT_TARGETS = r"transformer_blocks\.\d+\.(attn1\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))"
LABEL_ARGS = ("y", "class_labels", "labels", "class_label")


class SplitLinear(nn.Module):
    """Several layers whose outputs are concatenated on the last dim (a fused qkv split into
    separate q, k, v KIND layers, each with its own components)."""

    def __init__(self, parts: Sequence[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)


def _detect_targets(model: nn.Module) -> str:
    names = [n for n, _ in model.named_modules()]
    for pattern in (DIT_TARGETS, DIFFUSERS_DIT_TARGETS):
        if any(re.fullmatch(pattern, n) for n in names):
            return pattern
    raise ValueError(
        "kindify could not detect a known DiT layout (facebookresearch DiT or diffusers "
        "DiTTransformer2DModel); pass target_modules= (a regex or a list of module names)"
    )


def _matches(name: str, targets: str | Sequence[str]) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def replace_linears(model: nn.Module, targets, make) -> list[str]:
    """Replace every ``nn.Linear`` of ``model`` matching ``targets`` (None: the detected DiT
    layout) by ``make(name, linear)``, in place; all matches are checked before any change."""
    targets = _detect_targets(model) if targets is None else targets
    chosen = [(n, m) for n, m in model.named_modules() if n and _matches(n, targets)]
    if not chosen:
        raise ValueError(f"no module of {type(model).__name__} matches target_modules={targets!r}")
    for name, mod in chosen:
        if not isinstance(mod, nn.Linear):
            raise TypeError(f"target module {name!r} is a {type(mod).__name__}, not an nn.Linear")
    for name, mod in chosen:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, make(name, mod))
    return [n for n, _ in chosen]


def _detect_label_arg(model: nn.Module) -> str:
    params = inspect.signature(model.forward).parameters
    for cand in LABEL_ARGS:
        if cand in params:
            return cand
    raise ValueError(
        f"kindify could not find the class-label argument of {type(model).__name__}.forward "
        f"(looked for {LABEL_ARGS}); pass label_arg="
    )


def kindify(
    model: nn.Module,
    *,
    gate: ClassGate,
    tailor_rank: int | None = None,
    learngene_rank: int | None = None,
    target_modules: str | Sequence[str] | None = None,
    label_arg: str | None = None,
    split_qkv: bool = False,
) -> nn.Module:
    """Convert ``model``'s target linears to ``FastKindLinear`` in place and route labels.

    Args:
        gate: the shared class gate (its num_classes must match the model's labels).
        tailor_rank: N_T per layer (default: ``gate.tailor_rank``; they must agree).
        learngene_rank: N_G per layer (default: min(in, out) - tailor_rank).
        target_modules: regex (full match) or list of names / name suffixes; default:
            detected from the layout.
        label_arg: name of the forward argument holding class labels (default: detected).
        split_qkv: turn a fused ``qkv`` linear into three KIND layers (q, k, v), as KIND
            decomposes them; the output is concatenated, so the model is unchanged.
    Returns:
        the same model, with ``model.kind_gate`` registered.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(gate, ClassGate):
        raise TypeError(f"gate must be a ClassGate, got {type(gate).__name__}")
    if getattr(model, "_kind_fast_hook", None) is not None:
        raise ValueError("model is already kindified")
    tailor_rank = gate.tailor_rank if tailor_rank is None else tailor_rank
    if tailor_rank != gate.tailor_rank:
        raise ValueError(f"tailor_rank {tailor_rank} != gate.tailor_rank {gate.tailor_rank}")
    targets = _detect_targets(model) if target_modules is None else target_modules
    label_arg = _detect_label_arg(model) if label_arg is None else label_arg
    signature = inspect.signature(model.forward)
    if label_arg not in signature.parameters:
        raise ValueError(f"{type(model).__name__}.forward has no label argument {label_arg!r}")

    def make(name: str, lin: nn.Linear) -> nn.Module:
        nonlocal gate
        gate = gate.to(lin.weight.device)  # a no-op after the first layer
        kw = dict(tailor_rank=tailor_rank, learngene_rank=learngene_rank, gate=gate)
        if not (split_qkv and name.split(".")[-1] == "qkv"):
            return FastKindLinear.from_linear(lin, **kw)
        if lin.out_features % 3:
            raise ValueError(f"{name}: out_features {lin.out_features} is not divisible by 3")
        parts = []
        for w, b in zip(lin.weight.chunk(3, 0), (lin.bias.chunk(3, 0) if lin.bias is not None else [None] * 3)):
            piece = nn.Linear(lin.in_features, w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
            with torch.no_grad():
                piece.weight.copy_(w)
                if b is not None:
                    piece.bias.copy_(b)
            parts.append(FastKindLinear.from_linear(piece, **kw))
        return SplitLinear(parts)

    replace_linears(model, targets, make)
    model.kind_gate = gate

    def _route_labels(module, args, kwargs):
        bound = signature.bind_partial(*args, **kwargs)
        labels = bound.arguments.get(label_arg)
        module.kind_gate.labels = labels if isinstance(labels, Tensor) else None
        return None

    def _clear_labels(module, args, kwargs, output):
        module.kind_gate.labels = None

    model._kind_fast_hook = model.register_forward_pre_hook(_route_labels, with_kwargs=True)
    model._kind_fast_clear_hook = model.register_forward_hook(_clear_labels, with_kwargs=True, always_call=True)
    return model
