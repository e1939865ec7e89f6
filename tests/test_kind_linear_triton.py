"""The Triton backend of kind_linear (kernels/kind_linear.py, kind_fast/ops/kind_linear_triton.py).

CPU: the kernels run under TRITON_INTERPRET=1 (fp32 and fp16; the interpreter has no bf16)
against the independent float64 oracle with FlashAttention's rule (error <= 2 × the
reference's own error in the same dtype + a floor), for the forward and every gradient, all
gate kinds, class distributions, odd shapes, T a multiple of the row tile and not, frozen
subsets and determinism. The interpreter is switched on per test by an environment fixture;
the backend reloads its kernel module when the mode changes, so test order does not matter.

GPU (skipped without CUDA): bf16/fp16 at DiT shapes, torch.compile(fullgraph=True), CUDA-graph
capture of forward+backward, determinism.
"""

from __future__ import annotations

import os

import pytest
import torch

import kind_fast as kf
from kind_fast.ops.kind_linear import kind_linear, kind_linear_backward_ref, kind_linear_ref
from kind_fast.testing import (
    DISTRIBUTIONS,
    GATE_KINDS,
    assert_close_to_oracle,
    make_gate,
    make_labels,
    naive_kind_linear,
)

pytestmark = pytest.mark.interpret

GRADS = ("x", "w_g", "bias", "u_t", "sigma_t", "v_t", "val")
TAILOR_GRADS = ("x", "u_t", "sigma_t", "v_t")  # transfer: learngenes frozen
ARGS = ("x", "w_g", "bias", "u_t", "sigma_t", "v_t", "idx", "val", "labels")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _cannot_run(why: str):
    """Skip, or fail where the interpreter tests must run (CI: scripts/test.sh sets
    KIND_FAST_REQUIRE_INTERPRETER=1, so a broken Triton/numpy pair is red, not 84 skips)."""
    if os.environ.get("KIND_FAST_REQUIRE_INTERPRETER") == "1":
        pytest.fail(f"KIND_FAST_REQUIRE_INTERPRETER=1 but the interpreter tests cannot run: {why}", pytrace=False)
    pytest.skip(why)


@pytest.fixture
def interpreter(monkeypatch):
    """Run the Triton backend's kernels on the CPU interpreter for this test."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        _cannot_run(f"triton is not installed ({e})")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    why = _interpreter_broken()
    if why:
        _cannot_run(why)
    yield


_PROBE: list = []


def _interpreter_broken() -> str:
    """'' if this Triton's interpreter runs a loop with a runtime bound, else why not.

    Triton 3.6's interpreter converts 1-element arrays with int(), which numpy >= 2.4 refuses
    ("only 0-dimensional arrays can be converted"); Triton 3.9 fixed it.
    """
    if not _PROBE:
        import numpy as np
        import triton
        import triton.language as tl

        @triton.jit  # decorated now, with TRITON_INTERPRET=1 set
        def probe(out_ptr, n):
            acc = tl.full((16,), 0.0, tl.float32)
            for _ in range(0, n, 1):
                acc += 1.0
            tl.store(out_ptr + tl.arange(0, 16), acc)

        out = torch.zeros(16)
        try:
            probe[(1,)](out, 3)
            ok = bool((out == 3).all())
            _PROBE.append("" if ok else "Triton's interpreter gave a wrong result on a probe kernel")
        except Exception as e:  # noqa: BLE001
            _PROBE.append(f"Triton {triton.__version__}'s interpreter fails with numpy {np.__version__} "
                          f"({type(e).__name__}: {e}); use Triton >= 3.9 or numpy < 2.4")
    return _PROBE[0]


# ------------------------------------------------------------------ helpers
def make_case(n_in, n_out, n_t, k, b, t, *, gate_kind="random_k", dist="uniform", classes=6, seed=0,
              bias=True, device="cpu", random_values=False):
    """float64 inputs of the op (idx/val from a real gate, labels from a distribution).

    ``random_values``: the gate's values times U(0.5, 1.5) (same tailors on, same K): block and
    random_k gates have value 1, which hides the gate value's part of dσ_T and dval."""
    g = torch.Generator().manual_seed(seed)
    if gate_kind in ("all_on", "dense_trainable"):
        k = n_t
    gate = make_gate(gate_kind, classes, n_t, k, seed=seed)
    idx, val = gate.compiled()
    if random_values:
        val = val * (0.5 + torch.rand(val.shape, generator=g))
    labels = make_labels(dist, b, classes, generator=g)

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    inp = dict(
        x=r(b * t, n_in), w_g=r(n_out, n_in, scale=n_in ** -0.5), bias=r(n_out) if bias else None,
        u_t=r(n_t, n_out, scale=n_out ** -0.5), sigma_t=r(n_t).abs() + 0.5,
        v_t=r(n_t, n_in, scale=n_in ** -0.5), idx=idx, val=val.detach().double(), labels=labels,
    )
    return {n: (v.to(device) if v is not None else None) for n, v in inp.items()}


def cast(inp, dtype):
    """The op's inputs in ``dtype``; σ_T and gate values stay float32 (as the functional does)."""
    out = dict(inp)
    for n in ("x", "w_g", "bias", "u_t", "v_t"):
        if out[n] is not None:
            out[n] = out[n].to(dtype)
    out["sigma_t"], out["val"] = inp["sigma_t"].float(), inp["val"].float()
    return out


def args_of(inp):
    return [inp[n] for n in ARGS]


def run(inp, backend, grads, g):
    """y and the gradients of ``grads`` through the functional on ``backend`` (None: oracle)."""
    leaves = {n: inp[n].clone().requires_grad_(True) for n in grads if inp[n] is not None}
    full = {**inp, **leaves}
    if backend is None:
        y = naive_kind_linear(*args_of(full))
    else:
        with kf.use_backend(backend):
            y = kind_linear(*args_of(full), rows_per_sample=full["x"].shape[0] // full["labels"].shape[0])
    if leaves:
        y.backward(g.to(y.dtype))
    return y, {n: leaves[n].grad for n in leaves}


def check_against_oracle(inp64, dtype, grads=GRADS, what=""):
    """Triton vs float64 oracle, bounded by 2 × the reference's own error in ``dtype``."""
    g = torch.randn(inp64["x"].shape[0], inp64["w_g"].shape[0], dtype=torch.float64,
                    generator=torch.Generator().manual_seed(7)).to(inp64["x"].device)
    y_o, gr_o = run(inp64, None, grads, g)
    y_l, gr_l = run(cast(inp64, dtype), "torch", grads, g)
    y_t, gr_t = run(cast(inp64, dtype), "triton", grads, g)
    assert y_t.dtype == dtype and y_t.shape == y_o.shape
    assert_close_to_oracle(y_t, y_o, y_l, dtype, f"{what} y")
    for n in gr_o:
        assert gr_t[n] is not None and gr_t[n].shape == gr_o[n].shape, f"{what} d{n} shape"
        assert_close_to_oracle(gr_t[n], gr_o[n], gr_l[n], dtype, f"{what} d{n}")
    return y_t, gr_t


# ------------------------------------------------------------------ interpreter: correctness
# (in, out, N_T, K, B, T). Under the interpreter the row tile is 32 (T % 32 == 0), else 16
# (T % 16 == 0), else a mixed-class tile of 16 rows looping over the samples it touches.
SHAPES = [
    (37, 53, 11, 5, 3, 32),    # one class per 32-row tile; odd in/out; K=5; N-groups
    (40, 70, 20, 17, 4, 7),    # mixed-class tiles (T=7); K=17 -> KP=32
    (24, 36, 8, 3, 9, 1),      # one row per sample: a 16-row tile spans 9 samples
    (70, 33, 24, 8, 2, 48),    # T=48: 16-row tiles; several K steps and N tiles per program
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("gate_kind", GATE_KINDS)
def test_forward_and_grads_match_oracle(interpreter, gate_kind, shape, dtype):
    n_in, n_out, n_t, k, b, t = shape
    inp = make_case(n_in, n_out, n_t, k, b, t, gate_kind=gate_kind, seed=sum(shape))
    check_against_oracle(inp, dtype, GRADS, f"{gate_kind} {shape} {dtype}")


@pytest.mark.parametrize("t", [32, 5])
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_class_distributions(interpreter, dist, t):
    b = 6 if dist == "distinct" else 10
    inp = make_case(48, 40, 16, 6, b, t, gate_kind="block", dist=dist, classes=8, seed=t, random_values=True)
    check_against_oracle(inp, torch.float16, TAILOR_GRADS + ("val",), f"{dist} T={t}")


@pytest.mark.parametrize("t", [16, 9])
def test_shrink_h_matches_reference(interpreter, t):
    """The op's second output h (saved for backward) equals the reference's, padding slots too;
    int32 labels and int64 ids work as well as the usual int64 labels and int32 ids."""
    inp = cast(make_case(33, 45, 12, 7, 3, t, gate_kind="block", seed=2), torch.float32)
    if t == 9:
        inp["labels"], inp["idx"] = inp["labels"].int(), inp["idx"].long()
    y, h = _triton_op()(*args_of(inp))
    y_r, h_r = kind_linear_ref(*args_of(inp))
    assert h.dtype == torch.float32 and h.shape == h_r.shape
    torch.testing.assert_close(h, h_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, y_r, rtol=1e-5, atol=1e-5)


def _triton_op():
    from kind_fast.ops import kind_linear_triton

    return kind_linear_triton.OP


# output_mask order: dx, dw_g, dbias, du_t, dsigma_t, dv_t, dval
MASKS = {
    "pretrain": [True] * 7,
    "transfer": [True, False, False, True, True, True, False],
    "sigma_only": [False, False, False, False, True, False, False],
    "gate_only": [False, False, False, False, False, False, True],
    "u_only": [False, False, False, True, False, False, False],
    "v_and_x": [True, False, False, False, False, True, False],
    "no_dx": [False, True, True, True, True, True, True],
}


@pytest.mark.parametrize("t", [16, 6])
@pytest.mark.parametrize("mask_name", list(MASKS))
def test_backward_op_computes_only_requested(interpreter, mask_name, t):
    from kind_fast.ops.kind_linear_triton import BACKWARD_OP

    mask = MASKS[mask_name]
    inp = cast(make_case(36, 44, 14, 6, 3, t, gate_kind="dense", seed=t), torch.float32)
    y, h = kind_linear_ref(*args_of(inp))
    g = torch.randn_like(y)
    base = [inp[n] for n in ("x", "w_g", "u_t", "sigma_t", "v_t", "idx", "val", "labels")]
    out = BACKWARD_OP(g, *base, h, mask)
    ref = kind_linear_backward_ref(g, *base, h, [True] * 7)
    for j, (o, r) in enumerate(zip(out, ref)):
        if mask[j]:
            assert o.shape == r.shape and o.dtype == r.dtype, f"{GRADS[j]}"
            torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4, msg=f"d{GRADS[j]} ({mask_name})")
        else:
            assert o.numel() == 0, f"d{GRADS[j]} computed although not requested ({mask_name})"


@pytest.mark.parametrize("t", [32, 7])
def test_deterministic_bitwise(interpreter, t):
    inp = cast(make_case(40, 48, 12, 5, 4, t, gate_kind="random_k", dist="zipf", seed=4), torch.float16)
    g = torch.randn(inp["x"].shape[0], 48, generator=torch.Generator().manual_seed(1))
    torch.use_deterministic_algorithms(True)
    try:
        runs = [run(inp, "triton", GRADS, g) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(False)
    (y1, g1), (y2, g2) = runs
    assert torch.equal(y1, y2)
    for n in g1:
        assert torch.equal(g1[n], g2[n]), f"d{n} differs between two runs"


def test_opcheck(interpreter):
    from kind_fast.ops.kind_linear_triton import BACKWARD_OP, OP

    inp = cast(make_case(20, 24, 6, 3, 2, 16, seed=1), torch.float32)
    for n in ("x", "w_g", "bias", "u_t", "sigma_t", "v_t", "val"):
        inp[n] = inp[n].requires_grad_(True)
    torch.library.opcheck(OP, tuple(args_of(inp)), test_utils=("test_schema", "test_faketensor",
                                                                 "test_autograd_registration"))
    y, h = OP(*args_of(inp))
    base = [inp[n].detach() for n in ("x", "w_g", "u_t", "sigma_t", "v_t")]
    base += [inp["idx"], inp["val"].detach(), inp["labels"]]
    mask = MASKS["transfer"]
    torch.library.opcheck(BACKWARD_OP, (torch.randn_like(y), *base, h.detach(), mask),
                          test_utils=("test_schema", "test_faketensor"))


def test_layer_on_triton_backend(interpreter):
    """FastKindLinear (transfer: learngenes frozen) on the Triton backend vs the reference."""
    torch.manual_seed(0)
    gate = kf.ClassGate.block(5, 16, 8)
    layer = kf.FastKindLinear(40, 56, tailor_rank=16, gate=gate).half()
    layer.freeze_learngenes()
    x = torch.randn(3, 32, 40, dtype=torch.float16)
    labels = torch.tensor([0, 4, 2])
    outs = {}
    for backend in ("torch", "triton"):
        layer.zero_grad(set_to_none=True)
        with kf.use_backend(backend):
            y = layer(x, labels=labels)
            y.float().square().mean().backward()
        outs[backend] = (y.float(), layer.u_t.grad.float(), layer.v_t.grad.float(), layer.sigma_t.grad.float())
        assert layer.u_g.grad is None and layer.bias.grad is None
    for name, a, b in zip(("y", "du_t", "dv_t", "dsigma_t"), outs["torch"], outs["triton"]):
        # tolerances relative to the tensor's own scale (gradients here peak at 3e-3..2e-2):
        # an all-zero or a 10 %-off gradient must fail
        scale = a.abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-2 * scale, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("case", ["k_zero_tailors", "k_above_max"])
def test_fallback_to_reference(interpreter, case):
    from kind_fast.ops.kind_linear_triton import MAX_ACTIVE, OP

    if case == "k_zero_tailors":
        inp = cast(make_case(16, 20, 4, 2, 2, 3, seed=0), torch.float32)
        inp["idx"], inp["val"] = inp["idx"][:, :0].contiguous(), inp["val"][:, :0].contiguous()
    else:
        n_t = MAX_ACTIVE + 8
        inp = cast(make_case(16, 20, n_t, n_t, 2, 3, gate_kind="all_on", seed=0), torch.float32)
    y, h = OP(*args_of(inp))
    y_r, h_r = kind_linear_ref(*args_of(inp))
    torch.testing.assert_close(y, y_r)
    torch.testing.assert_close(h, h_r)


def test_autotune_space_is_pruned_and_wraps_the_kernel(interpreter):
    """KIND_FAST_AUTOTUNE=1 wraps the fused kernel in triton.autotune (tuning itself needs a GPU);
    the space is pruned of the configs the static audit shows spilling (tests/test_audit.py)."""
    from kind_fast.ops.kind_linear_triton import _kernels
    from kind_fast.perf.perfmodel import owner_split

    K = _kernels()
    tuner = K._autotuned_fused(1152, 32, 128)
    assert len(tuner.configs) >= 3 and not tuner.reset_to_zero  # epoch flags: nothing to zero between trials
    for kp, bm in ((128, 64), (32, 128), (64, 64)):
        kept = K.autotune_configs(1152, kp, bm)
        assert kept
        for c in kept:
            assert (c.kwargs["G"], c.kwargs["NSH"]) == owner_split(kp, c.kwargs["BN"], 1152)
            assert not (kp >= 128 and (c.kwargs["BN"] > 64 or c.num_warps < 8 or c.num_stages > 3))
            assert not (bm == 128 and c.num_warps == 4)
    assert not K._autotune_enabled(torch.device("cpu"))


def test_kernels_follow_the_interpreter_switch(interpreter, monkeypatch):
    """The kernel module is (re)decorated for the mode in force when a kernel runs."""
    from kind_fast.ops.kind_linear_triton import _kernels

    assert _kernels().INTERPRETED is True
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _kernels().INTERPRETED is False
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _kernels().INTERPRETED is True


# ------------------------------------------------------------------ path M2 (fully factored)
M2_GRADS = ("x", "u_g", "sigma_g", "v_g", "bias", "u_t", "sigma_t", "v_t", "val")
M2_ARGS = ("x", "u_g", "sigma_g", "v_g", "bias", "u_t", "sigma_t", "v_t", "idx", "val", "labels")


def make_m2_case(n_in, n_out, n_g, n_t, k, b, t, **kw):
    inp = make_case(n_in, n_out, n_t, k, b, t, **kw)
    g = torch.Generator().manual_seed(11)
    inp.pop("w_g")
    inp["u_g"] = torch.randn(n_g, n_out, generator=g, dtype=torch.float64) * n_out ** -0.5
    inp["v_g"] = torch.randn(n_g, n_in, generator=g, dtype=torch.float64) * n_in ** -0.5
    inp["sigma_g"] = torch.rand(n_g, generator=g, dtype=torch.float64) + 1.0
    return inp


def run_m2(inp, backend, g):
    from kind_fast.ops.kind_linear_triton import kind_linear_factored

    leaves = {n: inp[n].clone().requires_grad_(True) for n in M2_GRADS if inp[n] is not None}
    full = {**inp, **leaves}
    if backend is None:  # oracle: W_G materialised in float64, autograd through it
        w_g = (full["u_g"].t() * full["sigma_g"]) @ full["v_g"]
        y = naive_kind_linear(full["x"], w_g, *[full[n] for n in ARGS[2:]])
    else:
        with kf.use_backend(backend):
            y = kind_linear_factored(*[full[n] for n in M2_ARGS],
                                     rows_per_sample=full["x"].shape[0] // full["labels"].shape[0])
    y.backward(g.to(y.dtype))
    return y, {n: leaves[n].grad for n in leaves}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("t", [32, 7])
def test_factored_m2_matches_oracle(interpreter, t, dtype):
    """kind_linear_factored on the Triton backend (learngenes as always-on slots, no W_G) vs the
    float64 oracle, every gradient including U_G, σ_G, V_G; torch's error = the M1 reference."""
    inp = make_m2_case(40, 52, 9, 14, 6, 3, t, gate_kind="random_k", seed=t, random_values=True)
    low = cast({**inp, "w_g": None}, dtype)
    low.pop("w_g")
    for n in ("u_g", "v_g"):
        low[n] = inp[n].to(dtype)
    low["sigma_g"] = inp["sigma_g"].float()
    g = torch.randn(inp["x"].shape[0], 52, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y_o, gr_o = run_m2(inp, None, g)
    y_l, gr_l = run_m2(low, "torch", g)
    y_t, gr_t = run_m2(low, "triton", g)
    assert y_t.dtype == dtype
    assert_close_to_oracle(y_t, y_o, y_l, dtype, "M2 y")
    for n in gr_o:
        assert_close_to_oracle(gr_t[n], gr_o[n], gr_l[n], dtype, f"M2 d{n}")


def test_layer_routes_small_rank_to_m2(interpreter, monkeypatch):
    """FastKindLinear with a small learngene rank takes path M2 on the Triton backend."""
    from kind_fast.ops import kind_linear_triton as kt

    calls = []
    real = kt._kernels

    def spy():
        mod = real()
        calls.append(mod)
        return mod

    monkeypatch.setattr(kt, "_kernels", spy)
    torch.manual_seed(0)
    gate = kf.ClassGate.block(4, 16, 8)
    layer = kf.FastKindLinear(64, 80, tailor_rank=16, learngene_rank=8, gate=gate)
    from kind_fast.ops.paths import choose_path

    assert choose_path(64, 64, 80, 8, 16, learngene_rank=8).path == "M2"
    x = torch.randn(2, 32, 64)
    labels = torch.tensor([1, 4])
    with kf.use_backend("triton"):
        y = layer(x, labels=labels)
        y.square().mean().backward()
    grads = [p.grad.clone() for p in (layer.u_g, layer.sigma_g, layer.v_g, layer.u_t)]
    assert calls, "the Triton kernels did not run"
    layer.zero_grad(set_to_none=True)
    with kf.use_backend("torch"):
        y_r = layer(x, labels=labels)
        y_r.square().mean().backward()
    torch.testing.assert_close(y, y_r, rtol=1e-4, atol=1e-4)
    for a, p in zip(grads, (layer.u_g, layer.sigma_g, layer.v_g, layer.u_t)):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-4)


def test_factored_opcheck(interpreter):
    from kind_fast.ops.kind_linear_triton import FACTORED_OP

    inp = cast(make_case(20, 24, 6, 3, 2, 16, seed=1), torch.float32)
    args = [inp["x"], inp["bias"], inp["u_t"], inp["sigma_t"], inp["v_t"], inp["idx"], inp["val"], inp["labels"]]
    for i in (0, 1, 2, 3, 4, 6):
        args[i] = args[i].requires_grad_(True)
    torch.library.opcheck(FACTORED_OP, tuple(args), test_utils=("test_schema", "test_faketensor",
                                                                "test_autograd_registration"))


# ------------------------------------------------------------------ backend protocol, cost model
def test_supports_and_status(monkeypatch):
    from kind_fast.ops import kind_linear_triton as kt

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert kt.supports("cuda", torch.bfloat16) and kt.supports("cuda", torch.float16)
    assert not kt.supports("cuda", torch.float32)  # fp32 runs the reference via the registry
    assert not kt.supports("cpu", torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kt.supports("cpu", torch.float32) and kt.supports("cpu", torch.float16)
    assert not kt.supports("cpu", torch.bfloat16)  # the interpreter has no bf16
    ok, why = kt.status()
    assert isinstance(ok, bool) and why


def test_cost_model_paths():
    from kind_fast.ops.kind_linear_triton import MAX_ACTIVE
    from kind_fast.ops.paths import choose_path

    c = choose_path(8192, 1152, 4608, 32, 96, learngene_rank=1056)
    assert c.path == "M1" and c.would_prefer == "M1"
    assert c.flop_ratio == pytest.approx(1 + 32 / 1152 + 32 / 4608)
    m2 = choose_path(8192, 1152, 1152, 32, 96, learngene_rank=16)
    assert m2.would_prefer == "M2" and m2.path == "M2"
    big = choose_path(8192, 4096, 4096, 32, 96, learngene_rank=512)  # M2 cheaper but > 128 slots
    assert big.would_prefer == "M2" and big.path == "M1"
    assert choose_path(8192, 1152, 1152, 32, 96, distinct_classes=2, training=False).would_prefer == "M3"
    assert choose_path(8192, 1152, 1152, 32, 96, distinct_classes=2, training=True).would_prefer == "M1"
    assert choose_path(512, 1152, 1152, 32, 96, distinct_classes=2, training=False).would_prefer == "M1"
    assert choose_path(8192, 1152, 1152, 0, 96).path == "M0"
    assert choose_path(8192, 1152, 1152, MAX_ACTIVE + 1, 1152).path == "M0"


def test_debug_log(interpreter, monkeypatch, capsys):
    from kind_fast.ops import kind_linear_triton as kt

    monkeypatch.setenv("KIND_FAST_DEBUG", "1")
    monkeypatch.setattr(kt, "_LOGGED", set())
    inp = cast(make_case(16, 24, 6, 3, 2, 16, seed=3), torch.float32)
    kt.OP(*args_of(inp))
    err = capsys.readouterr().err
    assert "kind_fast[triton] forward" in err and "-> M1" in err and "BM" in err


# ------------------------------------------------------------------ GPU
DIT_SHAPES = [(384, 1536), (768, 768), (1152, 3456), (4608, 1152)]  # S.fc1, B.proj, XL.qkv, XL.fc2


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("t", [256, 17])
@pytest.mark.parametrize("n_in,n_out", DIT_SHAPES, ids=lambda v: str(v))
def test_gpu_dit_shapes(monkeypatch, n_in, n_out, t, dtype):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    b = 8 if t == 256 else 24
    inp = make_case(n_in, n_out, 96, 32, b, t, gate_kind="random_k", classes=10, seed=n_in, device="cuda",
                    random_values=True)
    check_against_oracle(inp, dtype, GRADS, f"GPU {n_in}x{n_out} T={t}")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("t", [256, 17])
def test_gpu_factored_m2(monkeypatch, t):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    b = 8 if t == 256 else 24
    inp = {n: (v.cuda() if isinstance(v, torch.Tensor) else v)
           for n, v in make_m2_case(1152, 1152, 64, 96, 32, b, t, classes=10, seed=5, random_values=True).items()}
    low = {n: (v.to(torch.bfloat16) if n in ("x", "u_g", "v_g", "bias", "u_t", "v_t") else v)
           for n, v in inp.items()}
    low["sigma_g"], low["sigma_t"], low["val"] = inp["sigma_g"].float(), inp["sigma_t"].float(), inp["val"].float()
    g = torch.randn(inp["x"].shape[0], 1152, dtype=torch.float64, device="cuda")
    y_o, gr_o = run_m2(inp, None, g)
    y_l, gr_l = run_m2(low, "torch", g)
    y_t, gr_t = run_m2(low, "triton", g)
    assert_close_to_oracle(y_t, y_o, y_l, torch.bfloat16, "GPU M2 y")
    for n in gr_o:
        assert_close_to_oracle(gr_t[n], gr_o[n], gr_l[n], torch.bfloat16, f"GPU M2 d{n}")


@pytest.mark.gpu
@requires_cuda
def test_gpu_auto_backend_choice(monkeypatch):
    from kind_fast.ops.backends import resolve_backend

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    dev = torch.device("cuda")
    assert resolve_backend(dev, torch.bfloat16) == "triton"
    assert resolve_backend(dev, torch.float16) == "triton"
    assert resolve_backend(dev, torch.float32) == "torch"


def _gpu_layer(n_in=768, n_out=768, dtype=torch.bfloat16):
    torch.manual_seed(0)
    gate = kf.ClassGate.block(10, 96, 32)
    layer = kf.FastKindLinear(n_in, n_out, tailor_rank=96, gate=gate).to("cuda", dtype)
    layer.freeze_learngenes()
    return layer


@pytest.mark.gpu
@requires_cuda
def test_gpu_compile_fullgraph(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    layer = _gpu_layer()
    x = torch.randn(4, 256, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.tensor([0, 3, 9, 10], device="cuda")

    def step(x, labels):
        return layer(x, labels=labels).float().square().mean()

    with kf.use_backend("triton"):
        compiled = torch.compile(step, fullgraph=True)
        loss_c = compiled(x, labels)
        gx_c, gu_c = torch.autograd.grad(loss_c, (x, layer.u_t))
        loss_e = step(x, labels)
        gx_e, gu_e = torch.autograd.grad(loss_e, (x, layer.u_t))
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(gx_c, gx_e)
    torch.testing.assert_close(gu_c, gu_e)


@pytest.mark.gpu
@requires_cuda
def test_gpu_cuda_graph_capture(monkeypatch):
    """Capture forward+backward in a CUDA graph; replay on new inputs copied into the buffers."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    layer = _gpu_layer()
    static_x = torch.randn(4, 256, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    static_lab = torch.tensor([0, 1, 2, 3], device="cuda")
    params = (layer.u_t, layer.sigma_t, layer.v_t)

    def step():
        loss = layer(static_x, labels=static_lab).float().square().mean()
        return (loss,) + torch.autograd.grad(loss, (static_x,) + params)

    with kf.use_backend("triton"):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):  # warm up: compile the kernels outside the capture
                step()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = step()
        for seed in (1, 2):
            gen = torch.Generator(device="cuda").manual_seed(seed)
            with torch.no_grad():
                static_x.copy_(torch.randn(static_x.shape, device="cuda", generator=gen, dtype=static_x.dtype))
                static_lab.copy_(torch.randint(0, 11, (4,), device="cuda", generator=gen))
            graph.replay()
            torch.cuda.synchronize()
            eager = step()
            for a, b in zip(static_out, eager):
                torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.gpu
@requires_cuda
def test_gpu_deterministic_bitwise(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    inp = cast(make_case(1152, 1152, 96, 32, 16, 256, dist="zipf", classes=10, seed=2, device="cuda"),
               torch.bfloat16)
    g = torch.randn(inp["x"].shape[0], 1152, device="cuda")
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        (y1, g1), (y2, g2) = (run(inp, "triton", GRADS, g) for _ in range(2))
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(y1, y2)
    for n in g1:
        assert torch.equal(g1[n], g2[n]), f"d{n}"


# ------------------------------------------------------------------ compiled mode without a GPU
# Every config the launchers can launch is compiled for sm_90a by the static audit
# (kind_fast/perf/audit.py, tests/test_audit.py): registers, spills, wgmma, async copies.
