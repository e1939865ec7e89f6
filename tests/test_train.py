"""Trainer: config, data readers, checkpoints, exact resume, diffusion loss and samplers, metrics."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

from kind_fast.models.diffusion import GaussianDiffusion, space_timesteps
from kind_fast.train import checkpoint as ck
from kind_fast.train.config import RunConfig, load_config_file, parse_int_list
from kind_fast.train.data import (
    GlobalBatchSampler,
    ImageFolder,
    LatentShards,
    batch_stream,
    rank_slice,
    write_latent_shards,
)
from kind_fast.train.loop import Trainer

sys.path.insert(0, os.path.dirname(__file__))
from train_helpers import tiny_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny finished KIND pretraining run (the init of the transfer tests)."""
    out = tmp_path_factory.mktemp("pre")
    tr = Trainer(tiny_config(out, steps=4))
    tr.train()
    tr.export()
    tr.close()
    return out


# =====================================================================================
# Config
# =====================================================================================
def test_config_defaults_and_round_trip(tmp_path):
    cfg = RunConfig()
    cfg.validate()
    cfg.save(tmp_path / "c.json")
    again = RunConfig.from_dict(json.loads((tmp_path / "c.json").read_text()))
    assert again == cfg


def test_config_yaml_and_json_files(tmp_path):
    pytest.importorskip("yaml")
    (tmp_path / "c.yaml").write_text("steps: 7\noptim:\n  lr: 3.0e-4\ndata: {classes: [1, 2]}\n")
    (tmp_path / "c.json").write_text(json.dumps({"steps": 7, "optim": {"lr": 3e-4}, "data": {"classes": [1, 2]}}))
    a = RunConfig.from_dict(load_config_file(tmp_path / "c.yaml"))
    b = RunConfig.from_dict(load_config_file(tmp_path / "c.json"))
    assert a == b and a.steps == 7 and a.optim.lr == 3e-4 and a.data.classes == [1, 2]


def test_config_yaml_without_pyyaml_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "c.yaml").write_text("steps: 3\n")
    monkeypatch.setitem(sys.modules, "yaml", None)
    with pytest.raises(ImportError, match="needs PyYAML"):
        load_config_file(tmp_path / "c.yaml")


@pytest.mark.parametrize("d, match", [
    ({"stepz": 3}, "unknown key 'stepz'"),
    ({"optim": {"lrr": 1}}, "unknown key 'optim.lrr'"),
    ({"steps": "many"}, "steps: expected an integer"),
    ({"steps": 0}, "steps: must be >= 1"),
    ({"optim": {"lr": -1}}, "optim.lr: must be > 0"),
    ({"method": {"name": "lora"}}, "pretrain supports"),
    ({"mode": "transfer"}, "needs the pretrained run"),
    ({"model": {"active": 9, "tailor_rank": 8}}, "model.active"),
    ({"data": {"source": "imagefolder"}}, "data.path"),
    ({"data": {"classes": [1, 1]}}, "duplicates"),
    ({"model": {"name": "DiT-Q/2"}}, "unknown DiT preset"),
    ({"progress": "maybe"}, "expected true/false"),
    ({"optim": "fast"}, "expected a mapping"),
])
def test_config_rejects_bad_values_with_the_key(d, match):
    with pytest.raises(ValueError, match=match):
        RunConfig.from_dict(d)


def test_config_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_config_file(tmp_path / "nope.yaml")
    (tmp_path / "c.txt").write_text("steps: 1")
    with pytest.raises(ValueError, match=".yaml, .yml or .json"):
        load_config_file(tmp_path / "c.txt")
    (tmp_path / "c.json").write_text("{steps: 1")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_config_file(tmp_path / "c.json")
    (tmp_path / "l.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="mapping at the top level"):
        load_config_file(tmp_path / "l.json")


def test_parse_int_list_and_dotted_overrides():
    assert parse_int_list("0-3,7") == [0, 1, 2, 3, 7]
    assert parse_int_list("8,9") == [8, 9]
    with pytest.raises(ValueError, match="like 0-7"):
        parse_int_list("3-1")
    cfg = RunConfig().with_overrides({"optim.ema_decay": "0.99", "data.flip": "true", "data.classes": "1-2"})
    assert cfg.optim.ema_decay == 0.99 and cfg.data.flip is True and cfg.data.classes == [1, 2]


# =====================================================================================
# Data
# =====================================================================================
def test_global_batch_sampler_epochs_ranks_and_determinism():
    s = GlobalBatchSampler(10, 4, seed=3)
    stream = torch.cat([s.indices(i) for i in range(5)])  # 20 items = 2 epochs
    assert sorted(stream[:10].tolist()) == list(range(10)) and sorted(stream[10:].tolist()) == list(range(10))
    assert torch.equal(s.indices(2), GlobalBatchSampler(10, 4, seed=3).indices(2))
    assert not torch.equal(torch.cat([s.indices(i) for i in range(3)]),
                           torch.cat([GlobalBatchSampler(10, 4, seed=4).indices(i) for i in range(3)]))
    g = s.indices(1)
    assert torch.equal(torch.cat([rank_slice(g, r, 2) for r in range(2)]), g)
    with pytest.raises(ValueError, match="not divisible"):
        rank_slice(torch.arange(5), 0, 2)
    assert s.position(3) == {"samples_consumed": 12, "epoch": 1, "offset": 2}


def _write_images(root, spec):
    from PIL import Image

    rng = np.random.default_rng(0)
    arrays = {}
    for cls, n, size in spec:
        (root / cls).mkdir(parents=True)
        for i in range(n):
            a = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(a).save(root / cls / f"{i}.png")
            arrays[(cls, i)] = a
    return arrays


def test_image_folder_reader(tmp_path):
    pytest.importorskip("PIL")
    arrays = _write_images(tmp_path, [("cat", 2, (12, 12)), ("dog", 3, (20, 12))])
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    ds = ImageFolder(tmp_path, image_size=12)
    assert len(ds) == 5 and ds.class_names == ["cat", "dog"] and ds.sample_shape == (3, 12, 12)
    x, y = ds[0]
    assert y == 0 and x.shape == (3, 12, 12) and x.dtype == torch.float32
    # a same-size image is passed through exactly, scaled to [-1, 1]
    want = torch.from_numpy(arrays[("cat", 0)]).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(x, want)
    x, y = ds[4]
    assert y == 1 and x.shape == (3, 12, 12) and -1 <= x.min() and x.max() <= 1  # 20×12 → centre crop
    gray = ImageFolder(tmp_path, image_size=6, channels=1, classes=[1])
    assert len(gray) == 3 and gray.class_names == ["dog"] and gray[0][0].shape == (1, 6, 6) and gray[0][1] == 0
    xb, yb = next(batch_stream(ds, GlobalBatchSampler(len(ds), 4, 0), 0, 1))
    assert xb.shape == (4, 3, 12, 12) and yb.shape == (4,)


def test_image_folder_bad_paths(tmp_path):
    pytest.importorskip("PIL")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        ImageFolder(tmp_path / "missing")
    with pytest.raises(ValueError, match="no class sub-folders"):
        ImageFolder(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="no images"):
        ImageFolder(tmp_path)
    _write_images(tmp_path / "b", [("c", 1, (4, 4))])
    with pytest.raises(ValueError, match="classes 0..0"):
        ImageFolder(tmp_path / "b", classes=[3])


def test_unreadable_images_stop_the_run_before_the_model_is_built(tmp_path, monkeypatch):
    """Issue 21 item 7: a corrupt image in an ImageFolder killed the run at its first batch,
    after the model was built (and, for a large model, after minutes of setup)."""
    pytest.importorskip("PIL")
    import kind_fast.train.loop as loop

    _write_images(tmp_path, [("a", 3, (8, 8)), ("b", 3, (8, 8))])
    (tmp_path / "a" / "1.png").write_bytes(b"not a png at all")
    good = (tmp_path / "b" / "2.png").read_bytes()
    (tmp_path / "b" / "2.png").write_bytes(good[: len(good) // 2])  # truncated: the header still reads
    with pytest.raises(ValueError, match=r"2 of 6 images cannot be read: .*a/1\.png.*b/2\.png"):
        ImageFolder(tmp_path, image_size=8)

    def no_model(*a, **k):
        raise AssertionError("the model was built before the data was checked")

    monkeypatch.setattr(loop, "build_model", no_model)
    cfg = tiny_config(tmp_path / "run", data={"source": "imagefolder", "path": str(tmp_path), "image_size": 8})
    with pytest.raises(ValueError, match="images cannot be read"):
        Trainer(cfg)
    (tmp_path / "a" / "1.png").unlink()
    (tmp_path / "b" / "2.png").write_bytes(good)
    assert len(ImageFolder(tmp_path, image_size=8)) == 5


def test_latent_shards_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(7, 4, 2, 2, generator=g).half()
    lab = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    write_latent_shards(tmp_path, [(lat[:4], lab[:4]), (lat[4:], lab[4:])], class_names=["a", "b", "c"],
                        scale_factor=0.18215, shard_size=3)
    meta = json.loads((tmp_path / "index.json").read_text())
    assert [s["count"] for s in meta["shards"]] == [3, 3, 1]
    ds = LatentShards(tmp_path)
    assert len(ds) == 7 and ds.sample_shape == (4, 2, 2) and ds.num_classes == 3 and ds.scale_factor == 0.18215
    for i in range(7):
        x, y = ds[i]
        assert torch.equal(x, lat[i].float()) and y == int(lab[i])
    sub = LatentShards(tmp_path, classes=[2, 0])
    assert len(sub) == 5 and sub.class_names == ["c", "a"]
    assert [sub[i][1] for i in range(5)] == [1, 0, 1, 0, 1]
    assert torch.equal(sub[1][0], lat[2].float())
    xb, yb = next(batch_stream(ds, GlobalBatchSampler(7, 4, 0), 0, 1, rank=1, world=2))
    assert xb.shape == (2, 4, 2, 2)


def test_latent_shards_bad_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="no index.json"):
        LatentShards(tmp_path)
    (tmp_path / "index.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        LatentShards(tmp_path)
    write_latent_shards(tmp_path / "ok", [(torch.zeros(2, 1, 2, 2), torch.tensor([0, 1]))], class_names=["a", "b"],
                        scale_factor=1.0)
    (tmp_path / "ok" / "shard_00000.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="is missing"):
        LatentShards(tmp_path / "ok")


# =====================================================================================
# Checkpoints
# =====================================================================================
def test_atomic_save_leaves_no_partial_file(tmp_path, monkeypatch):
    good = ck.save_checkpoint({"x": torch.ones(3)}, tmp_path, 1, keep_last=3)
    before = good.read_bytes()
    real_save = torch.save

    def crash(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a zip")  # the write starts, then the process "dies"
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        ck.save_checkpoint({"x": torch.zeros(3)}, tmp_path, 2, keep_last=1)
    monkeypatch.setattr(torch, "save", real_save)
    files = sorted(p.name for p in (tmp_path / ck.CKPT_DIR).iterdir())
    assert files == ["step_00000001.pt"], files  # no step 2, no temp file, step 1 kept
    assert good.read_bytes() == before
    assert torch.equal(torch.load(good, weights_only=True)["x"], torch.ones(3))


def test_keep_last_n(tmp_path):
    for step in range(1, 6):
        ck.save_checkpoint({"v": torch.tensor(step)}, tmp_path, step, keep_last=2)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [4, 5]
    with pytest.raises(ValueError, match="keep_last"):
        ck.prune_checkpoints(tmp_path, 0)


def test_corrupt_and_foreign_checkpoints_give_clear_errors(tmp_path):
    cfg = tiny_config(tmp_path / "run", steps=3, ckpt_every=1, keep_last=5)
    tr = Trainer(cfg)
    tr.train()
    tr.close()
    ckpts = ck.list_checkpoints(cfg.out)
    assert [s for s, _ in ckpts] == [1, 2, 3]
    last = ckpts[-1][1]
    good_prev = ckpts[-2][1].read_bytes()
    last.write_bytes(last.read_bytes()[:1000])  # truncated (killed mid-copy)
    with pytest.raises(ck.CheckpointError, match="corrupt or truncated"):
        Trainer(cfg, resume="auto")
    assert ckpts[-2][1].read_bytes() == good_prev  # the last good one is untouched
    tr = Trainer(cfg, resume=str(ckpts[-2][1]))  # and usable
    assert tr.step == 2
    tr.close()
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.ones(1)}}, foreign)
    with pytest.raises(ck.CheckpointError, match="not a kind_fast training checkpoint"):
        ck.load_checkpoint(foreign)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        Trainer(cfg, resume=str(tmp_path / "nope.pt"))


def test_incompatible_checkpoint_and_occupied_output(tmp_path):
    cfg = tiny_config(tmp_path / "run", steps=2)
    tr = Trainer(cfg)
    tr.train()
    tr.close()
    with pytest.raises(FileExistsError, match="--resume auto"):
        Trainer(cfg)
    bigger = tiny_config(tmp_path / "run", steps=4, model={"hidden_size": 48})
    with pytest.raises(ck.CheckpointError, match="incompatible run.*arch"):
        Trainer(bigger, resume="auto")
    short = tiny_config(tmp_path / "run", steps=1)
    with pytest.raises(ck.CheckpointError, match="past steps=1"):
        Trainer(short, resume="auto")


# =====================================================================================
# Exact resume
# =====================================================================================
@pytest.mark.parametrize("mode", ["pretrain", "transfer"])
def test_resume_reproduces_an_uninterrupted_run_bitwise(tmp_path, pretrained, mode):
    kw = dict(steps=7, data={"flip": True}, optim={"ema_decay": 0.9, "warmup_steps": 3})
    if mode == "transfer":
        kw["method"] = {"name": "kind", "init": str(pretrained)}

    def cfg(out):
        return tiny_config(out, mode, **kw)

    a = Trainer(cfg(tmp_path / "a"))
    losses_a = a.train()
    state_a = a.checkpoint_state()
    a.close()

    b = Trainer(cfg(tmp_path / "b"))
    b.train(until=3)  # "killed" after step 3, with a checkpoint at step 3
    b.save_checkpoint()
    b.close()
    del b
    torch.manual_seed(12345)  # the resumed process starts with other global RNG states
    np.random.seed(1)
    c = Trainer(cfg(tmp_path / "b"), resume="auto")
    assert c.step == 3
    losses_c = c.train()
    state_c = c.checkpoint_state()
    c.close()

    assert len(losses_a) == 7 and losses_c == losses_a  # bitwise, every step
    for part in ("model", "ema"):
        for k, v in state_a[part].items():
            assert torch.equal(v, state_c[part][k]), (part, k)
    for pid, st in state_a["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(state_c["optimizer"]["state"][pid][k]))
    assert state_a["scheduler"] == state_c["scheduler"]
    rows = [r for r in (tmp_path / "b" / "metrics.csv").read_text().splitlines()[1:]]
    assert [int(r.split(",")[0]) for r in rows] == [2, 3, 4, 6, 7]  # no duplicate rows after resume


def test_trainer_writes_its_outputs(tmp_path):
    cfg = tiny_config(tmp_path / "run", steps=2, tensorboard="auto")
    tr = Trainer(cfg)
    tr.train()
    paths = tr.export()
    tr.close()
    saved = RunConfig.from_dict(json.loads((tmp_path / "run" / "config.json").read_text()))
    # the config as given, with the model that was built filled in (the tiny defaults here)
    assert saved == cfg.with_overrides({"model.patch_size": 2, "model.mlp_ratio": 4.0, "model.learn_sigma": True})
    assert (paths["ema"] / "kind_config.json").is_file() and (paths["model"] / "train_spec.json").is_file()
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0]
    assert header.startswith("step,loss,mse,vb,lr,grad_norm")
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        assert not (tmp_path / "run" / "tb").exists()
    else:
        assert any((tmp_path / "run" / "tb").iterdir())


def test_tensorboard_on_without_the_package_is_a_clear_error(tmp_path, monkeypatch):
    from kind_fast.train.logger import tensorboard_writer

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match="pip install tensorboard"):
        tensorboard_writer(tmp_path, "on")
    assert tensorboard_writer(tmp_path, "auto") is None


def test_kind_op_gives_full_size_zero_grads_for_absent_tailors():
    """What lets DDP run KIND models with find_unused_parameters=False (see distributed.py)."""
    from kind_fast import ClassGate, FastKindLinear

    gate = ClassGate.block(4, 8, 2)
    layer = FastKindLinear(8, 8, tailor_rank=8, gate=gate)
    layer(torch.randn(3, 5, 8), labels=torch.tensor([1, 1, 4])).sum().backward()  # classes 1 and null only
    for p in (layer.u_t, layer.v_t, layer.sigma_t):
        assert p.grad is not None and p.grad.shape == p.shape
    on = gate.row(1) != 0
    assert layer.u_t.grad[~on].abs().max() == 0 and layer.u_t.grad[on].abs().max() > 0


def test_label_dropout_reaches_the_kind_gate_as_the_null_class(tmp_path):
    tr = Trainer(tiny_config(tmp_path / "run", steps=1, batch_size=64, model={"class_dropout": 0.5}))
    x, y = tr.data.get_batch(tr.sampler.indices(0))
    _, _, drop, _ = tr._draws(0)
    assert 0 < int(drop.sum()) < 64
    from kind_fast.testing import routed_labels

    with routed_labels(tr.model) as seen:
        tr._forward_loss(tr.model, x, y, 0)
    want = torch.where(drop, torch.full_like(y, tr.model.num_classes), y)
    assert seen and all(torch.equal(s, want) for s in seen)
    tr.close()


def test_train_flops_kind_transfer_below_full_fine_tuning(tmp_path, pretrained):
    flops = {}
    for method in ("kind", "full", "lora"):
        cfg = tiny_config(tmp_path / method, "transfer", steps=1, method={"name": method, "init": str(pretrained)})
        tr = Trainer(cfg)
        tr.train()
        flops[method] = tr.count_train_flops()
        tr.close()
    f = {k: v["train_per_image"] for k, v in flops.items()}
    assert 0 < f["kind"] < f["full"] and 0 < f["lora"] < f["full"], f
    for v in flops.values():  # fwd + bwd between 2× and 3× the forward
        assert 2.0 * v["forward_per_image"] < v["train_per_image"] <= 3.05 * v["forward_per_image"]


# =====================================================================================
# Diffusion loss and samplers
# =====================================================================================
def test_simple_loss_api_still_works():
    from kind_fast.models.dit import DiT

    m = DiT(input_size=8, patch_size=4, in_channels=1, hidden_size=16, depth=1, num_heads=2, num_classes=2)
    loss = GaussianDiffusion().loss(m, torch.randn(2, 1, 8, 8), torch.tensor([0, 1]), torch.Generator().manual_seed(0))
    assert loss.dim() == 0 and torch.isfinite(loss)


def test_vb_term_trains_only_the_variance_and_vanishes_at_the_posterior():
    d = GaussianDiffusion()
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 1, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 1, 10, 200, 500, 999])
    xt = d.q_sample(x0, t, noise)
    # exact ε and v = -1 (log Σ = log β̃): p equals the posterior, so KL = 0 for t > 0
    out = torch.cat([noise, -torch.ones_like(noise)], 1).requires_grad_(True)
    terms = d.loss_terms(out, x0, xt, t, noise)
    assert terms["mse"].abs().max() < 1e-10
    assert terms["vb"][1:].abs().max() < 1e-4 and terms["vb"][0] > 0  # t = 0: decoder NLL
    terms["vb"].sum().backward()
    assert out.grad[:, :1].abs().max() == 0 and out.grad[:, 1:].abs().max() > 0  # mean gradient stopped
    assert torch.equal(d.loss_terms(noise, x0, xt, t, noise)["vb"], torch.zeros(6))  # no learned sigma
    with pytest.raises(ValueError, match="channels"):
        d.loss_terms(torch.zeros(6, 3, 4, 4), x0, xt, t, noise)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_samplers_recover_a_point_mass_with_an_exact_eps(sampler):
    """With data = one point c and the exact ε of that distribution, both samplers end at c."""
    from kind_fast.train.sampling import make_scheduler, run_scheduler

    ac = GaussianDiffusion().alphas_cumprod
    c = torch.linspace(-0.8, 0.8, 16).view(1, 1, 4, 4).repeat(3, 1, 1, 1)

    def eps_fn(x, t_model):
        a = ac[t_model].float().view(-1, 1, 1, 1)  # the scheduler passes original timestep ids
        return (x - a.sqrt() * c) / (1 - a).sqrt()

    noise = torch.randn(c.shape, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    sched = make_scheduler(sampler, 25, learned_sigma=False)
    x = run_scheduler(sched, eps_fn, noise, channels=1, generator=g)
    torch.testing.assert_close(x, c, atol=1e-4, rtol=0)


def test_respacing():
    from kind_fast.train.sampling import make_scheduler

    assert space_timesteps(1000, 5) == [0, 250, 500, 749, 999]
    ddpm = make_scheduler("ddpm", 50)
    ts = ddpm.timesteps.tolist()
    assert len(ts) == 50 and ts[0] == 999 and ts[-1] == 0 and ts == space_timesteps(1000, 50)[::-1]
    assert make_scheduler("ddim", 50).timesteps.tolist() == list(range(980, -1, -20))  # DiT/ADM "ddim50"
    full = GaussianDiffusion()  # the scheduler's tables are ours (float32)
    torch.testing.assert_close(ddpm.alphas_cumprod.double(), full.alphas_cumprod, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="steps"):
        space_timesteps(1000, 0)
    with pytest.raises(ValueError, match=r"\[2, 1000\]"):
        make_scheduler("ddim", 1)


def _adm_reference_sampler(fn, noise, ts, *, ddim: bool, eta: float, gen) -> torch.Tensor:
    """ADM's respaced p_sample / ddim_sample written out in float64: the oracle of the
    diffusers schedulers. ``ts``: descending timesteps; step i goes from ts[i] to ts[i+1]
    (ᾱ = 1 after the last). The model sees float32 inputs, as in sampling."""
    ac = GaussianDiffusion().alphas_cumprod
    x = noise.double()
    for i, t in enumerate(ts):
        a, a_p = ac[t], (ac[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0, dtype=torch.float64))
        out = fn(x.float(), torch.full((x.shape[0],), t)).double()
        eps, v = out[:, :1], out[:, 1:]
        x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
        z = torch.randn(x.shape, generator=gen).double() if (t > 0 or (ddim and eta > 0)) else None
        if ddim:
            eps = (x - a.sqrt() * x0) / (1 - a).sqrt()  # ε re-derived from the clipped x_0
            sigma = eta * ((1 - a_p) / (1 - a) * (1 - a / a_p)).sqrt()
            x = a_p.sqrt() * x0 + (1 - a_p - sigma ** 2).sqrt() * eps + (sigma * z if eta > 0 else 0)
        else:
            beta = 1 - a / a_p
            mean = a_p.sqrt() * beta / (1 - a) * x0 + (1 - beta).sqrt() * (1 - a_p) / (1 - a) * x
            frac = (v + 1) / 2  # learned range: log Σ between log β̃ and log β
            log_var = frac * beta.log() + (1 - frac) * (beta * (1 - a_p) / (1 - a)).log()
            x = mean + (0.5 * log_var).exp() * z if z is not None else mean
    return x.float()


@pytest.mark.parametrize("sampler, eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.7)])
def test_diffusers_schedulers_match_the_adm_sampler(sampler, eta):
    """diffusers' DDPMScheduler(learned_range) / DDIMScheduler, as make_scheduler sets them up,
    compute ADM's sampling steps on our schedule: same noise stream, equal within float32."""
    from kind_fast.train.sampling import make_scheduler, run_scheduler

    w = torch.linspace(0.5, 1.5, 16).view(1, 1, 4, 4)

    def fn(x, t):  # an ε and a variance channel that depend on x and t
        s = (t.float() / 1000).view(-1, 1, 1, 1)
        return torch.cat([torch.tanh(w * x + s), torch.sin(3 * x * w - s)], 1)

    noise = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    sched = make_scheduler(sampler, 20, learned_sigma=True)
    ts = sched.timesteps.tolist()
    got = run_scheduler(sched, fn, noise, channels=1, eta=eta, generator=torch.Generator().manual_seed(1))
    want = _adm_reference_sampler(fn, noise, ts, ddim=sampler == "ddim", eta=eta,
                                  gen=torch.Generator().manual_seed(1))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.equal(got, noise)


def test_sampling_shapes_determinism_and_label_checks(pretrained):
    from kind_fast.train.models import load_weights
    from kind_fast.train.sampling import sample

    model = load_weights(pretrained / "ema").train()
    labels = torch.tensor([0, 3, 7])
    kw = dict(shape=(1, 8, 8), steps=3, cfg_scale=2.0)
    a = sample(model, labels, sampler="ddpm", seed=5, **kw)
    b = sample(model, labels, sampler="ddpm", seed=5, **kw)
    c = sample(model, labels, sampler="ddpm", seed=6, **kw)
    assert a.shape == (3, 1, 8, 8) and torch.equal(a, b) and not torch.equal(a, c)
    assert a.abs().max() <= 1.0
    d = sample(model, labels, sampler="ddim", seed=5, **kw)
    e = sample(model, labels, sampler="ddim", seed=5, batch_size=2, **kw)  # chunking is deterministic too
    # (up to rounding: the merged path's GEMMs change shape with the chunk; results depend on the batch size)
    assert d.shape == a.shape and torch.equal(e, sample(model, labels, sampler="ddim", seed=5, batch_size=2, **kw))
    torch.testing.assert_close(d[:2], e[:2], rtol=0, atol=1e-6)
    assert sample(model, labels, sampler="ddim", seed=5, shape=(1, 8, 8), steps=3, cfg_scale=1.0).shape == a.shape
    assert model.training  # sample() switches to eval and back
    with pytest.raises(ValueError, match="class ids"):
        sample(model, torch.tensor([8]), **kw)
    with pytest.raises(ValueError, match="ddpm or ddim"):
        sample(model, labels, sampler="euler", **kw)


# =====================================================================================
# Images and metrics
# =====================================================================================
def test_png_writer_round_trips(tmp_path):
    PIL = pytest.importorskip("PIL.Image")
    from kind_fast.train.sampling import make_grid, save_png

    imgs = torch.rand(5, 3, 4, 6, generator=torch.Generator().manual_seed(0)) * 2 - 1
    grid = make_grid(imgs, nrow=2, scale=2)
    assert grid.shape == (3 * 9 + 1, 2 * 13 + 1, 3) and grid.dtype == np.uint8
    save_png(grid, tmp_path / "rgb.png")
    with PIL.open(tmp_path / "rgb.png") as im:
        assert np.array_equal(np.asarray(im), grid)
    gray = make_grid(imgs[:, :1], nrow=5)
    save_png(gray, tmp_path / "g.png")
    with PIL.open(tmp_path / "g.png") as im:
        assert im.mode == "L" and np.array_equal(np.asarray(im), gray[:, :, 0])
    with pytest.raises(ValueError, match="uint8"):
        save_png(grid.astype(np.float32), tmp_path / "bad.png")


def test_metrics_sanity():
    pytest.importorskip("torchmetrics")
    from kind_fast.train.digits import load_digits
    from kind_fast.train.metrics import (
        DigitFeatures,
        DigitLogits,
        class_accuracy,
        frechet_distance,
        inception_score,
        kernel_distance,
        train_digit_classifier,
    )

    clf, report = train_digit_classifier(0)
    assert report["test_acc"] > 0.93, report
    x, y = load_digits()
    acc, per = class_accuracy(x, y, clf)
    assert acc > 0.95 and min(per.values()) > 0.85
    feats = DigitFeatures(clf)
    real = x[y >= 8]
    assert abs(frechet_distance(real, real, feats)) < 1e-3
    noise = torch.rand_like(real) * 2 - 1
    other = x[y < 2]
    fid_noise, fid_other = frechet_distance(real, noise, feats), frechet_distance(real, other, feats)
    assert fid_noise > 10 and fid_other > 10
    kid_same, _ = kernel_distance(real, real, feats, subsets=5, subset_size=100)
    kid_noise, _ = kernel_distance(real, noise, feats, subsets=5, subset_size=100)
    assert abs(kid_same) < 0.05 * kid_noise
    is_real, _ = inception_score(x, DigitLogits(clf), splits=2)
    is_one, _ = inception_score(x[y == 3], DigitLogits(clf), splits=2)
    assert is_real > 5 and is_one < 2


def test_streamed_npz_and_sample_labels(tmp_path):
    from kind_fast.train.sample_ddp import rank_chunks, sample_labels, write_npz

    x = np.arange(5 * 2 * 3, dtype=np.uint8).reshape(5, 2, 3, 1)
    write_npz(tmp_path / "s.npz", {"arr_0": (x.shape, np.uint8, [x[:2], x[2:3], x[3:]]),
                                   "labels": ((5,), np.int64, [np.arange(5)])})
    with np.load(tmp_path / "s.npz") as f:
        assert np.array_equal(f["arr_0"], x) and f["labels"].tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="4 rows, the array 5"):
        write_npz(tmp_path / "t.npz", {"arr_0": (x.shape, np.uint8, [x[:4]])})
    assert not (tmp_path / "t.npz").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["s.npz"]
    assert sample_labels([3, 5], num_samples=5).tolist() == [3, 5, 3, 5, 3]
    assert sample_labels([3, 5], n_per_class=2).tolist() == [3, 3, 5, 5]
    assert rank_chunks(7, 2, 0, 2) == [0, 2] and rank_chunks(7, 2, 1, 2) == [1, 3] and rank_chunks(1, 2, 1, 2) == []
