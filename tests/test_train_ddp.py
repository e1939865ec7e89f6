"""torchrun: 2 processes (gloo, CPU) with per-rank batch B/2 match one process with batch B."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from kind_fast.testing import single_thread
from kind_fast.train.logger import read_metrics
from kind_fast.train.loop import Trainer

sys.path.insert(0, os.path.dirname(__file__))
from train_helpers import tiny_config  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_pre")
    with single_thread():
        tr = Trainer(tiny_config(out, steps=3, log_every=1))
        tr.train()
        tr.export()
        tr.close()
    return out


def _torchrun(cfg_path, out_args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "kind_fast", *out_args, "--config", str(cfg_path), "--no-sample"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)


def _weights(out) -> dict[str, torch.Tensor]:
    d = out / "model"
    if (d / "model.safetensors").is_file():
        return load_file(str(d / "model.safetensors"))
    return {**load_file(str(d / "learngenes.safetensors")), **load_file(str(d / "tailors.safetensors"))}


@pytest.mark.parametrize("mode, method, strategy, extra", [
    ("pretrain", "kind", "ddp", {}),
    # 2 micro-batches per rank (DDP no_sync / FSDP2 gradient sync on the last one only),
    # activation checkpointing under FSDP: still the one-process run without either
    ("transfer", "kind", "ddp", {"grad_accum": 2}),
    ("transfer", "kind", "fsdp", {"grad_accum": 2, "grad_checkpoint": True}),
])
def test_two_processes_match_one(tmp_path, pretrained, mode, method, strategy, extra):
    kw = dict(steps=4, log_every=1, distributed=strategy, optim={"ema_decay": 0.5, "warmup_steps": 2})
    if mode == "transfer":
        kw["method"] = {"name": method, "init": str(pretrained)}
    multi = tiny_config(tmp_path / "multi", mode, **kw, **extra)
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(multi.to_dict()))
    r = _torchrun(cfg_path, [mode])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "× 2 processes" in r.stdout

    with single_thread():
        single = tiny_config(tmp_path / "single", mode, **kw)
        tr = Trainer(single)
        tr.train()
        tr.export()
        tr.close()

    a, b = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "multi")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for k in ("loss", "mse", "vb", "grad_norm"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-7), (ra["step"], k)
    wa, wb = _weights(tmp_path / "single"), _weights(tmp_path / "multi")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6, msg=k)


def test_sampling_on_two_processes_matches_one(tmp_path, pretrained):
    """kind-fast sample --num-samples N --npz under torchrun: each rank samples its chunks, rank 0
    assembles the .npz in output order; the result equals a one-process run bit for bit."""
    import numpy as np

    from kind_fast.__main__ import main

    # 7 samples in chunks of 2: rank 0 takes chunks 0 and 2, rank 1 chunks 1 and 3 (a short one)
    common = ["--num-samples", "7", "--batch-size", "2", "--steps", "3", "--sampler", "ddpm", "--npz",
              "--device", "cpu", "--seed", "3"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "kind_fast", "sample", str(pretrained), "--out", str(tmp_path / "multi" / "g.png"),
                        *common], capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "on 2 processes" in r.stdout
    with single_thread():
        assert main(["sample", str(pretrained), "--out", str(tmp_path / "single" / "g.png"), *common]) == 0
    a, b = np.load(tmp_path / "single" / "g.npz"), np.load(tmp_path / "multi" / "g.npz")
    assert a["arr_0"].shape == (7, 8, 8, 1) and a["arr_0"].dtype == np.uint8
    assert a["labels"].tolist() == [0, 1, 2, 3, 4, 5, 6]  # classes cycled, in output order
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["labels"], b["labels"])
    assert len({a["arr_0"][i].tobytes() for i in range(7)}) == 7  # every sample its own noise
    assert sorted(p.name for p in (tmp_path / "multi").iterdir()) == ["g.npz", "g.png"]  # shares removed


def test_sample_eval_scores_the_npz_of_every_process(tmp_path, pretrained):
    """kind-fast sample --eval under torchrun: rank 0 scores the assembled .npz (FID, sFID,
    precision/recall, class accuracy in the digit classifier's spaces) into <out>.eval.json, with
    the same numbers as a one-process run."""
    from kind_fast.__main__ import main

    common = ["--num-samples", "16", "--batch-size", "4", "--steps", "3", "--eval", "--device", "cpu", "--seed", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "kind_fast", "sample", str(pretrained), "--out", str(tmp_path / "multi" / "g.png"),
                        *common], capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    multi = json.loads((tmp_path / "multi" / "g.eval.json").read_text())
    assert {"fid", "sfid", "precision", "recall", "class_acc"} <= set(multi) and multi["n_generated"] == 16
    with single_thread():
        assert main(["sample", str(pretrained), "--out", str(tmp_path / "single" / "g.png"), *common]) == 0
    single = json.loads((tmp_path / "single" / "g.eval.json").read_text())
    assert single == multi
