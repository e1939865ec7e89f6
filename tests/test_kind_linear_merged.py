"""Path M3 (merged per-class weights, segmented GEMM): reference, registered ops, Triton kernels
under the interpreter, the entry point's use of it (CFG pairs, fallback to M1), the merged-weight
cache and its invalidation, and path M4 (tiny layers)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import kind_fast as kf
from kind_fast.nn.merged_cache import MergedWeightCache, tokens
from kind_fast.ops import paths
from kind_fast.ops.kind_linear import kind_linear_backward_ref, kind_linear_ref
from kind_fast.ops.kind_linear_merged import (
    assign_slots,
    kind_linear_merged,
    kind_linear_merged_gemm,
    kind_linear_merged_gemm_backward_ref,
    kind_linear_merged_gemm_ref,
    kind_linear_merged_ref,
    merge_weights,
)
from kind_fast.ops.paths import choose_path, force_path, kind_linear_eager
from kind_fast.testing import GATE_KINDS, assert_close_to_oracle, make_gate, make_labels, naive_kind_linear

NAMES = ("x", "w_g", "bias", "u_t", "sigma_t", "v_t")


def problem(kind="random_k", n_in=20, n_out=24, n_t=12, active=4, classes=6, b=6, t=5, dist="uniform",
            dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate = make_gate(kind, classes, n_t, active, seed=seed)
    idx, val = gate.compiled()
    args = dict(x=torch.randn(b * t, n_in, generator=g), w_g=torch.randn(n_out, n_in, generator=g) * n_in ** -0.5,
                bias=torch.randn(n_out, generator=g), u_t=torch.randn(n_t, n_out, generator=g) * n_out ** -0.5,
                sigma_t=torch.rand(n_t, generator=g) + 0.5, v_t=torch.randn(n_t, n_in, generator=g) * n_in ** -0.5)
    args = {k: v.to(dtype) for k, v in args.items()}
    args.update(idx=idx, val=val.to(dtype if dtype == torch.float64 else torch.float32),
                labels=make_labels(dist, b, classes, generator=g))
    return args


def oracle(a):
    return naive_kind_linear(a["x"], a["w_g"], a["bias"], a["u_t"], a["sigma_t"], a["v_t"], a["idx"], a["val"],
                             a["labels"])


ORDER = ("x", "w_g", "bias", "u_t", "sigma_t", "v_t", "idx", "val", "labels")


# ------------------------------------------------------------------ reference
@pytest.mark.parametrize("kind", GATE_KINDS)
def test_merge_weights_is_each_class_dense_weight(kind):
    torch.manual_seed(0)
    gate = make_gate(kind, 5, 12, 4)
    layer = kf.FastKindLinear(20, 24, tailor_rank=12, gate=gate).double()
    gate = gate.double()
    idx, val = gate.compiled()
    classes = [5, 0, 3]
    w = merge_weights(layer.learngene_weight(), layer.u_t, layer.sigma_t, layer.v_t, idx, val, classes)
    for s, c in enumerate(classes):
        torch.testing.assert_close(w[s], layer.to_dense(c), rtol=1e-12, atol=1e-12)


def test_assign_slots_first_appearance_on_device():
    labels = torch.tensor([4, 4, 1, 6, 1, 2])
    slot_class, class_slot = assign_slots(labels, 7, 3)
    assert slot_class.tolist() == [4, 1, 6]
    assert class_slot.tolist() == [-1, 1, -1, -1, 0, -1, 2]
    slot_class, class_slot = assign_slots(labels, 7, 10)  # S = min(max_slots, B, C+1) = 6
    assert slot_class.shape == (6,) and class_slot[2] == 3 and class_slot[0] == -1


@pytest.mark.parametrize("plan", ["segments", "all"])
@pytest.mark.parametrize("dist", ["cfg", "uniform", "same"])
def test_gemm_reference_plans_and_backward(plan, dist):
    g = torch.Generator().manual_seed(1)
    b, t, n_in, n_out, s = 6, 4, 10, 12, 3
    x = torch.randn(b * t, n_in, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(s, n_out, n_in, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(n_out, dtype=torch.float64, generator=g, requires_grad=True)
    slots = make_labels(dist, b, s - 1, generator=g)
    naive = torch.cat([x[i * t:(i + 1) * t] @ w[int(slots[i])].t() for i in range(b)]) + bias
    y = kind_linear_merged_gemm_ref(x.detach(), w.detach(), bias.detach(), slots, plan=plan)
    torch.testing.assert_close(y, naive.detach(), rtol=1e-12, atol=1e-12)
    gy = torch.randn(b * t, n_out, dtype=torch.float64, generator=g)
    want = torch.autograd.grad(naive, (x, w, bias), gy)
    got = kind_linear_merged_gemm_backward_ref(gy, x.detach(), w.detach(), slots, [True] * 3, plan=plan)
    for a, r in zip(got, want):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", GATE_KINDS)
@pytest.mark.parametrize("dist,max_classes", [("cfg", 2), ("uniform", 2), ("uniform", 7), ("same", 1)])
def test_whole_path_equals_oracle(kind, dist, max_classes):
    """kind_linear_merged = M1 for every gate kind, CFG pairs, and batches with more classes than
    slots (those samples take M1's tailor term)."""
    a = problem(kind, dist=dist)
    y = kind_linear_merged(*[a[k] for k in ORDER], max_classes=max_classes)
    torch.testing.assert_close(y, oracle(a), rtol=1e-10, atol=1e-10)
    y_all = kind_linear_merged_ref(*[a[k] for k in ORDER], max_classes,
                                   gemm=lambda *args: kind_linear_merged_gemm_ref(*args, plan="all"))
    torch.testing.assert_close(y_all, oracle(a), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", GATE_KINDS)
def test_whole_path_gradients(kind):
    """With gradients the functional runs merge + GEMM op under autograd: every gradient equals
    M1's reference (x, W_G, bias, U_T, σ_T, V_T and the gate values)."""
    a = problem(kind, dist="uniform", b=5, t=3)
    leaves = {k: a[k].clone().requires_grad_(True) for k in NAMES + ("val",)}
    args = {**a, **leaves}
    y = kind_linear_merged(*[args[k] for k in ORDER], max_classes=3)
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, [leaves[k] for k in NAMES + ("val",)], gy)
    y_r, h = kind_linear_ref(*[a[k] for k in ORDER])
    want = kind_linear_backward_ref(gy, *[a[k] for k in ORDER if k != "bias"], h, [True] * 7)
    torch.testing.assert_close(y, y_r, rtol=1e-10, atol=1e-10)
    for name, gg, ww in zip(NAMES + ("val",), got, want):
        torch.testing.assert_close(gg, ww, rtol=1e-9, atol=1e-9, msg=name)


def test_functional_validation():
    a = problem()
    w = torch.randn(2, 24, 20, dtype=torch.float64)
    with pytest.raises(ValueError, match="slots out of range"):
        kind_linear_merged_gemm(a["x"], w, None, torch.tensor([0, 1, 2, 0, 1, 0]))
    with pytest.raises(ValueError, match="weights must be"):
        kind_linear_merged_gemm(a["x"], w[:, :, :5], None, torch.zeros(6, dtype=torch.long))
    with pytest.raises(TypeError, match="dtype"):
        kind_linear_merged_gemm(a["x"], w.float(), None, torch.zeros(6, dtype=torch.long))
    with pytest.raises(TypeError, match="int32 or int64"):
        kind_linear_merged_gemm(a["x"], w, None, torch.zeros(6))
    with pytest.raises(ValueError, match="multiple"):
        kind_linear_merged_gemm(a["x"][:-1], w, None, torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="max_classes"):
        kind_linear_merged(*[a[k] for k in ORDER], max_classes=0)
    bad = dict(a, labels=torch.tensor([0, 1, 2, 3, 4, 7]))
    with pytest.raises(ValueError, match="out of range"):
        kind_linear_merged(*[bad[k] for k in ORDER])


def test_registered_ops_opcheck_and_flops():
    a = problem(dtype=torch.float32, dist="cfg")
    w = merge_weights(a["w_g"], a["u_t"], a["sigma_t"], a["v_t"], a["idx"], a["val"], [1, 6]).requires_grad_(True)
    x = a["x"].clone().requires_grad_(True)
    slots = torch.tensor([0, 0, 0, 1, 1, 1])
    torch.library.opcheck(torch.ops.kind_fast.kind_linear_merged_gemm, (x, w, a["bias"], slots))
    torch.library.opcheck(torch.ops.kind_fast.kind_linear_merged_gemm_backward,
                          (torch.randn(30, 24), a["x"], w.detach(), slots, [True, True, True]))
    torch.library.opcheck(torch.ops.kind_fast.kind_linear_merged, tuple(a[k] for k in ORDER) + (2,),
                          test_utils=("test_schema", "test_faketensor"))
    with FlopCounterMode(display=False) as fc:
        y = torch.ops.kind_fast.kind_linear_merged_gemm(x, w, a["bias"], slots)
    assert fc.get_total_flops() == 2 * 30 * 20 * 24
    with FlopCounterMode(display=False) as fc:
        y.sum().backward()
    assert fc.get_total_flops() >= 2 * (2 * 30 * 20 * 24)  # dx + dweights (+ the sum's nothing)
    with FlopCounterMode(display=False) as fc:
        torch.ops.kind_fast.kind_linear_merged(*[a[k] for k in ORDER], 2)
    assert fc.get_total_flops() == 2 * 30 * 20 * 24 + 2 * 2 * 24 * 20 * 4


# ------------------------------------------------------------------ Triton (interpreter)
@pytest.fixture
def interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from test_kind_linear_triton import _interpreter_broken

    why = _interpreter_broken()
    if why:
        pytest.skip(why)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("t,dist", [(32, "cfg"), (7, "uniform"), (16, "same")])
def test_triton_gemm_matches_reference(interpreter, dtype, t, dist):
    """Segmented GEMM and its backward on the interpreter: one-slot tiles (T % 32 == 0 / 16),
    mixed tiles (T = 7), CFG pairs; against the float64 reference with the oracle rule."""
    from kind_fast.ops.kind_linear_merged_triton import MERGED_GEMM_BACKWARD_OP, MERGED_GEMM_OP

    g = torch.Generator().manual_seed(t)
    b, n_in, n_out, s = 4, 40, 24, 3
    x = torch.randn(b * t, n_in, generator=g)
    w = torch.randn(s, n_out, n_in, generator=g) * n_in ** -0.5
    bias = torch.randn(n_out, generator=g)
    slots = make_labels(dist, b, s - 1, generator=g)
    gy = torch.randn(b * t, n_out, generator=g)
    low = [v.to(dtype) for v in (x, w, bias, gy)]
    y = MERGED_GEMM_OP(low[0], low[1], low[2], slots)
    grads = MERGED_GEMM_BACKWARD_OP(low[3], low[0], low[1], slots, [True, True, True])
    ref64 = [v.double() for v in low]
    y_o = kind_linear_merged_gemm_ref(ref64[0], ref64[1], ref64[2], slots)
    y_l = kind_linear_merged_gemm_ref(low[0], low[1], low[2], slots)
    assert y.dtype == dtype
    assert_close_to_oracle(y, y_o, y_l, dtype, "y")
    g_o = kind_linear_merged_gemm_backward_ref(ref64[3], ref64[0], ref64[1], slots, [True] * 3)
    g_l = kind_linear_merged_gemm_backward_ref(low[3], low[0], low[1], slots, [True] * 3)
    for name, a_, o_, l_ in zip(("dx", "dw", "db"), grads, g_o, g_l):
        assert_close_to_oracle(a_, o_, l_, dtype, name)


@pytest.mark.interpret
@pytest.mark.parametrize("kind", GATE_KINDS)
def test_triton_whole_path_and_layer_m3_equal_m1(interpreter, kind):
    """M3 through the Triton backend (whole-path op, and FastKindLinear in eval with a CFG pair
    declared) equals M1's reference, every gate kind, fp32."""
    from kind_fast.ops.kind_linear_merged_triton import MERGED_OP

    a = problem(kind, n_in=32, n_out=24, dist="cfg", b=4, t=16, dtype=torch.float32)
    y = MERGED_OP(*[a[k] for k in ORDER], 2)
    torch.testing.assert_close(y.double(), oracle(a), rtol=1e-4, atol=1e-4)
    torch.manual_seed(0)
    gate = make_gate(kind, 6, 12, 4)
    layer = kf.FastKindLinear(32, 24, tailor_rank=12, gate=gate).eval()
    x = torch.randn(4, 16, 32)
    labels = torch.tensor([2, 2, 6, 6])
    with torch.no_grad():
        with kf.use_backend("torch"), force_path("M0"):
            ref = layer(x, labels=labels)
        with kf.use_backend("triton"), gate.serving([2, 6]):
            y1 = layer(x, labels=labels)
            y2 = layer(x, labels=labels)
    assert layer.merged_cache.builds == 1 and layer.merged_cache.hits >= 1
    torch.testing.assert_close(y1, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y2, y1, rtol=0, atol=0)


SLOT_PATTERNS = {  # (B = 7 samples, S = 3 slots): runs of one slot are contiguous row ranges in the dW kernel
    "cfg": [0, 0, 0, 0, 1, 1, 1], "interleaved": [1, 0, 1, 0, 2, 2, 0], "reversed": [2, 2, 1, 1, 1, 0, 0],
    "one slot, two unused": [1] * 7,
}


@pytest.mark.parametrize("pattern", sorted(SLOT_PATTERNS))
def test_slot_runs_cover_each_slots_samples_as_runs(pattern):
    """slot_runs (the dW launcher's device-side plan): slot s's runs of consecutive samples,
    read from (order, run, start), are exactly its samples, each once, in batch order."""
    pytest.importorskip("triton")
    from kind_fast.kernels.kind_linear_merged import slot_runs

    slots = torch.tensor(SLOT_PATTERNS[pattern])
    for dt in (torch.int32, torch.int64):
        order, run, start = (v.tolist() for v in slot_runs(slots.to(dt), 3))
        assert len(start) == 4 and start[0] == 0 and start[-1] == len(order)
        for s in range(3):
            got = []
            for i in range(start[s], start[s + 1]):
                got += list(range(order[i], order[i] + run[i]))  # run[i] = 0 inside a run
            assert got == [b for b, v in enumerate(SLOT_PATTERNS[pattern]) if v == s], (s, order, run, start)
        assert sum(run) == len(order)


@pytest.mark.interpret
@pytest.mark.parametrize("pattern", sorted(SLOT_PATTERNS))
@pytest.mark.parametrize("t", [32, 7, 48])
def test_triton_dw_walks_each_slots_runs(interpreter, pattern, t):
    """The dW kernel (one program per tile and slot, a pipelined loop over the slot's runs of
    samples): interleaved, CFG and reversed slot orders and unused slots (dW = 0), with BR
    dividing T (T = 32: BR 32; T = 48: BR 16, runs longer than a chunk) or not (T = 7: the
    last chunk of every run masked); fp32 and fp16 against the float64 reference."""
    from kind_fast.ops.kind_linear_merged_triton import MERGED_GEMM_BACKWARD_OP

    g = torch.Generator().manual_seed(t)
    slots = torch.tensor(SLOT_PATTERNS[pattern])
    b, n_in, n_out, s = slots.shape[0], 40, 36, 3
    x = torch.randn(b * t, n_in, generator=g)
    w = torch.randn(s, n_out, n_in, generator=g) * n_in ** -0.5
    gy = torch.randn(b * t, n_out, generator=g)
    for dtype in (torch.float32, torch.float16):
        lx, lw, lg = (v.to(dtype) for v in (x, w, gy))
        _, dw, _ = MERGED_GEMM_BACKWARD_OP(lg, lx, lw, slots, [False, True, False])
        mask = [False, True, False]
        want = kind_linear_merged_gemm_backward_ref(lg.double(), lx.double(), lw.double(), slots, mask)[1]
        low = kind_linear_merged_gemm_backward_ref(lg, lx, lw, slots, mask)[1]
        assert dw.dtype == dtype and dw.shape == (s, n_out, n_in)
        assert_close_to_oracle(dw, want, low, dtype, f"dW {dtype}")
        for unused in set(range(s)) - set(SLOT_PATTERNS[pattern]):
            assert not dw[unused].any()


@pytest.mark.interpret
def test_triton_m3_gradients_through_autograd(interpreter):
    """Training through M3 on the Triton backend: merge + the segmented GEMM op under autograd
    (dx and dW by the kernels, dW carried through the merge) give M1's reference gradients
    for x, W_G, bias, U_T, σ_T, V_T and the gate values; a CFG-like batch with a third class."""
    a = problem("random_k", n_in=40, n_out=36, dist="uniform", b=6, t=16, dtype=torch.float32, seed=3)
    a["labels"] = torch.tensor([2, 2, 6, 6, 4, 2])
    leaves = {k: a[k].clone().requires_grad_(True) for k in NAMES + ("val",)}
    args = {**a, **leaves}
    with kf.use_backend("triton"):
        y = kind_linear_merged(*[args[k] for k in ORDER], max_classes=3)
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, [leaves[k] for k in NAMES + ("val",)], gy)
    a64 = {k: (v.double() if v.is_floating_point() else v) for k, v in a.items()}
    y_r, h = kind_linear_ref(*[a64[k] for k in ORDER])
    want = kind_linear_backward_ref(gy.double(), *[a64[k] for k in ORDER if k != "bias"], h, [True] * 7)
    torch.testing.assert_close(y.double(), y_r, rtol=1e-4, atol=1e-4)
    names = ("x", "w_g", "bias", "u_t", "sigma_t", "v_t", "val")
    for name, gg, r in zip(names, got, want):
        torch.testing.assert_close(gg.double(), r, rtol=2e-4, atol=2e-4, msg=lambda m, n=name: f"d{n}: {m}")


def test_meta_tensors_plan_for_the_gpu():
    """The launchers' configs on ``meta`` tensors (what the static audit replays) are the GPU
    plans of kind_fast.perf.perfmodel, not the interpreter's; CPU tensors get the interpreter's."""
    pytest.importorskip("triton")
    from kind_fast.kernels import kind_linear_merged as km

    from kind_fast.perf import perfmodel as pm
    meta, cpu = torch.device("meta"), torch.device("cpu")
    gpu = km.gemm_config(8192, 4608, 1152, 256, meta)
    plan = pm.plan_merged_gemm(8192, 4608, 1152, 256)
    assert (gpu["BM"], gpu["BN"], gpu["BK"], gpu["num_warps"], gpu["num_stages"]) == (128, 128, 64, 8, 4)
    assert gpu["GROUP_M"] == plan.GROUP_M and gpu["ROT"] == pm.rotation_stride(1152 // 64) > 1
    assert km.gemm_config(512, 4608, 1152, 16, meta)["BM"] == 64  # no mma.sync-sized tiles on a GPU
    assert km.gemm_config(8192, 4608, 1152, 256, cpu)["BM"] == 32
    assert km.dw_config(4608, 1152, 256, meta) == dict(BN=128, BK=128, BR=64, FULL=True, num_warps=8, num_stages=3)
    assert km.dw_config(4608, 1152, 37, meta)["FULL"] is False
    assert km.dw_config(4608, 1152, 256, cpu)["BN"] == 32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("n_in,n_out,t,slot_of", [(1152, 4608, 256, (0, 0, 1, 1)), (4608, 1152, 256, (0, 1, 1, 0)),
                                                  (1152, 1152, 37, (1, 0, 2, 0, 1, 1))], ids=str)
def test_gpu_segmented_gemm_dx_and_dw(monkeypatch, n_in, n_out, t, slot_of, dtype):
    """The compiled M3 kernels at DiT-XL/2 shapes (128-row one-slot tiles, 4 stages, K-rotation;
    64-row tiles over several slots; dW over runs of samples) against the float64 reference."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from kind_fast.ops.kind_linear_merged_triton import MERGED_GEMM_BACKWARD_OP, MERGED_GEMM_OP

    g = torch.Generator(device="cuda").manual_seed(n_in + t)
    b, s = len(slot_of), max(slot_of) + 1
    x = torch.randn(b * t, n_in, device="cuda", generator=g)
    w = torch.randn(s, n_out, n_in, device="cuda", generator=g) * n_in ** -0.5
    bias = torch.randn(n_out, device="cuda", generator=g)
    gy = torch.randn(b * t, n_out, device="cuda", generator=g)
    slots = torch.tensor(slot_of, device="cuda")
    low = [v.to(dtype) for v in (x, w, bias, gy)]
    y = MERGED_GEMM_OP(low[0], low[1], low[2], slots)
    grads = MERGED_GEMM_BACKWARD_OP(low[3], low[0], low[1], slots, [True, True, True])
    ref64 = [v.double() for v in low]
    assert_close_to_oracle(y, kind_linear_merged_gemm_ref(*ref64[:3], slots, plan="all"),
                           kind_linear_merged_gemm_ref(*low[:3], slots, plan="all"), dtype, "GPU M3 y")
    g_o = kind_linear_merged_gemm_backward_ref(ref64[3], ref64[0], ref64[1], slots, [True] * 3, plan="all")
    g_l = kind_linear_merged_gemm_backward_ref(low[3], low[0], low[1], slots, [True] * 3, plan="all")
    for name, a_, o_, l_ in zip(("dx", "dw", "db"), grads, g_o, g_l):
        assert_close_to_oracle(a_, o_, l_, dtype, f"GPU M3 {name}")


# ------------------------------------------------------------------ the entry point
def _layer(kind="random_k", classes=6, n_in=20, n_out=24, n_t=12, active=4, dtype=torch.float64):
    torch.manual_seed(0)
    gate = make_gate(kind, classes, n_t, active)
    layer = kf.FastKindLinear(n_in, n_out, tailor_rank=n_t, gate=gate, dtype=dtype)
    return layer, gate.to(dtype)


class PathSpy:
    """Records the paths the entry point's cost model picks."""

    def __init__(self, monkeypatch):
        self.paths = []
        real = paths.choose_path

        def spy(*args, **kwargs):
            choice = real(*args, **kwargs)
            self.paths.append(choice.path)
            return choice

        monkeypatch.setattr(paths, "choose_path", spy)


@pytest.mark.parametrize("kind", GATE_KINDS)
def test_layer_eval_cfg_m3_equals_m1(kind):
    """A CFG batch through merged class weights (M3, pinned: at this tiny size the CPU cost model
    measures the lean path M5 faster, bench/results/cpu_paths.md) equals the reference, and the
    merged weights are built once and reused."""
    layer, gate = _layer(kind)
    layer.eval()
    x = torch.randn(6, 9, 20, dtype=torch.float64)
    labels = torch.tensor([3, 3, 3, 6, 6, 6])  # a CFG batch: class 3 and the null class
    with torch.no_grad():
        with force_path("M0"):
            ref = layer(x, labels=labels)
        with gate.serving([3, 6]), force_path("M3"), paths.record_paths() as calls:
            y = layer(x, labels=labels)
            again = layer(x, labels=labels)
    assert [c["path"] for c in calls] == ["M3", "M3"]
    assert (layer.merged_cache.builds, layer.merged_cache.hits) == (1, 1)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(again, y, rtol=0, atol=0)


def test_many_classes_fall_back_to_m1(monkeypatch):
    """A batch of many distinct classes: merging one weight per class costs more than the tailor
    term (and the cache could not hold them), so the cost model does not take M3: on the CPU
    this tiny layer runs M4 or the lean path M5, on the Triton backend M1."""
    spy = PathSpy(monkeypatch)
    layer, gate = _layer("random_k", classes=40, n_in=24, n_out=24)
    layer.eval()
    x = torch.randn(40, 2, 24, dtype=torch.float64)
    labels = torch.arange(40)
    with torch.no_grad(), gate.serving(range(41)):
        y = layer(x, labels=labels)
    assert spy.paths[-1] in ("M0", "M4", "M5")
    ref = naive_kind_linear(x.view(-1, 24), layer.learngene_weight(), layer.bias, layer.u_t, layer.sigma_t,
                            layer.v_t, *gate.compiled(), labels).view(40, 2, 24)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    c = choose_path(80, 24, 24, 4, 12, samples=40, distinct_classes=40, training=False, merged_cached=False,
                    backend="triton")
    assert c.path == "M1" and c.would_prefer == "M1"


@pytest.mark.parametrize("path", ["M3", "M4"])
@pytest.mark.parametrize("kind", GATE_KINDS)
def test_training_paths_exact_gradients(path, kind):
    """M3 (merge under autograd) and M4 (tiny layers) against the reference: output and every
    gradient (x, U_G, σ_G, V_G, bias, U_T, σ_T, V_T, and the gate table when it trains)."""
    layer, gate = _layer(kind)
    x = torch.randn(5, 4, 20, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 6, 2, 2, 5])
    params = [x] + list(layer.parameters()) + ([gate.table] if gate.trainable else [])

    def run(p):
        with force_path(p):
            y = layer(x, labels=labels)
        gy = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
        return y.detach(), torch.autograd.grad(y, params, gy)

    y_ref, g_ref = run("M0")
    y, g = run(path)
    torch.testing.assert_close(y, y_ref, rtol=1e-11, atol=1e-11)
    for i, (a, r) in enumerate(zip(g, g_ref)):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-9, msg=f"gradient {i}")


def test_m4_gradcheck_float64():
    layer, gate = _layer("dense_trainable", classes=3, n_in=6, n_out=5, n_t=4, active=2)
    idx, val = gate.compiled()
    labels = torch.tensor([0, 3, 1])
    args = [torch.randn(6, 6, dtype=torch.float64, requires_grad=True)] + \
        [p.detach().clone().requires_grad_(True) for p in (layer.learngene_weight(), layer.bias, layer.u_t,
                                                           layer.sigma_t, layer.v_t)]
    v = val.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda *a: kind_linear_eager(*a[:6], idx, a[6], labels), args + [v])


def test_tiny_training_layer_takes_m5_and_flop_counting_takes_the_op(monkeypatch):
    """The demo's 64×64 transfer layer takes the lean CPU path (measured fastest,
    bench/results/cpu_paths.md); under a dispatch mode (FlopCounterMode) the op path runs, so
    FLOPs follow the op's formula."""
    spy = PathSpy(monkeypatch)
    torch.manual_seed(0)
    gate = kf.ClassGate.block(2, 16, 4)
    layer = kf.FastKindLinear(64, 64, tailor_rank=16, gate=gate).freeze_learngenes()
    x = torch.randn(8, 16, 64, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    layer(x, labels=labels).sum().backward()
    assert spy.paths[-1] == "M5"
    with FlopCounterMode(display=False):
        layer(x, labels=labels)
    assert spy.paths[-1] == "M0"  # under a dispatch mode: the op path, FLOPs by the op's formula


def test_declared_classes_are_checked():
    layer, gate = _layer()
    layer.eval()
    x = torch.randn(4, 3, 20, dtype=torch.float64)
    with torch.no_grad(), gate.serving([1, 6]):
        with force_path("M3"), pytest.raises(ValueError, match="outside the declared served classes"):
            layer(x, labels=torch.tensor([1, 1, 2, 6]))
    with pytest.raises(ValueError, match="not in"):
        with gate.serving([7]):
            pass
    assert gate.served is None
    with gate.serving([1, 6]):
        with gate.serving([0]):
            assert gate.served == (0,)
        assert gate.served == (1, 6)


# ------------------------------------------------------------------ the cache
# M3 is pinned in these tests: at their tiny sizes the CPU cost model measures M4/M5 faster, and
# what is under test is the merged-weight cache, which every eval call with declared (or
# twice-seen) classes consults whatever path runs.
def _eval_calls(layer, gate, x, labels, n=2):
    outs = []
    with torch.no_grad(), gate.serving(sorted(set(labels.tolist()))), force_path("M3"):
        for _ in range(n):
            outs.append(layer(x, labels=labels))
    return outs


def _fresh_ref(layer, x, labels):
    with torch.no_grad(), force_path("M0"):
        return layer(x, labels=labels)


def test_cache_hits_and_second_use_admission():
    layer, gate = _layer()
    layer.eval()
    x = torch.randn(4, 3, 20, dtype=torch.float64)
    labels = torch.tensor([1, 1, 6, 6])
    c = layer.merged_cache
    with kf.weight_cache():
        _eval_calls(layer, gate, x, labels, n=3)
        assert (c.builds, len(c), c.held()) == (1, 1, 2) and c.hits == 2
        layer.clear_merged_cache()
        with torch.no_grad(), force_path("M3"):  # undeclared: admitted on the second use, parameters unchanged
            layer(x, labels=labels)
            assert len(c) == 0
            layer(x, labels=labels)
            assert len(c) == 1
        layer.train()
        layer.clear_merged_cache()
        with torch.no_grad(), force_path("M3"):  # train mode, undeclared: no M3 caching
            layer(x, labels=labels)
            layer(x, labels=labels)
        assert len(c) == 0
    layer.eval()
    with torch.no_grad(), force_path("M3"):  # outside any weight_cache() scope nothing is cached, so nothing
        for _ in range(3):                   # can go stale
            layer(x, labels=labels)
    assert len(c) == 0


def test_merged_weights_never_outlive_their_scope():
    """Writes through .data (EMA swaps) are invisible to version counters: merged weights are
    dropped when the serving / weight_cache scope ends, so the next scope sees the new values."""
    layer, gate = _layer()
    layer.eval()
    x = torch.randn(4, 3, 20, dtype=torch.float64)
    labels = torch.tensor([1, 1, 6, 6])
    _eval_calls(layer, gate, x, labels)
    assert len(layer.merged_cache) == 0
    with torch.no_grad():
        layer.u_t.data.mul_(2.0)
        layer.u_g.data.mul_(0.5)
    after = _eval_calls(layer, gate, x, labels)[-1]
    torch.testing.assert_close(after, _fresh_ref(layer, x, labels))


@pytest.mark.parametrize("change", ["optimizer", "load_state_dict", "data_swap", "to", "gate", "copy_no_grad",
                                    "inference_mode"])
def test_cache_never_stale(change):
    with kf.weight_cache():  # one scope around both evaluations: the token alone must catch the change
        _cache_never_stale(change)


def _cache_never_stale(change):
    layer, gate = _layer()
    layer.eval()
    x = torch.randn(4, 3, 20, dtype=torch.float64)
    labels = torch.tensor([1, 1, 6, 6])
    before = _eval_calls(layer, gate, x, labels)[-1]
    assert layer.merged_cache.builds == 1
    if change == "optimizer":
        opt = torch.optim.SGD(layer.parameters(), lr=0.5)
        layer(x, labels=labels).square().sum().backward()
        opt.step()
    elif change == "load_state_dict":
        sd = {k: v + 0.1 for k, v in layer.state_dict().items()}
        layer.load_state_dict(sd)
    elif change == "data_swap":
        layer.u_t.data = layer.u_t.data * 2.0
    elif change == "to":
        layer.to(torch.float32)
        x = x.float()
    elif change == "gate":
        with torch.no_grad():
            gate.table.mul_(2.0)
    elif change == "copy_no_grad":
        with torch.no_grad():
            layer.v_t.copy_(layer.v_t * -1.0)
    elif change == "inference_mode":
        with torch.inference_mode():
            layer.sigma_t.add_(1.0)
    after = _eval_calls(layer, gate, x, labels)[-1]
    torch.testing.assert_close(after, _fresh_ref(layer, x, labels), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(after.double(), before)


def test_cache_capacity_lru_and_copies():
    layer, gate = _layer(classes=9)
    layer.eval()
    layer.merged_cache.capacity = 4
    x = torch.randn(4, 3, 20, dtype=torch.float64)
    c = layer.merged_cache
    with kf.weight_cache():
        for pair in ([0, 9], [1, 9], [2, 9]):  # three entries of 2 weights: the oldest is evicted
            _eval_calls(layer, gate, x, torch.tensor(pair * 2), n=1)
        assert len(c) == 2 and c.held() == 4
        assert copy.deepcopy(layer).merged_cache.held() == 0
    with pytest.raises(ValueError):
        c.capacity = -1
    c.capacity = 0
    assert len(c) == 0


def test_cache_token_tracks_storage_and_inference_tensors():
    p = torch.nn.Parameter(torch.randn(3))
    t0 = tokens([p])
    p.data = torch.randn(3)
    assert tokens([p]).key != t0.key
    with torch.inference_mode():
        q = torch.randn(3)
    assert tokens([p, q]) is None
    cache = MergedWeightCache(2)
    tok = tokens([p])
    assert cache.admit(("k",), tok, True) and not cache.admit((("a", "b", "c"),), tok, True)


# ------------------------------------------------------------------ GPU (skipped without one)
def _gpu_backend_ready(name: str) -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "needs a CUDA GPU"
    ok, why = kf.ops.backends.backend_status()[name]
    return ok, why


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_layer_m3_equals_m1_eager_and_graphed(backend):
    """On the GPU, a DiT-XL/2-shaped KIND layer in eval with a CFG pair declared takes M3 on each
    fused backend (merged weights cached once), equals M1, and replays from a CUDA graph (as
    the sampler runs it) with the same result as eager on new inputs."""
    ok, why = _gpu_backend_ready(backend)
    if not ok:
        pytest.skip(f"{backend} backend: {why}")
    from kind_fast.deploy.graphs import GraphedCall

    torch.manual_seed(0)
    gate = kf.ClassGate.block(10, 96, 32)
    layer = kf.FastKindLinear(1152, 4608, tailor_rank=96, gate=gate).to("cuda", torch.bfloat16).eval()
    labels = torch.tensor([3] * 4 + [10] * 4, device="cuda")
    x = torch.randn(8, 256, 1152, device="cuda", dtype=torch.bfloat16)
    x_new = torch.randn_like(x)
    with torch.no_grad(), kf.use_backend(backend), gate.serving([3, 10]):
        with paths.record_paths() as calls:
            y = layer(x, labels=labels)
        with force_path("M1"):
            y_m1 = layer(x, labels=labels)
        graphed = GraphedCall(lambda inp: layer(inp, labels=labels))
        graphed(x)
        y_graph = graphed(x_new)
        y_eager = layer(x_new, labels=labels)
    assert [(c["path"], c["backend"]) for c in calls] == [("M3", backend)]
    assert layer.merged_cache.builds == 1 and graphed.failed is None and graphed.replays >= 1
    scale = y_m1.float().abs().max().item()
    assert (y.float() - y_m1.float()).abs().max().item() <= 3e-2 * scale
    torch.testing.assert_close(y_graph, y_eager)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("layout", ["cfg", "scattered"])
def test_gpu_triton_merged_gemm_and_backward(layout):
    """The Triton backend's segmented GEMM and its backward at a DiT-XL/2 width, bf16, against the
    reference in float32."""
    ok, why = _gpu_backend_ready("triton")
    if not ok:
        pytest.skip(f"triton backend: {why}")
    from kind_fast.ops.kind_linear_merged_triton import MERGED_GEMM_BACKWARD_OP, MERGED_GEMM_OP

    g = torch.Generator(device="cuda").manual_seed(1)
    slots = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1] if layout == "cfg" else [1, 0, 2, 0, 1, 1, 2, 0], device="cuda")
    x = torch.randn(8 * 256, 1152, generator=g, device="cuda").bfloat16()
    w = (torch.randn(3, 1152, 1152, generator=g, device="cuda") * 1152 ** -0.5).bfloat16()
    bias = torch.randn(1152, generator=g, device="cuda").bfloat16()
    gy = torch.randn(8 * 256, 1152, generator=g, device="cuda").bfloat16()
    got = (MERGED_GEMM_OP(x, w, bias, slots), *MERGED_GEMM_BACKWARD_OP(gy, x, w, slots, [True] * 3))
    want = (kind_linear_merged_gemm_ref(x.float(), w.float(), bias.float(), slots),
            *kind_linear_merged_gemm_backward_ref(gy.float(), x.float(), w.float(), slots, [True] * 3))
    low = (kind_linear_merged_gemm_ref(x, w, bias, slots),
           *kind_linear_merged_gemm_backward_ref(gy, x, w, slots, [True] * 3))
    for name, a, o, l_ in zip(("y", "dx", "dweights", "dbias"), got, want, low):
        assert_close_to_oracle(a, o, l_, torch.bfloat16, name)
