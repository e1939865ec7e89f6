"""kindify round trip: settings saved with the weights, exact restore, diffusers save guard."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import kind_fast as kf
from kind_fast import kindify, kindify_from_pretrained
from kind_fast.models.dit import DiT, KindConfig
from kind_fast.deploy.serialization import load_pretrained, save_pretrained
from kind_fast.testing import tiny_dit


def inputs(channels=2, null=6):
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, channels, 8, 8, generator=g), torch.tensor([1, 500, 999]), torch.tensor([0, 3, null])


def perturb_tailors(m):
    """Tailors and gate that differ from an SVD init, so a restore that re-ran the SVD would fail."""
    with torch.no_grad():
        for layer in (mod for mod in m.modules() if isinstance(mod, kf.FastKindLinear)):
            layer.u_t.add_(torch.randn_like(layer.u_t) * 0.1)
            layer.sigma_t.mul_(1.5)


@pytest.mark.parametrize("gate", ["block", "dense"])
@pytest.mark.parametrize("split_qkv", [True, False])
def test_native_dit_round_trip(tmp_path, gate, split_qkv):
    m = tiny_dit()
    g = (kf.ClassGate.block(6, 8, 4) if gate == "block"
         else kf.ClassGate.dense(torch.rand(6, 8), trainable=True))
    kindify(m, gate=g, split_qkv=split_qkv)
    assert m.kind.gate == ("block" if gate == "block" else "custom")
    perturb_tailors(m)
    x, t, y = inputs()
    ref = m(x, t, y)
    save_pretrained(m, tmp_path)
    cfg = json.loads((tmp_path / "kind_config.json").read_text())
    assert cfg["kindify"]["split_qkv"] is split_qkv and cfg["kindify"]["native"] is True
    assert cfg["model"]["kind"] is not None, "a kindified kind_fast DiT is saved as a KIND-DiT"
    loaded = load_pretrained(tmp_path)
    assert loaded.kind == m.kind and loaded.kind_gate.kind == g.kind
    assert torch.equal(loaded(x, t, y), ref)
    again = kindify_from_pretrained(tiny_dit(seed=5), tmp_path)  # other base weights: all replaced
    assert torch.equal(again.eval()(x, t, y), ref)


def test_native_dit_transfers_from_kindified_save(tmp_path):
    """load_learngenes into a KIND-DiT of another class count (what `transfer --init` does)."""
    from kind_fast.deploy.serialization import load_learngenes

    m = tiny_dit()
    kindify(m, gate=kf.ClassGate.block(6, 8, 4), split_qkv=True)
    save_pretrained(m, tmp_path)
    new = DiT(**m.arch, kind=m.kind)
    load_learngenes(new, tmp_path)
    assert torch.equal(new.blocks[0].attn.k.u_g, m.blocks[0].attn.k.u_g)


@pytest.mark.parametrize("split_qkv", [True, False])
def test_hooked_dit_round_trip(tmp_path, split_qkv):
    targets = ["attn.qkv", "mlp.fc1"]  # custom targets: the generic (hooked) path
    m = tiny_dit()
    kindify(m, gate=kf.ClassGate.random_k(6, 8, 3, seed=2), split_qkv=split_qkv, target_modules=targets)
    perturb_tailors(m)
    x, t, y = inputs()
    ref = m(x, t, y)
    save_pretrained(m, tmp_path)
    cfg = json.loads((tmp_path / "kind_config.json").read_text())
    assert cfg["kindify"] == dict(target_modules=targets, label_arg="y", split_qkv=split_qkv, tailor_rank=8,
                                  learngene_rank=None, native=False)
    loaded = load_pretrained(tmp_path)
    assert loaded._kind_fast_hook is not None and isinstance(loaded.blocks[0].mlp.fc2, nn.Linear)
    assert torch.equal(loaded(x, t, y), ref)
    assert torch.equal(kindify_from_pretrained(tiny_dit(seed=3), tmp_path)(x, t, y), ref)


def diffusers_dit(seed=0):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    m = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                        num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.05)
    return m


def test_diffusers_round_trip_and_save_guard(tmp_path):
    m = diffusers_dit()
    kindify(m, gate=kf.ClassGate.block(10, 8, 4), split_qkv=False)
    perturb_tailors(m)
    x, t, y = inputs(channels=4, null=10)
    ref = m(x, timestep=t, class_labels=y).sample
    save_pretrained(m, tmp_path / "kind")
    cfg = json.loads((tmp_path / "kind" / "kind_config.json").read_text())
    assert cfg["model"]["diffusers_class"] == "DiTTransformer2DModel"
    assert cfg["model"]["config"]["num_embeds_ada_norm"] == 10
    loaded = load_pretrained(tmp_path / "kind")  # rebuilt from the saved diffusers config
    assert type(loaded).__name__ == "DiTTransformer2DModel"
    assert torch.equal(loaded(x, timestep=t, class_labels=y).sample, ref)
    base = diffusers_dit(seed=9)  # e.g. DiTTransformer2DModel.from_pretrained(<the dense model>)
    restored = kindify_from_pretrained(base, tmp_path / "kind")
    assert torch.equal(restored(x, timestep=t, class_labels=y).sample, ref)
    # diffusers' own save would lose the KIND weights on reload: it refuses, saying what to use
    with pytest.raises(RuntimeError, match="kind_fast.deploy.serialization.save_pretrained"):
        m.save_pretrained(tmp_path / "diffusers")
    assert not (tmp_path / "diffusers").exists()
    with pytest.raises(RuntimeError, match="kindify"):
        loaded.save_pretrained(tmp_path / "diffusers")


def test_custom_module_needs_its_base(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(16, 16)
            self.b = nn.Linear(16, 8)

        def forward(self, x, cls):
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    net = kindify(Net(), gate=kf.ClassGate.block(4, 4, 2), target_modules=["a", "b"], label_arg="cls")
    perturb_tailors(net)
    x, c = torch.randn(4, 5, 16), torch.tensor([0, 1, 2, 4])
    ref = net(x, c)
    save_pretrained(net, tmp_path)
    with pytest.raises(ValueError, match="kindify_from_pretrained"):
        load_pretrained(tmp_path)
    assert torch.equal(kindify_from_pretrained(Net(), tmp_path)(x, c), ref)
    with pytest.raises(ValueError, match="does not cover"):  # a base with more layers than the save

        class Bigger(Net):
            def __init__(self):
                super().__init__()
                self.extra = nn.Linear(2, 2)

        kindify_from_pretrained(Bigger(), tmp_path)


def test_errors(tmp_path):
    m = tiny_dit()
    kindify(m, gate=kf.ClassGate.block(6, 8, 4))
    with pytest.raises(ValueError, match="already"):
        kindify(m, gate=kf.ClassGate.block(6, 8, 4))
    kind_model = DiT(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=1, num_heads=4,
                     num_classes=3, kind=KindConfig(tailor_rank=8, active=4))
    save_pretrained(kind_model, tmp_path)
    with pytest.raises(ValueError, match="not saved from a kindified model"):
        kindify_from_pretrained(tiny_dit(), tmp_path)
    with pytest.raises(ValueError, match="takes its labels as y"):
        kindify(tiny_dit(), gate=kf.ClassGate.block(6, 8, 4), label_arg="labels")


def test_edited_kindify_settings_are_refused(tmp_path):
    """kindify's settings are part of the save's structure digest: a hand-edited one is refused."""
    m = tiny_dit()
    kindify(m, gate=kf.ClassGate.block(6, 8, 4), target_modules=["attn.qkv", "mlp.fc1"])
    save_pretrained(m, tmp_path)
    path = tmp_path / "kind_config.json"
    cfg = json.loads(path.read_text())
    cfg["kindify"]["target_modules"] = ["attn.qkv"]
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="differ from the ones saved"):
        load_pretrained(tmp_path)
