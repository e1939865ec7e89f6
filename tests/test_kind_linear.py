"""The kind_linear op family: reference vs an independent oracle, every gradient, the registered
ops (opcheck, gradcheck, compile), bad input, dtypes and autocast."""

from __future__ import annotations

import pytest
import torch

import kind_fast as kf
from kind_fast.ops.kind_linear import kind_linear as kind_linear_fn
from kind_fast.ops.kind_linear import kind_linear_backward_ref, kind_linear_ref, tailor_plan
from kind_fast.testing import (
    DISTRIBUTIONS,
    GATE_KINDS,
    assert_close_to_oracle,
    make_gate,
    make_labels,
    naive_kind_linear,
)

GRAD_NAMES = ("x", "w_g", "bias", "u_t", "sigma_t", "v_t", "val")


def make_case(n_in, n_out, n_t, active, batch, t, *, gate_kind="random_k", dist="uniform", classes=6,
              dtype=torch.float64, seed=0, bias=True, random_values=False):
    """Fresh random inputs of the op (all leaves), and the gate that produced idx/val.

    ``random_values``: the gate's values times U(0.5, 1.5) (same tailors on): block and random_k
    gates have value 1, which hides the gate value's part of dσ_T and dval."""
    g = torch.Generator().manual_seed(seed)
    gate = make_gate(gate_kind, classes, n_t, active, seed=seed)
    idx, val = gate.compiled()
    if random_values:
        val = val * (0.5 + torch.rand(val.shape, generator=g))
    labels = make_labels(dist, batch, classes, generator=g)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    inputs = dict(
        x=r(batch * t, n_in),
        w_g=r(n_out, n_in, scale=n_in ** -0.5),
        bias=r(n_out) if bias else None,
        u_t=r(n_t, n_out, scale=n_out ** -0.5),
        sigma_t=r(n_t).abs().double() + 0.5,
        v_t=r(n_t, n_in, scale=n_in ** -0.5),
        idx=idx,
        val=val.detach().double(),
        labels=labels,
    )
    return inputs, gate


def args_of(inp):
    return [inp[k] for k in ("x", "w_g", "bias", "u_t", "sigma_t", "v_t", "idx", "val", "labels")]


def kind_linear(*args, **kw):
    """The functional on these tests' flattened rows x (B·T, in): T is passed explicitly."""
    x, labels = args[0], args[8]
    if isinstance(x, torch.Tensor) and x.dim() == 2 and labels.shape[0] and "rows_per_sample" not in kw:
        kw["rows_per_sample"] = x.shape[0] // labels.shape[0]
    return kind_linear_fn(*args, **kw)


# ------------------------------------------------------------------ forward and gradients vs oracle
SHAPES = [
    # (in, out, N_T, K, B, T): odd sizes, K not a multiple of 16, both plans
    (37, 53, 11, 5, 4, 7),     # sample plan (T >= K)
    (37, 53, 11, 5, 6, 3),     # row plan (T < K)
    (24, 40, 8, 3, 5, 1),      # one row per sample: (B, in) input
    (64, 33, 20, 20, 3, 9),    # K = N_T (all active): row plan
    (19, 70, 13, 4, 2, 17),    # T prime
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("gate_kind", GATE_KINDS + ("block_valued",))
def test_forward_and_grads_match_oracle(shape, gate_kind):
    n_in, n_out, n_t, k, b, t = shape
    if gate_kind == "all_on":
        k = n_t
    valued = gate_kind == "block_valued"  # block structure, values other than 1
    inp, _ = make_case(n_in, n_out, n_t, k, b, t, gate_kind="block" if valued else gate_kind, dist="uniform",
                       seed=hash(shape) % 1000, random_values=valued)
    leaves = {n: inp[n].clone().requires_grad_(True) for n in GRAD_NAMES if inp[n] is not None}
    inp2 = dict(inp, **leaves)
    y = kind_linear(*args_of(inp2))
    oracle_leaves = {n: inp[n].clone().requires_grad_(True) for n in GRAD_NAMES if inp[n] is not None}
    y_ref = naive_kind_linear(*args_of(dict(inp, **oracle_leaves)))
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(y_ref)
    y.backward(g)
    y_ref.backward(g)
    for n in leaves:
        torch.testing.assert_close(leaves[n].grad, oracle_leaves[n].grad, rtol=1e-9, atol=1e-9, msg=f"d{n}")


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("t", [1, 5, 16])
def test_class_distributions(dist, t):
    b = 7 if dist == "distinct" else 12
    inp, _ = make_case(40, 48, 16, 6, b, t, gate_kind="block", dist=dist, classes=8, seed=t, random_values=True)
    leaves = {n: inp[n].clone().requires_grad_(True) for n in ("x", "u_t", "sigma_t", "v_t", "val")}
    y = kind_linear(*args_of(dict(inp, **leaves)))
    oleaves = {n: inp[n].clone().requires_grad_(True) for n in leaves}
    y_ref = naive_kind_linear(*args_of(dict(inp, **oleaves)))
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    for n in leaves:
        torch.testing.assert_close(leaves[n].grad, oleaves[n].grad, msg=f"d{n}")


def test_both_plans_are_exercised():
    assert tailor_plan(4 * 7, 4, 5, 11) == "sample"
    assert tailor_plan(6 * 3, 6, 5, 11) == "row"
    assert tailor_plan(3 * 9, 3, 20, 20) == "row"  # all tailors active: one GEMM is cheaper


def test_null_class_is_learngenes_only():
    inp, gate = make_case(16, 24, 8, 3, 3, 4, gate_kind="block", classes=4)
    inp["labels"] = torch.full((3,), gate.null_class)
    y = kind_linear(*args_of(inp))
    dense = inp["x"] @ inp["w_g"].t() + inp["bias"]
    torch.testing.assert_close(y, dense)


def test_absent_tailors_get_zero_gradient_not_none():
    """DDP needs computed zero gradients for tailors of classes absent from the batch."""
    inp, gate = make_case(16, 24, 12, 4, 4, 3, gate_kind="block", classes=3)
    inp["labels"] = torch.zeros(4, dtype=torch.long)  # class 0 uses tailors 0..3 only
    u = inp["u_t"].clone().requires_grad_(True)
    kind_linear(*args_of(dict(inp, u_t=u))).sum().backward()
    assert u.grad is not None and u.grad.shape == u.shape
    assert u.grad[4:].abs().max() == 0 and u.grad[:4].abs().max() > 0


# ------------------------------------------------------------------ only what is needed
@pytest.mark.parametrize("plan_t", [7, 2])
def test_backward_computes_only_requested(plan_t):
    inp, _ = make_case(20, 28, 10, 4, 3, plan_t)
    y, h = kind_linear_ref(*args_of(inp))
    g = torch.randn_like(y)
    base = [inp[k] for k in ("x", "w_g", "u_t", "sigma_t", "v_t", "idx", "val", "labels")]
    full = kind_linear_backward_ref(g, *base, h, [True] * 7)
    for i in range(7):
        mask = [j == i for j in range(7)]
        out = kind_linear_backward_ref(g, *base, h, mask)
        for j, t in enumerate(out):
            if j == i:
                torch.testing.assert_close(t, full[j], msg=f"{GRAD_NAMES[j]} alone")
            else:
                assert t.numel() == 0, f"{GRAD_NAMES[j]} computed although not requested"


def test_autograd_requests_only_needed_grads(monkeypatch):
    seen = []
    import kind_fast.ops.kind_linear as mod

    real = mod.kind_linear_backward_ref

    def spy(*args):
        seen.append(list(args[-1]))
        return real(*args)

    monkeypatch.setattr(mod, "kind_linear_backward_ref", spy)
    inp, _ = make_case(16, 24, 8, 3, 2, 5)
    u = inp["u_t"].clone().requires_grad_(True)
    kind_linear(*args_of(dict(inp, u_t=u))).sum().backward()
    assert seen == [[False, False, False, True, False, False, False]]


# ------------------------------------------------------------------ registered op checks
@pytest.mark.parametrize("t", [4, 1])
def test_opcheck(t):
    inp, _ = make_case(12, 20, 6, 3, 3, t, dtype=torch.float32, seed=1)
    for n in ("x", "w_g", "bias", "u_t", "sigma_t", "v_t"):
        inp[n] = inp[n].float().requires_grad_(True)
    inp["val"] = inp["val"].float().requires_grad_(True)
    torch.library.opcheck(torch.ops.kind_fast.kind_linear, tuple(args_of(inp)))
    y, h = torch.ops.kind_fast.kind_linear(*args_of(inp))
    base = [inp[k].detach() for k in ("x", "w_g", "u_t", "sigma_t", "v_t")]
    base += [inp["idx"], inp["val"].detach(), inp["labels"]]
    for mask in ([True] * 7, [True, False, False, True, True, True, False], [False] * 6 + [True]):
        args = (torch.randn_like(y), *base[:5], *base[5:], h, mask)
        torch.library.opcheck(torch.ops.kind_fast.kind_linear_backward, args)


@pytest.mark.parametrize("t", [5, 2])
def test_gradcheck_float64(t):
    inp, _ = make_case(7, 9, 5, 3, 2, t, gate_kind="dense_trainable", seed=3)
    names = ["x", "w_g", "bias", "u_t", "sigma_t", "v_t", "val"]

    def f(*leaves):
        return torch.ops.kind_fast.kind_linear(*args_of(dict(inp, **dict(zip(names, leaves)))))[0]

    leaves = [inp[n].clone().requires_grad_(True) for n in names]
    assert torch.autograd.gradcheck(f, leaves)


def test_compile_fullgraph_cpu():
    gate = kf.ClassGate.block(5, 8, 3)
    layer = kf.FastKindLinear(24, 40, tailor_rank=8, gate=gate)
    x = torch.randn(3, 6, 24, requires_grad=True)
    labels = torch.tensor([0, 5, 3])

    def step(x, labels):
        return layer(x, labels=labels).square().sum()

    compiled = torch.compile(step, fullgraph=True)
    loss_c = compiled(x, labels)
    (gx_c, gu_c) = torch.autograd.grad(loss_c, (x, layer.u_t))
    loss_e = step(x, labels)
    (gx_e, gu_e) = torch.autograd.grad(loss_e, (x, layer.u_t))
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(gx_c, gx_e)
    torch.testing.assert_close(gu_c, gu_e)


def test_flop_counter_counts_the_op():
    from torch.utils.flop_counter import FlopCounterMode

    from kind_fast.ops.kind_linear import kind_linear_flops

    inp, _ = make_case(16, 24, 8, 3, 2, 5, dtype=torch.float32)
    x = inp["x"].float().requires_grad_(True)
    with FlopCounterMode(display=False) as fc:
        kind_linear(*args_of(dict(inp, x=x))).sum().backward()
    m, k = 10, inp["idx"].shape[1]
    expected = kind_linear_flops(m, 16, 24, k) + kind_linear_flops(m, 16, 24, k, [True] + [False] * 6)
    assert fc.get_total_flops() == expected


# ------------------------------------------------------------------ dtypes, autocast, determinism
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_close_to_fp32_oracle(dtype):
    inp, _ = make_case(64, 96, 16, 6, 4, 8, dtype=dtype, seed=5)
    inp["sigma_t"], inp["val"] = inp["sigma_t"].float(), inp["val"].float()
    y, _ = kind_linear_ref(*args_of(inp))
    y32, _ = kind_linear_ref(*args_of(inp), upcast=True)
    oracle = naive_kind_linear(*args_of(inp))
    assert y.dtype == dtype and y32.dtype == torch.float32
    # the baseline is plain PyTorch in ``dtype`` (each sample's exact dense weight, rounded to
    # ``dtype``, through F.linear), not the output under test
    assert_close_to_oracle(y, oracle, torch_in_dtype(inp, dtype), dtype, "reference in its own dtype")
    torch.testing.assert_close(y32.double(), oracle, rtol=1e-4, atol=1e-4)


def torch_in_dtype(inp, dtype):
    """What PyTorch itself computes for the op in ``dtype``: per sample, the exact dense weight
    W_c (float64) rounded to ``dtype``, then F.linear in ``dtype``."""
    x, w_g, bias, u_t, sigma_t, v_t, idx, val, labels = args_of(inp)
    b = labels.shape[0]
    t = x.shape[0] // b
    out = []
    for i in range(b):
        c = int(labels[i])
        g = torch.zeros(u_t.shape[0], dtype=torch.float64).index_add(0, idx[c].long(), val[c].double())
        w = w_g.double() + u_t.double().t() @ torch.diag(sigma_t.double() * g) @ v_t.double()
        out.append(torch.nn.functional.linear(x[i * t:(i + 1) * t], w.to(dtype), None if bias is None
                                              else bias.to(dtype)))
    return torch.cat(out)


def test_autocast_cpu_bf16():
    gate = kf.ClassGate.block(4, 8, 4)
    layer = kf.FastKindLinear(32, 48, tailor_rank=8, gate=gate)
    x = torch.randn(2, 5, 32)
    labels = torch.tensor([1, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x, labels=labels)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x, labels=labels), rtol=3e-2, atol=3e-2)


def test_deterministic_bitwise():
    inp, _ = make_case(32, 48, 12, 4, 6, 5, dtype=torch.float32, dist="zipf")
    torch.use_deterministic_algorithms(True)
    try:
        outs = []
        for _ in range(2):
            leaves = {n: inp[n].float().clone().requires_grad_(True) for n in ("x", "u_t", "sigma_t", "v_t", "val")}
            y = kind_linear(*args_of(dict(inp, **leaves)))
            y.backward(torch.ones_like(y))
            outs.append([y] + [leaves[n].grad for n in leaves])
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ bad input
def test_bad_input_errors():
    inp, _ = make_case(16, 24, 8, 3, 2, 5, dtype=torch.float32)
    inp = {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in inp.items()}

    def call(**over):
        return kind_linear(*args_of(dict(inp, **over)))

    with pytest.raises(ValueError, match="labels out of range"):
        call(labels=torch.tensor([0, 99]))
    with pytest.raises(ValueError, match="labels out of range"):
        call(labels=torch.tensor([-1, 0]))
    with pytest.raises(TypeError, match="labels must have an integer dtype"):
        call(labels=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="labels must be 1-D"):
        call(labels=torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"with rows_per_sample=3 x must be \(3·3, in_features\)"):
        call(labels=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="w_g must be"):
        call(w_g=torch.randn(24, 15))
    with pytest.raises(ValueError, match="v_t must be"):
        call(v_t=torch.randn(8, 17))
    with pytest.raises(ValueError, match="sigma_t must be"):
        call(sigma_t=torch.randn(7))
    with pytest.raises(TypeError, match="dtype"):
        call(w_g=inp["w_g"].double())
    with pytest.raises(TypeError, match="not supported"):
        call(x=inp["x"].to(torch.int32))
    with pytest.raises(ValueError, match="idx and val"):
        call(val=inp["val"][:, :2])
    with pytest.raises(TypeError, match="idx must be int32 or int64"):
        call(idx=inp["idx"].float())
    with pytest.raises(ValueError, match="one device"):
        call(labels=inp["labels"].to("meta"))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        call(x=[[1.0]])


def test_input_layouts_are_explicit():
    """x is (B, ..., in) with x[b] the rows of sample b, or flattened (B·T, in) rows with
    rows_per_sample=T; a label count that does not fit is an error, never a regrouping."""
    inp, _ = make_case(12, 10, 8, 3, 2, 15, dtype=torch.float32)
    inp = {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in inp.items()}
    rest = args_of(inp)[1:8]
    x, labels = inp["x"], inp["labels"]  # x: (2·15, 12), 2 samples
    flat = kind_linear_fn(x, *rest, labels, rows_per_sample=15)
    # (2, 3, 5, 12): sample b owns x[b], any number of middle dims
    torch.testing.assert_close(kind_linear_fn(x.view(2, 3, 5, 12), *rest, labels), flat.view(2, 3, 5, 10))
    torch.testing.assert_close(kind_linear_fn(x.view(2, 15, 12), *rest, labels), flat.view(2, 15, 10))
    three = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=r"x has shape \(2, 3, 5, 12\) but labels has 3 entries"):
        kind_linear_fn(x.view(2, 3, 5, 12), *rest, three)  # was: 30 rows regrouped as 3 × 10
    with pytest.raises(ValueError, match=r"x has shape \(4, 12\) but labels has 2 entries.*rows_per_sample"):
        kind_linear_fn(x[:4], *rest, labels)  # was: 2 rows per sample
    torch.testing.assert_close(kind_linear_fn(x[:4], *rest, labels, rows_per_sample=2),
                               kind_linear_fn(x[:4].view(2, 2, 12), *rest, labels).view(4, 10))
    with pytest.raises(ValueError, match="rows_per_sample=4"):
        kind_linear_fn(x[:4], *rest, labels, rows_per_sample=4)
    with pytest.raises(ValueError, match="rows_per_sample=15"):
        kind_linear_fn(x.view(2, 15, 12), *rest, labels, rows_per_sample=15)  # only for 2-D rows
    with pytest.raises(ValueError, match="must be \\(B, ..., in_features\\)"):
        kind_linear_fn(x[0], *rest, labels)


def test_empty_batch():
    inp, _ = make_case(16, 24, 8, 3, 2, 5, dtype=torch.float32)
    inp = {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in inp.items()}
    y = kind_linear(*args_of(dict(inp, x=torch.empty(0, 16), labels=torch.empty(0, dtype=torch.long))))
    assert y.shape == (0, 24)
