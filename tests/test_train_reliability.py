"""Training never loses work (issue 12): resume from an older checkpoint, bit flips, changed
optimizer settings on resume, concurrent runs, non-finite losses, orphaned temp files, and a
loop of SIGKILLs during checkpoint writes."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from kind_fast.atomic import remove_stale_temps, temp_name
from kind_fast.train import checkpoint as ck
from kind_fast.train.logger import read_metrics
from kind_fast.train.loop import NonFiniteError, Trainer
from kind_fast.train.runlock import RunLock, RunLockedError

sys.path.insert(0, os.path.dirname(__file__))
from train_helpers import TINY_FLAGS, tiny_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(cfg, resume=None, until=None):
    tr = Trainer(cfg, resume=resume, log=lambda *a: None)
    try:
        tr.train(until=until)
    finally:
        tr.close()
    return tr


def _steps(out):
    return [s for s, _ in ck.list_checkpoints(out)]


def _cli(*args, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "kind_fast", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


# =====================================================================================
# Row 1: resume from an older checkpoint in a folder that holds newer ones
# =====================================================================================
def test_resume_from_an_older_checkpoint_moves_newer_ones_aside(tmp_path):
    out = tmp_path / "run"
    _run(tiny_config(out, steps=6, ckpt_every=1, keep_last=3))
    assert _steps(out) == [4, 5, 6]
    old = {s: p.read_bytes() for s, p in ck.list_checkpoints(out)}
    # the newest checkpoint is found truncated; the refusal says: resume from an earlier one
    (out / "checkpoints" / "step_00000006.pt").write_bytes(old[6][:2000])
    with pytest.raises(ck.CheckpointError, match="resume from an earlier checkpoint"):
        Trainer(tiny_config(out, steps=6, ckpt_every=1, keep_last=3), resume="auto")
    # ... with a changed learning rate, so the resumed run diverges from the old one
    cfg = tiny_config(out, steps=6, ckpt_every=1, keep_last=3, optim={"lr": 3e-3})
    tr = Trainer(cfg, resume=str(out / "checkpoints" / "step_00000004.pt"), log=lambda *a: None)
    assert tr.step == 4
    moved = list((out / ck.SUPERSEDED_DIR).iterdir())
    assert len(moved) == 1 and moved[0].name.endswith("after-step-4")
    aside = moved[0]
    # nothing lost: the newer checkpoints (the truncated one as it was) and the old run's
    # records are kept aside
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == ["step_00000005.pt", "step_00000006.pt"]
    assert (aside / "checkpoints" / "step_00000005.pt").read_bytes() == old[5]
    assert (aside / "checkpoints" / "step_00000006.pt").read_bytes() == old[6][:2000]
    assert [r["step"] for r in read_metrics(aside)][-1] == 6
    assert json.loads((aside / "config.json").read_text())["optim"]["lr"] == 1e-3
    assert _steps(out) == [4]
    tr.train()
    tr.close()
    # the resumed run wrote (and pruning kept) its own 5 and 6, including the end-of-run save
    assert _steps(out) == [4, 5, 6]
    assert (out / "checkpoints" / "step_00000004.pt").read_bytes() == old[4]
    for s in (5, 6):
        st = ck.load_checkpoint(out / "checkpoints" / f"step_{s:08d}.pt")
        assert st["config"]["optim"]["lr"] == 3e-3
    # so --resume auto continues the new run, not the old one
    tr = Trainer(tiny_config(out, steps=7, ckpt_every=1, keep_last=3, optim={"lr": 3e-3}), resume="auto",
                 log=lambda *a: None)
    assert tr.step == 6 and tr.cfg.optim.lr == 3e-3
    tr.close()


def test_resume_from_an_older_checkpoint_retires_every_output_of_the_abandoned_run(tmp_path):
    """Issue 21 item 1: a KIND transfer writes task/ (and eval.json, eval.csv, loss.png, samples/)
    from its newest state; resuming from an older checkpoint must move all of them aside before
    it trains, so a run killed right after that serves nothing of the abandoned run (export
    --task and sample-tasks read <out>/task)."""
    from kind_fast.__main__ import main
    from kind_fast.deploy.tasks import load_base, load_task

    pre, out = tmp_path / "pre", tmp_path / "t"
    assert main(["pretrain", "--steps", "2", "--out", str(pre), "--no-sample", *TINY_FLAGS]) == 0
    run = ["transfer", "--init", str(pre), "--method", "kind", "--classes", "8,9", "--out", str(out),
           "--steps", "6", "--ckpt-every", "3", "--keep-last", "5", "--sample-every", "3", "--eval-every", "6",
           "--set", "eval.metric_samples=2", "--set", "eval.sample_steps=2", "--eval", "--eval-samples", "2",
           *TINY_FLAGS]
    assert main(run) == 0
    written = {p.name for p in out.iterdir()}
    # every name a run writes is classified: superseded, copied aside, or kept and continued
    unknown = written - set(ck.RUN_OUTPUTS) - set(ck.RUN_RECORDS) - set(ck.RUN_KEPT)
    assert not unknown, f"outputs a resume would neither retire nor keep: {sorted(unknown)}"
    assert {"task", "eval.json", "eval.csv", "samples", "model", "ema"} <= written
    before = {n: (out / n).read_bytes() for n in ("eval.json", "eval.csv")}
    task6 = (out / "task" / "task.safetensors").read_bytes()
    # resume from step 3 and "die" right after the start (superseded/ exists, nothing trained)
    tr = Trainer(tiny_config(out, mode="transfer", steps=6, ckpt_every=3, keep_last=5,
                             data={"classes": [8, 9]}, method={"name": "kind", "init": str(pre)},
                             optim={"lr": 1e-3, "warmup_steps": 0}, log_every=1),
                 resume=str(out / "checkpoints" / "step_00000003.pt"), log=lambda *a: None)
    tr.close()
    aside, = (out / ck.SUPERSEDED_DIR).iterdir()
    for name in ck.RUN_OUTPUTS:  # nothing made from step 6 is live any more ...
        assert not (out / name).exists(), name
    with pytest.raises(FileNotFoundError, match="not a kind_fast task folder"):
        load_task(load_base(pre), out / "task")
    # ... and nothing is lost: it is all in superseded/
    assert (aside / "task" / "task.safetensors").read_bytes() == task6
    load_task(load_base(pre), aside / "task")
    for name, data in before.items():
        assert (aside / name).read_bytes() == data
    assert {p.name for p in (aside / "samples").iterdir()} >= {"step_00000003.png", "step_00000006.png", "grid.png"}
    assert [p.name for p in (aside / "checkpoints").iterdir()] == ["step_00000006.pt"]


def test_a_kill_inside_supersede_never_leaves_stale_outputs_live(tmp_path, monkeypatch):
    """The newer checkpoints are what makes a start supersede: they move last, so a process
    killed after some of the moves supersedes the rest at its next start."""
    out = tmp_path / "run"
    _run(tiny_config(out, steps=4, ckpt_every=2, keep_last=3))
    from kind_fast.train.models import save_weights

    tr = Trainer(tiny_config(out, steps=4, ckpt_every=2, keep_last=3), resume="auto", log=lambda *a: None)
    save_weights(tr.eval_model(), tr.spec, out / "ema")  # the step-4 outputs
    tr.close()
    real, moves = os.replace, []

    def dies_after_the_first_move(src, dst):  # the process dies after supersede's first move
        if ck.SUPERSEDED_DIR in Path(dst).parts:
            if moves:
                raise KeyboardInterrupt("killed")
            moves.append(Path(src).name)
        real(src, dst)

    monkeypatch.setattr(os, "replace", dies_after_the_first_move)
    with pytest.raises(KeyboardInterrupt):
        Trainer(tiny_config(out, steps=4, ckpt_every=2, keep_last=3),
                resume=str(out / "checkpoints" / "step_00000002.pt"), log=lambda *a: None)
    monkeypatch.setattr(os, "replace", real)
    assert moves == ["ema"]
    tr = Trainer(tiny_config(out, steps=4, ckpt_every=2, keep_last=3),
                 resume=str(out / "checkpoints" / "step_00000002.pt"), log=lambda *a: None)
    tr.close()
    assert not (out / "ema").exists() and _steps(out) == [2]


def test_pruning_never_deletes_what_it_just_wrote(tmp_path):
    for step in (10, 11):
        ck.save_checkpoint({"v": torch.tensor(step)}, tmp_path, step, keep_last=2)
    ck.save_checkpoint({"v": torch.tensor(5)}, tmp_path, 5, keep_last=1)
    assert _steps(tmp_path) == [5, 10, 11]  # step 5 kept, newer ones untouched
    ck.save_checkpoint({"v": torch.tensor(6)}, tmp_path, 6, keep_last=1)
    assert _steps(tmp_path) == [6, 10, 11]


def test_end_of_run_save_is_not_skipped_and_foreign_resume_is_refused(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _run(tiny_config(a, steps=3, ckpt_every=1))
    _run(tiny_config(b, steps=1))
    # resuming into b (which holds its own checkpoints) from a's checkpoint would mix two runs
    with pytest.raises(FileExistsError, match="holds checkpoints of another run"):
        Trainer(tiny_config(b, steps=4), resume=str(a / "checkpoints" / "step_00000002.pt"))
    assert _steps(b) == [1]
    # into an empty folder it continues a's run, and the final state is saved there
    c = tmp_path / "c"
    _run(tiny_config(c, steps=3), resume=str(a / "checkpoints" / "step_00000003.pt"))
    assert _steps(c) == [3]


# =====================================================================================
# Row 2: bit flips in a checkpoint
# =====================================================================================
def _data_ranges(path):
    """(start, end) byte ranges of the tensor-data records of a torch.save zip."""
    ranges = []
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            if "/data/" not in info.filename or info.file_size == 0:
                continue
            off = info.header_offset
            name_len = int.from_bytes(raw[off + 26:off + 28], "little")
            extra_len = int.from_bytes(raw[off + 28:off + 30], "little")
            start = off + 30 + name_len + extra_len
            ranges.append((start, start + info.compress_size))
    return ranges


def test_bit_flips_in_tensor_data_are_refused(tmp_path):
    out = tmp_path / "run"
    _run(tiny_config(out, steps=1))
    (path,) = [p for _, p in ck.list_checkpoints(out)]
    good = path.read_bytes()
    ref = ck.load_checkpoint(path)
    ranges = _data_ranges(path)
    assert sum(e - s for s, e in ranges) > 0.5 * len(good)
    rng = random.Random(0)
    flips = []
    for _ in range(40):  # bits inside tensor data: every one must be refused
        s, e = rng.choice(ranges)
        flips.append((rng.randrange(s, e), rng.randrange(8), True))
    for _ in range(20):  # bits anywhere: refused, or the loaded state is unchanged
        flips.append((rng.randrange(len(good)), rng.randrange(8), False))
    bad = tmp_path / "flipped.pt"
    for pos, bit, in_data in flips:
        data = bytearray(good)
        data[pos] ^= 1 << bit
        bad.write_bytes(bytes(data))
        try:
            st = ck.load_checkpoint(bad)
        except ck.CheckpointError:
            continue
        assert not in_data, f"a flipped bit at byte {pos} of tensor data was accepted"
        for part in ("model", "ema"):
            for k, v in ref[part].items():
                assert torch.equal(v, st[part][k]), (pos, part, k)


# =====================================================================================
# Row 3: --resume with changed optimizer settings
# =====================================================================================
def test_resume_applies_changed_optimizer_settings(tmp_path):
    out = tmp_path / "run"
    _run(tiny_config(out, steps=2, optim={"lr": 1e-3, "warmup_steps": 4}))
    new = {"lr": 5e-3, "weight_decay": 0.05, "beta1": 0.8, "beta2": 0.95, "warmup_steps": 4}
    logs = []
    tr = Trainer(tiny_config(out, steps=3, log_every=1, optim=new), resume="auto", log=logs.append)
    try:
        g = tr.opt.param_groups[0]
        assert tr.sched.base_lrs == [5e-3] and g["initial_lr"] == 5e-3
        assert g["lr"] == pytest.approx(5e-3 * 3 / 4)  # the warm-up factor at step 2 is kept
        assert g["weight_decay"] == 0.05 and tuple(g["betas"]) == (0.8, 0.95)
        assert any("optim.lr 0.001 -> 0.005" in m and "optim.weight_decay" in m and "optim.betas" in m
                   for m in logs), logs
        tr.train()
    finally:
        tr.close()
    assert read_metrics(out)[-1]["lr"] == pytest.approx(5e-3)  # step 3 ran with the new lr
    st = ck.load_checkpoint(out / "checkpoints" / "step_00000003.pt")
    assert st["optimizer"]["param_groups"][0]["weight_decay"] == 0.05
    # and the next resume with the same settings changes nothing
    tr = Trainer(tiny_config(out, steps=3, optim=new), resume="auto", log=logs.append)
    tr.close()
    assert tr._apply_optim_settings() == []


def test_cpu_optimizer_is_fused_and_an_older_checkpoint_resumes_with_it(tmp_path, monkeypatch):
    """The CPU trainer's AdamW is PyTorch's fused one; a checkpoint written by the for-loop AdamW
    (what older versions saved: fused/foreach None) still loads, and the resumed run uses the
    fused implementation, as a fresh run would (one implementation within a run from then on)."""
    from kind_fast.train import loop

    out = tmp_path / "run"
    tr = Trainer(tiny_config(tmp_path / "fresh", steps=1), log=lambda *a: None)
    tr.close()
    assert tr.opt.param_groups[0]["fused"] is True and tr.opt.param_groups[0]["foreach"] is False

    def for_loop_adamw(params, o):
        return torch.optim.AdamW(params, lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay), {}

    with monkeypatch.context() as m:
        m.setattr(loop, "_adamw", for_loop_adamw)
        _run(tiny_config(out, steps=2))
    st = ck.load_checkpoint(out / "checkpoints" / "step_00000002.pt")
    assert st["optimizer"]["param_groups"][0]["fused"] is None
    tr = Trainer(tiny_config(out, steps=3), resume="auto", log=lambda *a: None)
    try:
        g = tr.opt.param_groups[0]
        assert g["fused"] is True and g["foreach"] is False
        losses = tr.train()
    finally:
        tr.close()
    assert len(losses) == 3 and all(map(math.isfinite, losses))


# =====================================================================================
# Row 6: two runs into one folder
# =====================================================================================
def test_a_second_run_into_a_busy_folder_is_refused(tmp_path):
    out = tmp_path / "run"
    tr = Trainer(tiny_config(out, steps=2), log=lambda *a: None)  # holds the folder
    try:
        before = sorted(p.name for p in out.iterdir())
        with pytest.raises(RunLockedError, match=f"in use by another training run \\(pid {os.getpid()}"):
            Trainer(tiny_config(out, steps=2))
        # another process: the CLI exits 2 and touches nothing
        r = _cli("pretrain", "--out", str(out), "--steps", "2", "--no-sample", *TINY_FLAGS)
        assert r.returncode == 2, r.stderr
        assert "in use by another training run" in r.stderr
        assert sorted(p.name for p in out.iterdir()) == before
        tr.train()
    finally:
        tr.close()
    assert [r["step"] for r in read_metrics(out)] == [2]
    Trainer(tiny_config(out, steps=2), resume="auto").close()  # free again after close()


def test_a_lock_left_by_a_killed_run_does_not_block(tmp_path):
    out = tmp_path / "run"
    code = ("import sys, time; from kind_fast.train.runlock import RunLock; "
            "lock = RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(120)")
    p = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONPATH=REPO))
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=f"pid {p.pid}"):
            RunLock(out).acquire()
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    with RunLock(out) as lock:  # the kernel dropped the dead process's lock
        assert lock.held
    _run(tiny_config(out, steps=1))


# =====================================================================================
# Row 7: non-finite loss
# =====================================================================================
def test_non_finite_loss_stops_without_writing(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = Trainer._forward_loss

    def poisoned(self, model, x, y, step):
        terms = real(self, model, x, y, step)
        if step >= 2:  # the third step's loss is NaN (and so are its gradients)
            terms = {k: v * float("nan") for k, v in terms.items()}
        return terms

    monkeypatch.setattr(Trainer, "_forward_loss", poisoned)
    tr = Trainer(tiny_config(out, steps=6, ckpt_every=1, keep_last=10, log_every=4), log=lambda *a: None)
    with pytest.raises(NonFiniteError, match="non-finite") as e:
        tr.train()
    tr.close()
    # the checkpoint after step 3 would hold NaN parameters: the guard refused it (before the
    # step-4 log row would have caught the loss); steps 1 and 2 are intact
    assert "step 3" in str(e.value) and "step_00000002.pt" in str(e.value)
    assert _steps(out) == [1, 2]
    for _, p in ck.list_checkpoints(out):
        st = ck.load_checkpoint(p)
        assert all(torch.isfinite(v).all() for v in st["model"].values())
    with pytest.raises(NonFiniteError):
        tr.export()
    assert not (out / "model").exists()
    # without checkpoints in between, the loss itself stops the run at the step it went NaN
    tr = Trainer(tiny_config(tmp_path / "b", steps=6, log_every=1), log=lambda *a: None)
    with pytest.raises(NonFiniteError, match=r"the loss became non-finite \(nan\) at step 3"):
        tr.train()
    tr.close()
    assert tr.step == 3 and _steps(tmp_path / "b") == []


def test_cli_non_finite_exit_code_and_finite_checkpoints(tmp_path):
    out = tmp_path / "run"
    base = ["pretrain", "--out", str(out), "--no-sample", "--ckpt-every", "1", "--keep-last", "20", *TINY_FLAGS]
    r = _cli(*base, "--steps", "2", "--lr", "inf")
    assert r.returncode == 2 and "optim.lr: must be a finite number" in r.stderr, r.stderr
    assert _cli(*base, "--steps", "2").returncode == 0
    good = {s: p.read_bytes() for s, p in ck.list_checkpoints(out)}
    model = (out / "model" / "learngenes.safetensors").read_bytes()
    r = _cli(*base, "--steps", "8", "--lr", "1e30", "--resume")
    assert r.returncode == 3, (r.returncode, r.stderr[-2000:])
    assert "non-finite" in r.stderr and "Traceback" not in r.stderr
    for s, p in ck.list_checkpoints(out):
        if s in good:
            assert p.read_bytes() == good[s]  # never replaced
        st = ck.load_checkpoint(p)
        for part in ("model", "ema"):
            assert all(torch.isfinite(v).all() for v in st[part].values()), (s, part)
    assert (out / "model" / "learngenes.safetensors").read_bytes() == model  # no NaN export


# =====================================================================================
# Row 8: orphaned temp files
# =====================================================================================
def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temp_files_are_removed(tmp_path):
    d = tmp_path / "checkpoints"
    d.mkdir()
    final = d / "step_00000001.pt"
    dead = temp_name(final).name.replace(f"tmp-{os.getpid()}-", f"tmp-{_dead_pid()}-")
    mine = temp_name(final).name
    other_host = f".{final.name}.tmp-1-some-other-host"
    legacy = f".step_00000002.pt.tmp-{_dead_pid()}"  # the old name format, without a host
    for n in (dead, mine, other_host, legacy):
        (d / n).write_bytes(b"partial")
    removed = sorted(p.name for p in remove_stale_temps(d))
    assert removed == sorted([dead, legacy])
    assert sorted(p.name for p in d.iterdir()) == sorted([mine, other_host])
    # a run that starts in the folder sweeps the dead writers' files too
    (d / mine).unlink()
    dead = f".step_00000099.pt.tmp-{_dead_pid()}-x"
    (d / dead.replace("-x", "")).write_bytes(b"partial")
    _run(tiny_config(tmp_path, steps=1))
    assert sorted(p.name for p in d.iterdir()) == sorted(["step_00000001.pt", other_host])


KILL_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kill_child.py")


def _killed_run(argv, point, at, match, timeout=600):
    """Run ``python -m kind_fast *argv`` and SIGKILL it at the ``at``-th ``point`` event of an
    atomic write whose final path contains ``match`` (tests/kill_child.py: hooks, not timing)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, HF_HUB_OFFLINE="1", KF_KILL_POINT=point,
               KF_KILL_AT=str(at), KF_KILL_MATCH=match)
    return subprocess.run([sys.executable, KILL_CHILD, "-m", "kind_fast", *argv], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=timeout)


def _weights_load_or_are_refused(folder):
    """A weights folder a killed export left: loads, or is refused as a whole (never mixed)."""
    from kind_fast.train.models import load_weights

    if not folder.exists():
        return "missing"
    try:
        load_weights(folder)
    except (ValueError, FileNotFoundError):
        return "refused"
    return "loads"


@pytest.mark.slow
def test_kill_loop_never_leaves_an_accepted_partial_checkpoint(tmp_path):
    """SIGKILL a training process again and again, each time at a chosen step of a checkpoint or
    export write (aimed by hooks, so every kill lands inside a write however busy the machine is);
    every file under a final name stays loadable, exports load or are refused as a whole, and
    the next run finishes and leaves no temporary file."""
    out = tmp_path / "run"
    flags = [f"--set=model.{k}={v}" for k, v in
             {"hidden_size": 96, "depth": 2, "num_heads": 2, "tailor_rank": 8, "active": 2}.items()]
    argv = ["pretrain", "--out", str(out), "--steps", "12", "--ckpt-every", "1", "--keep-last", "2",
            "--batch-size", "4", "--no-progress", "--no-sample", "--tensorboard", "off", "--resume", *flags]
    kills = [("write", 2, "/checkpoints/"), ("rename", 2, "/checkpoints/"), ("renamed", 1, "/checkpoints/"),
             ("write", 3, "/checkpoints/"), ("rename", 1, "/model/"), ("write", 2, "/ema/"), ("renamed", 3, "/ema/")]
    for point, at, match in kills:
        r = _killed_run(argv, point, at, match)
        assert r.returncode == -signal.SIGKILL, f"{point} {at} {match}: not killed (rc {r.returncode}) " \
                                                f"{r.stderr[-1500:]}"
        for _, path in ck.list_checkpoints(out):  # never a partial file under a final name
            ck.load_checkpoint(path)
        for w in ("model", "ema"):
            _weights_load_or_are_refused(out / w)
    r = subprocess.run([sys.executable, "-m", "kind_fast", *argv], capture_output=True, text=True, cwd=REPO,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO), timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    leftovers = [str(p) for p in out.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
    assert leftovers == []
    assert _steps(out) == [11, 12]
    from kind_fast.train.models import load_weights

    load_weights(out / "model")
    load_weights(out / "ema")


@pytest.mark.slow
def test_kill_loop_over_task_writes(tmp_path):
    """A KIND transfer SIGKILLed at each step of writing its task folder (a whole-folder write:
    atomic_directory), aimed by hooks: <out>/task is the previous task or the new one, whole, or
    missing with the previous one named; the resumed run writes it and sweeps every hidden folder."""
    from kind_fast.__main__ import main
    from kind_fast.deploy.tasks import load_base, load_task

    pre, out = tmp_path / "pre", tmp_path / "t"
    assert main(["pretrain", "--steps", "2", "--out", str(pre), "--no-sample", *TINY_FLAGS]) == 0

    def argv(steps):
        return ["transfer", "--init", str(pre), "--classes", "8,9", "--out", str(out), "--steps", str(steps),
                "--no-sample", "--resume", *TINY_FLAGS]

    assert main(argv(2)) == 0  # a first task, at step 2
    base = load_base(pre)
    first = (out / "task" / "task.safetensors").read_bytes()
    for steps, point in enumerate(("write", "rename", "between", "renamed"), start=3):
        # each attempt trains one more step, then rewrites the task and is killed inside that write
        r = _killed_run(argv(steps), point, 1, "/task")
        assert r.returncode == -signal.SIGKILL, f"{point}: not killed (rc {r.returncode}) {r.stderr[-1500:]}"
        assert [p for p in out.iterdir() if p.name.startswith(".task.")], f"{point}: the kill left nothing behind"
        if point == "between":
            with pytest.raises(FileNotFoundError, match=r"previous task survives in .*\.task\.old-.*mv '"):
                load_task(base, out / "task")
        else:  # whole: the previous task, or (renamed) the new one
            load_task(base, out / "task")
            assert ((out / "task" / "task.safetensors").read_bytes() != first) == (point == "renamed")
    assert main(argv(7)) == 0
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".kind_fast.lock"]
    load_task(base, out / "task")


# =====================================================================================
# Minor: sampling arguments
# =====================================================================================
@pytest.mark.parametrize("flags, match", [
    (["--steps", "2000"], r"--steps must be an int in \[2, 1000\]"),
    (["--steps", "1"], r"--steps must be an int in \[2, 1000\]"),  # a sampler needs two timesteps
    (["--cfg-scale", "nan"], "--cfg-scale must be a finite number >= 0, got nan"),
    (["--cfg-scale", "inf"], "--cfg-scale must be a finite number"),
    (["--eta", "-1"], "--eta must be a finite number >= 0"),
])
def test_sample_arguments_are_validated(tmp_path, capsys, flags, match):
    from kind_fast.__main__ import main

    (tmp_path / "ema").mkdir()
    assert main(["sample", str(tmp_path), *flags]) == 2
    assert __import__("re").search(match, capsys.readouterr().err)


def test_sample_function_validates_its_arguments():
    from kind_fast.models.dit import DiT, KindConfig
    from kind_fast.train.sampling import sample

    m = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=16, depth=1, num_heads=1, num_classes=2,
            kind=KindConfig(tailor_rank=4, active=2))
    labels = torch.tensor([0, 1])
    for kw, match in (({"steps": 2000}, "steps must be an int"), ({"cfg_scale": float("nan")}, "cfg_scale"),
                      ({"steps": 2.5}, "steps must be an int")):
        with pytest.raises(ValueError, match=match):
            sample(m, labels, shape=(1, 8, 8), **kw)
    assert sample(m, labels, shape=(1, 8, 8), steps=2).shape == (2, 1, 8, 8)
