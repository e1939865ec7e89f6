"""Model-level conveniences users know from PEFT: parameter counts and freezing."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager

from torch import nn

from kind_fast.nn.gate import ClassGate
from kind_fast.nn.layers import LEARNGENE_PARAMS, TAILOR_PARAMS, FastKindLinear

__all__ = ["kind_layers", "parameter_breakdown", "print_trainable_parameters", "freeze_learngenes", "class_gates",
           "serving"]

PARTS = ("learngene", "tailor", "kind_bias", "gate", "dense")


def kind_layers(model: nn.Module) -> list[tuple[str, FastKindLinear]]:
    """(name, layer) of every FastKindLinear in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FastKindLinear)]


def _part_of(model: nn.Module) -> dict[int, str]:
    part = {}
    for _, layer in kind_layers(model):
        for name in LEARNGENE_PARAMS:
            p = getattr(layer, name)
            if p is not None:
                part[id(p)] = "kind_bias" if name == "bias" else "learngene"
        for name in TAILOR_PARAMS:
            part[id(getattr(layer, name))] = "tailor"
    for m in model.modules():
        if isinstance(m, ClassGate):
            for p in m.parameters(recurse=False):
                part[id(p)] = "gate"
    return part


def parameter_breakdown(model: nn.Module) -> dict[str, dict[str, int]]:
    """{part: {"total": n, "trainable": n}} for learngene, tailor, kind_bias (biases of KIND
    layers, shared like learngenes), gate, dense (everything else), and "all"."""
    part = _part_of(model)
    out = {k: {"total": 0, "trainable": 0} for k in PARTS + ("all",)}
    for p in model.parameters():  # deduplicated by torch
        k = part.get(id(p), "dense")
        for key in (k, "all"):
            out[key]["total"] += p.numel()
            out[key]["trainable"] += p.numel() if p.requires_grad else 0
    return out


def print_trainable_parameters(model: nn.Module, *, breakdown: bool = True) -> str:
    """Print (and return) PEFT's line, then the KIND breakdown::

        trainable params: 45,086,240 || all params: 608,585,760 || trainable%: 7.4083
    """
    b = parameter_breakdown(model)
    total, train = b["all"]["total"], b["all"]["trainable"]
    lines = [f"trainable params: {train:,d} || all params: {total:,d} || trainable%: {100 * train / max(total, 1):.4f}"]
    if breakdown:
        for k in PARTS:
            if b[k]["total"]:
                lines.append(f"  {k:<10} trainable {b[k]['trainable']:>14,d} of {b[k]['total']:>14,d}")
    text = "\n".join(lines)
    print(text)
    return text


def freeze_learngenes(model: nn.Module, frozen: bool = True) -> nn.Module:
    """Freeze (or unfreeze) the learngenes and biases of every KIND layer of ``model``."""
    for _, layer in kind_layers(model):
        layer.freeze_learngenes(frozen)
    return model


def class_gates(model: nn.Module) -> list[ClassGate]:
    """The distinct ClassGates of ``model``: registered ones and those its KIND layers hold."""
    gates: dict[int, ClassGate] = {}
    for m in model.modules():
        if isinstance(m, ClassGate):
            gates.setdefault(id(m), m)
        elif isinstance(m, FastKindLinear) and m.gate is not None:
            gates.setdefault(id(m.gate), m.gate)
    return list(gates.values())


@contextmanager
def serving(model: nn.Module, classes: Iterable[int]) -> Iterator[nn.Module]:
    """Declare, for every gate of ``model``, the classes its labels come from in the block (a
    sampling loop: the sampled classes, plus the null class under guidance). KIND layers then run
    path M3 on merged per-class weights built once (see ``ClassGate.serving``). A model without
    gates is returned unchanged."""
    classes = [int(c) for c in classes]
    with ExitStack() as stack:
        for gate in class_gates(model):
            stack.enter_context(gate.serving(classes))
        yield model
