"""Shared test and benchmark utilities: an independent oracle, class distributions, and the
tolerance rule (docs/design.md §8). Imported by tests/ and bench/, never by the package itself."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from kind_fast.nn.gate import ClassGate

DISTRIBUTIONS = ("same", "cfg", "uniform", "zipf", "distinct")
GATE_KINDS = ("block", "random_k", "dense", "dense_trainable", "all_on")
# absolute floor added to "2 × PyTorch's own error" (FlashAttention's rule)
ATOL_FLOOR = {torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float32: 1e-4, torch.float64: 1e-10}


def make_labels(dist: str, batch: int, num_classes: int, *, generator: torch.Generator | None = None) -> Tensor:
    """(batch,) int64 labels in [0, num_classes] (num_classes = null) drawn from ``dist``:

    same      every sample the same class
    cfg       first half one class, second half the null class (a CFG sampling batch)
    uniform   uniform over the real classes and the null class
    zipf      Zipf-like (p ∝ 1/(c+1)^1.2): a few popular classes, a long tail
    distinct  all different (needs batch <= num_classes + 1)
    """
    g = generator
    if dist == "same":
        c = int(torch.randint(0, num_classes, (1,), generator=g))
        return torch.full((batch,), c, dtype=torch.long)
    if dist == "cfg":
        c = int(torch.randint(0, num_classes, (1,), generator=g))
        half = batch - batch // 2
        return torch.cat([torch.full((half,), c), torch.full((batch - half,), num_classes)]).long()
    if dist == "uniform":
        return torch.randint(0, num_classes + 1, (batch,), generator=g)
    if dist == "zipf":
        p = 1.0 / torch.arange(1, num_classes + 2, dtype=torch.float64) ** 1.2
        return torch.multinomial(p, batch, replacement=True, generator=g)
    if dist == "distinct":
        if batch > num_classes + 1:
            raise ValueError(f"distinct needs batch <= {num_classes + 1}, got {batch}")
        return torch.randperm(num_classes + 1, generator=g)[:batch]
    raise ValueError(f"unknown distribution {dist!r}; choose from {DISTRIBUTIONS}")


def make_gate(kind: str, num_classes: int, tailor_rank: int, active: int, *, seed: int = 0) -> ClassGate:
    """A gate of each kind the package supports (dense ones with random real values)."""
    if kind == "block":
        return ClassGate.block(num_classes, tailor_rank, active)
    if kind == "random_k":
        return ClassGate.random_k(num_classes, tailor_rank, active, seed=seed, null="class")
    if kind in ("dense", "dense_trainable"):
        g = torch.Generator().manual_seed(seed)
        table = torch.randn(num_classes, tailor_rank, generator=g)
        if kind == "dense":  # sparse soft gate: `active` random nonzeros per class
            keep = torch.rand(num_classes, tailor_rank, generator=g).argsort(1) < active
            table = table * keep
        return ClassGate.dense(table, null_row=torch.randn(tailor_rank, generator=g) * 0.5,
                               trainable=kind == "dense_trainable")
    if kind == "all_on":
        return ClassGate.all_on(num_classes, tailor_rank)
    raise ValueError(f"unknown gate kind {kind!r}; choose from {GATE_KINDS}")


def naive_kind_linear(x, w_g, bias, u_t, sigma_t, v_t, idx, val, labels) -> Tensor:
    """Oracle written independently of the reference: one dense weight per sample, float64.

    x (M, in) with M = B·T; returns (M, out) float64. Slow; for tests only.
    """
    b = labels.shape[0]
    t = x.shape[0] // b
    n_t = u_t.shape[0]
    outs = []
    for i in range(b):
        c = int(labels[i])
        g = torch.zeros(n_t, dtype=torch.float64, device=x.device)
        g = g.index_add(0, idx[c].long(), val[c].double())
        w = w_g.double() + u_t.double().t() @ torch.diag(sigma_t.double() * g) @ v_t.double()
        y = x[i * t:(i + 1) * t].double() @ w.t()
        if bias is not None:
            y = y + bias.double()
        outs.append(y)
    return torch.cat(outs, 0)


def max_err(a: Tensor, b: Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_to_oracle(out: Tensor, oracle: Tensor, torch_lowp: Tensor, dtype: torch.dtype, what: str = "") -> None:
    """FlashAttention's rule: |out - oracle| <= 2·|torch_lowp - oracle| + floor(dtype).

    ``oracle`` is the reference in float32/float64, ``torch_lowp`` the reference run in the
    input dtype: a fused backend may be as wrong as PyTorch itself is, twice over, no more.
    """
    err = max_err(out, oracle)
    base = max_err(torch_lowp, oracle)
    bound = 2 * base + ATOL_FLOOR[dtype] * max(1.0, oracle.abs().max().item() if oracle.numel() else 1.0)
    if not err <= bound:
        raise AssertionError(f"{what}: max error {err:.3e} > bound {bound:.3e} (torch's own error {base:.3e})")


@contextmanager
def routed_labels(model: torch.nn.Module) -> Iterator[list[Tensor]]:
    """Record the labels every KIND layer of ``model`` uses while the block runs (given as
    ``labels=`` or read from the gate), one entry per layer call."""
    from kind_fast.nn.layers import FastKindLinear

    seen: list[Tensor] = []

    def hook(module, args, kwargs):
        labels = kwargs.get("labels", args[1] if len(args) > 1 else None)
        seen.append(labels if labels is not None else module.gate.labels)

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in model.modules()
               if isinstance(m, FastKindLinear)]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def perturbed(model: torch.nn.Module, std: float = 0.05, *, trainable_only: bool = False) -> torch.nn.Module:
    """Add N(0, std²) noise to every parameter (or only the trainable ones) in place, in parameter
    order from the global RNG; returns the model. DiT's adaLN-Zero init makes every block the
    identity and the output zero, which would let comparisons pass for the wrong reason."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad or not trainable_only:
                p.add_(torch.randn_like(p) * std)
    return model


def tiny_dit(seed: int = 0, num_classes: int = 6, kind=None, **kwargs) -> torch.nn.Module:
    """A small ``kind_fast.models.dit.DiT`` (8×8×2 inputs, width 32, depth 2, 4 heads; ``kwargs``
    override), built after ``torch.manual_seed(seed)``, in eval mode, ``perturbed``. Dense unless
    ``kind`` (a KindConfig) is given."""
    from kind_fast.models.dit import DiT

    torch.manual_seed(seed)
    args = dict(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=2, num_heads=4,
                num_classes=num_classes, kind=kind)
    return perturbed(DiT(**{**args, **kwargs}).eval())


@contextmanager
def single_thread() -> Iterator[None]:
    """Run the block with one intra-op thread. Tiny models are dominated by per-op overhead,
    and on a shared 2-core machine two OpenMP threads waiting on a busy core ran 5-10× slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
