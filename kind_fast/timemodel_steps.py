"""DiT-XL/2 steps in the time model (kind_fast.timemodel): every number here is MODELLED.

A whole step of a real DiT-XL/2 (kind_fast.dit, batch 32, 256 tokens per image) runs on
``meta`` tensors inside ``kind_fast.launches.record_launches``; every launch is priced by
kind_fast.timemodel. What is substituted, and why (stated assumptions):

* The KIND layers run the reference op on ``meta`` tensors; each call of
  ``kind_fast::kind_linear`` / ``kind_fast::kind_linear_backward`` (recorded as one custom-op
  launch) is priced as what the Triton backend launches for that shape and gradient mask
  (``timemodel.layer_launches``), and ``kind_fast::kind_linear_merged_gemm`` (path M3) as the
  Triton segmented GEMM.
* Attention (``F.scaled_dot_product_attention``) is recorded as one FlashAttention launch
  forward and one backward (``GpuTime.attention``), not as the math decomposition ``meta``
  tensors would take.
* Mixed precision as the trainer and bench/gpu_check.py run it (fp32 parameters under bf16
  autocast; torch has no autocast on ``meta``): the step is replayed in fp32 and every float
  tensor of its forward and backward is priced as bf16 (autocast's activations; the ops
  autocast keeps in fp32 are few and small next to the GEMMs); what autocast adds is priced
  per step: one cast of every parameter matrix a forward reads (fp32 read, bf16 write) and
  AdamW over the fp32 trainable parameters and gradients (``torch.optim.AdamW``'s foreach
  path, replayed on ``meta``).
* Transfer steps run inside ``kind_fast.caching.training_scope`` as the trainer runs them
  (W_G built once and reused while the learngenes are frozen; bench/gpu_check.py does the same).
* Peak memory (the transfer step's ≤ 0.75 × goal): fp32 parameters + bf16 copies of what a
  forward reads + fp32 gradients and AdamW state of the trainable parameters + the distinct
  storages autograd saves for backward (counted with saved-tensor hooks).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

from kind_fast.launches import Launch, TensorInfo
from kind_fast.timemodel import (
    H100_TIME,
    GoalRow,
    GpuTime,
    KernelTime,
    LayerShape,
    layer_launches,
    meta_replay,
    price_all,
)

__all__ = ["dit_step_launches", "dit_step_rows", "price_custom", "step_memory"]

BATCH, MODEL, CLASSES = 32, "DiT-XL/2", 10


# =====================================================================================
# Custom ops of our own, priced as the Triton launches they stand for
# =====================================================================================
def price_custom(r: Launch, gpu: GpuTime, e: float) -> KernelTime:
    ins = r.inputs
    if r.name in ("kind_fast::kind_linear", "kind_fast::kind_linear_backward", "kind_fast::kind_linear_triton",
                  "kind_fast::kind_linear_triton_backward"):
        bwd = r.name.endswith("backward")
        # forward: (x, w_g, [bias], u_t, sigma_t, v_t, idx, val, labels)
        # backward: (grad_y, x, w_g, u_t, sigma_t, v_t, idx, val, labels, h)
        x = ins[1] if bwd else ins[0]
        w_g = ins[2] if bwd else ins[1]
        idx = next(t for t in ins if t.dtype in ("int32", "int64") and len(t.shape) == 2)
        labels = next(t for t in ins if t.dtype in ("int32", "int64") and len(t.shape) == 1)
        u_t = next(t for t in ins[2 if bwd else 1:] if len(t.shape) == 2 and t.shape[1] == w_g.shape[0]
                   and t is not w_g)
        m, n_in = x.shape
        shape = LayerShape("layer", n_in, w_g.shape[0], m, k=idx.shape[1], n_t=u_t.shape[0], t=m // labels.shape[0],
                           classes=idx.shape[0] - 1)
        if bwd:
            mask = r.args[-1]
            what = "kind_bwd:" + "".join("1" if v else "0" for v in mask)
        else:
            what = "kind_fwd"
        secs = price_all(layer_launches(shape, what), gpu, e)
        return KernelTime(r.name, secs, note=what)
    if r.name in ("kind_fast::kind_linear_merged_gemm", "kind_fast::kind_linear_merged_gemm_triton"):
        x, weights = ins[0], ins[1]
        m, n_in = x.shape
        slots = next(t for t in ins if len(t.shape) == 1 and t.dtype in ("int32", "int64"))
        shape = LayerShape("layer", n_in, weights.shape[1], m, t=m // slots.shape[0])
        return KernelTime(r.name, price_all(layer_launches(shape, "m3_fwd"), gpu, e))
    raise KeyError(f"no time model for custom op {r.name}")


# =====================================================================================
# Replays
# =====================================================================================
@contextlib.contextmanager
def _flash_attention(rec: list) -> Iterator[None]:
    """F.scaled_dot_product_attention recorded as one FlashAttention launch forward and one
    backward (see the module docstring)."""
    import torch
    import torch.nn.functional as F

    class _Flash(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            info = [TensorInfo(tuple(t.shape), str(t.dtype).replace("torch.", ""), "meta") for t in (q, k, v)]
            rec.append(Launch("model", "flash_attention", inputs=info, outputs=info[:1]))
            ctx.info = info
            return torch.empty_like(q)

        @staticmethod
        def backward(ctx, g):
            info = ctx.info
            rec.append(Launch("model", "flash_attention_backward", inputs=info + info[:1], outputs=info))
            return torch.empty_like(g), torch.empty_like(g), torch.empty_like(g)

    real = F.scaled_dot_product_attention

    def sdpa(q, k, v, *args, **kwargs):
        return _Flash.apply(q, k, v)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


def _model(mode: str):
    """DiT-XL/2 of ``mode`` (kind_fast.benchmark.build_model) on meta tensors (fp32)."""
    from kind_fast.benchmark import build_model

    return build_model(MODEL, mode, device="meta", num_classes=CLASSES)


def _bf16(t: TensorInfo) -> TensorInfo:
    return TensorInfo(t.shape, "bfloat16", t.device) if t.dtype == "float32" else t


def _as_autocast(rec) -> list[Launch]:
    """Records of an fp32 replay priced as autocast's bf16 activations (module docstring)."""
    out = []
    for r in rec:
        if r.kind in ("aten", "model"):
            r = Launch(r.kind, r.name, r.grid, r.sizes, r.meta, [_bf16(t) for t in r.inputs],
                       [_bf16(t) for t in r.outputs], r.args)
        out.append(r)
    return out


def _weights_read(model) -> int:
    """Elements of the bf16 weights a forward reads under autocast: a dense layer's matrix, a
    KIND layer's W_G (out × in) and its tailors U_T, V_T."""
    from kind_fast.layers import FastKindLinear

    n, kind_params = 0, set()
    for m in model.modules():
        if isinstance(m, FastKindLinear):
            n += m.out_features * m.in_features + m.u_t.numel() + m.v_t.numel()
            kind_params.update(id(p) for p in m.parameters())
    return n + sum(p.numel() for p in model.parameters() if id(p) not in kind_params and p.dim() >= 2)


def _autocast_extras(model, trainable_only: bool) -> list[Launch]:
    """What fp32 parameters under bf16 autocast add to a bf16 replay: a cast per floating
    parameter a forward reads (KIND's W_G cached inside training_scope is cast once, when
    built: not per step), and AdamW (foreach) over fp32 copies of the trainable parameters."""
    import torch

    from kind_fast.launches import record_launches
    from kind_fast.layers import FastKindLinear

    out = []
    kind_params = {id(p) for m in model.modules() if isinstance(m, FastKindLinear) for p in m.parameters()}
    shapes = [tuple(p.shape) for p in model.parameters() if id(p) not in kind_params and p.dim() >= 2]
    for m in model.modules():  # W_G comes from the cache (built in bf16 once); U_T, V_T cast per call
        if isinstance(m, FastKindLinear):
            shapes += [tuple(m.u_t.shape), tuple(m.v_t.shape)]
    for shape in shapes:
        out.append(Launch("aten", "_to_copy", inputs=[TensorInfo(shape, "float32", "meta")],
                          outputs=[TensorInfo(shape, "bfloat16", "meta")]))
    params = [p for p in model.parameters() if p.requires_grad]
    if params:
        copies = [torch.empty(p.shape, dtype=torch.float32, device="meta", requires_grad=True) for p in params]
        for c in copies:
            c.grad = torch.empty_like(c)
        opt = torch.optim.AdamW(copies, lr=1e-4, weight_decay=0.0, foreach=True)
        with record_launches() as rec:
            opt.step()
        out.extend(rec)
    return out


@contextlib.contextmanager
def _triton_paths() -> Iterator[None]:
    """``meta`` tensors resolve to the Triton backend (the choice a GPU run makes; its ops run
    their fake kernels here), so the op family's cost model picks the paths it picks there;
    the recording dispatch mode is hidden from the entry point (it would otherwise keep to the
    op paths, as it does under FlopCounterMode)."""
    import kind_fast.backends as B
    import kind_fast.ops.paths as P
    from kind_fast.ops import kind_linear_triton as T

    real_b, real_o, real_d = B.resolve_backend, B.resolve_op, P.under_dispatch_mode
    P.under_dispatch_mode = lambda: False

    def resolve_backend(device, dtype=None):
        return "triton" if device.type == "meta" else real_b(device, dtype)

    def resolve_op(device, dtype):
        return T.OP if device.type == "meta" else real_o(device, dtype)

    B.resolve_backend, B.resolve_op = resolve_backend, resolve_op
    try:
        yield
    finally:
        B.resolve_backend, B.resolve_op, P.under_dispatch_mode = real_b, real_o, real_d


@functools.lru_cache(maxsize=None)
def dit_step_launches(mode: str) -> tuple[tuple[Launch, ...], dict]:
    with meta_replay(), _triton_paths():
        return _dit_step_launches(mode)


def _dit_step_launches(mode: str) -> tuple[tuple[Launch, ...], dict]:
    """(launches, info) of one DiT-XL/2 step: ``full_ft``, ``transfer``, ``pretrain`` (forward,
    ε-loss, backward, AdamW) or ``dense_sample`` / ``kind_sample`` (one guided sampling step:
    the model on 32 images of one class and their 32 null rows; KIND inside
    ``kind_fast.utils.serving`` on cached merged weights, as the sampler runs it)."""
    import torch

    from kind_fast.caching import training_scope, weight_cache
    from kind_fast.diffusion import GaussianDiffusion
    from kind_fast.launches import record_launches

    info: dict = {}
    if mode in ("dense_sample", "kind_sample"):
        model = _model("dense" if mode == "dense_sample" else "kind")
        size = int(round(model.pos_embed.shape[1] ** 0.5)) * model.patch_size
        x = torch.empty(2 * BATCH, model.in_channels, size, size, device="meta")
        t = torch.zeros(2 * BATCH, dtype=torch.int64, device="meta")
        y = torch.tensor([3] * BATCH + [CLASSES] * BATCH).to("meta")
        from kind_fast.utils import serving

        scope = contextlib.ExitStack()
        if mode == "kind_sample":
            scope.enter_context(weight_cache())
            scope.enter_context(serving(model, [3, CLASSES]))
        with scope, torch.no_grad():
            model(x, t, y)  # the first call merges and caches the served classes' weights
            rec: list = []
            with _flash_attention(rec), record_launches() as got:
                model(x, t, y)
            rec.extend(got)
        return tuple(_as_autocast(rec)), info
    model = _model(mode)
    diffusion = GaussianDiffusion()
    size = int(round(model.pos_embed.shape[1] ** 0.5)) * model.patch_size
    x = torch.empty(BATCH, model.in_channels, size, size, device="meta")
    y = torch.zeros(BATCH, dtype=torch.int64, device="meta")
    scope = training_scope(model) if mode == "transfer" else contextlib.nullcontext()
    saved: dict[int, int] = {}
    params = {p.untyped_storage()._cdata for p in model.parameters()}

    def pack(t):
        st = t.untyped_storage()
        if st._cdata not in params:  # autocast saves bf16 activations: fp32 ones count as bf16
            saved[st._cdata] = st.nbytes() // (2 if t.dtype == torch.float32 else 1)
        return t

    with scope:
        if mode == "transfer":  # W_G built before the measured step, as in a running trainer
            with torch.no_grad():
                _ = diffusion.loss(model, x, y)
        rec = []
        with _flash_attention(rec), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with record_launches() as got:
                loss = diffusion.loss(model, x, y)
                loss.backward()
            rec.extend(got)
    rec = _as_autocast(rec) + _autocast_extras(model, True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    bf16_copies = _weights_read(model)
    info.update(trainable=trainable, params=total, saved_bytes=sum(saved.values()),
                memory=4 * total + 2 * bf16_copies + (4 + 8) * trainable + sum(saved.values()))
    return tuple(rec), info


def step_memory(mode: str) -> int:
    return dit_step_launches(mode)[1]["memory"]


def dit_step_rows(gpu: GpuTime = H100_TIME) -> list[GoalRow]:
    """Step goals: transfer ≤ 0.80 × full fine-tuning (time) and ≤ 0.75 × (peak memory, modelled);
    pretrain ≤ 1.20 × a dense (full fine-tuning) step; KIND sampling ≤ 1.05 × a dense step."""
    m = BATCH * 256

    def t(mode, e):
        return price_all(dit_step_launches(mode)[0], gpu, e)

    full = t("full_ft", 1.0)
    dense_sample = t("dense_sample", 1.0)
    mem_ratio = step_memory("transfer") / step_memory("full_ft")
    return [
        GoalRow(f"{MODEL} step (B={BATCH})", "transfer step", m, 0.80, lambda e: t("transfer", e) / full),
        GoalRow(f"{MODEL} step (B={BATCH})", "transfer peak memory", m, 0.75, lambda e: mem_ratio),
        GoalRow(f"{MODEL} step (B={BATCH})", "pretrain step", m, 1.20, lambda e: t("pretrain", e) / full),
        GoalRow(f"{MODEL} sampling (B={BATCH} + null)", "sampling step", 2 * m, 1.05,
                lambda e: t("kind_sample", e) / dense_sample),
    ]
