"""KIND-DiT: Diffusion Transformers whose token-wise linears are KIND layers.

Written from scratch after the DiT paper's architecture (Peebles & Xie, 2023): patchify,
adaLN-Zero blocks conditioned on timestep + class, learned sigma, a null class for
classifier-free guidance. Module names follow the DiT checkpoint layout (``blocks.{i}.attn.qkv``,
``mlp.fc1``, ``adaLN_modulation.1`` …) so converted weights line up. With ``kind=None`` this is
a plain dense DiT (fused ``qkv``), which is also what ``kindify`` converts.

KIND layers (docs/design.md §1): q, k, v (or fused qkv), attention proj, fc1, fc2; adaLN modulation,
embedders and the final layer stay dense.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from kind_fast.nn.gate import DEFAULT_GATE, ClassGate
from kind_fast.nn.layers import FastKindLinear, _group_problem, kind_group


# =====================================================================================
# Config
# =====================================================================================
@dataclass
class KindConfig:
    """How a DiT is decomposed (defaults: docs/design.md §1)."""

    tailor_rank: int = 96  # N_T per matrix
    active: int = 32  # tailors each class switches on
    # balanced | block | random_k | all_on | custom (a ClassGate given explicitly, see make_gate);
    # the default is kind_fast.nn.gate.DEFAULT_GATE (docs/design.md §1.4)
    gate: str = DEFAULT_GATE
    null: str = "off"  # null (CFG) class: off | all | class
    qkv: str = "split"  # split: q, k, v are separate KIND layers; fused: one 3d×d layer
    learngene_rank: int | None = None  # N_G; None: min(in, out) - tailor_rank
    seed: int = 0  # random_k and balanced gates

    def __post_init__(self):
        if self.qkv not in ("split", "fused"):
            raise ValueError(f"qkv must be 'split' or 'fused', got {self.qkv!r}")
        if self.gate not in ("balanced", "block", "random_k", "all_on", "custom"):
            raise ValueError(f"gate must be balanced, block, random_k, all_on or custom, got {self.gate!r}")

    def make_gate(self, num_classes: int) -> ClassGate:
        """The gate these settings describe for ``num_classes`` classes. ``gate="custom"`` marks a
        model whose gate was given explicitly (e.g. ``kindify`` with a dense gate): it is saved
        with the weights, and a gate for other classes must be passed (``retarget(n, gate=...)``)."""
        if self.gate == "custom":
            raise ValueError("KindConfig(gate='custom') cannot build a gate: pass gate= (a ClassGate) explicitly")
        if self.gate == "balanced":
            return ClassGate.balanced(num_classes, self.tailor_rank, self.active, seed=self.seed, null=self.null)
        if self.gate == "block":
            return ClassGate.block(num_classes, self.tailor_rank, self.active, null=self.null)
        if self.gate == "random_k":
            return ClassGate.random_k(num_classes, self.tailor_rank, self.active, seed=self.seed, null=self.null)
        return ClassGate.all_on(num_classes, self.tailor_rank)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# =====================================================================================
# Embedders
# =====================================================================================
class PatchEmbed(nn.Module):
    """(N, C, H, W) image or latent -> (N, T, d) tokens, T = (H/p)·(W/p)."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not a multiple of patch_size {patch_size}")
        self.num_patches_side = input_size // patch_size
        self.num_patches = self.num_patches_side ** 2
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> (N, d) through sinusoidal features and a two-layer MLP."""

    def __init__(self, hidden_size: int, freq_size: int = 256, freq_shift: float = 0.0):
        super().__init__()
        self.freq_size = freq_size
        self.freq_shift = freq_shift  # diffusers' DiT divides by (half - 1): freq_shift = 1
        self.mlp = nn.Sequential(nn.Linear(freq_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    @staticmethod
    def sinusoidal(t: Tensor, dim: int, max_period: float = 10000.0, freq_shift: float = 0.0) -> Tensor:
        half = dim // 2
        exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
        freqs = torch.exp(exponent / (half - freq_shift))
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return F.pad(emb, (0, dim % 2))

    def forward(self, t: Tensor) -> Tensor:
        emb = self.sinusoidal(t, self.freq_size, freq_shift=self.freq_shift)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class ids -> (N, d); id ``num_classes`` is the null class that label dropout feeds in."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def drop(self, labels: Tensor, force_drop_ids: Tensor | None = None) -> Tensor:
        """Replace labels by the null id: randomly in training, or where force_drop_ids == 1."""
        if force_drop_ids is not None:
            drop = force_drop_ids == 1
        elif self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            return labels
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: Tensor) -> Tensor:
        return self.embedding_table(labels)


# =====================================================================================
# Blocks
# =====================================================================================
def _linear(d_in: int, d_out: int, kind: KindConfig | None, gate: ClassGate | None) -> nn.Module:
    if kind is None:
        return nn.Linear(d_in, d_out)
    return FastKindLinear(d_in, d_out, tailor_rank=kind.tailor_rank, learngene_rank=kind.learngene_rank,
                          gate=gate, device="meta")


def _apply(layer: nn.Module, x: Tensor, labels: Tensor | None) -> Tensor:
    """A block linear: KIND layers get the class labels explicitly (no state is left behind,
    so a recomputation under activation checkpointing sees the same labels)."""
    return layer(x, labels=labels) if isinstance(layer, FastKindLinear) else layer(x)


class Attention(nn.Module):
    """Multi-head self-attention; q, k, v separate (KIND split) or one fused qkv layer.

    Split q, k, v KIND layers run as one group (``kind_fast.nn.layers.kind_group``: one pass over x,
    each layer its own components and state-dict keys); ``group_qkv = False`` on the class or an
    instance runs them one by one (benchmarks compare the two), and so do layers with forward
    hooks (called as modules, so their hooks run)."""

    group_qkv = True

    def __init__(self, dim: int, num_heads: int, kind: KindConfig | None, gate: ClassGate | None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.split = kind is not None and kind.qkv == "split"
        if self.split:
            self.q, self.k, self.v = (_linear(dim, dim, kind, gate) for _ in range(3))
        else:
            self.qkv = _linear(dim, 3 * dim, kind, gate)
        self.proj = _linear(dim, dim, kind, gate)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        if self.split:
            layers = (self.q, self.k, self.v)
            if self.group_qkv and labels is not None and _group_problem(layers, hooks=True) is None:
                q, k, v = kind_group(layers, x, labels)
            else:
                q, k, v = (_apply(m, x, labels) for m in layers)
        else:
            q, k, v = _apply(self.qkv, x, labels).chunk(3, dim=-1)
        q, k, v = (rearrange(z, "n t (h e) -> n h t e", h=self.num_heads) for z in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)  # (N, heads, T, d/heads)
        return _apply(self.proj, rearrange(out, "n h t e -> n t (h e)"), labels)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, kind: KindConfig | None, gate: ClassGate | None):
        super().__init__()
        self.fc1 = _linear(dim, hidden, kind, gate)
        self.fc2 = _linear(hidden, dim, kind, gate)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        return _apply(self.fc2, F.gelu(_apply(self.fc1, x, labels), approximate="tanh"), labels)


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (gated residuals, zero-initialised)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, kind, gate, mlp_norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, kind, gate)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=mlp_norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), kind, gate)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: Tensor, c: Tensor, labels: Tensor | None = None) -> Tensor:
        """``labels``: the (post-dropout) class ids, for KIND layers; None in a dense DiT."""
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_a.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_a, scale_a), labels)
        return x + gate_m.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_m, scale_m), labels)


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def sincos_pos_embed(dim: int, grid: int) -> np.ndarray:
    """Fixed 2-D sin-cos position table (grid², dim): half the channels per axis."""
    if dim % 4:
        raise ValueError(f"hidden size {dim} must be a multiple of 4 for 2-D sin-cos embeddings")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    coords = np.arange(grid, dtype=np.float64)
    gy, gx = np.meshgrid(coords, coords, indexing="ij")

    def axis(pos):
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([axis(gx), axis(gy)], axis=1)


# =====================================================================================
# DiT
# =====================================================================================
class DiT(nn.Module):
    """Class-conditional DiT; with ``kind`` set its token-wise linears are KIND layers.

    forward(x (N, C, H, W), t (N,), y (N,)) -> (N, C or 2C, H, W). ``y`` holds class ids in
    [0, num_classes] (num_classes: the null class). With ``kind`` the labels (after label
    dropout) are passed to every KIND layer explicitly; ``kind_gate.labels`` is not used.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        kind: KindConfig | None = None,
        gate: ClassGate | None = None,
        time_freq_shift: float = 0.0,
        mlp_norm_eps: float = 1e-6,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.kind = kind
        self.arch = dict(input_size=input_size, patch_size=patch_size, in_channels=in_channels,
                         hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                         class_dropout_prob=class_dropout_prob, num_classes=num_classes,
                         learn_sigma=learn_sigma)
        # conventions of diffusers' DiTTransformer2DModel (kind_fast.train.convert maps them exactly);
        # recorded only when they differ from DiT's, so older saves and specs stay unchanged
        if time_freq_shift:
            self.arch["time_freq_shift"] = time_freq_shift
        if mlp_norm_eps != 1e-6:
            self.arch["mlp_norm_eps"] = mlp_norm_eps
        if kind is not None:
            gate = gate if gate is not None else kind.make_gate(num_classes)
            if gate.num_classes != num_classes:
                raise ValueError(f"gate has {gate.num_classes} classes but the model has {num_classes}")
            self.kind_gate = gate
        elif gate is not None:
            raise ValueError("a gate was given but kind=None (a dense DiT has no tailors)")

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size, freq_shift=time_freq_shift)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        grid = input_size // patch_size
        self.register_buffer("pos_embed", torch.from_numpy(sincos_pos_embed(hidden_size, grid)).float()[None])
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio, kind, gate, mlp_norm_eps) for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def initialize_weights(self) -> None:
        """DiT init: xavier linears (KIND layers: SVD of a xavier matrix), zero adaLN and output.

        A model built under ``torch.device("meta")`` stays uninitialised (for counting
        parameters of big configs without paying for the SVDs); call ``to_empty`` and then
        this method to materialise it.
        """
        if self.x_embedder.proj.weight.is_meta:
            return
        if self.kind is not None:
            self.kind_gate.reset_parameters()
        grid = self.x_embedder.num_patches_side
        self.pos_embed.copy_(torch.from_numpy(sincos_pos_embed(self.pos_embed.shape[-1], grid)))
        for layer in self.kind_layers():
            if layer.u_g.is_meta:  # KIND layers are built on meta: the SVD init happens below
                layer.to_empty(device=self.x_embedder.proj.weight.device)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for block in self.blocks:
            attn = block.attn
            if attn.split:  # xavier over the fused 3d×d matrix, as a dense DiT's qkv
                d = attn.q.in_features
                w = nn.init.xavier_uniform_(torch.empty(3 * d, d, dtype=torch.float64))
                parts = [(attn.q, w[:d]), (attn.k, w[d:2 * d]), (attn.v, w[2 * d:])]
            else:
                parts = [(attn.qkv, None)]
            parts += [(attn.proj, None), (block.mlp.fc1, None), (block.mlp.fc2, None)]
            for layer, w in parts:
                if isinstance(layer, FastKindLinear):
                    if w is None:
                        w = nn.init.xavier_uniform_(
                            torch.empty(layer.out_features, layer.in_features, dtype=torch.float64))
                    layer.load_dense_weight(w)
                    if layer.bias is not None:
                        layer.bias.zero_()
        pw = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(pw.view(pw.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for lin in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    # ------------------------------------------------------------------ forward
    def unpatchify(self, x: Tensor) -> Tensor:
        """(N, T, p²·C) -> (N, C, H, W): token (i, j) fills the p×p patch at row i, column j."""
        h = int(round(x.shape[1] ** 0.5))
        return rearrange(x, "n (h w) (p q c) -> n c (h p) (w q)", h=h, p=self.patch_size, q=self.patch_size)

    def forward(self, x: Tensor, t: Tensor, y: Tensor, force_drop_ids: Tensor | None = None) -> Tensor:
        from kind_fast.ops.labels import check_labels

        check_labels(y, self.num_classes, name="y (class labels)")
        if isinstance(x, Tensor) and y.shape[0] != x.shape[0]:
            raise ValueError(f"y (class labels) has {y.shape[0]} entries but x has {x.shape[0]} samples")
        y = self.y_embedder.drop(y, force_drop_ids)
        labels = y if self.kind is not None else None  # what every KIND layer sees (post-dropout)
        x = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        c = self.t_embedder(t) + self.y_embedder(y)
        checkpointing = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, c, labels, use_reentrant=False) if checkpointing else block(x, c, labels)
        return self.unpatchify(self.final_layer(x, c))

    def forward_with_cfg(self, x: Tensor, t: Tensor, y: Tensor, cfg_scale: float) -> Tensor:
        """Classifier-free guidance in one batch, as DiT's sampling loop calls it: y holds the
        conditional labels in its first half and the null label (``num_classes``) in its second
        half; both halves run on the first half of x (the second half of x is not read). The
        labels are used as given (nothing is replaced), and guidance acts on all ε channels:
        ε = ε_uncond + cfg_scale · (ε_cond - ε_uncond), returned for both halves."""
        half = x[: x.shape[0] // 2]
        both = torch.cat([half, half], dim=0)
        out = self(both, t, y)
        eps, rest = out[:, : self.in_channels], out[:, self.in_channels :]
        cond, uncond = eps.chunk(2, dim=0)
        guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([guided, guided], dim=0), rest], dim=1)

    grad_checkpointing = False

    def set_grad_checkpointing(self, enabled: bool = True) -> DiT:
        """Activation checkpointing of every block while training: a block's activations are
        recomputed in the backward instead of stored (the block gets the class labels as an
        argument, so the recomputation routes them the same way)."""
        self.grad_checkpointing = bool(enabled)
        return self

    # ------------------------------------------------------------------ KIND life cycle
    def kind_layers(self):
        return [m for m in self.modules() if isinstance(m, FastKindLinear)]

    def set_mode(self, mode: str) -> DiT:
        """pretrain / full_finetune: everything trains; transfer: tailors + label table +
        final layer train, learngenes and every other dense weight are frozen."""
        if mode in ("pretrain", "full_finetune"):
            self.requires_grad_(True)
        elif mode == "transfer":
            if self.kind is None:
                raise ValueError("transfer mode needs a KIND-DiT (kind=None is a dense DiT)")
            self.requires_grad_(False)
            for layer in self.kind_layers():
                for p in (layer.u_t, layer.sigma_t, layer.v_t):
                    p.requires_grad_(True)
            self.y_embedder.requires_grad_(True)
            self.final_layer.requires_grad_(True)
            if self.kind_gate.trainable:
                self.kind_gate.table.requires_grad_(True)
        else:
            raise ValueError(f"mode must be pretrain, transfer or full_finetune, got {mode!r}")
        self.mode = mode
        return self

    def retarget(self, num_classes: int, gate: ClassGate | None = None) -> DiT:
        """New classes: a fresh label table (num_classes + 1 rows) and, for KIND, a new gate."""
        d = self.y_embedder.embedding_table.embedding_dim
        dev = self.y_embedder.embedding_table.weight.device
        self.y_embedder = LabelEmbedder(num_classes, d, self.y_embedder.dropout_prob).to(dev)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        self.num_classes = self.arch["num_classes"] = num_classes
        if self.kind is not None:
            self.set_gate(gate if gate is not None else self.kind.make_gate(num_classes))
        elif gate is not None:
            raise ValueError("a dense DiT has no gate")
        return self

    def set_gate(self, gate: ClassGate) -> DiT:
        """Replace the gate shared by every KIND layer (its classes must match the model's)."""
        if self.kind is None:
            raise ValueError("a dense DiT has no gate")
        if gate.num_classes != self.num_classes:
            raise ValueError(f"gate has {gate.num_classes} classes, the model has {self.num_classes}")
        self.kind_gate = gate.to(self.pos_embed.device)
        for layer in self.kind_layers():
            layer.set_gate(self.kind_gate)
        return self

    def prepare_transfer(self, num_classes: int, gate: ClassGate | None = None, *,
                         generator: torch.Generator | None = None) -> DiT:
        """KIND transfer: keep (and freeze) learngenes, re-initialise tailors, new gate and
        label table for ``num_classes`` new classes."""
        self.retarget(num_classes, gate)
        for layer in self.kind_layers():
            layer.reset_tailors(generator=generator)
        return self.set_mode("transfer")

    @torch.no_grad()
    def to_dense(self, class_id: int | None = None) -> DiT:
        """Export a plain dense DiT (fused qkv) whose block linears are what ``class_id``
        sees (None: learngenes only). Everything else is copied."""
        dense = DiT(**self.arch, kind=None).to(self.pos_embed.device)
        own = {k: v for k, v in self.state_dict().items() if not k.startswith("kind_gate")}
        for i, (src, dst) in enumerate(zip(self.blocks, dense.blocks)):
            prefix = f"blocks.{i}."
            for k in [k for k in own if k.startswith(prefix + "attn.") or k.startswith(prefix + "mlp.")]:
                own.pop(k)
            a = src.attn
            qkv = [a.q, a.k, a.v] if a.split else [a.qkv]
            dst.attn.qkv.weight.copy_(torch.cat([_dense(m, class_id) for m in qkv], 0))
            dst.attn.qkv.bias.copy_(torch.cat([m.bias for m in qkv], 0))
            for name in ("attn.proj", "mlp.fc1", "mlp.fc2"):
                s, d = src.get_submodule(name), dst.get_submodule(name)
                d.weight.copy_(_dense(s, class_id))
                d.bias.copy_(s.bias)
        missing, unexpected = dense.load_state_dict(own, strict=False)
        copied = {k for k in missing if ".attn." in k or ".mlp." in k}
        if unexpected or set(missing) - copied:
            raise RuntimeError(f"to_dense: unexpected {unexpected}, missing {sorted(set(missing) - copied)}")
        return dense


    def export(self, classes, form: str = "merged", *, guidance: bool = True) -> nn.Module:
        """A standalone model serving ``classes`` exactly as this KIND model does, and (with
        ``guidance``) the null label too, so classifier-free-guided samples match
        (docs/design.md §7). ``form``: ``"merged"`` (one dense weight per served label,
        segmented GEMM: dense speed), ``"reduced"`` (W_G dense + only the tailors the labels
        use: small), ``"dense"`` (one class, ``guidance=False``: a plain dense DiT).
        See ``kind_fast.models.export``; save with ``kind_fast.save_export``."""
        from kind_fast.models.export import export_dit

        return export_dit(self, classes, form, guidance=guidance)

    def to_dense_export(self, class_id: int) -> DenseExportDiT:
        """``to_dense(class_id)`` as the dense export of that class (``export(c, "dense")``):
        exact for class_id, and every other label is refused (``DenseExportDiT``)."""
        return DenseExportDiT.from_dense(self.to_dense(class_id).eval(), class_id)


def _dense(layer: nn.Module, class_id: int | None) -> Tensor:
    return layer.to_dense(class_id) if isinstance(layer, FastKindLinear) else layer.weight


class DenseExportDiT(DiT):
    """The dense export of one class c of a KIND-DiT: a plain DiT (same modules, same
    facebookresearch-layout state dict) holding ``to_dense(c)``, whose blocks are
    W_G + U_Tᵀ diag(σ_T ⊙ g_c) V_T. That is exact for label c and for no other (label c' needs
    g_c', the null label of classifier-free guidance the learngenes alone), so ``forward``
    refuses every label but c with a ValueError that names c, and ``forward_with_cfg`` is
    refused (no null label). Built by ``DiT.to_dense_export`` / ``export(c, "dense")`` and by
    ``kind_fast.load_export`` of a dense export; the label check reads the labels on the host
    once per labels tensor (``kind_fast.models.export.per_labels``)."""

    export_classes: list[int]
    _plan_cache: tuple | None = None

    @classmethod
    def from_dense(cls, dense: DiT, class_id: int) -> DenseExportDiT:
        """``dense`` (``to_dense(class_id)`` of a KIND-DiT) as the export of class_id (its
        tensors are taken over, not copied)."""
        if not isinstance(dense, DiT) or dense.kind is not None:
            raise TypeError(f"DenseExportDiT.from_dense takes a dense DiT (kind=None), got {type(dense).__name__}")
        with torch.device("meta"):
            out = cls(**dense.arch, kind=None)
        out.load_state_dict(dense.state_dict(), strict=True, assign=True)
        return out.serving(class_id).train(dense.training)

    def serving(self, class_id: int) -> DenseExportDiT:
        """Set the one class served (in place)."""
        if isinstance(class_id, bool) or not isinstance(class_id, int) or not 0 <= class_id < self.num_classes:
            raise ValueError(f"a dense export serves one class id in [0, {self.num_classes}), got {class_id!r}")
        self.export_classes = [class_id]
        self._plan_cache = None
        return self

    def __getstate__(self):  # the label cache holds a weak reference: not picklable, not needed
        return {**self.__dict__, "_plan_cache": None}

    def _check(self, y: Tensor, labels: list[int]) -> bool:
        from kind_fast.models.export import check_served

        c = self.export_classes[0]
        check_served(labels, self.export_classes, self.num_classes, False,
                     f"this dense export (exact for class {c} only)",
                     hint=f"A dense export holds class {c}'s weights; export the others with --form merged or "
                          "reduced (which also serve the null label for classifier-free guidance)")
        return True

    def forward(self, x: Tensor, t: Tensor, y: Tensor, force_drop_ids: Tensor | None = None) -> Tensor:
        from kind_fast.models.export import per_labels

        if force_drop_ids is not None and bool(force_drop_ids.any()):
            raise ValueError(f"this dense export serves class {self.export_classes[0]} only: it has no null label "
                             "to drop labels to (force_drop_ids)")
        per_labels(self, y, self._check)
        return super().forward(x, t, y)

    def forward_with_cfg(self, x: Tensor, t: Tensor, y: Tensor, cfg_scale: float) -> Tensor:
        raise ValueError(f"this dense export serves class {self.export_classes[0]} without guidance (no null "
                         "label): it cannot run classifier-free guidance; sample it with cfg scale 1, or export "
                         "with --form merged or reduced for CFG-exact samples")

    def extra_repr(self) -> str:
        return f"dense export of class {self.export_classes[0]}"


# =====================================================================================
# Configs (DiT paper: S/B/L/XL × patch 2/4/8)
# =====================================================================================
_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
DiT_models = {
    f"DiT-{size}/{p}": (depth, hidden, heads, p)
    for size, (depth, hidden, heads) in _SIZES.items()
    for p in (2, 4, 8)
}


def build_dit(name: str, *, kind: KindConfig | None = None, **kwargs) -> DiT:
    """``build_dit("DiT-L/2", kind=KindConfig(), num_classes=150)``; kwargs override DiT args."""
    if name not in DiT_models:
        raise ValueError(f"unknown DiT config {name!r}; choose one of {sorted(DiT_models)}")
    depth, hidden, heads, p = DiT_models[name]
    args = dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=p)
    args.update(kwargs)
    return DiT(kind=kind, **args)


def kind_config_dict(kind: KindConfig | None) -> dict | None:
    return None if kind is None else asdict(kind)



# =====================================================================================
# Import of dense DiTs (bring your own DiT; docs/design.md §3.4)
# =====================================================================================
def _kind_layer(weight: Tensor, bias: Tensor | None, kind: KindConfig, gate: ClassGate,
                svd: bool = True) -> FastKindLinear:
    out_f, in_f = weight.shape
    layer = FastKindLinear(in_f, out_f, bias=bias is not None, tailor_rank=kind.tailor_rank,
                           learngene_rank=kind.learngene_rank, gate=gate, device="meta", dtype=weight.dtype)
    layer.to_empty(device=weight.device)
    if not svd:
        return layer
    layer.load_dense_weight(weight.detach())  # float64 SVD
    if bias is not None:
        with torch.no_grad():
            layer.bias.copy_(bias)
    return layer


@torch.no_grad()
def kindify_dit(model: DiT, kind: KindConfig, gate: ClassGate | None = None, *, svd: bool = True) -> DiT:
    """Turn a dense ``kind_fast.models.dit.DiT`` into a KIND-DiT **in place**: the same modules and
    parameter names as ``DiT(..., kind=kind)``, every block linear set by an exact SVD
    (``svd=False``: left uninitialised, for loading saved weights right after).

    ``gate`` defaults to ``kind.make_gate(model.num_classes)``. Returns ``model``.
    """
    if not isinstance(model, DiT):
        raise TypeError(f"kindify_dit expects a kind_fast.models.dit.DiT, got {type(model).__name__}")
    if model.kind is not None:
        raise ValueError("the model is already a KIND-DiT (kind is set)")
    if not isinstance(kind, KindConfig):
        raise TypeError(f"kind must be a KindConfig, got {type(kind).__name__}")
    gate = kind.make_gate(model.num_classes) if gate is None else gate
    if not isinstance(gate, ClassGate):
        raise TypeError(f"gate must be a ClassGate, got {type(gate).__name__}")
    if gate.num_classes != model.num_classes:
        raise ValueError(f"gate has {gate.num_classes} classes but the model has {model.num_classes}")
    if gate.tailor_rank != kind.tailor_rank:
        raise ValueError(f"gate has tailor_rank {gate.tailor_rank} but kind.tailor_rank is {kind.tailor_rank}")
    hidden = model.pos_embed.shape[-1]
    if kind.tailor_rank > hidden:
        raise ValueError(f"tailor_rank {kind.tailor_rank} exceeds the hidden size {hidden}")
    gate = gate.to(model.pos_embed.device)
    new = []  # build every layer first: a failing SVD leaves the model unchanged
    for block in model.blocks:
        attn, mlp = block.attn, block.mlp
        if kind.qkv == "split":
            w, b = attn.qkv.weight.chunk(3, 0), attn.qkv.bias.chunk(3, 0)
            qkv = {n: _kind_layer(w[i], b[i], kind, gate, svd) for i, n in enumerate("qkv")}
        else:
            qkv = {"qkv": _kind_layer(attn.qkv.weight, attn.qkv.bias, kind, gate, svd)}
        rest = {n: _kind_layer(getattr(p, n).weight, getattr(p, n).bias, kind, gate, svd)
                for p, n in ((attn, "proj"), (mlp, "fc1"), (mlp, "fc2"))}
        new.append((qkv, rest))
    for block, (qkv, rest) in zip(model.blocks, new):
        attn, mlp = block.attn, block.mlp
        del attn.qkv, attn.proj  # re-added in DiT's own order: q, k, v (or qkv), then proj
        for n, layer in qkv.items():
            setattr(attn, n, layer)
        attn.proj = rest["proj"]
        attn.split = kind.qkv == "split"
        mlp.fc1, mlp.fc2 = rest["fc1"], rest["fc2"]
        for layer in (*qkv.values(), *rest.values()):
            layer.train(block.training)
    model.kind = kind
    model.kind_gate = gate
    return model


def load_dense(src, *, which: str = "ema", num_heads: int | None = None, class_dropout_prob: float = 0.1) -> DiT:
    """A dense ``DiT`` (``kind=None``) holding ``src``'s weights on the CPU, in eval mode.

    ``src``: a facebookresearch-layout state dict or checkpoint dict, the path of a ``.pt`` /
    ``.safetensors`` file, a diffusers ``DiTTransformer2DModel`` or its local folder
    (``kind_fast.models.dense_io``), or a dense ``DiT`` (copied). kind_fast run/weights folders are
    read by ``kind_fast.train.convert.load_dense``. ``which``: ``ema`` or ``model`` weights of a
    training checkpoint. ``num_heads``: when neither the checkpoint nor the preset says.
    """
    from kind_fast.models.dense_io import read_dense

    if which not in ("ema", "model"):
        raise ValueError(f"which must be 'ema' or 'model', got {which!r}")
    if isinstance(src, DiT):
        if src.kind is not None:
            raise ValueError("src is already a KIND-DiT")
        import copy

        return copy.deepcopy(src).cpu().eval()
    arch, state = read_dense(src, presets=DiT_models, which=which, num_heads=num_heads,
                             class_dropout_prob=class_dropout_prob)
    with torch.device("meta"):
        model = DiT(**arch, kind=None)
    model.to_empty(device="cpu")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"the weights do not fit a DiT of the inferred architecture {arch}: {str(e)[:600]}") from None
    return model.eval()


def from_dense(src, kind: KindConfig | None = None, *, gate: ClassGate | None = None, which: str = "ema",
               num_heads: int | None = None, class_dropout_prob: float = 0.1) -> DiT:
    """A KIND-DiT from a dense DiT ``src`` by an exact float64 SVD of every block linear.

    Args:
        src: see ``load_dense`` (state dict, checkpoint file, dense DiT, diffusers
            ``DiTTransformer2DModel`` object or folder); ``kind_fast.train.convert.from_dense`` also
            reads kind_fast run and weights folders.
        kind: the decomposition (default ``KindConfig()``: 96 tailors, 32 active per class, the
            default gate ``kind_fast.nn.gate.DEFAULT_GATE``).
        gate: a ClassGate to use instead of ``kind.make_gate(num_classes)``.
    Returns:
        a new KIND-DiT in eval mode, on the CPU. With ``KindConfig(gate="all_on")`` it
        reproduces the dense model; every other weight is copied.
    """
    kind = KindConfig() if kind is None else kind
    dense = load_dense(src, which=which, num_heads=num_heads, class_dropout_prob=class_dropout_prob)
    return kindify_dit(dense, kind, gate).eval()
