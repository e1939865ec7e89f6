"""kindify: in-place conversion of existing DiTs, exactness, label routing, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kind_fast as kf
from kind_fast.models.kindify import SplitLinear, kindify
from kind_fast.testing import routed_labels, tiny_dit


def inputs(b=3, classes=6):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(b, 2, 8, 8, generator=g), torch.randint(0, 1000, (b,), generator=g),
            torch.tensor([0, 3, classes][:b]))


@pytest.mark.parametrize("split_qkv", [False, True])
@pytest.mark.parametrize("targets", [None, ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]])
def test_dit_layout_exact_with_all_on_gate(split_qkv, targets):
    m = tiny_dit()
    x, t, y = inputs()
    ref = m(x, t, y)
    kindify(m, gate=kf.ClassGate.all_on(6, 8), split_qkv=split_qkv, target_modules=targets)
    assert isinstance(m.kind_gate, kf.ClassGate)
    attn = m.blocks[0].attn
    if targets is None:  # kind_fast's own DiT becomes a native KIND-DiT (q, k, v when split)
        assert m.kind is not None and m.kind.qkv == ("split" if split_qkv else "fused")
        assert getattr(m, "_kind_fast_hook", None) is None, "DiT.forward routes labels itself"
        assert isinstance(attn.q if split_qkv else attn.qkv, kf.FastKindLinear)
    else:  # the generic path: module names kept, labels routed by the hook
        assert m.kind is None and m._kind_fast_hook is not None
        assert isinstance(attn.qkv, SplitLinear if split_qkv else kf.FastKindLinear)
    n_kind = sum(isinstance(mod, kf.FastKindLinear) for mod in m.modules())
    assert n_kind == 2 * (6 if split_qkv else 4)
    assert isinstance(m.blocks[0].adaLN_modulation[-1], nn.Linear), "adaLN stays dense"
    torch.testing.assert_close(m(x, t, y), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m(x, t, y=y), ref, rtol=1e-4, atol=1e-5)  # labels as keyword


def test_block_gate_routes_labels():
    m = tiny_dit()
    x, t, _ = inputs(2)
    kindify(m, gate=kf.ClassGate.block(6, 8, 4))
    with routed_labels(m) as seen:
        a = m(x, t, torch.tensor([0, 0]))
    assert seen and all(torch.equal(s, torch.tensor([0, 0])) for s in seen)
    assert m.kind_gate.labels is None, "the hook clears the routed labels after the forward"
    b = m(x, t, torch.tensor([1, 1]))
    assert not torch.allclose(a, b)
    # the gate (not only the label embedding) shapes the output: switching class 0's tailors
    # off everywhere through the shared gate changes class 0's output and only that
    with torch.no_grad():
        m.kind_gate.table[0].zero_()
    assert not torch.allclose(m(x, t, torch.tensor([0, 0])), a)
    torch.testing.assert_close(m(x, t, torch.tensor([1, 1])), b)


def test_gradients_flow_after_kindify():
    m = tiny_dit()
    x, t, y = inputs()
    kindify(m, gate=kf.ClassGate.block(6, 8, 4))
    m.train()
    m(x, t, y).square().mean().backward()
    layer = m.blocks[1].mlp.fc2
    assert layer.u_t.grad is not None and layer.sigma_g.grad is not None


def test_diffusers_dit_exact():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    m = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                        num_layers=2, sample_size=8, patch_size=2,
                                        num_embeds_ada_norm=10).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.05)
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 500, 999]), torch.tensor([0, 4, 10])
    ref = m(x, t, class_labels=y).sample
    kindify(m, gate=kf.ClassGate.all_on(10, 8))
    names = [n for n, mod in m.named_modules() if isinstance(mod, kf.FastKindLinear)]
    assert len(names) == 2 * 6 and "transformer_blocks.0.attn1.to_out.0" in names
    assert "transformer_blocks.0.ff.net.0.proj" in names
    torch.testing.assert_close(m(x, timestep=t, class_labels=y).sample, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m(x, t, y).sample, ref, rtol=1e-4, atol=1e-5)


def test_custom_targets_and_label_arg():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(16, 16)
            self.b = nn.Linear(16, 8)

        def forward(self, x, cls):
            return self.b(torch.relu(self.a(x)))

    net = Net()
    x = torch.randn(4, 5, 16)
    ref = net(x, torch.tensor([0, 1, 2, 3]))
    kindify(net, gate=kf.ClassGate.all_on(4, 4), target_modules=["a", "b"], label_arg="cls")
    assert isinstance(net.a, kf.FastKindLinear) and isinstance(net.b, kf.FastKindLinear)
    torch.testing.assert_close(net(x, torch.tensor([0, 1, 2, 3])), ref, rtol=1e-5, atol=1e-5)


def test_errors():
    m = tiny_dit()
    with pytest.raises(ValueError, match="no module"):
        kindify(tiny_dit(), gate=kf.ClassGate.all_on(6, 8), target_modules=r"nothing\.here")
    with pytest.raises(TypeError, match="not an nn.Linear"):
        kindify(tiny_dit(), gate=kf.ClassGate.all_on(6, 8), target_modules=r"x_embedder\.proj")
    with pytest.raises(ValueError, match="label"):
        kindify(tiny_dit(), gate=kf.ClassGate.all_on(6, 8), label_arg="class_id")
    with pytest.raises(ValueError, match="could not detect"):
        kindify(nn.Sequential(nn.Linear(4, 4)), gate=kf.ClassGate.all_on(2, 2))
    with pytest.raises(ValueError, match="tailor_rank"):
        kindify(tiny_dit(), gate=kf.ClassGate.all_on(6, 8), tailor_rank=4)
    with pytest.raises(TypeError, match="ClassGate"):
        kindify(m, gate="block")
    kindify(m, gate=kf.ClassGate.all_on(6, 8))
    with pytest.raises(ValueError, match="already"):
        kindify(m, gate=kf.ClassGate.all_on(6, 8))
