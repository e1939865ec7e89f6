"""Grouped projections (kind_linear_grouped, kind_group, InputGroup) and the lean CPU path M5:
equal to the separate layers (forward and every gradient), registered like the other ops
(opcheck, gradcheck, fake kernels, torch.compile fullgraph, FLOP formulas), backend dispatch
pluggable, and the layers' parameters, names and state-dict keys unchanged."""

from __future__ import annotations

import types

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import kind_fast as kf
from kind_fast.models.dit import Attention, DiT, KindConfig
from kind_fast.nn.layers import InputGroup
from kind_fast.ops import kind_linear_grouped as grouped_mod
from kind_fast.ops import paths
from kind_fast.ops.kind_linear import kind_linear, kind_linear_flops
from kind_fast.ops.kind_linear_grouped import kind_linear_grouped
from kind_fast.ops.kind_linear_lean import kind_linear_lean, lean_plan
from kind_fast.ops.paths import force_path, record_paths
from kind_fast.testing import (
    DISTRIBUTIONS,
    GATE_KINDS,
    assert_close_to_oracle,
    make_gate,
    make_labels,
    naive_kind_linear,
    tiny_dit,
)

F64 = torch.float64


def _group_case(gate_kind="random_k", dist="uniform", outs=(7, 9, 5), n_in=12, n_t=10, active=3, b=5, t=4,
                classes=6, dtype=F64, seed=0, bias=(True, False, True)):
    g = torch.Generator().manual_seed(seed)
    gate = make_gate(gate_kind, classes, n_t, active, seed=seed)
    idx, val = gate.compiled()
    labels = make_labels(dist, b, classes, generator=g)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=F64) * scale).to(dtype).requires_grad_(True)

    layers = []
    for o, has_bias in zip(outs, bias):
        layers.append(dict(w_g=r(o, n_in, scale=n_in ** -0.5), bias=r(o) if has_bias else None,
                           u_t=r(n_t, o, scale=o ** -0.5), sigma_t=(torch.rand(n_t, generator=g, dtype=F64) + 0.5)
                           .to(dtype).requires_grad_(True), v_t=r(n_t, n_in, scale=n_in ** -0.5)))
    x = r(b, t, n_in)
    v = val.detach().to(F64 if dtype == F64 else torch.float32).requires_grad_(gate.trainable)
    return x, layers, idx, v, labels


def _leaves(x, layers, val):
    out = [x] + [p for lay in layers for p in lay.values() if p is not None and p.requires_grad]
    return out + ([val] if val.requires_grad else [])


def _separate(x, layers, idx, val, labels):
    return [kind_linear(x, lay["w_g"], lay["bias"], lay["u_t"], lay["sigma_t"], lay["v_t"], idx, val, labels)
            for lay in layers]


def _grouped(x, layers, idx, val, labels):
    return kind_linear_grouped(x, [lay["w_g"] for lay in layers], [lay["bias"] for lay in layers],
                               [lay["u_t"] for lay in layers], [lay["sigma_t"] for lay in layers],
                               [lay["v_t"] for lay in layers], idx, val, labels)


def _outputs_and_grads(fn, x, layers, idx, val, labels):
    ys = fn(x, layers, idx, val, labels)
    gen = torch.Generator().manual_seed(7)
    gys = [torch.randn(y.shape, generator=gen, dtype=F64).to(y.dtype) for y in ys]
    leaves = _leaves(x, layers, val)
    grads = torch.autograd.grad(ys, leaves, gys)
    return [y.detach() for y in ys], grads


# ------------------------------------------------------------------ the registered op
@pytest.mark.parametrize("gate_kind", GATE_KINDS)
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_grouped_op_equals_separate_layers_float64(gate_kind, dist):
    """Exact in float64 (to its rounding): every output and every gradient, the gate's included."""
    case = _group_case(gate_kind, dist, b=5 if dist != "distinct" else 4)
    y_ref, g_ref = _outputs_and_grads(_separate, *case)
    y, g = _outputs_and_grads(_grouped, *case)
    for a, r in zip(y, y_ref):
        torch.testing.assert_close(a, r, rtol=1e-13, atol=1e-13)
    for i, (a, r) in enumerate(zip(g, g_ref)):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12, msg=f"gradient {i}")


@pytest.mark.parametrize("t", [1, 3, 8])
def test_grouped_op_rows_per_sample_and_plans(t):
    """T = 1 (the reference's row plan), T < K and T >= K (its sample plan)."""
    case = _group_case("block", "zipf", t=t, active=4, n_t=12)
    y_ref, g_ref = _outputs_and_grads(_separate, *case)
    y, g = _outputs_and_grads(_grouped, *case)
    for a, r in zip(list(y) + list(g), list(y_ref) + list(g_ref)):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_grouped_op_low_precision_within_the_dtype_rule(dtype):
    x, layers, idx, val, labels = _group_case(dtype=dtype, seed=3)
    ys = _grouped(x, layers, idx, val, labels)
    lowp = _separate(x, layers, idx, val, labels)
    for i, (y, lay) in enumerate(zip(ys, layers)):
        oracle = naive_kind_linear(x.detach().reshape(-1, x.shape[-1]), lay["w_g"], lay["bias"], lay["u_t"],
                                   lay["sigma_t"], lay["v_t"], idx, val, labels).view(y.shape)
        assert y.dtype == dtype
        assert_close_to_oracle(y, oracle, lowp[i], dtype, f"grouped layer {i}")


def test_grouped_opcheck_and_gradcheck():
    x, layers, idx, val, labels = _group_case("dense_trainable", dtype=torch.float32, seed=1)
    w = torch.cat([lay["w_g"].detach() for lay in layers]).requires_grad_(True)
    bias = torch.randn(w.shape[0]).requires_grad_(True)
    us = [lay["u_t"] for lay in layers]
    ss = [lay["sigma_t"] for lay in layers]
    vs = [lay["v_t"] for lay in layers]
    x2 = x.detach().reshape(-1, x.shape[-1]).requires_grad_(True)
    op = torch.ops.kind_fast.kind_linear_grouped
    args = (x2, w, bias, us, ss, vs, idx, val, labels)
    torch.library.opcheck(op, args)
    torch.library.opcheck(op, (x2, w, None, us, ss, vs, idx, val, labels))
    y, h = op(*args)
    assert h.shape == (x2.shape[0], 3 * idx.shape[1])
    plain = (x2.detach(), w.detach(), [u.detach() for u in us], [s.detach() for s in ss], [v.detach() for v in vs],
             idx, val.detach(), labels, h)
    for mask in ([True] * 7, [True, False, False, True, True, True, False], [False] * 6 + [True]):
        torch.library.opcheck(torch.ops.kind_fast.kind_linear_grouped_backward,
                              (torch.randn_like(y), *plain, mask))
    xd, layers, idx, val, labels = _group_case("dense_trainable", outs=(3, 4), bias=(True, True), n_in=5, n_t=4,
                                                active=2, b=2, t=3, classes=3, seed=2)
    n = len(layers)

    def f(x_, w_, b_, *rest):
        return op(x_.reshape(-1, 5), w_, b_, list(rest[:n]), list(rest[n:2 * n]), list(rest[2 * n:3 * n]), idx,
                  rest[-1], labels)[0]

    leaves = [xd.detach().clone().requires_grad_(True),
              torch.cat([lay["w_g"].detach() for lay in layers]).requires_grad_(True),
              torch.cat([lay["bias"].detach() for lay in layers]).requires_grad_(True)]
    leaves += [lay[k].detach().clone().requires_grad_(True) for k in ("u_t", "sigma_t", "v_t") for lay in layers]
    leaves.append(val.detach().clone().requires_grad_(True))
    assert torch.autograd.gradcheck(f, leaves)


def test_grouped_flop_formula_is_the_layers_sum():
    x, layers, idx, val, labels = _group_case(dtype=torch.float32)
    m, n_in, k = x.shape[0] * x.shape[1], x.shape[-1], idx.shape[1]
    with FlopCounterMode(display=False) as fc:
        ys = _grouped(x, layers, idx, val, labels)
        torch.autograd.backward(ys, [torch.ones_like(y) for y in ys])
    mask = [True, True, True, True, True, True, False]
    expected = sum(kind_linear_flops(m, n_in, lay["w_g"].shape[0], k) +
                   kind_linear_flops(m, n_in, lay["w_g"].shape[0], k, mask) for lay in layers)
    assert fc.get_total_flops() == expected


def test_grouped_backend_dispatch_is_pluggable(monkeypatch):
    """A backend module that defines GROUPED_OP serves groups with it; one without it gets exact
    per-layer calls of its own kind_linear op (what the Triton backend gets until its grouped
    launch lands)."""
    case = _group_case(dtype=torch.float32, seed=4)
    y_ref = [y.detach() for y in _separate(*case)]
    calls = []

    def fake_grouped(*args):
        calls.append("grouped")
        return torch.ops.kind_fast.kind_linear_grouped(*args)

    fake = types.SimpleNamespace(GROUPED_OP=fake_grouped)
    monkeypatch.setattr("kind_fast.ops.backends.resolve_backend", lambda device, dtype: "triton")
    monkeypatch.setattr("kind_fast.ops.backends.backend_module", lambda name: (fake, ""))
    assert grouped_mod.resolve_grouped_op(torch.device("cpu"), torch.float32) is fake_grouped
    ys = _grouped(*case)
    assert calls == ["grouped"]
    for a, r in zip(ys, y_ref):
        torch.testing.assert_close(a.detach(), r, rtol=0, atol=0)
    # no grouped kernel: the per-layer fallback, one kind_linear call per layer
    monkeypatch.setattr("kind_fast.ops.backends.backend_module", lambda name: (types.SimpleNamespace(), ""))
    per_layer = []
    real = grouped_mod.kind_linear
    monkeypatch.setattr(grouped_mod, "kind_linear", lambda *a, **k: per_layer.append(1) or real(*a, **k))
    monkeypatch.setattr("kind_fast.ops.backends.resolve_op", lambda device, dtype: torch.ops.kind_fast.kind_linear)
    ys = _grouped(*case)
    assert len(per_layer) == 3
    for a, r in zip(ys, y_ref):
        torch.testing.assert_close(a.detach(), r, rtol=0, atol=0)


def test_grouped_bad_input():
    x, layers, idx, val, labels = _group_case(dtype=torch.float32)
    ws = [lay["w_g"] for lay in layers]
    us = [lay["u_t"] for lay in layers]
    ss = [lay["sigma_t"] for lay in layers]
    vs = [lay["v_t"] for lay in layers]
    with pytest.raises(ValueError, match="one entry per layer"):
        kind_linear_grouped(x, ws, [None] * 3, us, ss[:2], vs, idx, val, labels)
    with pytest.raises(TypeError, match="one entry per layer"):
        kind_linear_grouped(x, ws, [None] * 3, us[0], ss, vs, idx, val, labels)
    with pytest.raises(ValueError, match="out_i"):
        kind_linear_grouped(x, ws[:2], [None] * 2, us, ss, vs, idx, val, labels)
    with pytest.raises(ValueError, match="at least one layer"):
        kind_linear_grouped(x, [], [], [], [], [], idx, val, labels)
    with pytest.raises(ValueError, match="labels out of range"):
        kind_linear_grouped(x, ws, [None] * 3, us, ss, vs, idx, val, torch.full_like(labels, 99))


# ------------------------------------------------------------------ the lean CPU path M5
def _layer_params(case):
    x, layers, idx, val, labels = case
    return x.reshape(-1, x.shape[-1]), layers, idx, val, labels


@pytest.mark.parametrize("plan_kind", ["union", "sample"])
@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("gate_kind", ["block", "random_k", "dense", "all_on"])
@pytest.mark.parametrize("learngenes", ["frozen", "train"])
def test_lean_path_equals_reference_every_gradient(plan_kind, groups, gate_kind, learngenes):
    """M5's hand-written backward against the reference op (float64): x, W_G (when the learngenes
    train), the biases and every tailor gradient; union and per-sample plans, one layer or a group."""
    outs = (7, 9, 5)[:groups]
    case = _group_case(gate_kind, "zipf", outs=outs, bias=(True, False, True)[:groups], t=4, active=3)
    x2, layers, idx, val, labels = _layer_params(case)
    if learngenes == "frozen":
        for lay in layers:
            lay["w_g"].requires_grad_(False)
    y_ref, g_ref = _outputs_and_grads(_separate, *case)
    present = tuple(sorted(set(labels.tolist())))
    plan = lean_plan(labels, idx, val, present, plan_kind)

    def lean(x, lays, idx_, val_, labels_):
        w, bias = grouped_mod.concat_group([lay["w_g"] for lay in lays], [lay["bias"] for lay in lays])
        y = kind_linear_lean(x.reshape(-1, x.shape[-1]), w, bias,
                             [(lay["u_t"], lay["sigma_t"], lay["v_t"]) for lay in lays], plan)
        return [p.view(*x.shape[:-1], -1) for p in y.split([lay["u_t"].shape[1] for lay in lays], -1)]

    y, g = _outputs_and_grads(lean, *case)
    for a, r in zip(y, y_ref):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
    for i, (a, r) in enumerate(zip(g, g_ref)):
        torch.testing.assert_close(a, r, rtol=1e-11, atol=1e-11, msg=f"gradient {i}")


def test_lean_plans_and_their_cache():
    gate = kf.ClassGate.block(4, 16, 4)
    idx, val = gate.compiled()
    labels = torch.tensor([0, 1, 0, 4])  # classes 0, 1 and the null class (no tailors)
    union = lean_plan(labels, idx, val, (0, 1, 4), "union")
    assert (union.kind, union.rank, union.cols, union.lo) == ("union", 8, None, 0)  # contiguous: slices
    assert union.gate.shape == (8, 4) and union.gate[:, 3].abs().sum() == 0
    assert lean_plan(labels, idx, val, (0, 1, 4), "union") is union, "one plan per labels tensor"
    sample = lean_plan(labels, idx, val, (0, 1, 4), "sample")
    assert sample.kind == "sample" and sample.ids.shape == (4, 4)
    assert lean_plan(labels, idx, val, (0, 1, 4), "union") is union, "both plans kept"
    rk = kf.ClassGate.random_k(4, 16, 3, seed=1)
    ridx, rval = rk.compiled()
    scattered = lean_plan(labels, ridx, rval, (0, 1, 4), "union")
    assert scattered.cols is not None and scattered.rank == len(set(ridx[[0, 1]].flatten().tolist()))
    null_only = lean_plan(torch.tensor([4, 4]), idx, val, (4,), "union")
    assert null_only.kind == "none"


def test_lean_path_none_plan_and_refusals():
    """A batch of null-class samples only (gate off: no tailor on) runs just the learngene GEMMs;
    a trainable gate or a dispatch mode never takes M5."""
    gate = kf.ClassGate.block(3, 8, 2)
    layer = kf.FastKindLinear(12, 10, tailor_rank=8, gate=gate).double().freeze_learngenes()
    x = torch.randn(2, 3, 12, dtype=F64, requires_grad=True)
    labels = torch.tensor([3, 3])
    with record_paths() as rec:
        y = layer(x, labels=labels)
    assert rec[-1]["path"] == "M5"
    y.sum().backward()
    torch.testing.assert_close(y, torch.nn.functional.linear(x, layer.learngene_weight(), layer.bias))
    assert layer.u_t.grad is not None and layer.u_t.grad.abs().sum() == 0
    soft = make_gate("dense_trainable", 3, 8, 2)
    layer.set_gate(soft)
    with force_path("M5"), pytest.raises(RuntimeError, match="fixed"):
        layer(x, labels=torch.tensor([0, 1]))
    with record_paths() as rec:
        layer(x, labels=torch.tensor([0, 1]))
    assert rec[-1]["path"] != "M5"


# ------------------------------------------------------------------ kind_group and the models
def _kind_layers(n=3, gate=None, n_in=16, n_out=12, dtype=F64, frozen=True):
    gate = gate or kf.ClassGate.block(4, 8, 2)
    torch.manual_seed(0)
    layers = [kf.FastKindLinear(n_in, n_out + i, tailor_rank=8, gate=gate).to(dtype) for i in range(n)]
    for m in layers:
        m.freeze_learngenes(frozen)
    return layers, gate


@pytest.mark.parametrize("frozen", [True, False])
@pytest.mark.parametrize("path", [None, "M0", "M5"])
def test_kind_group_equals_the_layers(frozen, path):
    layers, gate = _kind_layers(frozen=frozen)
    x = torch.randn(3, 5, 16, dtype=F64, requires_grad=True)
    labels = torch.tensor([0, 4, 2])
    params = [x] + [p for m in layers for p in m.parameters() if p.requires_grad]

    def run(grouped):
        with force_path(path):
            ys = kf.kind_group(layers, x, labels) if grouped else tuple(m(x, labels=labels) for m in layers)
        gys = [torch.linspace(-1, 1, y.numel(), dtype=F64).view_as(y) for y in ys]
        return [y.detach() for y in ys], torch.autograd.grad(ys, params, gys)

    (y_ref, g_ref), (y, g) = run(False), run(True)
    for a, r in zip(list(y) + list(g), list(y_ref) + list(g_ref)):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


def test_kind_group_shares_one_concatenated_learngene_weight():
    layers, _ = _kind_layers()
    x, labels = torch.randn(2, 3, 16, dtype=F64), torch.tensor([0, 1])
    with torch.no_grad():
        kf.kind_group(layers, x, labels)
    w_cat = layers[0].__dict__["_group_cache"][2]
    o = 0
    for m in layers:  # each layer's cached W_G is a view of the group's one copy
        w = m.learngene_weight()
        assert w.data_ptr() == w_cat[o:].data_ptr() and w.shape == (m.out_features, 16)
        o += m.out_features
    with torch.no_grad():
        layers[1].sigma_g.mul_(3.0)  # one member changes: the group's copy is rebuilt
        ys = kf.kind_group(layers, x, labels)
        torch.testing.assert_close(ys[1], layers[1]._forward(x, labels))


def test_kind_group_refuses_layers_that_cannot_group():
    layers, gate = _kind_layers()
    x = torch.randn(2, 3, 16, dtype=F64)
    other = kf.FastKindLinear(16, 12, tailor_rank=8, gate=kf.ClassGate.block(4, 8, 2)).double()
    for bad, why in (([layers[0], other], "share one ClassGate"), ([layers[0], torch.nn.Linear(16, 4)], "not a"),
                     ([layers[0], kf.FastKindLinear(17, 12, tailor_rank=8, gate=gate).double()], "in_features")):
        with pytest.raises(ValueError, match=why):
            kf.kind_group(bad, x, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="dtype"):
        kf.kind_group(layers, x.float(), torch.tensor([0, 1]))


def _dit(mode="transfer", **kw):
    torch.manual_seed(0)
    m = DiT(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=2, num_heads=2, num_classes=3,
            kind=KindConfig(tailor_rank=8, active=2), **kw).double().set_mode(mode)
    with torch.no_grad():  # adaLN-Zero starts at zero: give the blocks something to do
        for p in m.parameters():
            if p.dim() == 2 and p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return m


@pytest.mark.parametrize("mode", ["transfer", "pretrain"])
def test_kind_dit_groups_qkv_and_equals_the_ungrouped_model(mode, monkeypatch):
    m = _dit(mode)
    x, t, y = torch.randn(4, 2, 8, 8, dtype=F64), torch.tensor([5, 500, 20, 999]), torch.tensor([0, 2, 3, 1])
    keys = list(m.state_dict())
    seen = []
    real = grouped_mod.concat_group
    monkeypatch.setattr(grouped_mod, "concat_group", lambda *a: seen.append(1) or real(*a))

    def run(grouped):
        Attention.group_qkv = grouped
        try:
            m.zero_grad(set_to_none=True)
            out = m(x, t, y)
            out.square().sum().backward()
        finally:
            Attention.group_qkv = True
        return out.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    (o1, g1), (o2, g2) = run(True), run(False)
    assert seen, "q, k, v ran as one group"
    torch.testing.assert_close(o1, o2, rtol=1e-12, atol=1e-12)
    assert set(g1) == set(g2) and {n for n in g1 if ".attn.q." in n}
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], rtol=1e-11, atol=1e-11, msg=n)
    assert list(m.state_dict()) == keys, "grouping never changes the model or its state-dict keys"


def test_kind_dit_with_hooks_on_qkv_calls_them_as_modules():
    m = _dit("transfer")
    seen = []
    handle = m.blocks[0].attn.k.register_forward_hook(lambda mod, a, out: seen.append(out.shape))
    m(torch.randn(2, 2, 8, 8, dtype=F64), torch.tensor([1, 2]), torch.tensor([0, 1]))
    handle.remove()
    assert seen == [torch.Size([2, 16, 32])]


def test_kind_dit_grouped_under_torch_compile_fullgraph():
    m = _dit("transfer").float()
    x, t, y = torch.randn(2, 2, 8, 8), torch.tensor([5, 500]), torch.tensor([0, 2])

    def step(x, t, y):
        return m(x, t, y).square().sum()

    loss_c = torch.compile(step, fullgraph=True)(x, t, y)
    loss_e = step(x, t, y)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)


def test_kindify_split_qkv_groups_and_stays_exact():
    from kind_fast.models.kindify import SplitLinear, kindify

    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(16, 48)

        def forward(self, x):
            return self.qkv(x)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Module()])
            self.blocks[0].attn = Attn()

        def forward(self, x, y):
            return self.blocks[0].attn(x)

    torch.manual_seed(0)
    net = Net().double()
    x, y = torch.randn(2, 3, 16, dtype=F64), torch.tensor([0, 3])
    ref = net(x, y)
    kindify(net, gate=kf.ClassGate.all_on(3, 8), target_modules=["qkv"], split_qkv=True)
    split = net.blocks[0].attn.qkv
    assert isinstance(split, SplitLinear)
    calls = []
    real = paths.kind_linear_group_layer
    import kind_fast.nn.layers as layers_mod

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    layers_mod_real = layers_mod.kind_linear_group_layer
    layers_mod.kind_linear_group_layer = spy
    try:
        out = net(x, y)
    finally:
        layers_mod.kind_linear_group_layer = layers_mod_real
    assert calls == [1]
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_kindified_diffusers_attention_groups_qkv():
    """diffusers' attention calls to_q, to_k, to_v one by one on the same tensor: the first call
    computes all three (one group), the others get their kept outputs; outputs and gradients equal
    the ungrouped model's, and nothing is kept after the forward."""
    diffusers = pytest.importorskip("diffusers")
    from kind_fast.models.kindify import kindify

    torch.manual_seed(0)
    m = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                        num_layers=2, sample_size=8, patch_size=2,
                                        num_embeds_ada_norm=10).double().eval()  # eval: no label dropout
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.05)
    kindify(m, gate=kf.ClassGate.block(10, 8, 2))
    assert len(m.kind_input_groups) == 2
    x, t, y = torch.randn(3, 4, 8, 8, dtype=F64), torch.tensor([1, 500, 999]), torch.tensor([0, 4, 10])
    params = [p for p in m.parameters() if p.requires_grad]
    computed = []
    real = paths.kind_linear_group_layer
    import kind_fast.nn.layers as layers_mod

    def run():
        out = m(x, t, class_labels=y).sample
        return out.detach(), torch.autograd.grad(out.square().sum(), params)

    layers_mod.kind_linear_group_layer = lambda *a, **k: computed.append(1) or real(*a, **k)
    try:
        o1, g1 = run()
    finally:
        layers_mod.kind_linear_group_layer = real
    assert len(computed) == 2, "one group computation per attention"
    assert all(not grp._kept for grp in m.kind_input_groups), "nothing kept after the forward"
    for grp in m.kind_input_groups:
        grp.detach()
    o2, g2 = run()
    torch.testing.assert_close(o1, o2, rtol=1e-12, atol=1e-12)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_input_group_falls_back_for_another_input():
    layers, _ = _kind_layers()
    group = InputGroup(layers)
    x1, x2 = torch.randn(2, 3, 16, dtype=F64), torch.randn(2, 3, 16, dtype=F64)
    labels = torch.tensor([0, 1])
    with torch.no_grad():
        q = layers[0](x1, labels=labels)
        k = layers[1](x2, labels=labels)  # another input: computed anew, the outputs kept for x1 dropped
        assert group._kept and all(kept[0] is x2 for kept in group._kept.values())
        torch.testing.assert_close(q, layers[0]._forward(x1, labels))
        torch.testing.assert_close(k, layers[1]._forward(x2, labels))
        layers[0](x1, labels=labels)
        with torch.no_grad():
            layers[1].u_t.mul_(2.0)  # a member's parameter changed after the group ran: not reused
        torch.testing.assert_close(layers[1](x1, labels=labels), layers[1]._forward(x1, labels))
    import copy

    twin = copy.deepcopy(torch.nn.ModuleList(layers))
    assert twin[0].__dict__["_input_group"].layers[1] is twin[1], "copies group their own layers"
    group.detach()
    assert "_input_group" not in layers[0].__dict__


def test_input_group_under_inference_mode_runs_each_member():
    """Inference tensors have no version counter: an InputGroup cannot tell that x is unchanged,
    so each member runs on its own (it crashed on x._version before)."""
    layers, _ = _kind_layers()
    group = InputGroup(layers)
    x, labels = torch.randn(2, 3, 16, dtype=F64), torch.tensor([0, 1])
    with torch.no_grad():
        want = [m._forward(x, labels) for m in layers]
    with torch.inference_mode():
        xi, yi = x.clone(), labels.clone()
        got = [m(xi, labels=yi) for m in layers]
        assert not group._kept
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_tiny_dit_grouped_sampling_matches_m0():
    from kind_fast.train.sampling import sample

    model = tiny_dit(1, num_classes=3, kind=KindConfig(tailor_rank=8, active=2))
    labels = torch.tensor([0, 2, 2, 1])
    kw = dict(shape=(2, 8, 8), steps=3, cfg_scale=2.0, seed=3)
    a = sample(model, labels, **kw)
    with force_path("M0"):
        Attention.group_qkv = False
        try:
            b = sample(model, labels, merged=False, **kw)
        finally:
            Attention.group_qkv = True
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_kindify_input_groups_keep_nothing_past_the_forward():
    """A model that calls only some members: what the group kept for the others is dropped when
    the model's forward ends (kindify's label hook), so no output outlives its forward."""
    from kind_fast.models.kindify import kindify

    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.to_q, self.to_k, self.to_v = (torch.nn.Linear(16, 16) for _ in range(3))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Attn()

        def forward(self, x, labels):
            return self.attn.to_q(x) + self.attn.to_k(x)  # to_v is never called

    torch.manual_seed(0)
    net = Net().double()
    x, labels = torch.randn(2, 3, 16, dtype=F64), torch.tensor([0, 2])
    ref = net(x, labels)
    kindify(net, gate=kf.ClassGate.all_on(3, 8), target_modules=["to_q", "to_k", "to_v"])
    (group,) = net.kind_input_groups
    out = net(x, labels)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert not group._kept, "to_v's output was dropped at the end of the forward"
    net.attn.to_q(x, labels=labels)  # outside a model forward: kept until the next group call or forget()
    assert group._kept
    group.forget()
    assert not group._kept
