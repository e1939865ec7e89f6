"""KIND-DiT: architecture fidelity, KIND layers, label routing, modes, transfer, export."""

from __future__ import annotations

import pytest
import torch

import kind_fast as kf
from kind_fast.models.diffusion import GaussianDiffusion
from kind_fast.models.dit import DiT, DiT_models, KindConfig, build_dit
from kind_fast.testing import perturbed, routed_labels
from kind_fast.nn.utils import parameter_breakdown

# published DiT parameter counts (DiT paper; pos_embed counted, as its checkpoints store it)
DIT_PARAMS_M = {"DiT-S/2": 32.96, "DiT-B/2": 130.51, "DiT-L/2": 458.10, "DiT-XL/2": 675.13}


def tiny(kind="default", **kw):
    kind = KindConfig(tailor_rank=8, active=2) if kind == "default" else kind
    args = dict(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=2, num_heads=4,
                num_classes=5, kind=kind)
    args.update(kw)
    return DiT(**args)


@pytest.mark.parametrize("name", sorted(DiT_models))
def test_dense_configs_match_published_sizes(name):
    with torch.device("meta"):
        m = build_dit(name)
    n = sum(p.numel() for p in m.parameters()) + m.pos_embed.numel()
    if name in DIT_PARAMS_M:
        assert abs(n / 1e6 - DIT_PARAMS_M[name]) < 0.01
    depth, hidden, heads, p = DiT_models[name]
    assert len(m.blocks) == depth and m.blocks[0].attn.qkv.weight.shape == (3 * hidden, hidden)
    assert m.x_embedder.num_patches == (32 // p) ** 2


@pytest.mark.parametrize("new_classes", [461, 10])
def test_l2_transfer_trains_45_4m(new_classes):
    """docs/design.md §1: the default config lands DiT-L/2 transfer near the paper's 45.4M."""
    with torch.device("meta"):
        m = build_dit("DiT-L/2", kind=KindConfig(), num_classes=150)
    m.retarget(new_classes).set_mode("transfer")
    b = parameter_breakdown(m)
    trainable = b["all"]["trainable"]
    assert abs(trainable / 45.4e6 - 1) <= 0.05, trainable
    assert b["learngene"]["trainable"] == 0 and b["tailor"]["trainable"] == b["tailor"]["total"]
    assert b["tailor"]["total"] == 24 * 96 * (4 * (2 * 1024 + 1) + 2 * (5 * 1024 + 1))


def test_kind_layers_and_split_qkv():
    m = tiny()
    names = [n for n, mod in m.named_modules() if isinstance(mod, kf.FastKindLinear)]
    assert names[:6] == ["blocks.0.attn.q", "blocks.0.attn.k", "blocks.0.attn.v", "blocks.0.attn.proj",
                         "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]
    assert all(mod.gate is m.kind_gate for mod in m.kind_layers())
    fused = tiny(kind=KindConfig(tailor_rank=8, active=2, qkv="fused"))
    assert isinstance(fused.blocks[0].attn.qkv, kf.FastKindLinear)
    assert not isinstance(m.blocks[0].adaLN_modulation[-1], kf.FastKindLinear)


def test_forward_shapes_and_label_routing():
    m = tiny().eval()
    x, t, y = torch.randn(3, 2, 8, 8), torch.tensor([0, 10, 999]), torch.tensor([0, 4, 5])
    with routed_labels(m) as seen:
        out = m(x, t, y)
    assert out.shape == (3, 4, 8, 8)
    assert len(seen) == len(m.kind_layers()) and all(torch.equal(s, y) for s in seen)
    assert m.kind_gate.labels is None, "no labels are left behind on the gate"
    m.train()
    m.y_embedder.dropout_prob = 1.0
    with routed_labels(m) as seen:
        m(x, t, y)
    assert all(torch.all(s == 5) for s in seen), "the layers see the post-dropout (null) labels"


def test_labels_change_the_output_only_through_gate_and_embedding():
    m = perturbed(tiny()).eval()
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([5, 5])
    a = m(x, t, torch.tensor([0, 0]))
    b = m(x, t, torch.tensor([1, 1]))
    assert not torch.allclose(a, b)
    with torch.no_grad():  # same label embedding for both classes: the gate alone differs
        emb = m.y_embedder.embedding_table.weight
        emb[1] = emb[0]
    assert not torch.allclose(m(x, t, torch.tensor([0, 0])), m(x, t, torch.tensor([1, 1])))
    m.set_gate(kf.ClassGate.all_on(5, 8))  # and with an all-on gate, nothing
    torch.testing.assert_close(m(x, t, torch.tensor([0, 0])), m(x, t, torch.tensor([1, 1])))


def test_forward_with_cfg():
    m = perturbed(tiny()).eval()
    x = torch.randn(2, 2, 8, 8)
    x = torch.cat([x, x])
    y = torch.tensor([1, 2, 5, 5])
    out = m.forward_with_cfg(x, torch.tensor([3, 3, 3, 3]), y, cfg_scale=4.0)
    assert out.shape == (4, 4, 8, 8)
    torch.testing.assert_close(out[:2, :2], out[2:, :2])
    raw = m(x, torch.tensor([3, 3, 3, 3]), y)
    assert not torch.allclose(raw[:2, :2], raw[2:, :2]), "cond and uncond differ"
    torch.testing.assert_close(out[:2, :2], raw[2:, :2] + 4.0 * (raw[:2, :2] - raw[2:, :2]))
    # as its docstring says: the labels are used as given (a second half of real labels is not
    # replaced by the null label), and the second half of x is not read
    other = torch.cat([x[:2], torch.randn(2, 2, 8, 8)])
    y2 = torch.tensor([1, 2, 0, 4])
    raw2 = m(x, torch.tensor([3, 3, 3, 3]), y2)
    out2 = m.forward_with_cfg(other, torch.tensor([3, 3, 3, 3]), y2, cfg_scale=4.0)
    torch.testing.assert_close(out2[:2, :2], raw2[2:, :2] + 4.0 * (raw2[:2, :2] - raw2[2:, :2]))
    assert not torch.allclose(out2, out)


def test_set_mode_transfer_freezes_the_right_parts():
    m = tiny().set_mode("transfer")
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    for n in trainable:
        assert n.endswith(("u_t", "sigma_t", "v_t")) or n.startswith(("y_embedder", "final_layer")), n
    assert "blocks.0.attn.q.u_g" not in trainable and "blocks.0.adaLN_modulation.1.weight" not in trainable
    m.set_mode("pretrain")
    assert all(p.requires_grad for p in m.parameters())
    with pytest.raises(ValueError, match="mode"):
        m.set_mode("finetune")
    with pytest.raises(ValueError, match="KIND-DiT"):
        tiny(kind=None).set_mode("transfer")


def test_prepare_transfer():
    m = tiny()
    lg = {n: p.clone() for n, p in m.named_parameters() if n.endswith(("u_g", "sigma_g", "v_g"))}
    old_tailor = m.blocks[0].mlp.fc1.u_t.clone()
    m.prepare_transfer(num_classes=2, generator=torch.Generator().manual_seed(0))
    assert m.kind_gate.num_classes == 2 and m.y_embedder.embedding_table.weight.shape[0] == 3
    assert all(layer.gate is m.kind_gate for layer in m.kind_layers())
    for n, p in m.named_parameters():
        if n in lg:
            assert torch.equal(p, lg[n]) and not p.requires_grad
    assert not torch.allclose(old_tailor, m.blocks[0].mlp.fc1.u_t)
    out = m(torch.randn(2, 2, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 2]))
    out.square().mean().backward()
    assert m.blocks[0].mlp.fc1.u_t.grad is not None and m.blocks[0].mlp.fc1.u_g.grad is None


@pytest.mark.parametrize("qkv", ["split", "fused"])
def test_to_dense_export_matches(qkv):
    m = perturbed(tiny(kind=KindConfig(tailor_rank=8, active=2, qkv=qkv))).eval()
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([7, 700])
    for c in (3, None):
        dense = m.to_dense(class_id=c).eval()
        assert dense.kind is None and not dense.kind_layers()
        y = torch.full((2,), 5 if c is None else c)  # learngenes only == the null class
        torch.testing.assert_close(dense(x, t, y), m(x, t, y), rtol=1e-4, atol=1e-5)


def test_a_few_steps_reduce_the_loss():
    torch.manual_seed(0)
    m = tiny(learn_sigma=False)
    diffusion = GaussianDiffusion()
    x0 = torch.randn(8, 2, 8, 8)
    y = torch.arange(8) % 5
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(40):
        loss = diffusion.loss(m, x0, y, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) < 0.8 * sum(losses[:10])


def test_meta_build_then_materialise():
    with torch.device("meta"):
        m = tiny()
    assert m.blocks[0].attn.q.u_g.is_meta
    m.to_empty(device="cpu")
    m.initialize_weights()
    assert torch.isfinite(m(torch.randn(1, 2, 8, 8), torch.tensor([1]), torch.tensor([2]))).all()


def test_config_errors():
    with pytest.raises(ValueError, match="unknown DiT config"):
        build_dit("DiT-M/2")
    with pytest.raises(ValueError, match="qkv"):
        KindConfig(qkv="joint")
    with pytest.raises(ValueError, match="classes"):
        tiny(gate=kf.ClassGate.block(7, 8, 2))
    with pytest.raises(ValueError, match="dense DiT has no tailors"):
        tiny(kind=None, gate=kf.ClassGate.block(5, 8, 2))
    with pytest.raises(ValueError, match="patch_size"):
        tiny(input_size=9)


def test_bad_class_labels_are_clear_errors():
    m = tiny().eval()  # 5 classes; 5 is the null class
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([1, 2])
    with pytest.raises(TypeError, match=r"y \(class labels\) must be a torch.Tensor"):
        m(x, t, [0, 1])
    with pytest.raises(TypeError, match=r"y \(class labels\) must be a torch.Tensor"):
        m(x, t, 3)
    with pytest.raises(ValueError, match=r"y \(class labels\) out of range: got values in \[0, 6\], expected \[0, 5\]"):
        m(x, t, torch.tensor([0, 6]))
    with pytest.raises(ValueError, match=r"out of range.*\[-1, 0\]"):
        m(x, t, torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="has 3 entries but x has 2 samples"):
        m(x, t, torch.tensor([0, 1, 2]))
    dense = tiny(kind=None).eval()  # the dense DiT checks them too (its label table has 6 rows)
    with pytest.raises(ValueError, match=r"expected \[0, 5\]"):
        dense(x, t, torch.tensor([0, 7]))


def test_no_labels_are_left_behind_after_a_forward():
    """A layer called after a model forward must not use that forward's labels."""
    m = tiny().eval()
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([1, 2])
    m(x, t, torch.tensor([0, 1]))
    layer = m.blocks[0].mlp.fc1
    with pytest.raises(ValueError, match="no labels"):
        layer(torch.randn(2, 16, 32))
    dense = tiny(kind=None)
    kf.kindify(dense, gate=kf.ClassGate.block(5, 8, 2))
    dense(x, t, torch.tensor([0, 1]))
    layer = dense.blocks[0].mlp.fc1
    with pytest.raises(ValueError, match="no labels"):
        layer(torch.randn(2, 16, 32))
    with pytest.raises(RuntimeError):  # a forward that fails midway clears them too
        dense(torch.randn(2, 3, 8, 8), t, torch.tensor([0, 1]))  # 3 channels, the model takes 2
    assert dense.kind_gate.labels is None
