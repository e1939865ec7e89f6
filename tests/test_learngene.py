"""The learngene baselines: TLEG (ancestry θ_l = θ_A + (l/L)·θ_B, descendant by expansion) and
Heur-LG (a descendant that inherits the ancestry's top blocks), alone and through the trainer."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from kind_fast.models.baselines import TLEGDiT, heur_lg_descendant
from kind_fast.models.dit import DiT, KindConfig
from kind_fast.train.loop import Trainer
from kind_fast.train.models import load_weights, read_spec

sys.path.insert(0, os.path.dirname(__file__))
from train_helpers import tiny_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

ARCH = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=4, num_heads=2, num_classes=3)


def _perturbed_tleg(seed: int = 0) -> TLEGDiT:
    """A TLEG ancestry with every parameter moved off its init (θ_B and adaLN are zero there)."""
    torch.manual_seed(seed)
    m = TLEGDiT(**ARCH)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def _inputs(n: int = 3):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 1000, (n,), generator=g),
            torch.randint(0, 3, (n,), generator=g))


def test_tleg_blocks_are_linear_expansions_of_two_learngene_blocks():
    m = _perturbed_tleg()
    a, b = dict(m.learngene["a"].named_parameters()), dict(m.learngene["b"].named_parameters())
    assert not any(k.startswith("blocks.") for k in m.state_dict()), "the blocks hold no weights of their own"
    for depth in (4, 7):  # the ancestry's own depth, and a deeper descendant
        dense = m.expand(depth)
        assert type(dense) is DiT and len(dense.blocks) == depth
        for i, block in enumerate(dense.blocks):
            for name, p in block.named_parameters():
                torch.testing.assert_close(p, a[name] + (i + 1) / depth * b[name], rtol=0, atol=0)
        torch.testing.assert_close(dense.final_layer.linear.weight, m.final_layer.linear.weight, rtol=0, atol=0)


def test_tleg_forward_and_gradients_match_the_expanded_dit():
    """The ancestry computes what its expansion computes, and θ_A, θ_B get Σ_l g_l and
    Σ_l (l/L)·g_l of the expanded blocks' gradients g_l."""
    m = _perturbed_tleg()
    dense = m.expand()
    x, t, y = _inputs()
    m.eval()
    dense.eval()
    out, ref = m(x, t, y), dense(x, t, y)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    depth = len(dense.blocks)
    for name, p in m.learngene["a"].named_parameters():
        g = [dict(blk.named_parameters())[name].grad for blk in dense.blocks]
        torch.testing.assert_close(p.grad, sum(g), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(m.learngene["b"].get_parameter(name).grad,
                                   sum((i + 1) / depth * gi for i, gi in enumerate(g)), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(m.x_embedder.proj.weight.grad, dense.x_embedder.proj.weight.grad, rtol=1e-5, atol=1e-7)


def test_tleg_init_and_meta_construction():
    torch.manual_seed(0)
    m = TLEGDiT(**ARCH)
    assert all(torch.all(p == 0) for p in m.learngene["b"].parameters()), "θ_B starts at zero"
    assert m.learngene["a"].attn.qkv.weight.abs().sum() > 0
    with torch.device("meta"):
        e = TLEGDiT(**ARCH)
    e = e.to_empty(device="cpu")
    e.load_state_dict(m.state_dict())
    x, t, y = _inputs()
    torch.testing.assert_close(e.eval()(x, t, y), m.eval()(x, t, y), rtol=0, atol=0)
    with pytest.raises(ValueError, match="dense"):
        TLEGDiT(**ARCH, kind=KindConfig())
    with pytest.raises(ValueError, match="depth"):
        m.expand(0)


def test_heur_lg_inherits_the_top_blocks_and_final_layer_only():
    ancestry = _perturbed_tleg().expand()
    torch.manual_seed(5)
    child = heur_lg_descendant(ancestry, 2, blocks=3)
    torch.manual_seed(5)
    fresh = DiT(**dict(ARCH, num_classes=2))
    assert child.num_classes == 2 and child.y_embedder.embedding_table.weight.shape[0] == 3
    for i in range(4):
        src = ancestry if i >= 1 else fresh  # the top 3 of 4 blocks come from the ancestry
        for name, p in child.blocks[i].named_parameters():
            torch.testing.assert_close(p, src.blocks[i].get_parameter(name), rtol=0, atol=0)
    torch.testing.assert_close(child.final_layer.linear.weight, ancestry.final_layer.linear.weight, rtol=0, atol=0)
    torch.testing.assert_close(child.t_embedder.mlp[0].weight, fresh.t_embedder.mlp[0].weight, rtol=0, atol=0)
    assert all(p.requires_grad for p in child.parameters())
    assert len([1 for b in heur_lg_descendant(ancestry, 2).blocks
                if torch.equal(b.attn.qkv.weight, ancestry.blocks[3].attn.qkv.weight)]) == 1
    assert torch.equal(heur_lg_descendant(ancestry, 2).blocks[2].attn.qkv.weight, ancestry.blocks[2].attn.qkv.weight), \
        "default: the top half (2 of 4 blocks)"


def test_heur_lg_errors():
    ancestry = DiT(**ARCH)
    with pytest.raises(ValueError, match="1..4"):
        heur_lg_descendant(ancestry, 2, blocks=5)
    with pytest.raises(TypeError, match="KIND"):
        heur_lg_descendant(DiT(**ARCH, kind=KindConfig(tailor_rank=8, active=2)), 2)


@pytest.fixture(scope="module")
def ancestries(tmp_path_factory):
    """A KIND pretraining run and a TLEG ancestry run on digits 0-7 (a few steps each)."""
    out = {}
    for method in ("kind", "tleg"):
        d = tmp_path_factory.mktemp(method)
        tr = Trainer(tiny_config(d, steps=2, method={"name": method}))
        tr.train()
        tr.export()
        tr.close()
        out[method] = d
    return out


def test_trainer_tleg_pretrain_saves_and_loads_the_ancestry(ancestries):
    spec = read_spec(ancestries["tleg"] / "ema")
    assert (spec["mode"], spec["method"], spec["kind"]) == ("pretrain", "tleg", None)
    m = load_weights(ancestries["tleg"] / "model")
    assert isinstance(m, TLEGDiT) and m.learngene["b"].adaLN_modulation[1].weight.abs().sum() > 0, "θ_B trained"


@pytest.mark.parametrize("method,init,extra", [
    ("tleg", "tleg", {}),
    ("tleg", "tleg", {"tleg_depth": 3}),
    ("heur_lg", "kind", {"heur_lg_blocks": 1}),
    ("full", "tleg", {}),  # any baseline starts from the expanded TLEG ancestry
])
def test_trainer_learngene_transfers(tmp_path, ancestries, method, init, extra):
    # the depth comes from the init, or from method.tleg_depth: a given model.depth would be refused
    cfg = tiny_config(tmp_path / "t", "transfer", steps=2, data={"classes": [8, 9]}, model={"depth": None},
                      method={"name": method, "init": str(ancestries[init]), **extra})
    tr = Trainer(cfg)
    try:
        model = tr.model
        assert type(model) is DiT and model.kind is None and model.num_classes == 2
        assert all(p.requires_grad for p in model.parameters()), "the descendant trains every weight"
        if method == "tleg":
            ancestry = load_weights(ancestries["tleg"] / "ema")
            depth = extra.get("tleg_depth", 2)
            assert len(model.blocks) == depth
            torch.testing.assert_close(model.blocks[-1].mlp.fc2.weight, ancestry.learngene["a"].mlp.fc2.weight
                                       + ancestry.learngene["b"].mlp.fc2.weight, rtol=0, atol=1e-7)
        if method == "heur_lg":
            ancestry = load_weights(ancestries["kind"] / "ema").to_dense()
            assert tr.spec["heur_lg_blocks"] == 1
            assert torch.equal(model.blocks[1].mlp.fc1.weight, ancestry.blocks[1].mlp.fc1.weight)
            assert not torch.equal(model.blocks[0].mlp.fc1.weight, ancestry.blocks[0].mlp.fc1.weight)
        tr.train()
        tr.export()
    finally:
        tr.close()
    assert type(load_weights(tmp_path / "t" / "ema")) is DiT


def test_trainer_learngene_bad_settings(tmp_path, ancestries):
    with pytest.raises(ValueError, match="expanded to method.tleg_depth=3 blocks has depth=3, but the config gives "
                                         "depth=2"):
        Trainer(tiny_config(tmp_path / "d", "transfer", data={"classes": [8, 9]},
                            method={"name": "tleg", "init": str(ancestries["tleg"]), "tleg_depth": 3}))
    with pytest.raises(ValueError, match="TLEG ancestry"):
        Trainer(tiny_config(tmp_path / "a", "transfer", data={"classes": [8, 9]},
                            method={"name": "tleg", "init": str(ancestries["kind"])}))
    with pytest.raises(ValueError, match="heur_lg_blocks"):
        Trainer(tiny_config(tmp_path / "b", "transfer", data={"classes": [8, 9]},
                            method={"name": "heur_lg", "init": str(ancestries["kind"]), "heur_lg_blocks": 3}))
    with pytest.raises(ValueError, match="--init"):
        Trainer(tiny_config(tmp_path / "c", method={"name": "tleg", "init": str(ancestries["kind"])}))


def test_convert_reads_a_tleg_ancestry_as_its_expanded_dit(ancestries):
    from kind_fast.train.convert import load_dense

    dense = load_dense(ancestries["tleg"])
    ancestry = load_weights(ancestries["tleg"] / "ema")
    assert type(dense) is DiT and len(dense.blocks) == 2
    torch.testing.assert_close(dense.blocks[0].attn.qkv.weight, ancestry.learngene["a"].attn.qkv.weight
                               + 0.5 * ancestry.learngene["b"].attn.qkv.weight, rtol=0, atol=0)
