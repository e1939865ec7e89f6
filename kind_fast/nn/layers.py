"""FastKindLinear: a drop-in nn.Linear stored as KIND components.

    W_c = U_Gᵀ diag(σ_G) V_G  +  U_Tᵀ diag(σ_T ⊙ g_c) V_T          (nn.Linear layout: out × in)

Parameters are component-major (docs/design.md §2): ``u_g`` (N_G, out), ``sigma_g`` (N_G,), ``v_g``
(N_G, in) are the learngenes; ``u_t``, ``sigma_t``, ``v_t`` the tailors; ``bias`` (out,) is
class-agnostic and counted with the learngenes. The class gate g is a shared ``ClassGate``
(not registered as a submodule here, so one gate serves every layer of a model and is saved
once); the layer reads labels from ``labels=`` or from ``gate.labels``.

Forward: the op family's entry point (``kind_fast.ops.paths.kind_linear_layer``) picks the path
from the call's shapes (docs/design.md §2). On path M1, W_G is materialised (in float32, then
cast), then one ``kind_linear`` op adds the gathered, gated tailor term.

W_G is kept across calls while the learngenes are frozen (transfer, deployment), with or without
a ``kind_fast.weight_cache()`` scope: the cache is keyed by the learngenes' identity, version
counters and storage, so optimizer steps, ``load_state_dict``, ``copy_`` under no_grad, ``to()``,
unfreezing and replacing a parameter are all seen. Writes through ``.data`` are not (they bypass
the version counter): after one, call ``kind_fast.nn.caching.invalidate()``. While the learngenes
train (pretraining), W_G is rebuilt every call outside a scope, as before.

Groups: several KIND layers that read the same input (attention's q, k, v) run as one op through
``kind_group(layers, x, labels)`` (docs/design.md §2): each layer keeps its own parameters, names
and state-dict keys; the group shares the pass over x (one GEMM for the learngene terms on the
CPU's lean path, one launch where a fused backend serves groups).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kind_fast.nn import caching
from kind_fast.nn.gate import ClassGate, check_labels
from kind_fast.nn.merged_cache import MergedWeightCache, tokens
from kind_fast.ops.kind_linear import SUPPORTED_DTYPES, acc_dtype, sample_rows
from kind_fast.ops.paths import kind_linear_group_layer, kind_linear_layer

__all__ = ["FastKindLinear", "kind_group", "InputGroup"]

LEARNGENE_PARAMS = ("u_g", "sigma_g", "v_g", "bias")
TAILOR_PARAMS = ("u_t", "sigma_t", "v_t")


def _svd_components(w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of an (out, in) matrix in float64: (U (r, out), σ (r,), V (r, in)), σ descending."""
    u, s, vh = torch.linalg.svd(w.to(torch.float64), full_matrices=False)
    return u.t(), s, vh


class FastKindLinear(nn.Module):
    """Drop-in ``nn.Linear`` made of learngenes (shared) and class-gated tailors.

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        tailor_rank: N_T, tailor components (default 96, docs/design.md §1).
        learngene_rank: N_G (default ``min(in, out) - tailor_rank``, so r = min(in, out)).
        gate: a ``ClassGate`` shared with other layers; ``None`` means every tailor is always
            on (a plain factored linear layer that needs no labels).
        device, dtype: factory kwargs, as ``nn.Linear``.

    Call as ``layer(x, labels=labels)`` with labels (B,) class ids and x (B, ..., in): x[b]
    holds the rows of sample b, e.g. (B, T, in) tokens or (B, in) one row per sample. Any other
    layout is a ValueError (rows are never silently regrouped).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        tailor_rank: int = 96,
        learngene_rank: int | None = None,
        gate: ClassGate | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features), ("tailor_rank", tailor_rank)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if in_features < 1 or out_features < 1:
            raise ValueError(f"in_features and out_features must be >= 1, got {in_features}, {out_features}")
        r_max = min(in_features, out_features)
        if not 0 <= tailor_rank <= r_max:
            raise ValueError(f"tailor_rank must be in [0, min(in, out) = {r_max}], got {tailor_rank}")
        if learngene_rank is None:
            learngene_rank = r_max - tailor_rank
        if isinstance(learngene_rank, bool) or not isinstance(learngene_rank, int) or learngene_rank < 0:
            raise ValueError(f"learngene_rank must be an int >= 0, got {learngene_rank!r}")
        if learngene_rank + tailor_rank > r_max:
            raise ValueError(
                f"learngene_rank + tailor_rank = {learngene_rank + tailor_rank} exceeds "
                f"min(in, out) = {r_max}"
            )
        fk = {"device": device, "dtype": dtype}
        if dtype is not None and dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"dtype {dtype} is not supported; use one of {SUPPORTED_DTYPES}")
        self.in_features, self.out_features = in_features, out_features
        self.learngene_rank, self.tailor_rank = learngene_rank, tailor_rank
        self.u_g = nn.Parameter(torch.empty(learngene_rank, out_features, **fk))
        self.sigma_g = nn.Parameter(torch.empty(learngene_rank, **fk))
        self.v_g = nn.Parameter(torch.empty(learngene_rank, in_features, **fk))
        self.u_t = nn.Parameter(torch.empty(tailor_rank, out_features, **fk))
        self.sigma_t = nn.Parameter(torch.empty(tailor_rank, **fk))
        self.v_t = nn.Parameter(torch.empty(tailor_rank, in_features, **fk))
        self.bias = nn.Parameter(torch.empty(out_features, **fk)) if bias else None
        object.__setattr__(self, "_gate", None)
        self._wg_cache: tuple | None = None
        self._merged = MergedWeightCache()
        if gate is not None:
            self.set_gate(gate)
        if self.u_g.device.type != "meta":
            self.reset_parameters()

    # ------------------------------------------------------------------ init / conversion
    def reset_parameters(self) -> None:
        """nn.Linear's init (kaiming-uniform weight, uniform bias), then its SVD (docs/design.md §1)."""
        w = torch.empty(self.out_features, self.in_features, dtype=torch.float64, device=self.u_g.device)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        self.load_dense_weight(w)
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            with torch.no_grad():
                self.bias.uniform_(-bound, bound)

    @torch.no_grad()
    def load_dense_weight(self, weight: Tensor) -> None:
        """Set all components from the SVD (float64) of a dense (out, in) weight.

        The largest N_G singular components become learngenes, the next N_T tailors; with
        r = min(in, out) nothing is dropped, so all tailors on reproduces ``weight``.
        """
        if weight.shape != (self.out_features, self.in_features):
            raise ValueError(f"weight must be ({self.out_features}, {self.in_features}), got {tuple(weight.shape)}")
        u, s, v = _svd_components(weight)
        g, t = self.learngene_rank, self.tailor_rank
        for p, src in ((self.u_g, u[:g]), (self.sigma_g, s[:g]), (self.v_g, v[:g]),
                       (self.u_t, u[g:g + t]), (self.sigma_t, s[g:g + t]), (self.v_t, v[g:g + t])):
            p.copy_(src.to(device=p.device, dtype=p.dtype))
        self._wg_cache = None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        tailor_rank: int = 96,
        learngene_rank: int | None = None,
        gate: ClassGate | None = None,
    ) -> FastKindLinear:
        """Convert an ``nn.Linear`` by an exact float64 SVD of its weight (bias copied)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    tailor_rank=tailor_rank, learngene_rank=learngene_rank, gate=gate,
                    device="meta", dtype=w.dtype)
        layer.to_empty(device=w.device)
        layer.load_dense_weight(w.detach())
        if linear.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(linear.bias)
        layer.train(linear.training)
        return layer

    # ------------------------------------------------------------------ gate
    @property
    def gate(self) -> ClassGate | None:
        return self._gate

    def set_gate(self, gate: ClassGate | None) -> None:
        """Attach a (shared) gate; its tailor_rank must equal this layer's."""
        if gate is not None:
            if not isinstance(gate, ClassGate):
                raise TypeError(f"gate must be a ClassGate, got {type(gate).__name__}")
            if gate.tailor_rank != self.tailor_rank:
                raise ValueError(
                    f"gate has tailor_rank {gate.tailor_rank} but the layer has {self.tailor_rank} tailors"
                )
        object.__setattr__(self, "_gate", gate)

    # ------------------------------------------------------------------ life cycle
    def freeze_learngenes(self, frozen: bool = True) -> FastKindLinear:
        """Freeze (or unfreeze) U_G, σ_G, V_G and the bias, as in KIND transfer (either way the
        cached W_G is dropped)."""
        self.clear_weight_cache()
        for name in LEARNGENE_PARAMS:
            p = getattr(self, name)
            if p is not None:
                p.requires_grad_(not frozen)
        return self

    @torch.no_grad()
    def reset_tailors(self, gate: ClassGate | None = None, *, generator: torch.Generator | None = None) -> None:
        """Re-initialise the tailors for transfer (and optionally switch to a new gate).

        New tailors are the components [N_G, N_G + N_T) of the SVD of a fresh nn.Linear-style
        random matrix: the same scale and orthonormal structure they had at pretraining init.
        """
        if gate is not None:
            self.set_gate(gate)
        w = torch.empty(self.out_features, self.in_features, dtype=torch.float64)
        bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform(a=sqrt(5)) bound
        w.uniform_(-bound, bound, generator=generator)
        u, s, v = _svd_components(w.to(self.u_t.device))
        g, t = self.learngene_rank, self.tailor_rank
        for p, src in ((self.u_t, u[g:g + t]), (self.sigma_t, s[g:g + t]), (self.v_t, v[g:g + t])):
            p.copy_(src.to(device=p.device, dtype=p.dtype))

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per part: learngene (U_G, σ_G, V_G), tailor, bias, total."""
        lg = sum(getattr(self, n).numel() for n in ("u_g", "sigma_g", "v_g"))
        tl = sum(getattr(self, n).numel() for n in TAILOR_PARAMS)
        b = self.bias.numel() if self.bias is not None else 0
        return {"learngene": lg, "tailor": tl, "bias": b, "total": lg + tl + b}

    # ------------------------------------------------------------------ dense views
    def _learngene_weight_fresh(self, dtype: torch.dtype) -> Tensor:
        acc = acc_dtype(self.u_g.dtype)
        with torch.autocast(self.u_g.device.type, enabled=False):
            w = (self.u_g.t().to(acc) * self.sigma_g.to(acc)) @ self.v_g.to(acc)
        return w.to(dtype)

    def learngene_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """W_G = U_Gᵀ diag(σ_G) V_G (out, in), built in float32 and cast to ``dtype``.

        Reused across calls while the learngenes are frozen (with or without a
        ``kind_fast.weight_cache()`` scope), and inside a scope also for trainable learngenes
        when no gradient flows (sampling during pretraining). A cached W_G is valid only for the
        same parameter objects with unchanged version counters and storage (the entry pins the
        storage, so a freed address can never match): in-place writes through autograd-aware ops
        (optimizer steps, ``load_state_dict``, ``copy_`` under no_grad), ``to()``, unfreezing and
        replacing a parameter all rebuild it. Writes through ``.data`` are not seen: call
        ``kind_fast.nn.caching.invalidate()`` after one. Never cached while gradients flow to the
        learngenes or under ``torch.compile``; a W_G cached under ``torch.inference_mode`` is
        not reused outside it.
        """
        p = self._parameters
        u, sg, v = p["u_g"], p["sigma_g"], p["v_g"]
        dtype = u.dtype if dtype is None else dtype
        frozen = not (u.requires_grad or sg.requires_grad or v.requires_grad)
        if not (frozen or caching.enabled()) or (not frozen and torch.is_grad_enabled()) \
                or torch.compiler.is_compiling():
            return self._learngene_weight_fresh(dtype)
        key = (caching.generation(), dtype, u._version, sg._version, v._version, u.data_ptr(), sg.data_ptr(),
               v.data_ptr())
        hit = self._wg_cache
        if (hit is not None and hit[0] == key and hit[2][0] is u and hit[2][1] is sg and hit[2][2] is v
                and (not hit[1].is_inference() or torch.is_inference_mode_enabled())):
            return hit[1]
        with torch.no_grad():
            w = self._learngene_weight_fresh(dtype)
        # the entry holds the parameter objects and their storages: no other tensor can take
        # those addresses while it lives
        self._wg_cache = (key, w, (u, sg, v), (u.detach(), sg.detach(), v.detach()))
        caching.remember(self)
        return w

    def clear_weight_cache(self) -> None:
        """Drop the cached W_G and merged per-class weights (``kind_fast.nn.caching.invalidate``
        does it for every layer, and leaving the outermost ``weight_cache()`` scope too)."""
        self._wg_cache = None
        self.__dict__["_group_cache"] = None
        self.merged_cache.clear()

    def _cached_weight_view(self, dtype: torch.dtype, w: Tensor, view: Tensor) -> None:
        """Let the cached W_G ``w`` be ``view`` (a block of a group's concatenated W_G with the same
        values), so the group and the layer share one copy."""
        hit = self._wg_cache
        if hit is not None and hit[1] is w and hit[0][1] == dtype:
            self._wg_cache = (hit[0], view, hit[2], hit[3])

    @torch.no_grad()
    def to_dense(self, class_id: int | None = None) -> Tensor:
        """Dense (out, in) weight that ``class_id`` sees; None: learngenes only.

        Without a gate every tailor counts for every class.
        """
        acc = acc_dtype(self.u_g.dtype)
        w = self._learngene_weight_fresh(acc)
        if class_id is not None:
            if self.gate is not None:
                g = self.gate.row(class_id).to(device=self.u_t.device, dtype=acc)
            else:
                g = torch.ones(self.tailor_rank, dtype=acc, device=self.u_t.device)
            w = w + (self.u_t.t().to(acc) * (self.sigma_t.to(acc) * g)) @ self.v_t.to(acc)
        return w.to(self.u_g.dtype)

    def to_linear(self, class_id: int | None = None) -> nn.Linear:
        """A plain nn.Linear with ``to_dense(class_id)`` as its weight (deployment)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.u_g.device, dtype=self.u_g.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.to_dense(class_id))
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        group = self.__dict__.get("_input_group")
        if group is not None and not torch.compiler.is_compiling():
            out = group.member_forward(self, x, labels)
            if out is not None:
                return out
        return self._forward(x, labels)

    def _forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(f"x must have last dimension {self.in_features}, got shape {tuple(x.shape)}")
        p = self._parameters  # parameters by dict (nn.Module attribute lookup is slow on every call)
        dev_type = x.device.type
        if torch.is_autocast_enabled(dev_type):
            dt = torch.get_autocast_dtype(dev_type)
        else:
            dt = p["u_g"].dtype
            if x.dtype != dt:
                raise TypeError(
                    f"FastKindLinear: input dtype {x.dtype} != parameter dtype {dt}; cast the input "
                    "or the layer, or run under torch.autocast"
                )
        gate = self.__dict__["_gate"]
        bias = p["bias"]
        if gate is None:
            w_g = self.learngene_weight(dt)
            if self.tailor_rank == 0:
                return F.linear(x, w_g, bias.to(dt) if bias is not None else None)
            # no gate: every tailor always on, i.e. one dense weight
            u_t = p["u_t"]
            acc = acc_dtype(u_t.dtype)
            w_t = (u_t.t().to(acc) * p["sigma_t"].to(acc)) @ p["v_t"].to(acc)
            return F.linear(x, w_g + w_t.to(dt), bias.to(dt) if bias is not None else None)
        labels = self._labels(labels)
        self._check_input(x, labels)
        if labels.device != x.device:
            labels = labels.to(x.device, non_blocking=True)
        idx, val = gate.compiled(x.device)
        # the op family picks the path (M0-M5) from shapes and the batch's classes; W_G comes
        # from this layer's cache (kept while the learngenes are frozen), merged per-class weights
        # (M3) from its merged-weight cache, which lives only inside a kind_fast.weight_cache()
        # scope (kind_fast.nn.caching).
        merged = None
        if caching.enabled() and not torch.compiler.is_compiling():
            merged = self.merged_cache
            caching.remember(self)
        return kind_linear_layer(x, labels, u_g=p["u_g"], sigma_g=p["sigma_g"], v_g=p["v_g"], bias=bias,
                                 u_t=p["u_t"], sigma_t=p["sigma_t"], v_t=p["v_t"], idx=idx, val=val,
                                 w_g=self.learngene_weight, merged=merged, token=self._merged_token,
                                 classes=gate.served, training_module=self.training)

    # ------------------------------------------------------------------ merged weights (path M3)
    @property
    def merged_cache(self) -> MergedWeightCache:
        """This layer's cache of merged per-class weights (set ``.capacity`` to bound it)."""
        cache = self.__dict__.get("_merged")
        if cache is None:  # a layer unpickled from a version without it
            cache = self.__dict__["_merged"] = MergedWeightCache()
        return cache

    def clear_merged_cache(self) -> None:
        """Drop the merged per-class weights (needed only after writes that bypass version
        counters: in-place ops on ``param.data`` or on inference tensors)."""
        self.merged_cache.clear()

    def _merged_token(self) -> tuple | None:
        gate = self.gate
        return tokens((self.u_g, self.sigma_g, self.v_g, self.u_t, self.sigma_t, self.v_t,
                       gate.table, gate.idx, gate.mask))

    def _labels(self, labels: Tensor | None) -> Tensor:
        if labels is None:
            labels = self.__dict__["_gate"].labels
            if labels is None:
                raise ValueError(
                    "FastKindLinear has a class gate but got no labels: pass labels=, or call it inside a "
                    "kindified model's forward (its hook routes the model's class labels)"
                )
        return labels

    def _op_args(self, with_caches: bool) -> dict:
        """This layer's keyword arguments of ``kind_linear_layer`` (parameters, W_G source, caches)."""
        args = dict(u_g=self.u_g, sigma_g=self.sigma_g, v_g=self.v_g, bias=self.bias, u_t=self.u_t,
                    sigma_t=self.sigma_t, v_t=self.v_t, w_g=self.learngene_weight)
        if with_caches:
            args.update(merged=self.merged_cache, token=self._merged_token)
            caching.remember(self)
        return args

    def _check_input(self, x: Tensor, labels) -> None:
        """Labels and the one accepted layout: x is (B, ..., in) with B = len(labels), and
        x[b] holds the rows of sample b (class labels[b]), as for nn.Linear with a batch
        dimension. A 2-D x is (B, in), one row per sample; flattened rows are not regrouped."""
        check_labels(labels, self.__dict__["_gate"].num_classes)
        if x.dim() < 2 or labels.dim() != 1 or x.shape[0] != labels.shape[0]:
            sample_rows(x, labels, None, who="FastKindLinear")  # raises the layout error

    def _apply(self, fn, recurse=True):
        self._wg_cache = None
        self.__dict__["_group_cache"] = None
        self.merged_cache.clear()
        return super()._apply(fn, recurse)

    def __getstate__(self):
        # derived weights belong to this object's tensors: copies (deepcopy, pickling) start without them
        state = dict(self.__dict__)
        state["_wg_cache"] = None
        state["_group_cache"] = None
        return state

    def extra_repr(self) -> str:
        gate = "none (all tailors on)" if self.gate is None else self.gate.kind
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, learngene_rank={self.learngene_rank}, "
            f"tailor_rank={self.tailor_rank}, gate={gate}"
        )


# ====================================================================================== groups
def _group_problem(layers, *, hooks: bool = False) -> str | None:
    """Why ``layers`` cannot run as one group (None: they can). ``hooks``: a layer with forward
    hooks must be called as a module (its hooks would not run inside a group)."""
    if not layers:
        return "no layers"
    first = layers[0]
    for m in layers:
        if not isinstance(m, FastKindLinear):
            return f"{type(m).__name__} is not a FastKindLinear"
        if hooks and (m._forward_pre_hooks or m._forward_hooks):
            return "a layer has forward hooks"
        if m.gate is None or m.gate is not first.gate:
            return "the layers do not share one ClassGate"
        if m.in_features != first.in_features:
            return f"in_features differ ({m.in_features} vs {first.in_features})"
        if m.u_g.dtype != first.u_g.dtype or m.u_g.device != first.u_g.device:
            return "the layers' parameters differ in dtype or device"
    return None


def _group_weights(layers: Sequence[FastKindLinear]):
    """dtype -> (W_G of every layer concatenated, biases concatenated or None). While every layer's
    W_G is cached, the concatenation is too (on the first layer), and each layer's cache becomes a
    view of it: the group and the layers share one copy."""
    first = layers[0]

    def weights(dtype: torch.dtype):
        ws = [m.learngene_weight(dtype) for m in layers]
        biases = [m.bias for m in layers]
        grad_free = not any(w.requires_grad for w in ws) and not any(
            b is not None and b.requires_grad and torch.is_grad_enabled() for b in biases)
        hit = first.__dict__.get("_group_cache")
        if (grad_free and hit is not None and len(hit[0]) == len(ws) and all(a is b for a, b in zip(hit[0], ws))
                and all(a is b for a, b in zip(hit[1], layers)) and hit[3] == _bias_key(biases)
                and all(a is b for a, b in zip(hit[5], biases))):
            return hit[2], hit[4]
        from kind_fast.ops.kind_linear_grouped import concat_group

        w, bias = concat_group(ws, [None if b is None else b.to(dtype) for b in biases])
        if not grad_free or torch.compiler.is_compiling() or not all(m._wg_cache is not None and m._wg_cache[1] is wi
                                                                     for m, wi in zip(layers, ws)):
            return w, bias
        views, o = [], 0
        for m, wi in zip(layers, ws):
            view = w[o:o + wi.shape[0]]
            m._cached_weight_view(dtype, wi, view)
            views.append(view)
            o += wi.shape[0]
        first.__dict__["_group_cache"] = (tuple(views), tuple(layers), w, _bias_key(biases),
                                          None if bias is None else bias.detach(), tuple(biases))
        return w, bias

    return weights


def _bias_key(biases) -> tuple:
    """Versions and storages of the biases (their objects are compared by identity beside it)."""
    return tuple(None if b is None else (b._version, b.data_ptr(), b.requires_grad) for b in biases)


def kind_group(layers: Sequence[FastKindLinear], x: Tensor, labels: Tensor | None = None) -> tuple[Tensor, ...]:
    """Run KIND layers that read the same input (attention's q, k, v; any list) as one op:
    ``tuple(layer(x, labels=labels) for layer in layers)``, computed together.

    Every layer keeps its own decomposition, parameters, names and state-dict keys; grouping only
    shares the work (docs/design.md §2): on the CPU's lean path (M5) one GEMM computes every
    layer's learngene term and one GEMM every layer's tailor shrink; where the kind_linear op runs
    (M0/M1) the group is one ``kind_linear_grouped`` op, which a fused backend serves with one
    launch and otherwise runs as exact per-layer calls. The outputs equal the separate layers'
    (exactly in float64; within the dtype rule otherwise), and so do all gradients.

    The layers must be FastKindLinear sharing one ClassGate, with the same in_features, dtype and
    device (ValueError otherwise). ``labels`` as for FastKindLinear (default: ``gate.labels``).
    """
    layers = list(layers)
    why = _group_problem(layers)
    if why is not None:
        raise ValueError(f"kind_group: these layers cannot run as one group: {why}")
    first = layers[0]
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.shape[-1:] != (first.in_features,):
        raise ValueError(f"x must have last dimension {first.in_features}, got shape {tuple(x.shape)}")
    if not torch.is_autocast_enabled(x.device.type) and x.dtype != first.u_g.dtype:
        raise TypeError(f"kind_group: input dtype {x.dtype} != parameter dtype {first.u_g.dtype}; cast the input "
                        "or the layers, or run under torch.autocast")
    labels = first._labels(labels)
    first._check_input(x, labels)
    if labels.device != x.device:
        labels = labels.to(x.device, non_blocking=True)
    gate = first.gate
    idx, val = gate.compiled(x.device)
    with_caches = caching.enabled() and not torch.compiler.is_compiling()
    members = [m._op_args(with_caches) for m in layers]
    outs = kind_linear_group_layer(x, labels, members, idx=idx, val=val, weights=_group_weights(layers),
                                   classes=gate.served, training_module=first.training)
    return tuple(outs)


class InputGroup:
    """KIND layers that a model calls one by one on the same tensor (diffusers' attention calls
    ``to_q(x)``, ``to_k(x)``, ``to_v(x)``), computed as one group at the first call.

    ``kindify`` attaches one to each converted q/k/v triple. The first member called with an input
    x computes every member's output through ``kind_group`` and keeps the others' outputs; a member
    then called with the same x (the same tensor object, unchanged), the same labels, grad and
    autocast mode and unchanged parameters gets its kept output, exactly what its own call would
    return (graph included). Anything else (another input, a changed parameter, torch.compile) runs
    the member on its own; a new group computation drops what the previous one kept. Not a module:
    the layers stay where they are, with their own names and state-dict keys.
    """

    def __init__(self, layers: Sequence[FastKindLinear]):
        layers = list(layers)
        why = _group_problem(layers)
        if why is not None:
            raise ValueError(f"InputGroup: {why}")
        self.layers = layers
        self._kept: dict[int, tuple] = {}
        for m in layers:
            m.__dict__["_input_group"] = self

    def forget(self) -> None:
        """Drop the outputs kept for members not called yet."""
        self._kept = {}

    def detach(self) -> None:
        """Stop grouping: every member runs on its own again."""
        for m in self.layers:
            if m.__dict__.get("_input_group") is self:
                del m.__dict__["_input_group"]
        self._kept = {}

    @staticmethod
    def _state(m: FastKindLinear, x: Tensor, labels) -> tuple | None:
        """What the kept output depends on besides the identity of x and labels; None when that
        cannot be told (an inference tensor has no version counter to see an in-place change)."""
        params = (m.u_g, m.sigma_g, m.v_g, m.bias, m.u_t, m.sigma_t, m.v_t)
        if any(t is not None and t.is_inference() for t in (x, labels, *params)):
            return None
        dev = x.device.type
        return (x._version, None if labels is None else labels._version, torch.is_grad_enabled(),
                torch.is_inference_mode_enabled(), torch.is_autocast_enabled(dev),
                torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None,
                tuple(None if p is None else (p._version, p.data_ptr(), p.requires_grad) for p in params), m.training)

    def member_forward(self, layer: FastKindLinear, x: Tensor, labels: Tensor | None) -> Tensor | None:
        """``layer``'s output for ``x``: kept from the group's computation, or computed with the whole
        group now; None when it must run on its own."""
        if not isinstance(x, Tensor) or layer not in self.layers or _group_problem(self.layers) is not None:
            return None
        lab = labels if labels is not None else layer.gate.labels
        if self._state(layer, x, lab) is None:  # inference tensors: every member runs on its own
            self._kept = {}
            return None
        kept = self._kept.pop(id(layer), None)
        if kept is not None:
            kx, klab, state, out = kept
            if kx is x and klab is lab and state == self._state(layer, x, lab):
                return out
        self._kept = {}
        outs = kind_group(self.layers, x, labels)
        for m, out in zip(self.layers, outs):
            if m is not layer:
                self._kept[id(m)] = (x, lab, self._state(m, x, lab), out)
        return outs[self.layers.index(layer)]

    def __getstate__(self):
        return {"layers": self.layers, "_kept": {}}

    def __setstate__(self, state):
        self.layers = state["layers"]
        self._kept = {}
