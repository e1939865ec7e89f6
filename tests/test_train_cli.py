"""CLI end to end at tiny step counts: pretrain → transfer (KIND and every baseline) → sample,
bad arguments with clear errors, and the demo's table."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from kind_fast.__main__ import main

sys.path.insert(0, os.path.dirname(__file__))
from train_helpers import TINY_FLAGS  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pre_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "pre"
    assert main(["pretrain", "--steps", "3", "--out", str(out), "--no-sample", *TINY_FLAGS]) == 0
    return out


def test_pretrain_outputs(pre_run):
    cfg = json.loads((pre_run / "config.json").read_text())
    assert cfg["mode"] == "pretrain" and cfg["steps"] == 3 and cfg["model"]["hidden_size"] == 32
    assert (pre_run / "checkpoints" / "step_00000003.pt").is_file()
    assert (pre_run / "ema" / "learngenes.safetensors").is_file()
    assert len((pre_run / "metrics.csv").read_text().splitlines()) == 4  # header + 3 steps


@pytest.mark.parametrize("method", ["kind", "full", "lora", "svdiff", "scratch"])
def test_transfer_every_method_and_sample(tmp_path, pre_run, method, capsys):
    out = tmp_path / method
    rc = main(["transfer", "--init", str(pre_run), "--method", method, "--steps", "2", "--out", str(out),
               "--set", "eval.sample_steps=2", "--set", "eval.n_per_class=3", *TINY_FLAGS])
    assert rc == 0
    text = capsys.readouterr().out
    assert "trainable params" in text and "sample grid" in text
    assert (out / "samples" / "grid.png").is_file()
    assert json.loads((out / "ema" / "train_spec.json").read_text())["method"] == method
    png = tmp_path / "s.png"
    assert main(["sample", str(out), "--steps", "2", "--n-per-class", "2", "--out", str(png), "--npz"]) == 0
    from PIL import Image

    with Image.open(png) as im:
        assert im.size == (2 * 33 + 1, 2 * 33 + 1)  # 2 classes × 2 samples, 8 px × 4 + 1 px pad
    arr = __import__("numpy").load(png.with_suffix(".npz"))["arr_0"]
    assert arr.shape == (4, 8, 8, 1) and arr.dtype.name == "uint8"


def test_config_file_and_print_config(tmp_path, capsys):
    (tmp_path / "c.json").write_text(json.dumps({"mode": "pretrain", "steps": 9, "optim": {"lr": 0.002}}))
    assert main(["pretrain", "--config", str(tmp_path / "c.json"), "--steps", "5", "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["steps"] == 5 and cfg["optim"]["lr"] == 0.002  # the flag beats the file


def test_scale_flags_reach_the_config(capsys):
    assert main(["pretrain", "--grad-accum", "4", "--precision", "fp16", "--compile", "--grad-checkpoint",
                 "--lr-schedule", "cosine", "--warmup-steps", "5", "--sample-every", "100", "--eval-every", "200",
                 "--wandb", "on", "--wandb-project", "p", "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    got = (cfg["grad_accum"], cfg["precision"], cfg["compile"], cfg["grad_checkpoint"])
    assert got == (4, "fp16", "inductor", True)
    assert (cfg["optim"]["lr_schedule"], cfg["optim"]["warmup_steps"]) == ("cosine", 5)
    assert (cfg["sample_every"], cfg["eval_every"], cfg["wandb"], cfg["wandb_project"]) == (100, 200, "on", "p")
    assert main(["pretrain", "--compile", "aot_eager", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["compile"] == "aot_eager"
    assert main(["pretrain", "--print-config"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert (d["compile"], d["grad_checkpoint"], d["grad_accum"]) == ("off", False, 1)


@pytest.mark.parametrize("argv, match", [
    (["transfer", "--method", "lora"], "needs the pretrained run: --init"),
    (["transfer", "--init", "/nonexistent/run"], "does not exist"),
    (["pretrain", "--method", "lora"], "pretrain supports"),
    (["pretrain", "--config", "/nonexistent/c.yaml"], "not found"),
    (["pretrain", "--set", "optim.lrr=1"], "unknown key 'optim.lrr'"),
    (["pretrain", "--set", "steps"], "KEY=VALUE"),
    (["pretrain", "--classes", "a-b"], "like 0-7"),
    (["pretrain", "--data", "imagefolder", "--data-path", "/nonexistent/imgs"], "not a folder"),
    (["pretrain", "--data", "latents", "--data-path", "/nonexistent/lat"], "no index.json"),
    (["pretrain", "--batch-size", "0"], "batch_size: must be >= 1"),
    (["pretrain", "--precision", "fp8"], "precision: auto, fp32, bf16 or fp16"),
    (["pretrain", "--grad-accum", "0"], "grad_accum: must be >= 1"),
    (["pretrain", "--lr-schedule", "step"], "optim.lr_schedule"),
    (["pretrain", "--wandb", "maybe"], "wandb: on or off"),
])
def test_bad_arguments_exit_2_with_a_clear_message(argv, match, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    assert match in capsys.readouterr().err


def test_transfer_from_a_folder_without_weights(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["transfer", "--init", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "neither it nor" in capsys.readouterr().err


def test_sample_bad_paths(tmp_path, pre_run, capsys):
    assert main(["sample", str(tmp_path / "nothing")]) == 2
    assert "no ema/ folder" in capsys.readouterr().err
    assert main(["sample", str(pre_run), "--classes", "9"]) == 2
    assert "out of range" in capsys.readouterr().err


def test_resume_flag_continues_a_run(tmp_path, capsys):
    out = tmp_path / "r"
    base = ["pretrain", "--out", str(out), "--no-sample", *TINY_FLAGS]
    assert main([*base, "--steps", "2"]) == 0
    assert main([*base, "--steps", "3"]) == 2  # occupied output folder
    assert "--resume auto" in capsys.readouterr().err
    assert main([*base, "--steps", "3", "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert len((out / "metrics.csv").read_text().splitlines()) == 4


def test_demo_prints_one_table(tmp_path, capsys):
    pytest.importorskip("torchmetrics")
    out = tmp_path / "demo"
    rc = main(["demo", "--pretrain-steps", "2", "--steps", "2", "--samples-per-class", "4", "--sample-steps", "2",
               "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    for label in ("KIND pretrain", "TLEG ancestry", "KIND transfer", "full fine-tune", "LoRA", "SVDiff", "Heur-LG",
                  "TLEG", "from scratch", "real digits"):
        assert label in text
    head = next(line for line in text.splitlines() if line.startswith("method "))
    assert head.split()[-6:] == ["FID", "sFID", "prec", "recall", "class", "acc"]
    assert "train GFLOP/img" in text and "transfer_grid.png" in text
    assert "wall time: KIND transfer" in text  # compared with full fine-tuning, explained when slower
    summary = json.loads((out / "demo_summary.json").read_text())
    rows = {r["method"]: r for r in summary["rows"]}
    assert set(rows) == {"pretrain", "tleg_pretrain", "kind", "full", "lora", "svdiff", "heur_lg", "tleg", "scratch",
                         "real"}
    assert rows["kind"]["trainable"] < rows["full"]["trainable"]
    assert rows["kind"]["train_gflops_per_image"] < rows["full"]["train_gflops_per_image"]
    for m in ("heur_lg", "tleg"):  # dense descendants that train every weight: full fine-tuning's cost
        assert rows[m]["trainable"] == rows["full"]["trainable"]
        assert rows[m]["train_gflops_per_image"] == pytest.approx(rows["full"]["train_gflops_per_image"])
    assert rows["tleg_pretrain"]["trainable"] < rows["scratch"]["trainable"]  # two learngene blocks, not four
    for r in rows.values():  # computed (not NaN), in range
        assert r["fid"] == r["fid"] and r["sfid"] == r["sfid"] and 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1
    from PIL import Image

    with Image.open(out / "transfer_grid.png") as im:  # real + 7 methods, 2 labelled rows each, 4 digits a row
        w, h = im.size
        assert h > 16 * 8 * 6 and w > 4 * 8 * 6
    if "matplotlib is not installed" not in text:
        with Image.open(out / "demo_chart.png") as im:
            assert im.format == "PNG"


def test_demo_after_a_crash_restarts_the_run_it_started(tmp_path, capsys):
    """A demo that died during a run's set-up leaves the run folder with only its lock file (older
    versions) or the demo's marker: the next demo restarts that run with a message."""
    pytest.importorskip("torchmetrics")
    from kind_fast.train.demo import DEMO_MARKER

    out = tmp_path / "demo"
    (out / "pretrain").mkdir(parents=True)
    (out / "pretrain" / ".kind_fast.lock").write_text("pid 1 on gone, since 2026-01-01 00:00:00\n")
    (out / "kind").mkdir()
    (out / "kind" / DEMO_MARKER).write_text("")
    (out / "kind" / "metrics.csv").write_text("step,loss\n")  # died before config.json was written
    rc = main(["demo", "--pretrain-steps", "2", "--steps", "2", "--samples-per-class", "4", "--sample-steps", "2",
               "--methods", "kind", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert f"{out / 'pretrain'} holds an earlier demo run that did not finish" in text
    assert f"{out / 'kind'} holds an earlier demo run that did not finish" in text
    assert (out / "kind" / "ema").is_dir() and (out / "kind" / DEMO_MARKER).is_file()


def test_demo_run_folders_it_did_not_make_or_a_live_run_holds_are_left_alone(tmp_path):
    from kind_fast.train.demo import DEMO_MARKER, _fresh
    from kind_fast.train.runlock import RunLock

    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "chapter1.tex").write_text("keep me")
    with pytest.raises(SystemExit, match="is not a demo run folder"):
        _fresh(foreign)
    assert (foreign / "chapter1.tex").read_text() == "keep me"

    live = tmp_path / "live"
    live.mkdir()
    (live / DEMO_MARKER).write_text("")
    (live / "config.json").write_text("{}")
    with RunLock(live):  # another demo is training there right now
        with pytest.raises(SystemExit, match="in use by another training run"):
            _fresh(live)
    assert (live / "config.json").is_file()

    finished = tmp_path / "done"
    (finished / "ema").mkdir(parents=True)
    (finished / "config.json").write_text("{}")
    said = []
    _fresh(finished, log=said.append)
    assert said == [] and sorted(p.name for p in finished.iterdir()) == [".kind_fast.lock", DEMO_MARKER]


def test_wall_time_note_reports_what_it_measured_either_way():
    from kind_fast.train.demo import wall_time_note
    from kind_fast.models.dit import DiT, KindConfig

    kind = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=2,
               kind=KindConfig(tailor_rank=8, active=2)).set_mode("transfer")
    full = kind.to_dense()  # the dense DiT full fine-tuning trains (qkv fused)
    rows = lambda k, f: ({"wall_s": k, "train_gflops_per_image": 0.75}, {"wall_s": f, "train_gflops_per_image": 1.0})  # noqa: E731
    fast = wall_time_note(*rows(1.0, 2.0), kind, full, 4, (1, 8, 8))
    assert "0.50× full fine-tuning's time" in fast and "0.75× its FLOPs" in fast
    assert "the 6 KIND layers in 4 calls" in fast and "ms" in fast and "the difference" not in fast
    slow = wall_time_note(*rows(3.0, 2.0), kind, full, 4, (1, 8, 8))
    assert "1.50× full fine-tuning's time" in slow and "0.75× its FLOPs" in slow
    assert "the 6 KIND layers in 4 calls" in slow and "the 4 nn.Linear layers" in slow and "64 token rows" in slow
    assert "the difference" in slow
    # it points to where the per-layer numbers and the eager floor are (files that exist)
    root = Path(__file__).resolve().parents[1]
    for path in ("bench/results/cpu_demo_wall_time.md", "bench/cpu_demo_floor.py"):
        assert path in slow and (root / path).is_file()


def test_comparison_figure_labels_and_enlarges_every_row(tmp_path):
    import numpy as np
    import torch
    from PIL import Image

    from kind_fast.train.demo import comparison_figure

    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(6, 1, 8, 8, generator=g) * 2 - 1  # 2 rows (8, 9) × 3 digits
    path = comparison_figure([("KIND transfer", ["8", "9"], imgs), ("LoRA", ["8", "9"], imgs)], tmp_path / "f.png",
                             scale=6, title="t")
    with Image.open(path) as im:
        arr = np.asarray(im.convert("L"))
    row_h = 8 * 6 + 2 * 2  # a 6× digit and its padding
    assert arr.shape[0] == row_h // 2 + 4 * row_h
    tiles_w = 3 * (8 * 6 + 2) + 2
    label_w = arr.shape[1] - tiles_w
    for r in range(4):  # every row: text in the label column, and the digits as 6×6 blocks
        top = row_h // 2 + r * row_h
        assert (arr[top:top + row_h, :label_w] < 128).any()
        tile = arr[top + 2:top + 2 + 48, label_w + 2:label_w + 2 + 48]
        blocks = tile.reshape(8, 6, 8, 6)
        assert (blocks == blocks[:, :1, :, :1]).all()
        want = ((imgs[(r % 2) * 3, 0].clamp(-1, 1) + 1) * 127.5).round().numpy()
        assert np.array_equal(blocks[:, 0, :, 0], want)


def test_latent_pipeline_with_a_tiny_vae(tmp_path, capsys):
    """encode_latents.py (random tiny AutoencoderKL saved locally) → pretrain on the shards →
    sample decoded through the same VAE."""
    pytest.importorskip("diffusers")
    import numpy as np
    from diffusers import AutoencoderKL
    from PIL import Image

    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=16)
    vae.save_pretrained(tmp_path / "vae")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
    import encode_latents

    lat = tmp_path / "lat"
    assert encode_latents.main(["--vae", str(tmp_path / "vae"), "--data", str(tmp_path / "imgs"), "--out", str(lat),
                                "--image-size", "16", "--flip-copies", "--workers", "0", "--shard-size", "5",
                                "--device", "cpu"]) == 0
    meta = json.loads((lat / "index.json").read_text())
    assert meta["shape"] == [4, 8, 8] and [s["count"] for s in meta["shards"]] == [5, 5, 2]
    run = tmp_path / "run"
    assert main(["pretrain", "--data", "latents", "--data-path", str(lat), "--steps", "2", "--out", str(run),
                 "--no-sample", *TINY_FLAGS]) == 0
    png = tmp_path / "decoded.png"
    assert main(["sample", str(run), "--steps", "2", "--n-per-class", "2", "--vae", str(tmp_path / "vae"),
                 "--out", str(png)]) == 0
    with Image.open(png) as im:
        assert im.size == (2 * 33 + 1, 2 * 33 + 1) and im.mode == "RGB"  # 16 px decoded × 2, 2 × 2 grid


def test_imagefolder_run_and_digits_eval(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("x", "y", "z"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    out = tmp_path / "if"
    assert main(["pretrain", "--data", "imagefolder", "--data-path", str(tmp_path / "imgs"), "--image-size", "8",
                 "--classes", "2,0", "--steps", "2", "--out", str(out), "--set", "data.flip=true",
                 "--set", "eval.sample_steps=2", "--set", "eval.n_per_class=2",
                 *TINY_FLAGS, "--batch-size", "4"]) == 0  # the last --batch-size wins
    assert "4 samples, 2 classes" in capsys.readouterr().out
    with Image.open(out / "samples" / "grid.png") as im:
        assert im.mode == "RGB" and im.size == (2 * 33 + 1, 2 * 33 + 1)
    spec = json.loads((out / "ema" / "train_spec.json").read_text())
    assert spec["arch"]["in_channels"] == 3 and spec["arch"]["num_classes"] == 2
    # --eval on digits: FID / KID / IS and class accuracy written to eval.json
    pytest.importorskip("torchmetrics")
    ev = tmp_path / "ev"
    assert main(["pretrain", "--steps", "1", "--out", str(ev), "--eval", "--eval-samples", "3", "--no-sample",
                 *TINY_FLAGS, "--set", "eval.sample_steps=2"]) == 0
    res = json.loads((ev / "eval.json").read_text())
    assert {"fid", "kid", "is", "class_acc", "classifier_test_acc"} <= set(res) and res["fid"] > 0
