"""Save/load: learngenes and tailors in separate safetensors files plus a JSON config."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import kind_fast as kf
from kind_fast.models.dit import DiT, KindConfig
from kind_fast.deploy.serialization import (
    load_learngenes,
    load_pretrained,
    load_tailors,
    save_kind,
    save_pretrained,
    split_state_dict,
)
from kind_fast.testing import perturbed, tiny_dit


def model(seed=0, classes=5, kind=None):
    return tiny_dit(seed, classes, kind or KindConfig(tailor_rank=8, active=2, gate="random_k"))


def run(m, y=(0, 3)):
    g = torch.Generator().manual_seed(7)
    x, t = torch.randn(2, 2, 8, 8, generator=g), torch.tensor([10, 900])
    return m(x, t, torch.tensor(y))


def test_split_is_a_partition(tmp_path):
    m = model()
    learn, tail = split_state_dict(m)
    assert not set(learn) & set(tail)
    assert "blocks.0.attn.q.u_g" in learn and "blocks.0.attn.q.bias" in learn
    assert "blocks.0.attn.q.u_t" in tail and "kind_gate.table" in tail
    assert "y_embedder.embedding_table.weight" in tail and "final_layer.linear.weight" in learn
    skipped = set(m.state_dict()) - set(learn) - set(tail)
    assert skipped == {"kind_gate.idx", "kind_gate.mask"}, "idx/mask are rebuilt from the table"


def test_save_files_and_config(tmp_path):
    m = model()
    save_kind(m, tmp_path)
    cfg = json.loads((tmp_path / "kind_config.json").read_text())
    assert cfg["format"] == "kind_fast" and cfg["gate"]["kind"] == "random_k"
    assert cfg["layers"]["blocks.1.mlp.fc1"] == dict(in_features=32, out_features=128, learngene_rank=24,
                                                      tailor_rank=8, bias=True)
    assert cfg["model"]["arch"]["hidden_size"] == 32
    assert set(load_file(str(tmp_path / "learngenes.safetensors"))) == set(split_state_dict(m)[0])
    assert not list(tmp_path.glob(".*tmp*")), "no temporary files left behind"


def test_transfer_loads_only_learngenes(tmp_path):
    src = model(seed=0)
    save_kind(src, tmp_path, parts=("learngenes",))
    dst = model(seed=1)
    tailors_before = dst.blocks[0].mlp.fc1.u_t.clone()
    load_learngenes(dst, tmp_path)
    for name in ("blocks.0.mlp.fc1.u_g", "blocks.1.attn.v.sigma_g", "final_layer.linear.weight", "pos_embed"):
        assert torch.equal(dst.state_dict()[name], src.state_dict()[name]), name
    assert torch.equal(dst.blocks[0].mlp.fc1.u_t, tailors_before), "tailors untouched"
    with pytest.raises(FileNotFoundError, match="tailors"):
        load_tailors(dst, tmp_path)


def test_roundtrip_exact_outputs(tmp_path):
    src = model()
    ref = run(src)
    save_pretrained(src, tmp_path)
    back = load_pretrained(tmp_path).eval()
    torch.testing.assert_close(run(back), ref, rtol=0, atol=0)
    assert back.kind_gate.kind == "random_k"
    assert all(layer.gate is back.kind_gate for layer in back.kind_layers())


def test_load_tailors_rebuilds_the_shared_gate(tmp_path):
    src = model(kind=KindConfig(tailor_rank=8, active=2, gate="random_k", seed=3))
    save_kind(src, tmp_path)
    dst = model(seed=1, kind=KindConfig(tailor_rank=8, active=2, gate="block"))
    load_learngenes(dst, tmp_path)
    load_tailors(dst, tmp_path)
    assert dst.kind_gate.kind == "random_k" and torch.equal(dst.kind_gate.idx, src.kind_gate.idx)
    assert all(layer.gate is dst.kind_gate for layer in dst.kind_layers())
    torch.testing.assert_close(run(dst), run(src), rtol=0, atol=0)


def test_mismatched_model_gives_clear_errors(tmp_path):
    save_kind(model(), tmp_path)
    wider = model(kind=KindConfig(tailor_rank=4, active=2))
    with pytest.raises(ValueError, match="learngene_rank"):
        load_learngenes(wider, tmp_path)
    other_classes = model(classes=7)
    with pytest.raises(ValueError, match="shape"):
        load_tailors(other_classes, tmp_path)


def test_corrupt_and_missing_files(tmp_path):
    save_kind(model(), tmp_path)
    (tmp_path / "learngenes.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="corrupt"):
        load_learngenes(model(), tmp_path)
    (tmp_path / "kind_config.json").write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_learngenes(model(), tmp_path)
    with pytest.raises(FileNotFoundError, match="kind_config.json"):
        load_learngenes(model(), tmp_path / "nowhere")


def test_kindified_model_save_load(tmp_path):
    dense = DiT(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=1, num_heads=4,
                num_classes=3, kind=None)
    kf.kindify(dense, gate=kf.ClassGate.block(3, 8, 4))
    perturbed(dense)  # non-trivial adaLN / output layers so the comparison means something
    save_kind(dense, tmp_path)
    other = DiT(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=1, num_heads=4,
                num_classes=3, kind=None)
    kf.kindify(other, gate=kf.ClassGate.block(3, 8, 4))
    x, t, y = torch.randn(2, 2, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 2])
    assert not torch.allclose(other(x, t, y), dense(x, t, y))
    load_learngenes(other, tmp_path)
    load_tailors(other, tmp_path)
    torch.testing.assert_close(other(x, t, y), dense(x, t, y), rtol=0, atol=0)


# =====================================================================================
# Integrity (issue 12): interrupted saves, changed bytes, edited configs
# =====================================================================================
def test_an_interrupted_save_is_refused_not_mixed(tmp_path, monkeypatch):
    import kind_fast.deploy.serialization as ser

    old, new = model(seed=0), model(seed=1)
    save_pretrained(old, tmp_path)
    real = ser.atomic_write_bytes

    def killed_after_learngenes(data, path):
        real(data, path)
        if path.name == "learngenes.safetensors":
            raise KeyboardInterrupt("killed")  # the process dies here: new learngenes, old tailors

    monkeypatch.setattr(ser, "atomic_write_bytes", killed_after_learngenes)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(new, tmp_path)
    monkeypatch.setattr(ser, "atomic_write_bytes", real)
    with pytest.raises(ValueError, match="two different saves"):
        load_pretrained(tmp_path)
    with pytest.raises(ValueError, match="two different saves"):
        load_learngenes(model(), tmp_path)
    save_pretrained(new, tmp_path)  # a complete save is accepted again
    torch.testing.assert_close(run(load_pretrained(tmp_path).eval()), run(new), rtol=0, atol=0)


def test_an_interrupted_training_export_is_refused(tmp_path, monkeypatch):
    """train.models.save_weights: the weights folder as a whole (train_spec.json last)."""
    import kind_fast.atomic
    from kind_fast.train.models import SPEC_FILE, load_weights, save_weights

    spec = {"mode": "pretrain", "method": "kind", "arch": {}, "kind": {"tailor_rank": 8}}
    save_weights(model(seed=0), spec, tmp_path)
    real = kind_fast.atomic.atomic_write_text

    def killed_before_the_spec(text, path):
        if path.name == SPEC_FILE:
            raise KeyboardInterrupt("killed")
        real(text, path)

    monkeypatch.setattr(kind_fast.atomic, "atomic_write_text", killed_before_the_spec)
    with pytest.raises(KeyboardInterrupt):
        save_weights(model(seed=1), spec, tmp_path)
    monkeypatch.setattr(kind_fast.atomic, "atomic_write_text", real)
    with pytest.raises(ValueError, match="two different saves"):
        load_weights(tmp_path)
    dense_spec = {"mode": "pretrain", "method": "dense", "kind": None,
                  "arch": dict(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=1, num_heads=4,
                               num_classes=3)}
    dense = DiT(**dense_spec["arch"], kind=None)
    save_weights(dense, dense_spec, tmp_path / "dense")
    w = tmp_path / "dense" / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-5] ^= 0x10
    w.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match the SHA-256"):
        load_weights(tmp_path / "dense")


def test_changed_bytes_in_safetensors_data_are_refused(tmp_path):
    save_pretrained(model(), tmp_path)
    path = tmp_path / "tailors.safetensors"
    good = path.read_bytes()
    header = 8 + int.from_bytes(good[:8], "little")
    rng = torch.Generator().manual_seed(0)
    for pos in torch.randint(header, len(good), (10,), generator=rng).tolist():
        data = bytearray(good)
        data[pos] ^= 1 << (pos % 8)
        path.write_bytes(bytes(data))
        with pytest.raises(ValueError, match="corrupt"):
            load_pretrained(tmp_path)
    path.write_bytes(good)
    load_pretrained(tmp_path)


def test_edited_or_malformed_config_is_refused(tmp_path):
    m = model()
    save_pretrained(m, tmp_path)
    cfg_path = tmp_path / "kind_config.json"
    good = json.loads(cfg_path.read_text())
    edited = json.loads(json.dumps(good))
    edited["model"]["arch"]["num_heads"] = 2  # same tensor shapes, different model
    cfg_path.write_text(json.dumps(edited))
    with pytest.raises(ValueError, match="does not describe the weights"):
        load_pretrained(tmp_path)
    cfg_path.write_text(json.dumps([good]))
    with pytest.raises(ValueError, match="must hold a JSON object"):
        load_pretrained(tmp_path)
    with pytest.raises(ValueError, match="must hold a JSON object"):
        load_learngenes(model(), tmp_path)
    from kind_fast.train.models import init_info

    with pytest.raises(ValueError, match="must hold a JSON object"):
        init_info(tmp_path)
    # a save of format version 1 (no integrity records) still loads
    v1 = {k: v for k, v in good.items() if k != "files"}
    v1["format_version"] = 1
    cfg_path.write_text(json.dumps(v1))
    torch.testing.assert_close(run(load_pretrained(tmp_path).eval()), run(m), rtol=0, atol=0)
