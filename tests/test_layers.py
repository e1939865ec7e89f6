"""FastKindLinear: drop-in behaviour, conversion, dense views, life cycle, caching, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kind_fast as kf
from kind_fast.nn.gate import ClassGate


def _layer(n_in=40, n_out=56, n_t=12, active=4, classes=5, **kw):
    gate = ClassGate.block(classes, n_t, active)
    return kf.FastKindLinear(n_in, n_out, tailor_rank=n_t, gate=gate, **kw), gate


def test_defaults_and_repr():
    layer, _ = _layer()
    assert (layer.learngene_rank, layer.tailor_rank) == (40 - 12, 12)
    assert layer.u_g.shape == (28, 56) and layer.v_t.shape == (12, 40) and layer.sigma_t.shape == (12,)
    assert "learngene_rank=28" in repr(layer) and "gate=block" in repr(layer)
    assert torch.all(layer.sigma_g[:-1] >= layer.sigma_g[1:]), "components sorted by sigma"
    assert layer.sigma_g.min() >= layer.sigma_t.max(), "largest components are the learngenes"
    counts = layer.parameter_counts()
    assert counts == {"learngene": 28 * (56 + 1 + 40), "tailor": 12 * (56 + 1 + 40), "bias": 56,
                      "total": 40 * 97 + 56}


def test_init_is_svd_of_nn_linear_init():
    torch.manual_seed(0)
    layer = kf.FastKindLinear(64, 64, tailor_rank=16)
    w = layer.to_dense(class_id=0)  # no gate: all tailors
    bound = 1 / 8
    assert w.abs().max() <= bound * (1 + 1e-5), "kaiming_uniform(a=sqrt(5)) bound 1/sqrt(in)"
    u = torch.cat([layer.u_g, layer.u_t]).double()
    torch.testing.assert_close(u @ u.t(), torch.eye(64, dtype=torch.float64), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(48, 80), (80, 48), (33, 33)])
def test_from_linear_exact_with_all_on_gate(shape):
    torch.manual_seed(1)
    lin = nn.Linear(*shape)
    gate = ClassGate.all_on(7, 16)
    layer = kf.FastKindLinear.from_linear(lin, tailor_rank=16, gate=gate)
    x = torch.randn(5, 9, shape[0])
    labels = torch.tensor([0, 3, 6, 7, 2])  # 7 = null, also all on for all_on
    torch.testing.assert_close(layer(x, labels=labels), lin(x), rtol=1e-5, atol=1e-5)


def test_from_linear_float64_exact():
    lin = nn.Linear(20, 30, dtype=torch.float64)
    layer = kf.FastKindLinear.from_linear(lin, tailor_rank=5, gate=ClassGate.all_on(2, 5))
    torch.testing.assert_close(layer.to_dense(0), lin.weight.detach(), rtol=1e-12, atol=1e-12)


def test_to_dense_matches_forward_per_class():
    layer, gate = _layer()
    x = torch.randn(4, 6, 40)
    labels = torch.tensor([0, 1, 4, 5])
    y = layer(x, labels=labels)
    for b, c in enumerate(labels.tolist()):
        torch.testing.assert_close(y[b], x[b] @ layer.to_dense(c).t() + layer.bias, rtol=1e-5, atol=1e-5)
    lin = layer.to_linear(1)
    torch.testing.assert_close(lin(x[1]), y[1], rtol=1e-5, atol=1e-5)


def test_labels_from_gate_state_and_missing_labels_error():
    layer, gate = _layer()
    x = torch.randn(2, 3, 40)
    with pytest.raises(ValueError, match="no labels"):
        layer(x)
    gate.labels = torch.tensor([2, 3])
    torch.testing.assert_close(layer(x), layer(x, labels=torch.tensor([2, 3])))


def test_no_gate_is_a_plain_linear():
    torch.manual_seed(0)
    lin = nn.Linear(24, 32)
    layer = kf.FastKindLinear.from_linear(lin, tailor_rank=8)
    x = torch.randn(3, 24)
    torch.testing.assert_close(layer(x), lin(x), rtol=1e-5, atol=1e-5)


def test_2d_input_one_row_per_sample():
    layer, _ = _layer()
    x = torch.randn(6, 40)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    y = layer(x, labels=labels)
    ref = torch.stack([x[i] @ layer.to_dense(int(c)).t() + layer.bias for i, c in enumerate(labels)])
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_freeze_learngenes_and_transfer_grads():
    layer, _ = _layer()
    layer.freeze_learngenes()
    assert not any(getattr(layer, n).requires_grad for n in ("u_g", "sigma_g", "v_g", "bias"))
    assert all(getattr(layer, n).requires_grad for n in ("u_t", "sigma_t", "v_t"))
    x = torch.randn(3, 4, 40, requires_grad=True)
    layer(x, labels=torch.tensor([0, 1, 2])).sum().backward()
    assert layer.u_g.grad is None and layer.u_t.grad is not None and x.grad is not None
    layer.freeze_learngenes(False)
    assert layer.u_g.requires_grad


def test_reset_tailors_keeps_learngenes_and_sets_gate():
    layer, _ = _layer()
    lg = [p.clone() for p in (layer.u_g, layer.sigma_g, layer.v_g)]
    tl = layer.u_t.clone()
    new_gate = ClassGate.random_k(3, 12, 5, seed=1)
    layer.reset_tailors(new_gate, generator=torch.Generator().manual_seed(0))
    assert layer.gate is new_gate
    for a, b in zip(lg, (layer.u_g, layer.sigma_g, layer.v_g)):
        assert torch.equal(a, b)
    assert not torch.allclose(tl, layer.u_t)
    assert layer.sigma_t.min() > 0
    with pytest.raises(ValueError, match="tailor_rank"):
        layer.reset_tailors(ClassGate.block(3, 10, 5))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reset_tailors_have_the_scale_of_a_fresh_init(seed):
    """Transfer's new tailors are the tail components of a fresh nn.Linear-style init: their
    σ_T match the same singular values of an independently drawn nn.Linear weight (to the
    spread of random matrices), and U_T, V_T have orthonormal rows. Scaling them by 1e-3 (or
    by 1e3) went unnoticed before this test."""
    torch.manual_seed(seed)
    layer = kf.FastKindLinear(48, 96, tailor_rank=12, gate=ClassGate.block(3, 12, 4))
    with torch.no_grad():
        layer.sigma_t.mul_(1e3)  # whatever the tailors were (trained), reset replaces them
    layer.reset_tailors(generator=torch.Generator().manual_seed(100 + seed))
    ref = torch.linalg.svdvals(torch.nn.Linear(48, 96).weight.detach().double())[36:48]  # the same components
    ratio = layer.sigma_t.double() / ref
    assert ratio.min() > 0.7 and ratio.max() < 1.4, ratio
    eye = torch.eye(12, dtype=torch.float64)
    for m in (layer.u_t, layer.v_t):
        torch.testing.assert_close(m.double() @ m.double().t(), eye, atol=1e-5, rtol=0)


def test_learngene_weight_cache_while_frozen_with_or_without_a_scope():
    layer, _ = _layer()
    layer.freeze_learngenes()
    w1 = layer.learngene_weight()
    assert layer.learngene_weight() is w1, "frozen learngenes: cached without a scope (drop-in use)"
    with torch.no_grad():
        layer.sigma_g.mul_(2.0)  # like an optimizer step or a load: the version counter moves
    w2 = layer.learngene_weight()
    assert w2 is not w1
    torch.testing.assert_close(w2, 2 * w1)
    with kf.weight_cache():
        assert layer.learngene_weight() is w2, "the scope reuses it too"
    w3 = layer.learngene_weight()
    assert w3 is not w2, "leaving a scope drops every cache (filled inside or outside it)"
    torch.testing.assert_close(w3, w2)
    layer.freeze_learngenes(False)
    w4 = layer.learngene_weight()
    assert w4.requires_grad and w4 is not w3, "trainable learngenes are rebuilt with a graph"


def test_trainable_learngenes_are_cached_only_inside_a_scope_without_grad():
    """Pretraining behaves as before: outside a scope W_G is rebuilt on every call, also under
    no_grad; inside a scope (sampling) it is reused while no gradient flows."""
    layer, _ = _layer()
    with torch.no_grad():
        assert layer.learngene_weight() is not layer.learngene_weight()
        with kf.weight_cache():
            w = layer.learngene_weight()
            assert layer.learngene_weight() is w
    with kf.weight_cache():
        assert layer.learngene_weight() is not layer.learngene_weight()  # gradients flow: never cached
    assert layer._wg_cache is None


def _transfer_case():
    layer, gate = _layer(classes=3)
    layer.freeze_learngenes()
    x, labels = torch.randn(4, 5, 40), torch.tensor([0, 3, 2, 1])
    return layer, x, labels


def _fresh_output(layer, x, labels):
    """The layer's output from a copy that has never cached anything."""
    import copy

    twin = copy.deepcopy(layer)
    assert twin._wg_cache is None, "copies start without derived weights"
    with torch.no_grad():
        return twin(x, labels=labels)


@pytest.mark.parametrize("change", ["load_state_dict", "to", "unfreeze", "replace", "data_swap", "invalidate"])
def test_cached_learngene_weight_sees_every_module_api_change(change):
    """Everything the version counters and the module API can see rebuilds the cached W_G; a
    write through .data is the documented exception, fixed by kind_fast.nn.caching.invalidate()."""
    layer, x, labels = _transfer_case()
    with torch.no_grad():
        before = layer(x, labels=labels)
    assert layer._wg_cache is not None
    new = {k: v + 0.1 * torch.randn_like(v) if k in ("u_g", "sigma_g", "v_g") else v
           for k, v in layer.state_dict().items()}
    if change == "load_state_dict":
        layer.load_state_dict(new)
    elif change == "to":
        layer.to(torch.float64).to(torch.float32)
        with torch.no_grad():
            layer.u_g.mul_(1.5)
    elif change == "unfreeze":  # train the learngenes a step, then freeze them again
        layer.freeze_learngenes(False)
        opt = torch.optim.SGD([layer.u_g, layer.sigma_g, layer.v_g], lr=0.5)
        layer(x, labels=labels).square().sum().backward()
        opt.step()
        layer.freeze_learngenes()
    elif change == "replace":
        layer.u_g = nn.Parameter(new["u_g"], requires_grad=False)
    elif change == "data_swap":
        layer.sigma_g.data = new["sigma_g"].clone()  # the version counter stays; the storage changes
    else:
        layer.v_g.data.copy_(new["v_g"])  # in place through .data: invisible to version counters
        kf.nn.caching.invalidate()
    with torch.no_grad():
        after = layer(x, labels=labels)
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, _fresh_output(layer, x, labels), rtol=0, atol=0)


def _ema_style_write(params, values):
    """What diffusers' EMAModel.copy_to / restore do: writes through .data, which leave the
    parameters' version counters unchanged."""
    torch._foreach_copy_([p.data for p in params], [v.data for v in values])


def test_writes_through_data_to_trainable_parameters_are_always_seen():
    """EMA swaps of a transfer model write its trainable parameters (tailors, label table, final
    layer) through .data: nothing derived from them is cached, so the output always follows. A
    pretraining model (trainable learngenes) caches no W_G outside a scope either."""
    from kind_fast.models.dit import DiT, KindConfig

    torch.manual_seed(0)
    for mode in ("transfer", "pretrain"):
        m = DiT(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=1, num_heads=2, num_classes=3,
                kind=KindConfig(tailor_rank=8, active=2)).set_mode(mode).eval()
        x, t, y = torch.randn(2, 2, 8, 8), torch.tensor([5, 500]), torch.tensor([0, 2])
        params = [p for p in m.parameters() if p.requires_grad]
        shadow = [p.detach() + 0.05 * torch.randn_like(p) for p in params]  # "EMA" weights
        saved = [p.detach().clone() for p in params]

        def reference():  # a fresh model with the current weights: no cache anywhere
            fresh = DiT(**m.arch, kind=m.kind).eval()
            fresh.load_state_dict(m.state_dict())
            return fresh(x, t, y)

        with torch.no_grad():
            before = m(x, t, y)
            _ema_style_write(params, shadow)  # swap the EMA weights in
            torch.testing.assert_close(m(x, t, y), reference(), rtol=0, atol=0)
            assert (m(x, t, y) - before).abs().max() > 1e-3
            _ema_style_write(params, saved)  # and back
            torch.testing.assert_close(m(x, t, y), before, rtol=0, atol=0)
            with kf.weight_cache():  # inside a scope: invalidate() after a .data write
                m(x, t, y)
                _ema_style_write(params, shadow)
                kf.nn.caching.invalidate()
                torch.testing.assert_close(m(x, t, y), reference(), rtol=0, atol=0)
            _ema_style_write(params, saved)


def test_diffusers_ema_copy_to_on_a_transfer_model():
    """diffusers' EMAModel on a transfer model, over its trainable parameters (as the trainer keeps
    it) or over all of them (frozen learngenes: their EMA is the weights themselves): after
    training steps, copy_to and restore (writes through .data) leave the model computing what a
    fresh model with those weights computes, with the W_G cached all along."""
    pytest.importorskip("diffusers")
    from diffusers.training_utils import EMAModel

    from kind_fast.models.dit import DiT, KindConfig

    torch.manual_seed(0)
    for which in ("trainable", "all"):
        m = DiT(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=1, num_heads=2, num_classes=3,
                kind=KindConfig(tailor_rank=8, active=2)).set_mode("transfer")
        params = [p for p in m.parameters() if p.requires_grad] if which == "trainable" else list(m.parameters())
        ema = EMAModel(params, decay=0.5)
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        x, t, y = torch.randn(2, 2, 8, 8), torch.tensor([5, 500]), torch.tensor([0, 2])
        target = torch.randn(2, 4, 8, 8)
        for _ in range(3):
            opt.zero_grad()
            (m(x, t, y) - target).square().mean().backward()
            opt.step()
            ema.step(params)
        layer = m.blocks[0].mlp.fc1
        assert layer._wg_cache is not None

        def reference():
            fresh = DiT(**m.arch, kind=m.kind).eval()
            fresh.load_state_dict(m.state_dict())
            return fresh(x, t, y)

        m.eval()
        with torch.no_grad():
            live = m(x, t, y)
            ema.store(params)
            ema.copy_to(params)
            swapped = m(x, t, y)
            torch.testing.assert_close(swapped, reference(), rtol=0, atol=0)
            assert (swapped - live).abs().max() > 1e-4
            ema.restore(params)
            torch.testing.assert_close(m(x, t, y), live, rtol=0, atol=0)
        m.train()


@pytest.mark.parametrize("scoped", [False, True])
def test_inference_mode_forward_then_a_training_step(scoped):
    layer, _ = _layer()
    layer.freeze_learngenes()
    x, labels = torch.randn(2, 5, 40), torch.tensor([0, 3])
    ctx = kf.weight_cache() if scoped else torch.enable_grad()
    with ctx:
        with torch.inference_mode():
            y_inf = layer(x, labels=labels)
        y = layer(x, labels=labels)  # a training step right after: W_G must not be an inference tensor
        y.square().sum().backward()
    torch.testing.assert_close(y.detach(), y_inf)
    assert layer.u_t.grad is not None and layer.u_t.grad.abs().sum() > 0


def test_pretrain_grads_reach_learngenes():
    layer, _ = _layer()
    x = torch.randn(2, 5, 40)
    layer(x, labels=torch.tensor([0, 3])).square().sum().backward()
    for n in ("u_g", "sigma_g", "v_g", "bias", "u_t", "sigma_t", "v_t"):
        assert getattr(layer, n).grad is not None and getattr(layer, n).grad.abs().sum() > 0, n


def test_factory_kwargs_and_meta():
    layer = kf.FastKindLinear(16, 24, tailor_rank=4, device="meta", dtype=torch.float16)
    assert layer.u_g.is_meta and layer.u_g.dtype == torch.float16
    layer = kf.FastKindLinear(16, 24, tailor_rank=4, dtype=torch.float64)
    assert layer.u_t.dtype == torch.float64


def test_dtype_mismatch_and_shape_errors():
    layer, _ = _layer()
    with pytest.raises(TypeError, match="input dtype"):
        layer(torch.randn(2, 3, 40, dtype=torch.float64), labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="last dimension 40"):
        layer(torch.randn(2, 3, 41), labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels out of range"):
        layer(torch.randn(2, 3, 40), labels=torch.tensor([0, 9]))


def test_constructor_errors():
    with pytest.raises(ValueError, match="tailor_rank"):
        kf.FastKindLinear(8, 16, tailor_rank=9)
    with pytest.raises(ValueError, match="exceeds"):
        kf.FastKindLinear(8, 16, tailor_rank=4, learngene_rank=5)
    with pytest.raises(TypeError, match="in_features"):
        kf.FastKindLinear(8.0, 16, tailor_rank=4)
    with pytest.raises(ValueError, match="gate has tailor_rank"):
        kf.FastKindLinear(8, 16, tailor_rank=4, gate=ClassGate.block(2, 6, 2))
    with pytest.raises(TypeError, match="ClassGate"):
        kf.FastKindLinear(8, 16, tailor_rank=4, gate=object())
    with pytest.raises(TypeError, match="nn.Linear"):
        kf.FastKindLinear.from_linear(nn.Conv1d(3, 3, 1))


def test_truncated_learngenes():
    lin = nn.Linear(32, 32)
    layer = kf.FastKindLinear.from_linear(lin, tailor_rank=4, learngene_rank=8, gate=ClassGate.all_on(2, 4))
    assert layer.u_g.shape == (8, 32)
    u, s, vh = torch.linalg.svd(lin.weight.detach().double())
    best = (u[:, :12] * s[:12]) @ vh[:12]
    torch.testing.assert_close(layer.to_dense(0).double(), best, rtol=1e-5, atol=1e-5)


def test_gate_not_registered_as_submodule():
    layer, gate = _layer()
    assert not any(isinstance(m, ClassGate) for m in layer.modules())
    assert all(not k.startswith("gate") for k in layer.state_dict())


def test_labels_must_be_a_tensor_and_rows_are_never_regrouped():
    layer, gate = _layer(n_in=12)
    x = torch.randn(2, 3, 5, 12)
    for bad in ([0, 1], 3, (0, 1)):
        with pytest.raises(TypeError, match="labels must be a torch.Tensor"):
            layer(x, labels=bad)
    y = layer(x, labels=torch.tensor([0, 1]))  # (B, ..., in): sample b owns x[b]
    torch.testing.assert_close(y, layer(x.view(2, 15, 12), labels=torch.tensor([0, 1])).view(2, 3, 5, 56))
    with pytest.raises(ValueError, match=r"x has shape \(2, 3, 5, 12\) but labels has 3 entries"):
        layer(x, labels=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"x has shape \(4, 12\) but labels has 2 entries"):
        layer(torch.randn(4, 12), labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"labels out of range.*expected \[0, 5\]"):
        layer(x, labels=torch.tensor([0, 6]))


@pytest.mark.slow
def test_out_of_range_labels_under_torch_compile_name_the_range():
    layer, _ = _layer(n_in=12)
    layer.freeze_learngenes().eval()
    fn = torch.compile(lambda x, labels: layer(x, labels=labels), fullgraph=True)
    x = torch.randn(2, 3, 12)
    with torch.no_grad():
        torch.testing.assert_close(fn(x, torch.tensor([0, 5])), layer(x, labels=torch.tensor([0, 5])))
        with pytest.raises(RuntimeError, match=r"labels out of range: expected class ids in \[0, 5\]"):
            fn(x, torch.tensor([0, 6]))


def test_training_scope_caches_only_while_every_learngene_is_frozen():
    from kind_fast.models.dit import DiT, KindConfig

    m = DiT(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=1, num_heads=2, num_classes=3,
            kind=KindConfig(tailor_rank=8, active=2))
    layer = m.blocks[0].mlp.fc1
    for mode, cached in (("transfer", True), ("pretrain", False)):
        m.set_mode(mode)
        with kf.nn.caching.training_scope(m), torch.no_grad():
            assert kf.nn.caching.enabled() is cached
            assert (layer.learngene_weight() is layer.learngene_weight()) is cached
