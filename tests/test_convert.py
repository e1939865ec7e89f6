"""Bring your own DiT: from_dense / kind-fast convert on our dense DiT and on diffusers' DiT."""

from __future__ import annotations

import argparse
import copy
import json

import pytest
import torch

import kind_fast as kf
from kind_fast.__main__ import main as cli
from kind_fast.train.convert import from_dense, load_dense
from kind_fast.models.dit import DiT, KindConfig, kindify_dit
from kind_fast.models.dit import from_dense as dit_from_dense
from kind_fast.nn.gate import DEFAULT_GATE
from kind_fast.models.dit import load_dense as dit_load_dense
from kind_fast.deploy.serialization import load_pretrained
from kind_fast.testing import tiny_dit

ALL_ON = dict(tailor_rank=8, gate="all_on")



def inputs(channels=2, size=8, null=6):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(3, channels, size, size, generator=g), torch.tensor([1, 500, 999]),
            torch.tensor([0, 3, null]))


@pytest.mark.parametrize("qkv", ["split", "fused"])
def test_state_dict_all_on_reproduces_dense(qkv):
    dense = tiny_dit()
    x, t, y = inputs()
    ref = dense(x, t, y)
    kind = KindConfig(qkv=qkv, **ALL_ON)
    m = dit_from_dense(dense.state_dict(), kind, num_heads=4)
    assert m.kind == kind and len(m.kind_layers()) == 2 * (6 if qkv == "split" else 4)
    torch.testing.assert_close(m(x, t, y), ref, rtol=1e-5, atol=1e-5)
    # the same modules, names and shapes as a KIND-DiT built directly: save/load/transfer fit
    native = DiT(**dense.arch, kind=kind).state_dict()
    assert {k: v.shape for k, v in m.state_dict().items()} == {k: v.shape for k, v in native.items()}
    # the SVD is exact: learngenes + every tailor give back each dense weight
    w = dense.blocks[1].attn.qkv.weight
    got = (torch.cat([m.blocks[1].attn.get_submodule(n).to_dense(0) for n in "qkv"])
           if qkv == "split" else m.blocks[1].attn.qkv.to_dense(0))
    torch.testing.assert_close(got, w, rtol=0, atol=2e-6)


def test_block_gate_diverts_and_src_is_untouched():
    dense = tiny_dit()
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    m = from_dense(dense, KindConfig(tailor_rank=8, active=4, gate="block"))  # a DiT object: copied, not changed
    assert all(torch.equal(v, before[k]) for k, v in dense.state_dict().items())
    x, t, _ = inputs()
    a, b = m(x, t, torch.tensor([0, 0, 0])), m(x, t, torch.tensor([1, 1, 1]))
    assert not torch.allclose(a, b)
    assert m.kind_gate.kind == "block" and not m.training


def test_checkpoint_file_with_ema_args_and_prefixes(tmp_path):
    dense = tiny_dit()
    other = tiny_dit(seed=1)
    ckpt = {"model": {"module." + k: v for k, v in other.state_dict().items()},
            "ema": dense.state_dict(), "opt": {}, "args": argparse.Namespace(model="DiT-S/2", image_size=16)}
    path = tmp_path / "0001000.pt"
    torch.save(ckpt, path)
    x, t, y = inputs()
    # args.model says DiT-S/2 (6 heads) but hidden 32 needs 4: num_heads= wins; ema is the default
    m = from_dense(path, KindConfig(**ALL_ON), num_heads=4)
    torch.testing.assert_close(m(x, t, y), dense(x, t, y), rtol=1e-5, atol=1e-5)
    m2 = from_dense(path, KindConfig(**ALL_ON), num_heads=4, which="model")  # "module." stripped
    torch.testing.assert_close(m2(x, t, y), other(x, t, y), rtol=1e-5, atol=1e-5)
    # a plain state dict file; hidden 32 is no DiT preset, so the heads must be given
    torch.save(dense.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="num_heads"):
        from_dense(tmp_path / "plain.pt", KindConfig(**ALL_ON))


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="not a DiT state dict"):
        from_dense({"weight": torch.zeros(2, 2)})
    kind_model = DiT(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=1, num_heads=4,
                     num_classes=3, kind=KindConfig(tailor_rank=8, active=4))
    with pytest.raises(ValueError, match="already a KIND-DiT"):
        from_dense(kind_model.state_dict(), num_heads=4)
    with pytest.raises(ValueError, match="already a KIND-DiT"):
        from_dense(kind_model)
    with pytest.raises(FileNotFoundError):
        from_dense(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not be read"):
        from_dense(tmp_path / "junk.pt")
    with pytest.raises(TypeError, match="cannot import"):
        from_dense(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="tailor_rank"):  # 96 tailors do not fit 32-wide layers
        from_dense(tiny_dit().state_dict(), num_heads=4)


def diffusers_dit(tied=True, seed=0):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    m = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                        out_channels=8, num_layers=2, sample_size=8, patch_size=2,
                                        num_embeds_ada_norm=10).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.05)
        if tied:  # as in checkpoints converted from the original DiT: one shared embedder
            for blk in m.transformer_blocks[1:]:
                blk.norm1.emb.load_state_dict(m.transformer_blocks[0].norm1.emb.state_dict())
    return m


@pytest.mark.parametrize("qkv", ["split", "fused"])
def test_diffusers_random_weights_exact(qkv):
    m = diffusers_dit()
    x, t, y = inputs(channels=4, null=10)
    ref = m(x, timestep=t, class_labels=y).sample
    dense = dit_load_dense(m)
    assert dense.arch["time_freq_shift"] == 1.0 and dense.arch["mlp_norm_eps"] == 1e-5
    torch.testing.assert_close(dense(x, t, y), ref, rtol=1e-6, atol=1e-6)
    k = from_dense(m, KindConfig(qkv=qkv, **ALL_ON))
    torch.testing.assert_close(k(x, t, y), ref, rtol=1e-5, atol=1e-5)
    # without diffusers' timestep convention the model would differ: the option matters
    arch = {a: v for a, v in dense.arch.items() if a != "time_freq_shift"}
    plain = DiT(**arch).eval()
    plain.load_state_dict(dense.state_dict())
    assert (plain(x, t, y) - ref).abs().max() > 1e-3


def test_diffusers_untied_embedders_refused_and_folder(tmp_path):
    with pytest.raises(ValueError, match="per-block timestep/label embedders"):
        from_dense(diffusers_dit(tied=False))
    m = diffusers_dit()
    m.save_pretrained(tmp_path / "dit")  # a local diffusers folder (nothing downloaded)
    x, t, y = inputs(channels=4, null=10)
    k = from_dense(tmp_path / "dit", KindConfig(**ALL_ON))
    torch.testing.assert_close(k(x, t, y), m(x, timestep=t, class_labels=y).sample, rtol=1e-5, atol=1e-5)


def test_convert_cli(tmp_path, capsys):
    dense = tiny_dit()
    torch.save(dense.state_dict(), tmp_path / "dit.pt")
    out = tmp_path / "kind"
    rc = cli(["convert", str(tmp_path / "dit.pt"), "--out", str(out), "--tailor-rank", "8", "--active", "4",
              "--num-heads", "4", "--check"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "kind-fast pretrain --init" in text
    weights = float(text.split("(learngenes + all tailors) ")[1].split(";")[0])
    output = float(text.split("with every tailor on ")[1].split()[0])
    assert weights < 1e-6 and output < 1e-5
    cfg = json.loads((out / "kind_config.json").read_text())
    assert cfg["model"]["kind"]["tailor_rank"] == 8 and cfg["gate"]["kind"] == DEFAULT_GATE
    loaded = load_pretrained(out)
    direct = from_dense(dense, KindConfig(tailor_rank=8, active=4))
    x, t, y = inputs()
    torch.testing.assert_close(loaded(x, t, y), direct(x, t, y), rtol=0, atol=0)
    # a bad source is one clear line, exit code 2
    assert cli(["convert", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_load_dense_from_kind_fast_folders(tmp_path):
    from kind_fast.deploy.serialization import save_pretrained

    kind_model = kf.models.dit.DiT(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=1, num_heads=4,
                            num_classes=3, kind=KindConfig(tailor_rank=8, active=4))
    save_pretrained(kind_model, tmp_path / "k")
    with pytest.raises(ValueError, match="already holds a KIND-DiT"):
        load_dense(tmp_path / "k")
    with pytest.raises(ValueError, match="neither"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "x.txt").write_text("")
        load_dense(tmp_path / "empty")


def test_check_conversion_can_fail():
    from kind_fast.models.dense_io import check_conversion

    dense = tiny_dit()
    m = kindify_dit(copy.deepcopy(dense), KindConfig(tailor_rank=8, active=4))
    ok = check_conversion(dense, m)
    assert ok["weights"] < 1e-6 and ok["output"] < 1e-5
    with torch.no_grad():
        m.blocks[1].mlp.fc2.sigma_t[3] += 0.1  # one component off
    bad = check_conversion(dense, m)
    assert bad["weights"] > 1e-3 and bad["output"] > 1e-4
    fresh = DiT(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=1, num_heads=4, num_classes=3)
    assert check_conversion(fresh, kindify_dit(copy.deepcopy(fresh), KindConfig(**ALL_ON)))["output"] is None


def test_an_unreadable_diffusers_bin_is_one_clear_line(tmp_path, capsys):
    """Issue 21 item 7: an unreadable .bin in a diffusers folder given to convert ended in a traceback."""
    m = diffusers_dit()
    m.save_pretrained(tmp_path / "dit", safe_serialization=False)
    (tmp_path / "dit" / "diffusion_pytorch_model.bin").write_bytes(b"not a checkpoint" * 64)
    assert cli(["convert", str(tmp_path / "dit"), "--out", str(tmp_path / "k"), "--tailor-rank", "4",
                "--active", "2"]) == 2
    err = capsys.readouterr().err
    assert "diffusers could not load a DiTTransformer2DModel" in err and "corrupt or incomplete" in err
    assert not (tmp_path / "k").exists()
