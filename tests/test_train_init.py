"""`kind-fast pretrain --init`: continue as KIND from a dense run, a .pt via convert, or a KIND save."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from kind_fast.__main__ import main
from kind_fast.models.dit import DiT

sys.path.insert(0, os.path.dirname(__file__))
from train_helpers import TINY_FLAGS, tiny_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("init") / "dense"
    assert main(["pretrain", "--method", "dense", "--steps", "2", "--out", str(out), "--no-sample", *TINY_FLAGS]) == 0
    return out


def _inputs(n_classes):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(3, 1, 8, 8, generator=g), torch.tensor([3, 400, 999]),
            torch.tensor([0, n_classes - 1, n_classes]))


def test_dense_run_converted_exactly(tmp_path, dense_run):
    """The model a `pretrain --init <dense run> --method kind` run starts from is the dense model
    (all-on gate: exactly; the SVD loses nothing)."""
    from kind_fast.train.models import build_model, load_weights, make_spec

    cfg = tiny_config(tmp_path / "o", method={"name": "kind", "init": str(dense_run)},
                      model={"gate": "all_on"}, seed=3)
    spec = make_spec(cfg, 8, (1, 8, 8))
    assert spec["init_is_kind"] is False and spec["kind"]["gate"] == "all_on"
    model = build_model(cfg, spec).eval()
    dense = load_weights(dense_run / "ema").eval()
    assert isinstance(model, DiT) and model.kind is not None and model.mode == "pretrain"
    assert all(p.requires_grad for p in model.parameters() if p is not model.kind_gate.table)
    x, t, y = _inputs(8)
    torch.testing.assert_close(model(x, t, y), dense(x, t, y), rtol=1e-5, atol=1e-5)


def test_pretrain_init_cli_continues_and_resumes(tmp_path, dense_run, capsys):
    out = tmp_path / "kind"
    flags = ["pretrain", "--init", str(dense_run), "--out", str(out), "--no-sample", "--ckpt-every", "1",
             *TINY_FLAGS]
    assert main([*flags, "--steps", "2"]) == 0
    spec = json.loads((out / "ema" / "train_spec.json").read_text())
    assert spec["kind"]["tailor_rank"] == 8 and spec["init_is_kind"] is False
    assert main([*flags, "--steps", "3", "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert len((out / "metrics.csv").read_text().splitlines()) == 4
    # the KIND result continues again as KIND (loaded as it is), and transfers
    again = tmp_path / "again"
    assert main(["pretrain", "--init", str(out), "--steps", "1", "--out", str(again), "--no-sample",
                 *TINY_FLAGS]) == 0
    assert json.loads((again / "ema" / "train_spec.json").read_text())["init_is_kind"] is True
    assert main(["transfer", "--init", str(again), "--classes", "8,9", "--steps", "1", "--out",
                 str(tmp_path / "tr"), "--no-sample", *TINY_FLAGS]) == 0


def test_pt_file_through_convert_and_other_classes(tmp_path, dense_run, capsys):
    """A facebookresearch-layout .pt: `kind-fast convert` it, then pretrain on 5 classes (the init
    has 8): a fresh label table and gate; every other weight comes from the checkpoint."""
    from kind_fast.train.models import build_model, load_weights, make_spec

    dense = load_weights(dense_run / "ema")
    torch.save({"ema": dense.state_dict()}, tmp_path / "dit.pt")
    conv = tmp_path / "conv"
    assert main(["convert", str(tmp_path / "dit.pt"), "--out", str(conv), "--tailor-rank", "8", "--active",
                 "2", "--num-heads", "2"]) == 0
    capsys.readouterr()
    cfg = tiny_config(tmp_path / "o", method={"name": "kind", "init": str(conv)}, data={"classes": [0, 1, 2, 3, 4]})
    spec = make_spec(cfg, 5, (1, 8, 8))
    assert spec["init_is_kind"] and spec["init_classes"] == 8 and spec["arch"]["num_classes"] == 5
    model = build_model(cfg, spec)
    assert model.y_embedder.embedding_table.weight.shape[0] == 6 and model.kind_gate.num_classes == 5
    torch.testing.assert_close(model.blocks[0].mlp.fc1.to_dense(None).float(),
                               load_weights(conv).blocks[0].mlp.fc1.to_dense(None).float())
    assert main(["pretrain", "--init", str(conv), "--classes", "0-4", "--steps", "1", "--out",
                 str(tmp_path / "run"), "--no-sample", *TINY_FLAGS]) == 0


def test_pretrain_init_errors(tmp_path, dense_run, capsys):
    assert main(["pretrain", "--init", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), *TINY_FLAGS]) == 2
    assert "does not exist" in capsys.readouterr().err
    kind_run = tmp_path / "k"
    assert main(["pretrain", "--init", str(dense_run), "--steps", "1", "--out", str(kind_run), "--no-sample",
                 *TINY_FLAGS]) == 0
    assert main(["pretrain", "--init", str(kind_run), "--method", "dense", "--out", str(tmp_path / "o2"),
                 *TINY_FLAGS]) == 2
    assert "drop the tailors" in capsys.readouterr().err
    assert main(["pretrain", "--init", str(dense_run), "--data", "imagefolder", "--data-path", str(tmp_path),
                 "--out", str(tmp_path / "o3"), *TINY_FLAGS]) == 2


def test_pretrain_init_pt_file_of_a_custom_width_needs_its_heads(tmp_path, dense_run, capsys):
    """A dense .pt whose width is no DiT preset: the heads are not in the weights, so pretrain
    asks for --init-num-heads (never guesses) and then builds the init's exact architecture."""
    from kind_fast.train.models import build_model, load_weights, make_spec

    dense = load_weights(dense_run / "ema").eval()
    torch.save(dense.state_dict(), tmp_path / "dit.pt")
    assert main(["pretrain", "--init", str(tmp_path / "dit.pt"), "--steps", "1", "--out", str(tmp_path / "o"),
                 "--no-sample", *TINY_FLAGS]) == 2
    err = capsys.readouterr().err
    assert "--init-num-heads" in err and "not a DiT preset" in err
    assert main(["pretrain", "--init", str(tmp_path / "dit.pt"), "--init-num-heads", "0", "--out",
                 str(tmp_path / "o0"), *TINY_FLAGS]) == 2
    assert "method.init_num_heads" in capsys.readouterr().err
    heads = dense.arch["num_heads"]
    cfg = tiny_config(tmp_path / "o1", method={"name": "kind", "init": str(tmp_path / "dit.pt"),
                                              "init_num_heads": heads}, model={"gate": "all_on"})
    spec = make_spec(cfg, 8, (1, 8, 8))
    assert spec["arch"]["num_heads"] == heads and spec["init_is_kind"] is False
    x, t, y = _inputs(8)
    torch.testing.assert_close(build_model(cfg, spec).eval()(x, t, y), dense(x, t, y), rtol=1e-5, atol=1e-5)
    assert main(["pretrain", "--init", str(tmp_path / "dit.pt"), "--init-num-heads", str(heads), "--steps", "1",
                 "--out", str(tmp_path / "o2"), "--no-sample", *TINY_FLAGS]) == 0


# =====================================================================================
# Issue 21 item 6: model settings are never silently ignored; config.json records the model built
# =====================================================================================
def test_a_preset_with_other_sizes_is_refused(tmp_path):
    """--model DiT-S/8 --set model.hidden_size=64 --set model.depth=1 built hidden 384, depth 12
    (43M parameters) while config.json said 64 / 1."""
    from kind_fast.train.config import RunConfig
    from kind_fast.train.models import make_spec, record_built_model

    def cfg(**model):
        return RunConfig.from_dict({"out": str(tmp_path / "o"), "model": {"name": "DiT-S/8", **model}})

    with pytest.raises(ValueError, match=r"DiT-S/8 fixes hidden_size=384, depth=12, but the config gives "
                                         r"hidden_size=64, depth=1"):
        make_spec(cfg(hidden_size=64, depth=1), 10, (1, 8, 8))
    for same in ({}, {"hidden_size": 384, "num_heads": 6}, {"mlp_ratio": 2.0}):  # the preset's own, or not its key
        c = cfg(**same)
        spec = make_spec(c, 10, (1, 8, 8))
        built = record_built_model(c, spec).model
        assert (built.hidden_size, built.depth, built.num_heads, built.patch_size) == (384, 12, 6, 8)
        assert built.mlp_ratio == same.get("mlp_ratio", 4.0) == spec["arch"]["mlp_ratio"]
    # without a preset, the given sizes are what is built
    c = RunConfig.from_dict({"out": str(tmp_path / "o"), "model": {"hidden_size": 48, "depth": 1}})
    built = record_built_model(c, make_spec(c, 10, (1, 8, 8))).model
    assert (built.hidden_size, built.depth, built.num_heads, built.tailor_rank, built.active) == (48, 1, 4, 16, 4)


def test_pretrain_init_records_the_init_model_and_refuses_other_sizes(tmp_path, dense_run, capsys):
    """pretrain --init recorded the trainer's defaults (hidden 64, depth 4) in config.json for a
    model of the init's size; a size that differs from the init's was silently dropped."""
    out = tmp_path / "k"
    assert main(["pretrain", "--init", str(dense_run), "--steps", "1", "--out", str(out), "--no-sample",
                 "--set", "model.tailor_rank=8", "--set", "model.active=2", "--batch-size", "8", "--no-progress",
                 "--tensorboard", "off"]) == 0
    saved = json.loads((out / "config.json").read_text())["model"]
    init = json.loads((dense_run / "ema" / "train_spec.json").read_text())["arch"]
    assert {k: saved[k] for k in ("hidden_size", "depth", "num_heads", "patch_size")} == \
        {k: init[k] for k in ("hidden_size", "depth", "num_heads", "patch_size")} == \
        {"hidden_size": 32, "depth": 2, "num_heads": 2, "patch_size": 2}
    assert (saved["tailor_rank"], saved["active"]) == (8, 2)
    capsys.readouterr()
    assert main(["pretrain", "--init", str(dense_run), "--steps", "1", "--out", str(tmp_path / "k2"),
                 *TINY_FLAGS, "--set", "model.depth=4"]) == 2
    assert "has depth=2, but the config gives depth=4" in capsys.readouterr().err
    # transfer: the pretrained model fixes the architecture and the KIND layout
    for flag, msg in (("model.hidden_size=64", "has hidden_size=32"), ("model.tailor_rank=16", "has tailor_rank=8")):
        assert main(["transfer", "--init", str(out), "--classes", "8,9", "--steps", "1",
                     "--out", str(tmp_path / "t"), *TINY_FLAGS, "--set", flag]) == 2
        assert msg in capsys.readouterr().err
    assert main(["transfer", "--init", str(out), "--classes", "8,9", "--steps", "1", "--model", "DiT-S/2",
                 "--out", str(tmp_path / "t"), "--no-progress"]) == 2  # a preset that is not the init's
    assert "has depth=2, hidden_size=32, num_heads=2, but the config gives depth=12" in capsys.readouterr().err
    assert not (tmp_path / "t" / "checkpoints").exists()


def test_pretrain_init_uses_the_kind_defaults_of_convert(tmp_path, capsys):
    """pretrain --init DIT.pt took the trainer's tiny-model defaults (tailor rank 16, active 4)
    where kind-fast convert takes 96 / 32, so a task trained on one base could not be served by
    the other ("task has tailor_rank=16, this base has 96")."""
    from kind_fast.models.dit import KindConfig
    from kind_fast.train.config import RunConfig
    from kind_fast.train.models import init_info, make_spec

    torch.manual_seed(0)
    dense = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=128, depth=1, num_heads=2, num_classes=10,
                kind=None)
    torch.save(dense.state_dict(), tmp_path / "dit.pt")
    assert main(["convert", str(tmp_path / "dit.pt"), "--out", str(tmp_path / "conv"), "--num-heads", "2"]) == 0
    converted = init_info(tmp_path / "conv")["kind"]
    cfg = RunConfig.from_dict({"out": str(tmp_path / "o"), "method": {"init": str(tmp_path / "dit.pt"),
                                                                     "init_num_heads": 2}})
    kind = make_spec(cfg, 10, (1, 8, 8))["kind"]
    assert (kind["tailor_rank"], kind["active"]) == (converted["tailor_rank"], converted["active"]) == \
        (KindConfig().tailor_rank, KindConfig().active) == (96, 32)
    assert {k: kind[k] for k in converted if k != "seed"} == {k: converted[k] for k in converted if k != "seed"}
    # a fresh tiny model keeps its own small defaults
    fresh = make_spec(RunConfig.from_dict({"out": str(tmp_path / "f")}), 10, (1, 8, 8))["kind"]
    assert (fresh["tailor_rank"], fresh["active"]) == (16, 4)
    # an init too narrow for the default says which setting to pass
    small = RunConfig.from_dict({"out": str(tmp_path / "s"), "method": {"init": str(tmp_path / "dit.pt"),
                                                                       "init_num_heads": 2},
                                 "model": {"tailor_rank": 200}})
    with pytest.raises(ValueError, match="model.tailor_rank 200 exceeds the hidden size 128"):
        make_spec(small, 10, (1, 8, 8))
