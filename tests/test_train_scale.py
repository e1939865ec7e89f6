"""The trainer at scale, on tiny models: gradient accumulation, fp16 with loss scaling,
torch.compile, activation checkpointing, LR schedules, sampling/eval during training, the EMA."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

from kind_fast.testing import perturbed
from kind_fast.train import checkpoint as ck
from kind_fast.train.logger import read_metrics
from kind_fast.train.loop import Trainer, lr_factor

sys.path.insert(0, os.path.dirname(__file__))
from train_helpers import FakeWandb, tiny_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(cfg, resume=None, until=None):
    tr = Trainer(cfg, resume=resume, log=lambda *a: None)
    try:
        losses = tr.train(until=until)
        state = tr.checkpoint_state()
    finally:
        tr.close()
    return losses, state


def _tiny_dit(**kw):
    from kind_fast.models.dit import DiT, KindConfig

    torch.manual_seed(0)
    m = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=5,
            kind=KindConfig(tailor_rank=8, active=2), **kw)
    return perturbed(m)  # adaLN-Zero starts at zero: perturb so every block matters


def _batch():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(4, 1, 8, 8, generator=g), torch.tensor([10, 200, 500, 999]), torch.tensor([0, 1, 4, 2]),
            torch.tensor([0, 0, 1, 0]))


# =====================================================================================
# --grad-accum
# =====================================================================================
def test_grad_accum_equals_one_big_batch_and_resumes_mid_cycle(tmp_path, monkeypatch):
    kw = dict(steps=4, batch_size=16, ckpt_every=2, optim={"ema_decay": 0.9})
    big, big_state = _run(tiny_config(tmp_path / "big", **kw))
    acc, acc_state = _run(tiny_config(tmp_path / "acc", grad_accum=4, **kw))
    assert acc == pytest.approx(big, rel=1e-5, abs=1e-7)  # 4 micro-batches of 4 = one batch of 16
    gn_big = [r["grad_norm"] for r in read_metrics(tmp_path / "big")]
    assert [r["grad_norm"] for r in read_metrics(tmp_path / "acc")] == pytest.approx(gn_big, rel=1e-5)
    for part in ("model", "ema"):
        for k, v in big_state[part].items():
            torch.testing.assert_close(acc_state[part][k], v, rtol=1e-5, atol=1e-6, msg=f"{part} {k}")

    # killed in the middle of step 3's accumulation (after 2 of its 4 micro-batches) ...
    calls = {"n": 0}
    orig = Trainer._forward_loss

    def dying(self, *a, **k):
        if self.step == 2:
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt("killed mid-cycle")
        return orig(self, *a, **k)

    monkeypatch.setattr(Trainer, "_forward_loss", dying)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_config(tmp_path / "cut", grad_accum=4, **kw))
    monkeypatch.setattr(Trainer, "_forward_loss", orig)
    assert [s for s, _ in ck.list_checkpoints(tmp_path / "cut")] == [2]
    # ... resumes from step 2's checkpoint and redoes step 3 whole: bit for bit the uninterrupted run
    resumed, resumed_state = _run(tiny_config(tmp_path / "cut", grad_accum=4, **kw), resume="auto")
    assert resumed == acc
    for part in ("model", "ema"):
        for k, v in acc_state[part].items():
            assert torch.equal(resumed_state[part][k], v), (part, k)


def test_grad_accum_must_divide_the_batch(tmp_path):
    with pytest.raises(ValueError, match="grad_accum"):
        tiny_config(tmp_path / "r", batch_size=16, grad_accum=3)


# =====================================================================================
# --precision fp16 (GradScaler)
# =====================================================================================
def test_fp16_trains_with_a_grad_scaler_whose_state_is_checkpointed(tmp_path):
    kw = dict(steps=4, ckpt_every=2, precision="fp16")
    full, full_state = _run(tiny_config(tmp_path / "a", **kw))
    assert all(math.isfinite(v) for v in full) and full_state["scaler"]["scale"] > 1
    _run(tiny_config(tmp_path / "b", **kw), until=2)
    saved = ck.load_checkpoint(ck.list_checkpoints(tmp_path / "b")[-1][1])
    assert saved["scaler"]["_growth_tracker"] == 2  # two good steps since the last growth
    resumed, resumed_state = _run(tiny_config(tmp_path / "b", **kw), resume="auto")
    assert resumed == full  # bitwise, scaler restored
    assert resumed_state["scaler"] == full_state["scaler"]
    fp32, _ = _run(tiny_config(tmp_path / "c", steps=4))
    assert full != fp32 and full == pytest.approx(fp32, rel=0.05)  # fp16 really ran, and close


def test_fp16_with_fsdp_is_refused(tmp_path):
    with pytest.raises(ValueError, match="fp16"):
        tiny_config(tmp_path / "r", precision="fp16", distributed="fsdp")


# =====================================================================================
# --compile
# =====================================================================================
def test_kind_dit_compiles_without_graph_breaks():
    """fullgraph=True: the KIND ops, the gate's label routing and label dropout trace as one graph;
    the compiled forward and backward equal eager (KIND transfer: the main path)."""
    m = _tiny_dit()
    m.set_mode("transfer")
    x, t, y, drop = _batch()
    ref = m(x, t, y, force_drop_ids=drop)
    ref.square().mean().backward()
    want = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
    m.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    out = torch.compile(m, fullgraph=True, backend="aot_eager")(x, t, y, force_drop_ids=drop)
    out.square().mean().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for n, p in m.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, want[n], rtol=1e-4, atol=1e-6, msg=n)


def test_trainer_compile_matches_eager(tmp_path):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    kw = dict(steps=3, optim={"ema_decay": 0.9})
    eager, _ = _run(tiny_config(tmp_path / "e", **kw))
    compiled, _ = _run(tiny_config(tmp_path / "c", compile="aot_eager", **kw))
    assert compiled == pytest.approx(eager, rel=1e-5)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] >= 1  # it did compile


# =====================================================================================
# --grad-checkpoint
# =====================================================================================
@pytest.mark.parametrize("mode", ["pretrain", "transfer"])
def test_grad_checkpointing_gives_the_same_gradients_and_stores_less(mode):
    x, t, y, drop = _batch()

    def grads_and_saved(ckpt: bool):
        m = _tiny_dit().set_mode(mode).set_grad_checkpointing(ckpt)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s.numel()) or s, lambda s: s):
            out = m(x, t, y, force_drop_ids=drop)
        out.square().mean().backward()
        return out, {n: p.grad for n, p in m.named_parameters() if p.requires_grad}, sum(saved)

    out_a, ga, saved_a = grads_and_saved(False)
    out_b, gb, saved_b = grads_and_saved(True)
    assert torch.equal(out_a, out_b) and ga.keys() == gb.keys()
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-6, atol=1e-8, msg=n)
    assert saved_b < 0.5 * saved_a  # the blocks' activations were not kept


def test_trainer_grad_checkpoint_matches(tmp_path):
    a, _ = _run(tiny_config(tmp_path / "a", steps=3))
    b, _ = _run(tiny_config(tmp_path / "b", steps=3, grad_checkpoint=True))
    assert b == pytest.approx(a, rel=1e-6)


# =====================================================================================
# --lr-schedule
# =====================================================================================
def test_lr_schedules():
    f = lambda s, sch: lr_factor(s, warmup=2, total=10, schedule=sch)  # noqa: E731
    assert [f(s, "constant") for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    cos = [f(s, "cosine") for s in range(10)]
    assert cos[:3] == [0.5, 1.0, 1.0] and cos[2] > cos[5] > cos[9] > 0
    assert cos[6] == pytest.approx(0.5)  # half way through the 8 post-warm-up steps
    assert lr_factor(10, warmup=0, total=10, schedule="cosine") == pytest.approx(0.0)


def test_trainer_cosine_schedule_reaches_the_logged_lr(tmp_path):
    cfg = tiny_config(tmp_path / "r", steps=6, log_every=1, optim={"lr": 1e-3, "warmup_steps": 2,
                                                                      "lr_schedule": "cosine"})
    _run(cfg)
    lrs = [r["lr"] for r in read_metrics(tmp_path / "r")]  # lr after each step (for the next one)
    want = [1e-3 * lr_factor(s, warmup=2, total=6, schedule="cosine") for s in range(1, 7)]
    assert lrs == pytest.approx(want, rel=1e-9)
    with pytest.raises(ValueError, match="optim.lr_schedule"):
        tiny_config(tmp_path / "x", optim={"lr_schedule": "linear"})


def test_resuming_a_cosine_run_with_other_steps_says_the_schedule_changes(tmp_path):
    kw = dict(ckpt_every=2, optim={"lr_schedule": "cosine"})
    _run(tiny_config(tmp_path / "r", steps=4, **kw), until=2)
    notes = []
    tr = Trainer(tiny_config(tmp_path / "r", steps=6, **kw), resume="auto", log=notes.append)
    tr.close()
    assert any("the length of the cosine schedule" in n for n in notes), notes


# =====================================================================================
# --sample-every / --eval-every
# =====================================================================================
def test_sampling_and_eval_during_training_leave_the_run_unchanged(tmp_path, monkeypatch):
    pytest.importorskip("torchmetrics")
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    plain, plain_state = _run(tiny_config(tmp_path / "plain", steps=4))
    out = tmp_path / "periodic"
    cfg = tiny_config(out, steps=4, sample_every=2, eval_every=4, wandb="on",
                      eval={"metric_samples": 3, "sample_steps": 2})
    busy, busy_state = _run(cfg)
    assert busy == plain  # bitwise: sampling draws from its own generators
    for k, v in plain_state["model"].items():
        assert torch.equal(busy_state["model"][k], v), k
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step_00000002.png", "step_00000004.png"]
    rows = read_metrics(out, "eval.csv")
    assert [r["step"] for r in rows] == [4] and rows[0]["fid"] > 0 and 0 <= rows[0]["class_acc"] <= 1
    log = (out / "log.txt").read_text()
    assert "eval step 4" in log and "samples at step 2" in log
    logged = {k for _, v in fake.logged for k in v}
    assert {"samples", "eval/fid", "eval/class_acc", "train/loss"} <= logged


def test_eval_every_needs_digits(tmp_path):
    with pytest.raises(ValueError, match="eval_every"):
        tiny_config(tmp_path / "r", eval_every=2, data={"source": "imagefolder", "path": str(tmp_path)})


# =====================================================================================
# EMA (diffusers' EMAModel)
# =====================================================================================
@pytest.mark.parametrize("warmup", [False, True])
def test_ema_follows_its_decay_schedule(tmp_path, warmup):
    d = 0.6
    tr = Trainer(tiny_config(tmp_path / "r", steps=3, optim={"ema_decay": d, "ema_warmup": warmup}),
                 log=lambda *a: None)
    try:
        name = tr.param_names[0]
        p = dict(tr.model.named_parameters())[name]
        ema = None
        stream = iter(tr.data.get_batch(tr.sampler.indices(s)) for s in range(3))
        for k in range(1, 4):
            tr.train_step(*next(stream))
            decay = 0.0 if k == 1 else (min(d, k / (9 + k)) if warmup else d)
            ema = p.detach().clone() if ema is None else decay * ema + (1 - decay) * p.detach()
            torch.testing.assert_close(tr.ema[name], ema, rtol=1e-6, atol=1e-7)
    finally:
        tr.close()

