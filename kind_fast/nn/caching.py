"""Caches of weights derived from parameters, and the scope that allows more of them.

A KIND layer's learngene weight W_G = U_Gᵀ diag(σ_G) V_G costs N_G/M of the layer's GEMM to
build (M rows). ``FastKindLinear`` keeps it across calls **while the learngenes are frozen**
(transfer, deployment), with or without a scope: the entry is valid only for the same parameter
objects with unchanged version counters and storage (it pins the storage, so a freed address
cannot match). In-place updates (optimizer steps, ``copy_`` under no_grad, ``load_state_dict``),
``to()``, ``freeze_learngenes`` and replacing a parameter (``layer.u_g = nn.Parameter(...)``,
``p.data = new``) are all seen. In-place writes **through** ``.data`` are not (``.data`` has its
own version counter): after one, call ``invalidate()``. That is the one documented exception;
diffusers' ``EMAModel.copy_to``/``restore`` on a transfer model write the trainable parameters
(tailors, heads) or frozen learngenes with their own values, so they stay correct. While the
learngenes train (pretraining), W_G is rebuilt on every call outside a scope.

Inside ``with kind_fast.weight_cache():`` more may be kept while version counters and storage
are unchanged: merged per-class weights (path M3) and W_G of trainable learngenes when no
gradient flows (sampling during pretraining). Inside a scope, do not write parameters through
``.data``, or call ``invalidate()`` after doing so. Leaving the outermost scope drops every cache.

kind_fast enters the scope where nothing writes the parameters behind its back: sampling
(``kind_fast.train.sampling.sample``) and the trainer's steps while the learngenes are frozen
(it writes the live model only through the optimizer, which never holds them). Caches are
never used while gradients flow to the learngenes, under ``torch.compile`` tracing, or (for an
inference tensor made under ``torch.inference_mode``) outside inference mode.

Measured on the 2-core CPU VM (fp32, one thread, B = 2 at 32×32 latents, depth-reduced DiT-S/2
and DiT-B/2 with the default 96 tailors), before W_G was kept outside scopes: sampling forwards
took 1.4× (S) and 2.0× (B) as long without the cache, transfer fwd+bwd 1.2× and 1.45×. The share
shrinks as N_G/M with the batch.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

__all__ = ["weight_cache", "training_scope", "enabled", "generation", "remember", "invalidate"]

_depth = 0
_generation = 0
_holders: weakref.WeakSet = weakref.WeakSet()


def enabled() -> bool:
    """Whether derived-weight caches may be used now (inside a ``weight_cache()`` scope)."""
    return _depth > 0


def generation() -> int:
    """Changes whenever caches are dropped; part of every cache key."""
    return _generation


def remember(holder) -> None:
    """Register an object with a ``clear_weight_cache()`` method to be cleared at scope exit."""
    _holders.add(holder)


def invalidate() -> None:
    """Drop every derived-weight cache now: after writing parameters through ``.data`` (inside a
    scope, or to the frozen learngenes of a layer whose W_G is kept)."""
    global _generation
    _generation += 1
    for h in list(_holders):
        h.clear_weight_cache()
    _holders.clear()


def training_scope(model):
    """``weight_cache()`` while every learngene of ``model`` is frozen (an optimizer over the
    trainable parameters never writes them, so W_G may be reused across training steps), else
    a no-op scope (trainable learngenes rebuild W_G every step anyway)."""
    # KIND layers by what they hold (importing kind_fast.nn.layers here would be an import cycle)
    kind = [m for m in model.modules() if hasattr(m, "clear_weight_cache") and hasattr(m, "u_g")]
    lg = [p for m in kind for p in (m.u_g, m.sigma_g, m.v_g)]
    return weight_cache() if lg and not any(p.requires_grad for p in lg) else contextlib.nullcontext()


@contextlib.contextmanager
def weight_cache() -> Iterator[None]:
    """Allow derived-weight caches inside this (re-entrant) scope; see the module docstring.
    Also usable as a decorator."""
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            invalidate()
