"""FastKindLinear: a drop-in nn.Linear stored as KIND components.

    W_c = U_Gᵀ diag(σ_G) V_G  +  U_Tᵀ diag(σ_T ⊙ g_c) V_T          (nn.Linear layout: out × in)

Parameters are component-major (docs/design.md §2): ``u_g`` (N_G, out), ``sigma_g`` (N_G,), ``v_g``
(N_G, in) are the learngenes; ``u_t``, ``sigma_t``, ``v_t`` the tailors; ``bias`` (out,) is
class-agnostic and counted with the learngenes. The class gate g is a shared ``ClassGate``
(not registered as a submodule here, so one gate serves every layer of a model and is saved
once); the layer reads labels from ``labels=`` or from ``gate.labels``.

Forward: the op family's entry point (``kind_fast.ops.paths.kind_linear_layer``) picks the path
from the call's shapes (docs/design.md §2). On path M1, W_G is materialised (in float32, then
cast), then one ``kind_linear`` op adds the gathered, gated tailor term. W_G is rebuilt on every
call unless the caller opened a ``kind_fast.weight_cache()`` scope (``kind_fast.caching``): a
cache outside such a scope could go stale when parameters are written through ``.data``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kind_fast import caching
from kind_fast.gate import ClassGate
from kind_fast.merged_cache import MergedWeightCache, tokens
from kind_fast.ops.kind_linear import SUPPORTED_DTYPES, acc_dtype
from kind_fast.ops.paths import kind_linear_layer

__all__ = ["FastKindLinear"]

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
        """Freeze (or unfreeze) U_G, σ_G, V_G and the bias, as in KIND transfer."""
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

        Built from the current parameters on every call, except inside a
        ``kind_fast.weight_cache()`` scope, where it is reused while the learngenes' version
        counters and storage are unchanged (see ``kind_fast.caching``). Never cached while
        gradients flow to the learngenes or under ``torch.compile``; a W_G cached under
        ``torch.inference_mode`` is not reused outside it.
        """
        dtype = self.u_g.dtype if dtype is None else dtype
        lg = (self.u_g, self.sigma_g, self.v_g)
        tracks_grad = torch.is_grad_enabled() and any(p.requires_grad for p in lg)
        if tracks_grad or torch.compiler.is_compiling() or not caching.enabled():
            return self._learngene_weight_fresh(dtype)
        key = (caching.generation(), dtype, self.u_g.device) + tuple((p._version, p.data_ptr()) for p in lg)
        hit = self._wg_cache
        if hit is not None and hit[0] == key and (torch.is_inference_mode_enabled() or not hit[1].is_inference()):
            return hit[1]
        with torch.no_grad():
            w = self._learngene_weight_fresh(dtype)
        self._wg_cache = (key, w)
        caching.remember(self)
        return w

    def clear_weight_cache(self) -> None:
        """Drop the cached W_G and merged per-class weights (``kind_fast.caching.invalidate``
        does it for every layer, and leaving the outermost ``weight_cache()`` scope too)."""
        self._wg_cache = None
        self.merged_cache.clear()

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
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(f"x must have last dimension {self.in_features}, got shape {tuple(x.shape)}")
        if torch.is_autocast_enabled(x.device.type):
            dt = torch.get_autocast_dtype(x.device.type)
        else:
            dt = self.u_g.dtype
            if x.dtype != dt:
                raise TypeError(
                    f"FastKindLinear: input dtype {x.dtype} != parameter dtype {dt}; cast the input "
                    "or the layer, or run under torch.autocast"
                )
        gate = self.gate
        if gate is None:
            w_g = self.learngene_weight(dt)
            if self.tailor_rank == 0:
                return F.linear(x, w_g, self.bias.to(dt) if self.bias is not None else None)
            # no gate: every tailor always on, i.e. one dense weight
            acc = acc_dtype(self.u_t.dtype)
            w_t = (self.u_t.t().to(acc) * self.sigma_t.to(acc)) @ self.v_t.to(acc)
            bias = self.bias.to(dt) if self.bias is not None else None
            return F.linear(x, w_g + w_t.to(dt), bias)
        if labels is None:
            labels = gate.labels
            if labels is None:
                raise ValueError(
                    "FastKindLinear has a class gate but got no labels: pass labels=, or call it inside a "
                    "kindified model's forward (its hook routes the model's class labels)"
                )
        self._check_input(x, labels)
        if labels.device != x.device:
            labels = labels.to(x.device, non_blocking=True)
        idx, val = gate.compiled(x.device)
        # the op family picks the path (M0-M4) from shapes and the batch's classes; W_G comes
        # from this layer's cache, merged per-class weights (M3) from its merged-weight cache.
        # Both caches live only inside a kind_fast.weight_cache() scope (kind_fast.caching), so
        # writes that bypass version counters (param.data) can never leave them stale.
        merged = None
        if caching.enabled() and not torch.compiler.is_compiling():
            merged = self.merged_cache
            caching.remember(self)
        return kind_linear_layer(x, labels, u_g=self.u_g, sigma_g=self.sigma_g, v_g=self.v_g, bias=self.bias,
                                 u_t=self.u_t, sigma_t=self.sigma_t, v_t=self.v_t, idx=idx, val=val,
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

    def _check_input(self, x: Tensor, labels) -> None:
        """Labels and the one accepted layout: x is (B, ..., in) with B = len(labels), and
        x[b] holds the rows of sample b (class labels[b]), as for nn.Linear with a batch
        dimension. A 2-D x is (B, in), one row per sample; flattened rows are not regrouped."""
        from kind_fast.gate import check_labels
        from kind_fast.ops.kind_linear import sample_rows

        check_labels(labels, self.gate.num_classes)
        sample_rows(x, labels, None, who="FastKindLinear")

    def _apply(self, fn, recurse=True):
        self._wg_cache = None
        self.merged_cache.clear()
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        gate = "none (all tailors on)" if self.gate is None else self.gate.kind
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, learngene_rank={self.learngene_rank}, "
            f"tailor_rank={self.tailor_rank}, gate={gate}"
        )
