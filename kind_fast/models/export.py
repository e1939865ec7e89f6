"""CFG-exact deployment exports of a KIND-DiT (docs/design.md §7).

``DiT.to_dense(c)`` is exact for class c, but classifier-free guidance also evaluates the
null label, whose block weights are the learngenes alone (W_G, plus the null row's tailors if
the gate switches any on). No single dense DiT holds both, so a guided sample of
``to_dense(c)`` differs from the KIND model's. ``export_dit`` (``DiT.export``) builds a
standalone module that serves a fixed set of labels exactly:

    merged   one dense weight per served label and block linear,
                 W_ℓ = W_G + U_Tᵀ diag(σ_T ⊙ g_ℓ) V_T
             and a segmented GEMM: the rows of each sample go through their label's weight
             (path M3 of docs/design.md §2, here in plain PyTorch: ``segmented_linear``).
             Dense speed; S dense weight sets on disk.
    reduced  W_G dense plus only the tailors the served labels switch on, applied by the
             ``kind_linear`` op with the gate rows of the served labels (the ICML paper's
             "decomposable model"). Small on disk.
    dense    ``to_dense(c)`` for one class and no guidance: a plain DiT that refuses every
             other label (``kind_fast.models.dit.DenseExportDiT``), saved as a
             facebookresearch-layout ``.pt`` state dict.

The served labels are the given classes plus, with ``guidance=True`` (default), the null
label ``num_classes``. Labels keep their original ids: ``model(x, t, y)`` takes the KIND
model's class ids and raises a clear error for any label it does not serve. Samples of an
export therefore match the KIND model's for the same seed (fp32: to rounding).

No ClassGate and no FastKindLinear are involved: the export's parameters are plain tensors,
saved as safetensors + a JSON config by ``kind_fast.deploy.export_io`` (``save_export`` / ``load_export``).
"""

from __future__ import annotations

import contextlib
import copy
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kind_fast._version import __version__

__all__ = ["ExportedDiT", "export_dit", "segmented_linear", "SegmentPlan", "FORMS"]

FORMS = ("merged", "reduced", "dense")
FORMAT = "kind_fast.export"
FORMAT_VERSION = 2  # 2: the config is bound to the weights (kind_fast.deploy.export_io)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation, as ``kind_fast.models.dit.modulate`` (this module does not import kind_fast.models.dit:
    ``DiT.export`` imports it, and the package has no import cycles)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# =====================================================================================
# Labels: read on the host once per labels tensor, never stale
# =====================================================================================
def per_labels(owner: nn.Module, y: Tensor, build):
    """``build(y, labels as a host list)`` for the labels ``y``, cached in ``owner._plan_cache``.

    A sampling loop passes the same labels tensor at every step, so they are read on the host
    (one synchronisation for GPU labels) once, not once per step. The cache must never serve
    labels that changed: a change through ``y[...] =`` bumps the tensor's version, but one
    through ``y.data`` or ``y.numpy()`` does not. So on the CPU the labels are compared with the
    copy read last (cheap: no synchronisation there), and on a GPU a cached answer comes with a
    device-side assertion that the labels still equal that copy (no synchronisation, also
    captured into a CUDA graph): a stale answer is an error, never a wrong sample.
    """
    if not isinstance(y, Tensor):
        raise TypeError(f"y must be a torch.Tensor of class ids, got {type(y).__name__}")
    if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8) or y.dim() != 1:
        raise TypeError(f"y must be a 1-D integer tensor of class ids, got {y.dtype} {tuple(y.shape)}")
    key = (y.data_ptr(), y.shape[0], y.device, None if y.is_inference() else y._version)
    hit = owner._plan_cache
    if hit is not None and hit[0]() is y and hit[1] == key:
        if y.device.type == "cpu":
            if torch.equal(y, hit[2]):
                return hit[3]
        else:
            torch._assert_async((y == hit[2]).all(), "kind_fast export: the labels changed in place without "
                                "a version bump (a write through y.data?); pass a new labels tensor")
            return hit[3]
    if y.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"{type(owner).__name__}: run one call with these labels before capturing a CUDA graph")
    seen = y.clone()
    value = build(y, seen.tolist())
    owner._plan_cache = (weakref.ref(y), key, seen, value)
    return value


def check_served(labels: list[int], classes: list[int], num_classes: int, guidance: bool, what: str, *,
                 hint: str = "Export those classes too (DiT.export / kind-fast export --classes)") -> None:
    """ValueError naming the served classes unless every label is one of ``classes`` or, with
    ``guidance``, the null label ``num_classes``."""
    ok = set(classes) | ({num_classes} if guidance else set())
    bad = sorted({v for v in labels if v not in ok})
    if bad:
        served = ", ".join(map(str, classes)) or "none"
        null = f"; null label {num_classes}" if guidance else " (exported without guidance: no null label)"
        raise ValueError(f"{what} does not serve label(s) {bad}: it serves classes [{served}]{null}. {hint}")


# =====================================================================================
# Segmented GEMM (path M3 in plain PyTorch)
# =====================================================================================
@dataclass(frozen=True)
class SegmentPlan:
    """How the samples of one batch group by weight slot, read once on the host.

    ``segments``: (slot, start, end) runs of consecutive samples after the permutation
    ``perm`` (None when the batch already comes grouped, as a CFG batch [c…, null…] does);
    ``inverse`` undoes ``perm``.
    """

    segments: tuple[tuple[int, int, int], ...]
    perm: Tensor | None
    inverse: Tensor | None

    @staticmethod
    def from_slots(slots_host: list[int], device: torch.device) -> SegmentPlan:
        if not slots_host:
            return SegmentPlan((), None, None)
        grouped = all(a <= b for a, b in zip(slots_host, slots_host[1:]))
        order = list(range(len(slots_host))) if grouped else sorted(range(len(slots_host)),
                                                                   key=slots_host.__getitem__)
        segs, start = [], 0
        for i in range(1, len(order) + 1):
            if i == len(order) or slots_host[order[i]] != slots_host[order[start]]:
                segs.append((slots_host[order[start]], start, i))
                start = i
        if grouped:
            return SegmentPlan(tuple(segs), None, None)
        perm = torch.tensor(order, dtype=torch.long)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(len(order))
        return SegmentPlan(tuple(segs), perm.to(device), inverse.to(device))


def segmented_linear(x: Tensor, weight: Tensor, bias: Tensor | None, slots: Tensor, plan: SegmentPlan) -> Tensor:
    """y[n] = x[n] · weight[slots[n]]ᵀ + bias for x (N, …, in), weight (S, out, in), slots (N,).

    One dense GEMM per slot present in the batch over its samples' rows (a CFG batch: two
    cuBLAS GEMMs on a GPU, each over half the rows, plus one copy of y). The package's own M3
    op, ``kind_fast.ops.kind_linear_merged.kind_linear_merged_gemm``, does the same work with
    the backends' kernels; an export keeps this plain loop because its plan is built once per
    labels tensor (``ExportedDiT.route``) and then needs no host read, so a sampling loop over
    an export can be captured in a CUDA graph, and the export runs wherever PyTorch does.
    """
    if len(plan.segments) <= 1:  # one label in the batch (or an empty batch): one dense GEMM
        return F.linear(x, weight[plan.segments[0][0] if plan.segments else 0], bias)
    xs = x if plan.perm is None else x.index_select(0, plan.perm)
    y = torch.cat([F.linear(xs[a:b], weight[s], bias) for s, a, b in plan.segments])
    return y if plan.inverse is None else y.index_select(0, plan.inverse)


# =====================================================================================
# Per-label linears
# =====================================================================================
@dataclass
class _Route:
    """What every per-label linear of one forward call needs."""

    slots: Tensor  # (N,) slot of each sample, on the device
    plan: SegmentPlan | None  # merged form: the host-side grouping
    idx: Tensor | None  # reduced form: (S, K) active tailor ids per slot (into the kept bank)
    val: Tensor | None  # reduced form: (S, K) gate values per slot


class MergedLinear(nn.Module):
    """One dense (out, in) weight per served label; bias shared (KIND biases are class-agnostic)."""

    def __init__(self, slots: int, in_features: int, out_features: int, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(slots, out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))

    def forward(self, x: Tensor, route: _Route) -> Tensor:
        return segmented_linear(x, self.weight, self.bias, route.slots, route.plan)

    def extra_repr(self) -> str:
        return f"slots={self.weight.shape[0]}, in_features={self.in_features}, out_features={self.out_features}"


class ReducedLinear(nn.Module):
    """W_G dense plus the R tailors the served labels use: y = x·W_Gᵀ + b + gated tailor term."""

    def __init__(self, tailors: int, in_features: int, out_features: int, device=None, dtype=None):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.w_g = nn.Parameter(torch.empty(out_features, in_features, **fk))
        self.bias = nn.Parameter(torch.empty(out_features, **fk))
        self.u_t = nn.Parameter(torch.empty(tailors, out_features, **fk))
        self.sigma_t = nn.Parameter(torch.empty(tailors, **fk))
        self.v_t = nn.Parameter(torch.empty(tailors, in_features, **fk))

    def forward(self, x: Tensor, route: _Route) -> Tensor:
        if self.u_t.shape[0] == 0:  # the served labels switch on no tailor
            return F.linear(x, self.w_g, self.bias)
        from kind_fast.ops.kind_linear import kind_linear

        return kind_linear(x, self.w_g, self.bias, self.u_t, self.sigma_t, self.v_t, route.idx, route.val,
                           route.slots)

    def extra_repr(self) -> str:
        return f"tailors={self.u_t.shape[0]}, in_features={self.in_features}, out_features={self.out_features}"


class _Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, split: bool, make):
        super().__init__()
        self.num_heads, self.split = num_heads, split
        if split:
            self.q, self.k, self.v = make(dim, dim), make(dim, dim), make(dim, dim)
        else:
            self.qkv = make(dim, 3 * dim)
        self.proj = make(dim, dim)

    def forward(self, x: Tensor, route: _Route) -> Tensor:
        n, t, d = x.shape
        if self.split:
            q, k, v = self.q(x, route), self.k(x, route), self.v(x, route)
        else:
            q, k, v = self.qkv(x, route).chunk(3, dim=-1)
        q, k, v = (z.view(n, t, self.num_heads, d // self.num_heads).transpose(1, 2) for z in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, t, d), route)


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, make):
        super().__init__()
        self.fc1, self.fc2 = make(dim, hidden), make(hidden, dim)

    def forward(self, x: Tensor, route: _Route) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x, route), approximate="tanh"), route)


class _Block(nn.Module):
    """A DiT block (adaLN-Zero) whose token-wise linears take the per-sample route."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, split: bool, make):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = _Attention(dim, num_heads, split, make)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio), make)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: Tensor, c: Tensor, route: _Route) -> Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_a.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_a, scale_a), route)
        return x + gate_m.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_m, scale_m), route)


# =====================================================================================
# The exported model
# =====================================================================================
class ExportedDiT(nn.Module):
    """A DiT that serves a fixed set of labels exactly as the KIND model it came from.

    forward(x (N, C, H, W), t (N,), y (N,)) with y the KIND model's label ids (the null label
    is ``num_classes``); ``forward_with_cfg`` as DiT's. Build with ``DiT.export`` or
    ``load_export``; the constructor lays out (uninitialised) per-label linears around the
    given DiT embedders and final layer (``kind_fast.models.dit`` modules, taken as they are).
    """

    def __init__(self, arch: dict, classes: list[int], *, form: str, x_embedder: nn.Module, t_embedder: nn.Module,
                 final_layer: nn.Module, guidance: bool = True, split: bool = False, tailors: int = 0,
                 active: int = 1, device=None, dtype=None):
        super().__init__()
        if form not in ("merged", "reduced"):
            raise ValueError(f"ExportedDiT form must be merged or reduced, got {form!r}")
        self.arch, self.form, self.guidance = dict(arch), form, bool(guidance)
        self.num_classes = int(arch["num_classes"])
        self.classes = _check_classes(classes, self.num_classes)
        self.served_labels = self.classes + ([self.num_classes] if self.guidance else [])
        if not self.served_labels:
            raise ValueError("an export must serve at least one label")
        self.in_channels = arch["in_channels"]
        self.out_channels = self.in_channels * 2 if arch["learn_sigma"] else self.in_channels
        self.patch_size = arch["patch_size"]
        d, n_slots = arch["hidden_size"], len(self.served_labels)
        fk = {"device": device, "dtype": dtype}

        self._slot = {ell: i for i, ell in enumerate(self.served_labels)}
        if form == "merged":
            self.split = False  # one GEMM over the fused qkv weight

            def make(i, o):
                return MergedLinear(n_slots, i, o, **fk)
        else:
            self.split = bool(split)
            self.register_buffer("gate_idx", torch.zeros(n_slots, active, dtype=torch.int32, device=device))
            self.register_buffer("gate_val", torch.zeros(n_slots, active, dtype=torch.float32, device=device))

            def make(i, o):
                return ReducedLinear(tailors, i, o, **fk)

        self.x_embedder, self.t_embedder, self.final_layer = x_embedder, t_embedder, final_layer
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self.label_table = nn.Embedding(n_slots, d)  # rows of the served labels, in slot order
            self.blocks = nn.ModuleList(_Block(d, arch["num_heads"], arch["mlp_ratio"], self.split, make)
                                        for _ in range(arch["depth"]))
        if dtype is not None:
            self.label_table.to(dtype)
            for b in self.blocks:
                b.adaLN_modulation.to(dtype)
        tokens = (arch["input_size"] // self.patch_size) ** 2
        self.register_buffer("pos_embed", torch.zeros(1, tokens, d, device=device, dtype=dtype or torch.float32))
        self._plan_cache: tuple | None = None

    def __getstate__(self):  # the label cache holds a weak reference: not picklable, not needed
        return {**self.__dict__, "_plan_cache": None}

    # ------------------------------------------------------------------ labels
    def route(self, y: Tensor) -> _Route:
        """Check the labels and map them to weight slots (clear errors for unserved labels)."""
        return per_labels(self, y, self._build_route)

    def _build_route(self, y: Tensor, labels: list[int]) -> _Route:
        check_served(labels, self.classes, self.num_classes, self.guidance, f"this {self.form} export")
        slots_host = [self._slot[v] for v in labels]
        with torch.inference_mode(False):  # kept across calls: a normal tensor, even under inference_mode
            slots = torch.tensor(slots_host, dtype=torch.long).to(y.device, non_blocking=True)
        if self.form == "merged":
            return _Route(slots, SegmentPlan.from_slots(slots_host, y.device), None, None)
        return _Route(slots, None, self.gate_idx, self.gate_val)

    # ------------------------------------------------------------------ forward
    def unpatchify(self, x: Tensor) -> Tensor:
        p, c = self.patch_size, self.out_channels
        h = w = int(round(x.shape[1] ** 0.5))
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        r = self.route(y)
        if x.shape[0] != r.slots.shape[0]:
            raise ValueError(f"x has {x.shape[0]} samples but y has {r.slots.shape[0]} labels")
        x = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        c = self.t_embedder(t) + self.label_table(r.slots)
        for block in self.blocks:
            x = block(x, c, r)
        return self.unpatchify(self.final_layer(x, c))

    def forward_with_cfg(self, x: Tensor, t: Tensor, y: Tensor, cfg_scale: float) -> Tensor:
        """As ``DiT.forward_with_cfg``: the second half of y holds null labels."""
        if not self.guidance:
            raise ValueError("this export was made without guidance (no null label): it cannot run CFG")
        half = x[: x.shape[0] // 2]
        out = self(torch.cat([half, half], dim=0), t, y)
        eps, rest = out[:, : self.in_channels], out[:, self.in_channels:]
        cond, uncond = eps.chunk(2, dim=0)
        guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([guided, guided], dim=0), rest], dim=1)

    def config(self) -> dict:
        cfg = {"format": FORMAT, "format_version": FORMAT_VERSION, "form": self.form, "arch": self.arch,
               "classes": self.classes, "guidance": self.guidance, "split": self.split,
               "dtype": str(self.final_layer.linear.weight.dtype).removeprefix("torch."),
               "kind_fast_version": __version__, "torch_version": torch.__version__}
        if self.form == "reduced":
            cfg["tailors"], cfg["active"] = self.blocks[0].mlp.fc1.u_t.shape[0], self.gate_idx.shape[1]
        return cfg

    def extra_repr(self) -> str:
        return f"form={self.form}, classes={self.classes}, guidance={self.guidance}"


def _check_classes(classes, num_classes: int) -> list[int]:
    if isinstance(classes, int) and not isinstance(classes, bool):
        classes = [classes]
    if isinstance(classes, Tensor):
        classes = classes.tolist()
    try:
        items = list(classes)
    except TypeError:
        raise TypeError(f"classes must be a list of class ids, got {type(classes).__name__}") from None
    out: list[int] = []
    for c in items:
        if isinstance(c, bool) or not isinstance(c, int):
            raise TypeError(f"class ids must be ints, got {c!r} ({type(c).__name__})")
        if not 0 <= c < num_classes:
            raise ValueError(f"class id {c} out of range: the model has classes 0..{num_classes - 1} "
                             f"(the null label {num_classes} is served with guidance=True)")
        if c not in out:
            out.append(c)
    return out


# =====================================================================================
# Export from a KIND-DiT
# =====================================================================================
def _kind_linears(block) -> list[tuple[str, tuple]]:
    """(export name, source KIND layers) per token-wise linear of a source block."""
    a = block.attn
    qkv = [("attn.q", (a.q,)), ("attn.k", (a.k,)), ("attn.v", (a.v,))] if a.split else [("attn.qkv", (a.qkv,))]
    return qkv + [("attn.proj", (a.proj,)), ("mlp.fc1", (block.mlp.fc1,)), ("mlp.fc2", (block.mlp.fc2,))]


@torch.no_grad()
def export_dit(model, classes, form: str = "merged", *, guidance: bool = True) -> nn.Module:
    """Standalone model serving ``classes`` (and the null label with ``guidance``) exactly.

    ``form``: merged | reduced → an ``ExportedDiT``; dense → a ``DenseExportDiT`` (a
    ``kind_fast.models.dit.DiT(kind=None)`` equal to ``model.to_dense(c)`` that serves class c only:
    one class, ``guidance=False``, since a dense DiT cannot also hold the null label's
    weights). See the module docstring.
    """
    from kind_fast.nn.layers import FastKindLinear

    if getattr(model, "kind", None) is None or not hasattr(model, "kind_gate") or not hasattr(model, "blocks"):
        raise TypeError("export needs a KIND-DiT (kind_fast.models.dit.DiT with kind set); a dense DiT is its own export")
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    classes = _check_classes(classes, model.num_classes)
    if form == "dense":
        if guidance or len(classes) != 1:
            raise ValueError("form='dense' exports one class without guidance (guidance=False): the null label "
                             "CFG evaluates needs other block weights. Use form='merged' or 'reduced' for CFG")
        return model.to_dense_export(classes[0])  # a kind_fast.models.dit.DenseExportDiT
    if not classes and not guidance:
        raise ValueError("nothing to export: no classes and no guidance")
    dtype = model.final_layer.linear.weight.dtype
    device = model.pos_embed.device
    gate = model.kind_gate
    served = classes + ([model.num_classes] if guidance else [])
    split = model.blocks[0].attn.split
    used: list[int] = []
    if form == "reduced":
        # the served labels' rows of the compiled gate, re-indexed into the bank of the tailors
        # they use (same slot order and values as the KIND layer's: the tailor term is the same)
        idx, val = (t.detach().cpu() for t in gate.compiled())
        active = gate.mask.detach().cpu() > 0
        used = sorted({int(idx[ell, q]) for ell in served for q in range(idx.shape[1]) if active[ell, q]})
        pos = {j: i for i, j in enumerate(used)}
        r_idx = torch.zeros(len(served), idx.shape[1], dtype=torch.int32)
        r_val = torch.zeros(len(served), idx.shape[1], dtype=torch.float32)
        for s, ell in enumerate(served):
            for q in range(idx.shape[1]):
                if active[ell, q]:
                    r_idx[s, q], r_val[s, q] = pos[int(idx[ell, q])], val[ell, q]
    shared = {name: copy.deepcopy(getattr(model, name)).requires_grad_(False)
              for name in ("x_embedder", "t_embedder", "final_layer")}  # every label uses them as they are
    out = ExportedDiT(model.arch, classes, form=form, guidance=guidance, split=split, tailors=len(used),
                      active=gate.active if form == "reduced" else 1, device="meta", dtype=dtype, **shared)
    for name in ("label_table", "blocks"):  # the per-label parts: allocated here, filled below
        getattr(out, name).to_empty(device=device)
    for name, buf in list(out.named_buffers(recurse=False)):
        setattr(out, name, torch.empty_like(buf, device=device))
    out.pos_embed.copy_(model.pos_embed)
    out.label_table.weight.copy_(model.y_embedder.embedding_table.weight[torch.tensor(served, device=device)])
    if form == "reduced":
        out.gate_idx.copy_(r_idx)
        out.gate_val.copy_(r_val)
    ids = torch.tensor(used, dtype=torch.long, device=device)
    for src, dst in zip(model.blocks, out.blocks):
        dst.adaLN_modulation.load_state_dict(src.adaLN_modulation.state_dict())
        for name, (m,) in _kind_linears(src):
            if not isinstance(m, FastKindLinear):
                raise TypeError(f"export expects a KIND layer in every block linear; {name} is {type(m).__name__}")
            if form == "merged":  # q, k, v go into row blocks of one fused qkv weight
                part = {"attn.q": 0, "attn.k": 1, "attn.v": 2}.get(name)
                target = dst.get_submodule("attn.qkv" if part is not None else name)
                rows = slice(part * m.out_features, (part + 1) * m.out_features) if part is not None else slice(None)
                for s, ell in enumerate(served):
                    target.weight[s, rows].copy_(m.to_dense(ell))  # W_G + U_Tᵀ diag(σ_T ⊙ g_ℓ) V_T
                target.bias[rows].copy_(m.bias)
            else:
                dst_l = dst.get_submodule(name)
                dst_l.w_g.copy_(m.learngene_weight(dtype))  # the W_G the KIND forward uses
                dst_l.bias.copy_(m.bias)
                dst_l.u_t.copy_(m.u_t[ids])
                dst_l.sigma_t.copy_(m.sigma_t[ids])
                dst_l.v_t.copy_(m.v_t[ids])
    out._plan_cache = None
    return out.train(False).requires_grad_(False)
