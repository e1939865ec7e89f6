"""kindify: convert an existing dense DiT to KIND in place.

Each target ``nn.Linear`` becomes a ``FastKindLinear`` by an exact float64 SVD of its weight,
the shared ``ClassGate`` is registered once as ``model.kind_gate``, and a forward pre-hook
copies the model's class-label argument (a tensor: no host sync) into ``gate.labels`` where
every converted layer reads it; a forward hook clears it again when the forward ends (also
when it raises), so a later call of a layer without labels is an error, not a call with the
previous batch's labels. With an all-on gate the converted model reproduces the original
output to float tolerance.

Known layouts (target modules detected automatically):
    DiT (facebookresearch layout, and kind_fast.models.dit.DiT with kind=None):
        blocks.{i}.attn.qkv, blocks.{i}.attn.proj, blocks.{i}.mlp.fc1, blocks.{i}.mlp.fc2
    diffusers DiTTransformer2DModel:
        transformer_blocks.{i}.attn1.to_q/to_k/to_v, attn1.to_out.0, ff.net.0.proj, ff.net.2

q, k and v run as one group (``kind_fast.nn.layers.kind_group``: one pass over x), each layer keeping
its own components and state-dict keys: a split ``qkv`` (``SplitLinear``) calls the group
directly, and diffusers' ``to_q``/``to_k``/``to_v``, which the attention processor calls one by one
on the same tensor, share a ``kind_fast.nn.layers.InputGroup`` (the first call computes all three;
``model.kind_input_groups`` lists them, ``group.detach()`` turns one off).

The hook routes the label *argument*. A model that replaces labels by the null class inside
its forward (label dropout) gates those samples by their real class; do label dropout
before calling the model (kind_fast's trainer does) or use kind_fast.models.dit.DiT with ``kind``.

kind_fast's own dense DiT (``kind_fast.models.dit.DiT`` with ``kind=None``, default targets) is not
hooked: it becomes a native KIND-DiT (``kind_fast.models.dit.kindify_dit``: q, k, v separate with
``split_qkv=True``, ``model.kind`` set, labels routed by ``DiT.forward`` after label dropout), so
it saves, loads and transfers like any KIND-DiT.

Round trip (docs/design.md §3.2): kindify's settings (targets, qkv split, label argument, ranks)
are kept in ``model._kind_fast_kindify`` and written by ``kind_fast.deploy.serialization.save_pretrained``
beside the gate and the weights; ``kind_fast.kindify_from_pretrained(base_model, dir)`` (in
``kind_fast.deploy.serialization``) rebuilds the same model, and ``load_pretrained(dir)`` does it alone
for kind_fast DiTs and diffusers models (whose config is saved too). A kindified model's own
``save_pretrained`` (diffusers, transformers) is replaced by one that raises: it would write the
KIND components under names its ``from_pretrained`` does not know, and loading that folder would
re-initialise every converted
linear (diffusers only warns about it).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from kind_fast.nn.gate import ClassGate
from kind_fast.nn.layers import FastKindLinear, InputGroup, _group_problem, kind_group

__all__ = ["kindify", "SplitLinear", "DIT_TARGETS", "DIFFUSERS_DIT_TARGETS"]

DIT_TARGETS = r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc[12])"
DIFFUSERS_DIT_TARGETS = r"transformer_blocks\.\d+\.(attn1\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))"
LABEL_ARGS = ("y", "class_labels", "labels", "class_label")


class SplitLinear(nn.Module):
    """Several layers whose outputs are concatenated on the last dim (a fused qkv split into
    separate q, k, v KIND layers, each with its own components). KIND parts sharing one gate run
    as one group (``kind_fast.nn.layers.kind_group``)."""

    def __init__(self, parts: Sequence[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: Tensor) -> Tensor:
        parts = list(self.parts)
        if _group_problem(parts, hooks=True) is None:
            return torch.cat(kind_group(parts, x), dim=-1)
        return torch.cat([p(x) for p in parts], dim=-1)


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


class _ForeignSaveGuard:
    """Replaces a kindified model's own ``save_pretrained`` (picklable, unlike a closure)."""

    def __init__(self, cls_name: str):
        self.cls_name = cls_name

    def __call__(self, *args, **kwargs):
        raise RuntimeError(
            f"this {self.cls_name} was converted by kind_fast.models.kindify: {self.cls_name}.save_pretrained would "
            "write the KIND components (u_g, sigma_g, ...) under names its from_pretrained does not know, and "
            "loading that folder would re-initialise every converted linear. Save it with "
            "kind_fast.deploy.serialization.save_pretrained(model, folder) and load it with "
            "kind_fast.deploy.serialization.load_pretrained(folder) or kind_fast.kindify_from_pretrained(base_model, folder)")


def _is_native_dit(model: nn.Module, target_modules) -> bool:
    from kind_fast.models.dit import DiT

    return isinstance(model, DiT) and model.kind is None and target_modules in (None, DIT_TARGETS)


def _kind_config_for(gate: ClassGate, tailor_rank: int, learngene_rank: int | None, split_qkv: bool):
    """The KindConfig of a native conversion with ``gate``: balanced/block/random_k/all_on when the
    config rebuilds exactly this gate, else ``gate="custom"`` (the gate is saved with the model)."""
    from kind_fast.models.dit import KindConfig

    base = dict(tailor_rank=tailor_rank, learngene_rank=learngene_rank, qkv="split" if split_qkv else "fused")
    cfg = gate.to_config()
    cands = []
    if gate.kind in ("balanced", "block", "random_k"):
        cands.append(KindConfig(**base, gate=gate.kind, active=cfg["active"], null=cfg["null"],
                                seed=cfg.get("seed", 0)))
    elif gate.kind == "all_on":
        cands.append(KindConfig(**base, gate="all_on"))
    for cand in cands:
        built = cand.make_gate(gate.num_classes)
        if built.to_config() == cfg and torch.equal(built.table, gate.table.detach().cpu().float()):
            return cand
    return KindConfig(**base, gate="custom")


def _detect_num_classes(model: nn.Module) -> int:
    """The class count of a known DiT layout (kind_fast/facebookresearch DiT, diffusers)."""
    for owner in (model, getattr(model, "y_embedder", None), getattr(model, "config", None)):
        for attr in ("num_classes", "num_embeds_ada_norm"):
            n = getattr(owner, attr, None) if owner is not None else None
            if isinstance(n, int) and not isinstance(n, bool) and n >= 1:
                return n
    raise ValueError(f"kindify could not tell how many classes {type(model).__name__} has; pass gate= "
                     "(e.g. kind_fast.ClassGate.balanced(num_classes, 96, 32))")


def kindify(
    model: nn.Module,
    *,
    gate: ClassGate | None = None,
    tailor_rank: int | None = None,
    learngene_rank: int | None = None,
    target_modules: str | Sequence[str] | None = None,
    label_arg: str | None = None,
    split_qkv: bool = False,
    svd: bool = True,
) -> nn.Module:
    """Convert ``model``'s target linears to ``FastKindLinear`` in place and route labels.

    Args:
        gate: the shared class gate (its num_classes must match the model's labels). Default:
            ``kind_fast.nn.gate.default_gate`` for the model's classes (the ``DEFAULT_GATE`` kind,
            ``tailor_rank`` tailors, default 96, a third of them active per class; docs/design.md §1.4).
        tailor_rank: N_T per layer (default: ``gate.tailor_rank``; they must agree).
        learngene_rank: N_G per layer (default: min(in, out) - tailor_rank).
        target_modules: regex (full match) or list of names / name suffixes; default:
            detected from the layout.
        label_arg: name of the forward argument holding class labels (default: detected).
        split_qkv: turn a fused ``qkv`` linear into three KIND layers (q, k, v), as KIND
            decomposes them; the output is concatenated, so the model is unchanged.
        svd: set the components from the SVD of the dense weights (default). ``False`` leaves
            them uninitialised, for loading saved weights right after (kindify_from_pretrained).
    Returns:
        the same model, with ``model.kind_gate`` registered. A ``kind_fast.models.dit.DiT`` with
        ``kind=None`` (and default targets) becomes a native KIND-DiT instead (module docstring).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if gate is None:
        from kind_fast.nn.gate import default_gate

        gate = default_gate(_detect_num_classes(model), 96 if tailor_rank is None else tailor_rank)
    if not isinstance(gate, ClassGate):
        raise TypeError(f"gate must be a ClassGate, got {type(gate).__name__}")
    if getattr(model, "_kind_fast_hook", None) is not None or getattr(model, "_kind_fast_kindify", None):
        raise ValueError("model is already kindified")
    if getattr(model, "kind", None) is not None and hasattr(model, "kind_gate"):
        raise ValueError("model is already a KIND-DiT")
    tailor_rank = gate.tailor_rank if tailor_rank is None else tailor_rank
    if tailor_rank != gate.tailor_rank:
        raise ValueError(f"tailor_rank {tailor_rank} != gate.tailor_rank {gate.tailor_rank}")
    if _is_native_dit(model, target_modules):
        from kind_fast.models.dit import kindify_dit

        if label_arg not in (None, "y"):
            raise ValueError(f"kind_fast.models.dit.DiT takes its labels as y, not {label_arg!r}")
        kind_fast_kind = _kind_config_for(gate, tailor_rank, learngene_rank, split_qkv)
        kindify_dit(model, kind_fast_kind, gate, svd=svd)
        model._kind_fast_kindify = dict(target_modules=DIT_TARGETS, label_arg="y", split_qkv=bool(split_qkv),
                                        tailor_rank=tailor_rank, learngene_rank=learngene_rank, native=True)
        return model
    targets = _detect_targets(model) if target_modules is None else target_modules
    label_arg = _detect_label_arg(model) if label_arg is None else label_arg
    signature = inspect.signature(model.forward)
    if label_arg not in signature.parameters:
        raise ValueError(f"{type(model).__name__}.forward has no label argument {label_arg!r}")

    def convert(w: Tensor, b: Tensor | None, training: bool) -> FastKindLinear:
        layer = FastKindLinear(w.shape[1], w.shape[0], bias=b is not None, tailor_rank=tailor_rank,
                               learngene_rank=learngene_rank, gate=gate, device="meta", dtype=w.dtype)
        layer.to_empty(device=w.device)
        if svd:
            layer.load_dense_weight(w.detach())  # exact float64 SVD
            if b is not None:
                with torch.no_grad():
                    layer.bias.copy_(b)
        return layer.train(training)

    def make(name: str, lin: nn.Linear) -> nn.Module:
        nonlocal gate
        gate = gate.to(lin.weight.device)  # a no-op after the first layer
        if not (split_qkv and name.split(".")[-1] == "qkv"):
            return convert(lin.weight, lin.bias, lin.training)
        if lin.out_features % 3:
            raise ValueError(f"{name}: out_features {lin.out_features} is not divisible by 3")
        bias = lin.bias.chunk(3, 0) if lin.bias is not None else [None] * 3
        return SplitLinear([convert(w, b, lin.training) for w, b in zip(lin.weight.chunk(3, 0), bias)])

    replace_linears(model, targets, make)
    model.kind_gate = gate
    groups = []  # diffusers' attention calls to_q, to_k, to_v one by one on the same tensor
    for _, parent in model.named_modules():
        trio = [getattr(parent, n, None) for n in ("to_q", "to_k", "to_v")]
        if _group_problem(trio) is None:
            groups.append(InputGroup(trio))
    object.__setattr__(model, "kind_input_groups", groups)
    model._kind_fast_kindify = dict(target_modules=targets if isinstance(targets, str) else list(targets),
                                    label_arg=label_arg, split_qkv=bool(split_qkv), tailor_rank=tailor_rank,
                                    learngene_rank=learngene_rank, native=False)
    if callable(getattr(type(model), "save_pretrained", None)):
        model.save_pretrained = _ForeignSaveGuard(type(model).__name__)

    def _route_labels(module, args, kwargs):
        bound = signature.bind_partial(*args, **kwargs)
        labels = bound.arguments.get(label_arg)
        module.kind_gate.labels = labels if isinstance(labels, Tensor) else None
        return None

    def _clear_labels(module, args, kwargs, output):
        module.kind_gate.labels = None
        for group in module.__dict__.get("kind_input_groups", ()):
            group.forget()  # outputs kept for members not called (yet) belong to this forward only

    model._kind_fast_hook = model.register_forward_pre_hook(_route_labels, with_kwargs=True)
    model._kind_fast_clear_hook = model.register_forward_hook(_clear_labels, with_kwargs=True, always_call=True)
    return model
