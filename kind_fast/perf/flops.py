"""Analytic FLOP model of DiT training and sampling: KIND, full fine-tuning, LoRA, SVDiff, and
the learngene baselines Heur-LG and TLEG.

Units (every number says which):
    MAC   one multiply-accumulate. DiT's paper "Gflops" are GMACs (forward, per image, attention
          score/value matmuls included): S/2 6.06, B/2 23.01, L/2 80.71, XL/2 118.64 at 256×256.
    FLOP  2 × MAC, what ``torch.utils.flop_counter.FlopCounterMode`` reports.

What is counted: the GEMM-shaped work, i.e. linear layers, the patch-embedding convolution, the
two attention matmuls (QKᵀ and PV), and for KIND/SVDiff the materialisation of a factored weight
(W = Uᵀ diag(σ) V) and its backward. Elementwise work (norms, activations, softmax, modulation,
the loss, the optimizer) is not counted, in line with DiT's table and with FlopCounterMode.

Per image vs per step. Work on activations scales with the number of images; the
materialisation of W_G (KIND pretraining) or W (SVDiff) and the projection of dW onto the
factors happen once per layer per training step, whatever the batch. ``ModelFlops.macs(per=
"image")`` amortises those per-step terms over ``batch`` images (the per-device micro-batch:
DiT's recipe is 256 images over 8 GPUs, so the default is 32); ``per="step"`` gives the total of
one step at that batch.

Backward split. ``dx`` holds activation gradients (dX of every layer, attention backward, and
KIND's dh = dY·U_Tᵀ that dX and dV_T share); ``dw`` holds parameter gradients (dW, dU_T, dV_T,
LoRA's dA/dB, the projection of dW_G onto U_G, σ_G, V_G). The first layers whose inputs are
data (the patch embedding's conv and the timestep MLP's first linear) never compute dX,
because autograd does not ask for it.

What each mode computes in this package (``kind_fast.models.dit``, ``kind_fast.models.baselines``):
    dense      a dense DiT, inference forward (DiT's table)
    kind       a KIND-DiT, inference forward: cached W_G GEMM + K active tailors (shrink+expand)
    full_ft    dense DiT, everything trains: forward, dX and dW for every layer (~3× forward)
    pretrain   KIND-DiT, everything trains: W_G materialised every step (out·N_G·in), one dense
               GEMM + K tailors per row; backward dX, dW_G (projected: 2·out·N_G·in per step),
               dU_T, dV_T, dσ_T; every dense layer trains as in full_ft
    transfer   KIND-DiT, learngenes frozen: W_G cached (materialised once, not per step), backward
               dX, dU_T, dV_T, dσ_T, no dW_G; label table and final layer train, the rest frozen
    lora       dense DiT, frozen base (dX only) + rank-r adapters on qkv/proj/fc1/fc2 (forward
               and both adapter gradients); label table and final layer train
    svdiff     dense DiT whose block linears are spectral layers: W = Uᵀ diag(σ) V materialised
               every step, dense forward, dX and dW (dW is needed for dσ = diag(U dW Vᵀ)), plus
               the projection out·in·r per step; label table and final layer train
  learngene baselines (``LEARNGENE_MODES``, ``kind_fast.models.baselines``):
    heur_lg    Heur-LG's descendant: a dense DiT (inherited top blocks, fresh lower ones) that
               trains every weight: the cost and trainable count of full_ft
    tleg       TLEG's descendant: the ancestry expanded to a dense DiT, every weight trains:
               full_ft again
    tleg_pretrain  TLEG's ancestry: a dense DiT's GEMMs (each block runs θ_A + (l/L)·θ_B, an
               elementwise expansion that, like the optimizer, is not counted) with the block
               parameters stored and trained twice, not L times (θ_A, θ_B)

The KIND terms reuse the FLOP formulas registered for the custom op
(``kind_fast.ops.kind_linear.kind_linear_flops``): forward 2·M·in·out + 2·M·K·(in + out), with
K active tailors per row. ``flop_counter()`` is FlopCounterMode with formulas for the CPU
attention kernels (which torch leaves uncounted), so counted and analytic numbers are comparable
on any device. ``kind-fast flops`` prints the comparison table and writes markdown and a plot.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from kind_fast.models.dit import DiT_models, KindConfig
from kind_fast.ops.kind_linear import kind_linear_flops

__all__ = [
    "MODES",
    "TRAIN_MODES",
    "LEARNGENE_MODES",
    "ALL_MODES",
    "DIT_PAPER_GMACS",
    "PAPER_TRANSFER",
    "Cost",
    "ModelFlops",
    "dit_flops",
    "flops_table",
    "transfer_saving",
    "baseline_savings",
    "paper_conventions",
    "flop_counter",
    "count_flops",
    "format_markdown",
    "write_flops_report",
]

TRAIN_MODES = ("full_ft", "pretrain", "transfer", "lora", "svdiff")
INFERENCE_MODES = ("dense", "kind")
MODES = INFERENCE_MODES + TRAIN_MODES
# training modes of the learngene baselines (dense DiTs; kept apart from TRAIN_MODES, which the
# benchmarks build one model per mode for)
LEARNGENE_MODES = ("heur_lg", "tleg", "tleg_pretrain")
ALL_MODES = MODES + LEARNGENE_MODES
MODE_TITLES = {
    "dense": "dense DiT, inference",
    "kind": "KIND-DiT, inference",
    "full_ft": "full fine-tuning",
    "pretrain": "KIND pretraining",
    "transfer": "KIND transfer",
    "lora": "LoRA",
    "svdiff": "SVDiff",
    "heur_lg": "Heur-LG",
    "tleg": "TLEG",
    "tleg_pretrain": "TLEG ancestry pretraining",
}
SIZES = ("DiT-S/2", "DiT-B/2", "DiT-L/2", "DiT-XL/2")

# DiT paper (Peebles & Xie 2023), forward "Gflops" = GMACs per image; key (model, image size).
DIT_PAPER_GMACS = {
    ("DiT-S/2", 256): 6.06, ("DiT-S/4", 256): 1.42, ("DiT-S/8", 256): 0.36,
    ("DiT-B/2", 256): 23.01, ("DiT-B/4", 256): 5.57, ("DiT-B/8", 256): 1.42,
    ("DiT-L/2", 256): 80.71, ("DiT-L/4", 256): 19.71, ("DiT-L/8", 256): 5.01,
    ("DiT-XL/2", 256): 118.64, ("DiT-XL/4", 256): 29.06, ("DiT-XL/8", 256): 7.40,
    ("DiT-XL/2", 512): 524.60,
}
# KIND v1 abstract (DiT-L/2): trainable parameters and "saves at least 35.4 GFLOPs". The FLOP
# convention behind 35.4 is not public: no setting here is tuned to it (docs/flops.md).
PAPER_TRANSFER = {"model": "DiT-L/2", "trainable_params": 45.4e6, "saved_gflops": 35.4,
                  "pretrain_classes": 150, "novel_classes": 461}

VAE_FACTOR = 8  # 256×256 images are 32×32×4 latents
FREQ_SIZE = 256  # sinusoidal timestep features


# =====================================================================================
# Cost records
# =====================================================================================
@dataclass(frozen=True)
class Cost:
    """MACs of one layer site (``count`` identical layers, e.g. one per block), summed.

    ``fwd``, ``dx``, ``dw`` are per image; ``step_fwd`` (materialising a factored weight) and
    ``step_bwd`` (projecting its gradient onto the factors) are per training step.
    """

    name: str
    count: int = 1
    fwd: int = 0
    dx: int = 0
    dw: int = 0
    step_fwd: int = 0
    step_bwd: int = 0
    params: int = 0
    trainable: int = 0


PARTS = ("fwd", "dx", "dw", "bwd", "train")


@dataclass
class ModelFlops:
    """Analytic FLOPs of one DiT config in one mode; see the module docstring for units."""

    model: str
    mode: str
    image_size: int
    batch: int
    tokens: int
    costs: tuple[Cost, ...] = field(default_factory=tuple)
    num_classes: int = 1000

    def _image_step(self, part: str) -> tuple[int, int]:
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}")
        f = sum(c.fwd for c in self.costs)
        dx = sum(c.dx for c in self.costs)
        dw = sum(c.dw for c in self.costs)
        sf = sum(c.step_fwd for c in self.costs)
        sb = sum(c.step_bwd for c in self.costs)
        return {
            "fwd": (f, sf), "dx": (dx, 0), "dw": (dw, sb), "bwd": (dx + dw, sb),
            "train": (f + dx + dw, sf + sb),
        }[part]

    def macs(self, part: str = "train", per: str = "image") -> float:
        """MACs of ``part`` (fwd, dx, dw, bwd = dx + dw, train = fwd + bwd) per image (per-step
        terms amortised over ``batch``) or per step (``batch`` images + per-step terms)."""
        img, step = self._image_step(part)
        if per == "image":
            return img + step / self.batch
        if per == "step":
            return img * self.batch + step
        raise ValueError(f"per must be 'image' or 'step', got {per!r}")

    def flops(self, part: str = "train", per: str = "image") -> float:
        """FLOPs (= 2 × MACs)."""
        return 2 * self.macs(part, per)

    def gmacs(self, part: str = "train", per: str = "image") -> float:
        return self.macs(part, per) / 1e9

    def gflops(self, part: str = "train", per: str = "image") -> float:
        return self.flops(part, per) / 1e9

    @property
    def params(self) -> int:
        return sum(c.params for c in self.costs)

    @property
    def trainable_params(self) -> int:
        return sum(c.trainable for c in self.costs)

    def with_batch(self, batch: int) -> ModelFlops:
        return replace(self, batch=_check_pos("batch", batch))

    def summary(self) -> dict:
        """Flat dict of the headline numbers (GMAC/GFLOP per image and per step)."""
        out = dict(model=self.model, mode=self.mode, image_size=self.image_size, batch=self.batch,
                   params=self.params, trainable_params=self.trainable_params)
        for part in PARTS:
            out[f"{part}_gmac_per_image"] = self.gmacs(part, "image")
        out["train_gflop_per_image"] = self.gflops("train", "image")
        out["train_tflop_per_step"] = self.flops("train", "step") / 1e12
        out["per_step_gmac"] = self._image_step("train")[1] / 1e9
        return out


def _check_pos(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    return v


# =====================================================================================
# Per-layer costs
# =====================================================================================
def _linear(name, n_in, n_out, rows, count, *, dx: bool, dw: bool, bias: bool = True) -> Cost:
    """nn.Linear applied to ``rows`` rows per image: fwd = dX = dW = rows·in·out MACs."""
    mac = rows * n_in * n_out * count
    p = (n_in * n_out + (n_out if bias else 0)) * count
    return Cost(name, count, fwd=mac, dx=mac if dx else 0, dw=mac if dw else 0,
                params=p, trainable=p if dw else 0)


def _lora(name, n_in, n_out, rows, count, rank: int, training: bool) -> Cost:
    """Frozen base (dX only) + adapter x·Aᵀ·Bᵀ: fwd r·(in+out); backward dh = g·B and
    dX_adapter = dh·A (dx), dB = gᵀh and dA = dhᵀx (dw)."""
    base = rows * n_in * n_out * count
    ad = rows * rank * (n_in + n_out) * count
    p_base = (n_in * n_out + n_out) * count
    p_ad = rank * (n_in + n_out) * count
    return Cost(name + " (LoRA r=%d)" % rank, count, fwd=base + ad,
                dx=(base + ad) if training else 0, dw=ad if training else 0,
                params=p_base + p_ad, trainable=p_ad if training else 0)


def _svdiff(name, n_in, n_out, rows, count, training: bool) -> Cost:
    """W = Uᵀ diag(σ) V (r = min(in, out)) materialised every step, then a dense layer whose
    dW feeds dσ through the projection dA = dW·Vᵀ (out·in·r per step)."""
    r = min(n_in, n_out)
    mac = rows * n_in * n_out * count
    mat = n_out * r * n_in * count
    p = (r * (n_in + n_out + 1) + n_out) * count
    return Cost(name + " (SVDiff)", count, fwd=mac, dx=mac if training else 0,
                dw=mac if training else 0, step_fwd=mat if training else 0,
                step_bwd=mat if training else 0, params=p, trainable=r * count if training else 0)


def _kind(name, n_in, n_out, rows, count, kind: KindConfig, mode: str) -> Cost:
    """A FastKindLinear (path M1) from the op's registered FLOP formulas (FLOPs / 2 = MACs)."""
    n_t = kind.tailor_rank
    n_g = min(n_in, n_out) - n_t if kind.learngene_rank is None else kind.learngene_rank
    k = n_t if kind.gate == "all_on" else kind.active
    fwd = kind_linear_flops(rows, n_in, n_out, k) // 2 * count
    p_lg = n_g * (n_in + n_out + 1) + n_out  # U_G, V_G, σ_G and the bias (learngene side)
    p_t = n_t * (n_in + n_out + 1)
    params = (p_lg + p_t) * count
    if mode == "kind":
        return Cost(name + " (KIND)", count, fwd=fwd, params=params)
    pretrain = mode == "pretrain"
    # output_mask order: dx, dw_g, dbias, du_t, dsigma_t, dv_t, dval (fixed gate: no dval)
    mask = [True, pretrain, pretrain, True, True, True, False]
    bwd = kind_linear_flops(rows, n_in, n_out, k, mask) // 2 * count
    dx = kind_linear_flops(rows, n_in, n_out, k, [True] + [False] * 6) // 2 * count
    mat = n_out * n_g * n_in * count
    return Cost(name + " (KIND)", count, fwd=fwd, dx=dx, dw=bwd - dx,
                step_fwd=mat if pretrain else 0, step_bwd=2 * mat if pretrain else 0,
                params=params, trainable=params if pretrain else p_t * count)


def _attention(tokens: int, dim: int, count: int, training: bool) -> Cost:
    """QKᵀ and PV: 2·T²·d MACs forward; backward dQ, dK, dP, dV: 4·T²·d (no recomputation)."""
    f = 2 * tokens * tokens * dim * count
    return Cost("blocks.*.attn (QKᵀ, PV)", count, fwd=f, dx=2 * f if training else 0)


# =====================================================================================
# The model
# =====================================================================================
def dit_flops(
    model: str = "DiT-XL/2",
    mode: str = "full_ft",
    *,
    image_size: int = 256,
    batch: int = 32,
    kind: KindConfig | None = None,
    lora_rank: int = 8,
    num_classes: int = 1000,
    in_channels: int = 4,
    learn_sigma: bool = True,
    depth: int | None = None,
) -> ModelFlops:
    """Analytic FLOPs of ``model`` (a name in ``kind_fast.models.dit.DiT_models``) in ``mode``.

    Args:
        mode: dense / kind (inference) or full_ft / pretrain / transfer / lora / svdiff.
        image_size: pixels; the latent is image_size / 8 (DiT's VAE), e.g. 256 → 32×32.
        batch: images per step per device, over which per-step terms are amortised.
        kind: KIND decomposition (default ``KindConfig()``: N_T = 96, K = 32, split q/k/v).
        lora_rank: LoRA rank r. num_classes: label table size (C + 1 rows with the null class).
        depth: override the config's depth (reduced models for CPU benchmarks).
    """
    if model not in DiT_models:
        raise ValueError(f"unknown DiT config {model!r}; choose one of {sorted(DiT_models)}")
    if mode not in ALL_MODES:
        raise ValueError(f"mode must be one of {ALL_MODES}, got {mode!r}")
    _check_pos("image_size", image_size)
    _check_pos("batch", batch)
    _check_pos("lora_rank", lora_rank)
    _check_pos("num_classes", num_classes)
    kind = KindConfig() if kind is None else kind
    if not isinstance(kind, KindConfig):
        raise TypeError(f"kind must be a KindConfig, got {type(kind).__name__}")
    n_depth, d, _heads, p = DiT_models[model]
    n_depth = n_depth if depth is None else _check_pos("depth", depth)
    if image_size % (VAE_FACTOR * p):
        raise ValueError(f"image_size {image_size} must be a multiple of {VAE_FACTOR * p} "
                         f"for {model}")
    grid = image_size // VAE_FACTOR // p
    t = grid * grid
    c_in, c_out = in_channels, (2 if learn_sigma else 1) * in_channels
    training = mode in TRAIN_MODES or mode in LEARNGENE_MODES
    full = mode in ("full_ft", "pretrain") or mode in LEARNGENE_MODES  # every parameter trains

    costs: list[Cost] = []
    patch = d * c_in * p * p
    conv = t * patch
    costs.append(Cost("x_embedder.proj (conv)", 1, fwd=conv, dw=conv if full else 0,
                      params=patch + d, trainable=patch + d if full else 0))
    costs.append(_linear("t_embedder.mlp.0", FREQ_SIZE, d, 1, 1, dx=False, dw=full))
    costs.append(_linear("t_embedder.mlp.2", d, d, 1, 1, dx=full, dw=full))
    emb = (num_classes + 1) * d
    costs.append(Cost("y_embedder (lookup)", 1, params=emb, trainable=emb if training else 0))
    costs.append(_linear("blocks.*.adaLN_modulation.1", d, 6 * d, 1, n_depth, dx=training, dw=full))

    if mode in ("kind", "pretrain", "transfer"):
        qkv = ([("blocks.*.attn.q", d, d), ("blocks.*.attn.k", d, d), ("blocks.*.attn.v", d, d)]
               if kind.qkv == "split" else [("blocks.*.attn.qkv", d, 3 * d)])
    else:
        qkv = [("blocks.*.attn.qkv", d, 3 * d)]
    hidden = 4 * d
    shapes = qkv + [("blocks.*.attn.proj", d, d), ("blocks.*.mlp.fc1", d, hidden),
                    ("blocks.*.mlp.fc2", hidden, d)]
    for name, n_in, n_out in shapes:
        if mode in ("dense", "full_ft") or mode in LEARNGENE_MODES:
            costs.append(_linear(name, n_in, n_out, t, n_depth, dx=training, dw=training))
        elif mode == "lora":
            costs.append(_lora(name, n_in, n_out, t, n_depth, lora_rank, training))
        elif mode == "svdiff":
            costs.append(_svdiff(name, n_in, n_out, t, n_depth, training))
        else:
            costs.append(_kind(name, n_in, n_out, t, n_depth, kind, mode))
    costs.append(_attention(t, d, n_depth, training))

    tr = dict(dx=training, dw=training)  # the final layer trains in every training mode
    costs.append(_linear("final_layer.adaLN_modulation.1", d, 2 * d, 1, 1, **tr))
    costs.append(_linear("final_layer.linear", d, p * p * c_out, t, 1, **tr))
    if mode == "tleg_pretrain":  # the blocks' parameters are θ_A and θ_B: two blocks' worth, not depth
        costs = [replace(c, params=c.params // c.count * 2, trainable=c.trainable // c.count * 2)
                 if c.name.startswith("blocks.") else c for c in costs]
    if mode == "lora":  # PEFT's modules_to_save trains copies of the heads and keeps the originals (frozen)
        heads = emb + (d * 2 * d + 2 * d) + (d * p * p * c_out + p * p * c_out)
        costs.append(Cost("heads (PEFT modules_to_save originals)", 1, params=heads))
    return ModelFlops(model=model, mode=mode, image_size=image_size, batch=batch, tokens=t,
                      costs=tuple(costs), num_classes=num_classes)


def flops_table(
    models: Sequence[str] = SIZES,
    modes: Sequence[str] = MODES,
    **kwargs,
) -> list[ModelFlops]:
    """``dit_flops`` for every (model, mode) pair, models outermost."""
    return [dit_flops(m, mode, **kwargs) for m in models for mode in modes]


def transfer_saving(model: str = "DiT-L/2", *, baseline: str = "full_ft", mode: str = "transfer",
                    num_classes: int = 461, **kwargs) -> dict:
    """What ``mode`` saves against ``baseline`` per image per training step, in GMACs and
    GFLOPs, plus the trainable parameters of ``mode`` (461 novel classes by default)."""
    base = dit_flops(model, baseline, num_classes=num_classes, **kwargs)
    ours = dit_flops(model, mode, num_classes=num_classes, **kwargs)
    return dict(
        model=model, mode=mode, baseline=baseline, batch=base.batch,
        trainable_params=ours.trainable_params,
        baseline_train_gmac=base.gmacs("train"), train_gmac=ours.gmacs("train"),
        saved_gmac=base.gmacs("train") - ours.gmacs("train"),
        saved_gflop=base.gflops("train") - ours.gflops("train"),
        saved_fwd_gmac=base.gmacs("fwd") - ours.gmacs("fwd"),
        ratio=ours.macs("train") / base.macs("train"),
    )


BASELINES = ("full_ft", "lora", "svdiff", "heur_lg", "tleg")


def baseline_savings(models: Sequence[str] = SIZES, *, batch: int = 32, num_classes: int = 461,
                     **kwargs) -> list[dict]:
    """KIND transfer against every baseline (full fine-tuning, LoRA, SVDiff): GFLOP (2 × MAC)
    per image per training step of each, and what KIND saves (negative: KIND costs more)."""
    rows = []
    for m in models:
        ours = dit_flops(m, "transfer", batch=batch, num_classes=num_classes, **kwargs)
        for b in BASELINES:
            base = dit_flops(m, b, batch=batch, num_classes=num_classes, **kwargs)
            rows.append(dict(model=m, baseline=b, baseline_gflop=base.gflops("train"),
                             kind_gflop=ours.gflops("train"),
                             saved_gflop=base.gflops("train") - ours.gflops("train"),
                             ratio=ours.macs("train") / base.macs("train")))
    return rows


def format_savings(rows: Sequence[dict]) -> str:
    lines = ["| model | baseline | baseline GFLOP/img | KIND transfer GFLOP/img | KIND saves GFLOP/img "
             "| KIND / baseline |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['baseline']} | {r['baseline_gflop']:.1f} | {r['kind_gflop']:.1f} | "
              f"{r['saved_gflop']:.1f}{' (KIND costs more)' if r['saved_gflop'] < 0 else ''} | {r['ratio']:.3f} |"
              for r in rows]
    return "\n".join(lines)


def paper_conventions(models: Sequence[str] = ("DiT-B/2", "DiT-L/2"), *, batch: int = 32,
                      num_classes: int = 461) -> list[dict]:
    """The saving of KIND transfer against full fine-tuning under each candidate reading of
    "saves at least 35.4 GFLOPs" (unit × scope × per), for ``models``."""
    rows = []
    for m in models:
        base = dit_flops(m, "full_ft", batch=batch, num_classes=num_classes)
        ours = dit_flops(m, "transfer", batch=batch, num_classes=num_classes)
        for scope, part in (("forward only", "fwd"), ("training step (fwd + bwd)", "train")):
            for per in ("image", "step"):
                saved_mac = base.macs(part, per) - ours.macs(part, per)
                for unit, scale in (("GMAC", 1), ("GFLOP", 2)):
                    v = saved_mac * scale / 1e9
                    where = "per image" if per == "image" else f"per step (batch {batch})"
                    rows.append(dict(model=m, unit=unit, scope=scope, per=where, saved=v,
                                     meets=v >= PAPER_TRANSFER["saved_gflops"]))
    return rows


# =====================================================================================
# Counting with torch.utils.flop_counter
# =====================================================================================
def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    """CPU flash attention forward: QKᵀ and PV (torch's convention for the CUDA kernels)."""
    b, h, s_q, e = query_shape
    s_k, e_v = key_shape[-2], value_shape[-1]
    return 2 * b * h * s_q * s_k * (e + e_v)


def _sdpa_cpu_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args,
                            **kwargs) -> int:
    """dV = Pᵀ·dO, dP = dO·Vᵀ, dQ = dS·K, dK = dSᵀ·Q (no recomputation, as torch counts)."""
    return 2 * _sdpa_cpu_flop(query_shape, key_shape, value_shape)


def _addmm_inplace_flop(self_shape, a_shape, b_shape, *args, **kwargs) -> int:
    """In-place addmm_ / baddbmm_: 2 · (batch ·) m · k · n."""
    return 2 * math.prod(a_shape) * b_shape[-1]


def flop_counter(display: bool = False, **kwargs):
    """``FlopCounterMode`` that also counts the CPU attention kernels and in-place GEMMs.

    torch registers FLOP formulas for the CUDA SDPA kernels only; on the CPU
    ``_scaled_dot_product_flash_attention_for_cpu`` (and its backward) would count 0, and so
    would the in-place ``addmm_`` / ``baddbmm_`` (the kind_linear reference uses them; inside
    the registered op only the op's own formula counts). The formulas are passed as
    ``custom_mapping``: nothing global changes, and torch's own formula wins where one exists.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode, flop_registry

    mapping = dict(kwargs.pop("custom_mapping", {}) or {})
    aten = torch.ops.aten
    sdpa = "_scaled_dot_product_flash_attention_for_cpu"
    for op_name, fn in ((sdpa, _sdpa_cpu_flop), (sdpa + "_backward", _sdpa_cpu_backward_flop),
                        ("addmm_", _addmm_inplace_flop), ("baddbmm_", _addmm_inplace_flop)):
        op = getattr(aten, op_name, None)
        if op is not None and op not in flop_registry:
            mapping.setdefault(op, fn)
    return FlopCounterMode(display=display, custom_mapping=mapping, **kwargs)


def count_flops(model, x, t, y, *, optimizer=None, loss_fn=None, custom_mapping=None) -> dict[str, int]:
    """Count one forward (and, with ``loss_fn`` or ``optimizer``, one training step) with
    ``flop_counter()``. Returns FLOPs: {"fwd"} or {"fwd", "bwd", "train"}.

    ``loss_fn(out) -> scalar`` defaults to the mean square of the output (no GEMMs).
    ``custom_mapping``: FLOP formulas {op: fn} that replace the registered ones (FlopCounterMode's).
    """
    train = optimizer is not None or loss_fn is not None
    with flop_counter(custom_mapping=custom_mapping) as fc:
        out = model(x, t, y)
    fwd = fc.get_total_flops()
    if not train:
        return {"fwd": fwd}
    loss = loss_fn(out) if loss_fn is not None else out.float().square().mean()
    with flop_counter(custom_mapping=custom_mapping) as fc:
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    bwd = fc.get_total_flops()
    return {"fwd": fwd, "bwd": bwd, "train": fwd + bwd}


# =====================================================================================
# Report: table, markdown, plot
# =====================================================================================
COLUMNS = (
    ("model", "model"), ("mode", "mode"), ("trainable", "trainable params"),
    ("fwd", "fwd GMAC/img"), ("dx", "dX GMAC/img"), ("dw", "dW GMAC/img"),
    ("step", "per-step GMAC"), ("train_gmac", "train GMAC/img"),
    ("train_gflop", "train GFLOP/img"), ("ratio", "× full FT"), ("saved", "saved GFLOP/img"),
)


def _rows(results: Iterable[ModelFlops]) -> list[dict]:
    results = list(results)
    base = {r.model: r for r in results if r.mode == "full_ft"}
    rows = []
    for r in results:
        b = base.get(r.model)
        train = r.mode in TRAIN_MODES or r.mode in LEARNGENE_MODES
        rows.append(dict(
            model=r.model, mode=r.mode,
            trainable=f"{r.trainable_params / 1e6:.2f}M" if train else "-",
            fwd=f"{r.gmacs('fwd'):.2f}",
            dx=f"{r.gmacs('dx'):.2f}" if train else "-",
            dw=f"{r.gmacs('dw'):.2f}" if train else "-",
            step=f"{r._image_step('train')[1] / 1e9:.1f}" if train else "-",
            train_gmac=f"{r.gmacs('train'):.2f}" if train else "-",
            train_gflop=f"{r.gflops('train'):.1f}" if train else "-",
            ratio=f"{r.macs('train') / b.macs('train'):.3f}" if (train and b) else "-",
            saved=f"{b.gflops('train') - r.gflops('train'):.1f}" if (train and b) else "-",
        ))
    return rows


def format_table(results: Iterable[ModelFlops], markdown: bool = False) -> str:
    """Fixed-width (or markdown) comparison table of ``results``."""
    rows = _rows(results)
    heads = [h for _, h in COLUMNS]
    keys = [k for k, _ in COLUMNS]
    if markdown:
        lines = ["| " + " | ".join(heads) + " |", "|" + "|".join("---" for _ in heads) + "|"]
        lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(str(r[k])) for r in rows)) for k, h in COLUMNS]
    fmt = "  ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*heads), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*(str(r[k]) for k in keys)) for r in rows]
    return "\n".join(lines)


def format_markdown(results: Sequence[ModelFlops], *, image_size: int, batch: int,
                    paper: Sequence[dict] | None = None, lora_rank: int = 8) -> str:
    """The report ``kind-fast flops`` writes."""
    results = list(results)
    lines = [
        "# FLOPs of DiT training: KIND vs full fine-tuning, LoRA, SVDiff, Heur-LG and TLEG",
        "",
        f"Analytic model `kind_fast.perf.flops` at {image_size}×{image_size} "
        f"({results[0].tokens} tokens per image for /2 models), per-step terms amortised over "
        f"batch {batch} (images per device per step), label table of "
        f"{results[0].num_classes} classes + null. MAC = multiply-accumulate, FLOP = 2 × MAC. "
        "`fwd` is the forward pass, `dX` activation gradients, `dW` parameter gradients; "
        "`train` = fwd + dX + dW per image; `per-step GMAC` is work done once per step "
        "(W materialisation and projection) that is already amortised in the per-image columns. "
        "Elementwise work (norms, softmax, activations, optimizer) is not counted, as in DiT's "
        "table. See docs/flops.md for every convention.",
        "",
        format_table(results, markdown=True),
        "",
    ]
    models = list(dict.fromkeys(r.model for r in results))
    if {"transfer", *BASELINES} <= {r.mode for r in results}:
        lines += [
            "## KIND transfer against every baseline",
            "",
            "GFLOP (2 × MAC) per image per training step (fwd + bwd), 461 novel classes, "
            f"learngenes frozen, N_T = 96, K = 32, LoRA rank {lora_rank}. KIND transfer costs more "
            "than LoRA.",
            "",
            format_savings(baseline_savings(models, batch=batch, num_classes=results[0].num_classes,
                                            lora_rank=lora_rank)),
            "",
        ]
    if paper:
        lines += [
            "## The paper's claim (KIND v1: DiT-L/2, 45.4M trainable, saves >= 35.4 GFLOPs)",
            "",
            "The paper's FLOP convention is not public, so none of these readings is its own; "
            "under ours (GFLOP per image per training step) DiT-L/2 saves far more than 35.4 "
            "against full fine-tuning, and the forward alone saves nothing. Saving of KIND "
            "transfer against full fine-tuning under each reading:",
            "",
            "| model | unit | scope | per | saved | >= 35.4 |",
            "|---|---|---|---|---|---|",
        ]
        lines += [f"| {r['model']} | {r['unit']} | {r['scope']} | {r['per']} | {r['saved']:.1f} | "
                  f"{'yes' if r['meets'] else 'no'} |" for r in paper]
        lines.append("")
    return "\n".join(lines)


def pyplot():
    """matplotlib.pyplot with the Agg backend, or a clear error (extra ``report``)."""
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "plots need matplotlib: pip install 'kind_fast[report]' (or pip install matplotlib)"
        ) from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_flops(results: Sequence[ModelFlops], path: str | Path) -> Path:
    """Grouped bars: training GFLOPs per image (fwd / dX / dW stacked) by model and mode."""
    plt = pyplot()
    trained = TRAIN_MODES + LEARNGENE_MODES
    results = [r for r in results if r.mode in trained]
    models = list(dict.fromkeys(r.model for r in results))
    modes = [m for m in trained if any(r.mode == m for r in results)]
    fig, axes = plt.subplots(1, len(models), figsize=(3.2 * len(models) + 1, 4.2), squeeze=False)
    colors = {"fwd": "#4C72B0", "dx": "#DD8452", "dw": "#55A868"}
    for ax, m in zip(axes[0], models, strict=True):
        for i, mode in enumerate(modes):
            r = next(r for r in results if r.model == m and r.mode == mode)
            bottom = 0.0
            for part in ("fwd", "dx", "dw"):
                v = r.gflops(part)
                ax.bar(i, v, bottom=bottom, color=colors[part], label=part if i == 0 else None)
                bottom += v
            ax.text(i, bottom, f"{bottom:.0f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(modes)), modes, rotation=35, ha="right", fontsize=8)
        ax.set_title(m, fontsize=10)
        ax.set_ylabel("GFLOP per image per training step" if m == models[0] else "")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Training FLOPs by mode (batch {results[0].batch}, "
                 f"{results[0].image_size} px)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_flops_report(out_dir: str | Path, *, models: Sequence[str] = SIZES, image_size: int = 256,
                       batch: int = 32, plot: bool = True, num_classes: int = 461,
                       **kwargs) -> dict[str, Path]:
    """Write ``flops.md`` (and ``flops.png``) under ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = flops_table(models, image_size=image_size, batch=batch, num_classes=num_classes,
                          **kwargs)
    paper = paper_conventions([m for m in ("DiT-B/2", "DiT-L/2") if m in models] or models[:1],
                              batch=batch)
    paths = {"markdown": out / "flops.md"}
    text = format_markdown(results, image_size=image_size, batch=batch, paper=paper,
                           lora_rank=kwargs.get("lora_rank", 8))
    paths["markdown"].write_text(text)
    if plot:
        paths["plot"] = plot_flops(results, out / "flops.png")
    return paths


# =====================================================================================
# CLI: kind-fast flops
# =====================================================================================
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", default=list(SIZES),
                   help="DiT configs (default S/B/L/XL /2)")
    p.add_argument("--modes", nargs="+", default=list(ALL_MODES), choices=ALL_MODES)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch", type=int, default=32,
                   help="images per device per step (amortises per-step work)")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--num-classes", type=int, default=461,
                   help="classes of the trained label table (default: KIND's 461 novel classes)")
    p.add_argument("--per-layer", metavar="MODEL", help="also print the per-layer costs of MODEL")
    p.add_argument("--out", default="runs/flops", help="folder for flops.md and flops.png")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")


def format_layers(model: str, modes: Sequence[str], **kwargs) -> str:
    """Per-layer GMACs per image (per-step terms amortised) of ``model`` in each mode."""
    lines = []
    for mode in modes:
        r = dit_flops(model, mode, **kwargs)
        lines.append(f"{model} {mode}: fwd, dX, dW in GMAC per image; step fwd, step bwd in GMAC "
                     "per training step (whatever the batch)")
        heads = ("fwd", "dX", "dW", "step fwd", "step bwd")
        lines.append(f"  {'layer':<42} " + " ".join(f"{h:>9}" for h in heads))
        for c in r.costs:
            vals = (c.fwd, c.dx, c.dw, c.step_fwd, c.step_bwd)
            lines.append(f"  {c.name:<42} " + " ".join(f"{v / 1e9:>9.3f}" for v in vals))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    for m in args.models:
        if m not in DiT_models:
            raise SystemExit(f"kind-fast flops: unknown model {m!r}; "
                             f"choose from {sorted(DiT_models)}")
    kw = dict(image_size=args.image_size, batch=args.batch, lora_rank=args.lora_rank,
              num_classes=args.num_classes)
    try:
        results = flops_table(args.models, args.modes, **kw)
    except ValueError as e:
        raise SystemExit(f"kind-fast flops: {e}") from e
    print(f"FLOPs per image at {args.image_size}x{args.image_size}, batch {args.batch} "
          "(MAC = multiply-accumulate, FLOP = 2 MAC; per-step work amortised over the batch)")
    print(format_table(results))
    paper = paper_conventions([m for m in ("DiT-B/2", "DiT-L/2")], batch=args.batch)
    s = transfer_saving("DiT-L/2", batch=args.batch)
    print(f"\nDiT-L/2 KIND transfer (461 novel classes): "
          f"{s['trainable_params'] / 1e6:.2f}M trainable (paper 45.4M); the forward alone costs "
          f"{-s['saved_fwd_gmac']:.2f} GMAC more than the dense DiT. Per image per training step "
          "(GFLOP = 2 MAC; the paper's convention for its '>= 35.4 GFLOPs' is not public):")
    for r in baseline_savings(["DiT-L/2"], batch=args.batch, lora_rank=args.lora_rank):
        verdict = "saves" if r["saved_gflop"] >= 0 else "costs"
        print(f"  vs {r['baseline']:<8} {r['baseline_gflop']:8.1f} GFLOP: KIND transfer {r['kind_gflop']:.1f}, "
              f"{verdict} {abs(r['saved_gflop']):.1f} GFLOP ({r['ratio']:.3f}x)")
    if args.per_layer:
        print()
        print(format_layers(args.per_layer, args.modes, **kw))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "flops.md"
    md.write_text(format_markdown(results, image_size=args.image_size, batch=args.batch,
                                  paper=paper, lora_rank=args.lora_rank))
    print(f"\nwrote {md}")
    if not args.no_plot:
        from kind_fast._optional import available

        if available("matplotlib"):
            png = plot_flops(results, out / "flops.png")
            print(f"wrote {png}")
        else:
            print("skipped flops.png: matplotlib is not installed (pip install 'kind_fast[report]')")
    return 0

