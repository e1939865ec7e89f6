"""Run logging: plain lines off a terminal, log.txt, loss-curve PNG, `kind-fast plot`, W&B."""

from __future__ import annotations

import os
import sys

import pytest

from kind_fast.train.loop import Trainer

sys.path.insert(0, os.path.dirname(__file__))
from train_helpers import FakeWandb, tiny_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _train(cfg, resume=None, until=None):
    lines = []
    tr = Trainer(cfg, resume=resume, log=lines.append)
    try:
        tr.train(until=until)
    finally:
        tr.close()
    return lines


def test_plain_lines_log_txt_and_loss_curve(tmp_path):
    """Under pytest stdout is not a terminal: every --log-every row is printed as a plain line,
    log.txt has them (and survives a resume), and loss.png is drawn at the end."""
    pytest.importorskip("matplotlib")
    from PIL import Image

    out = tmp_path / "run"
    lines = _train(tiny_config(out, steps=6, log_every=2, ckpt_every=2), until=4)  # "killed" after step 4
    rows = [ln for ln in lines if ln.startswith("step ")]
    assert [ln.split()[1] for ln in rows] == ["2/6", "4/6"]
    assert "loss " in rows[0] and "lr " in rows[0] and "img/s" in rows[0]
    lines = _train(tiny_config(out, steps=6, log_every=2, ckpt_every=2), resume="auto")
    assert [ln.split()[1] for ln in lines if ln.startswith("step ")] == ["6/6"]
    log = (out / "log.txt").read_text()
    assert "started" in log and "resumed at step 4" in log
    for step in ("step 2/6", "step 4/6", "step 6/6"):
        assert step in log
    assert "loss curve: " in log
    with Image.open(out / "loss.png") as im:
        assert im.format == "PNG" and im.size[0] > 500


def test_no_matplotlib_says_so_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "run"
    lines = _train(tiny_config(out, steps=2, log_every=1))
    notes = [ln for ln in lines if "matplotlib" in ln]
    assert notes == ["loss curve not drawn: matplotlib is not installed"]
    assert not (out / "loss.png").exists() and (out / "metrics.csv").is_file()


def test_kind_fast_plot_command(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from kind_fast.__main__ import main

    out = tmp_path / "run"
    _train(tiny_config(out, steps=2, log_every=1))
    (out / "loss.png").unlink()
    assert main(["plot", str(out), "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").is_file() and not (out / "loss.png").exists()
    assert main(["plot", str(tmp_path / "nothing")]) == 2
    assert "no metrics.csv" in capsys.readouterr().err


def test_wandb_gets_the_rows_and_a_resume_continues_its_run(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = tmp_path / "run"
    cfg = tiny_config(out, steps=4, log_every=2, ckpt_every=2, wandb="on", wandb_project="proj")
    _train(cfg, until=2)
    _train(cfg, resume="auto")
    ids = [i["id"] for i in fake.inits]
    assert ids[0] == ids[1] == (out / "wandb_id.txt").read_text().strip() and fake.finished == 2
    assert fake.inits[0]["project"] == "proj" and fake.inits[0]["config"]["steps"] == 4
    assert fake.inits[0]["resume"] == "allow" and fake.inits[0]["dir"] == str(out)
    train_rows = [(s, v) for s, v in fake.logged if "train/loss" in v]
    assert [s for s, _ in train_rows] == [2, 4] and all(v["train/loss"] > 0 for _, v in train_rows)


def test_wandb_on_without_the_package_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match="pip install wandb"):
        Trainer(tiny_config(tmp_path / "r", wandb="on"))


def test_real_wandb_offline(tmp_path, monkeypatch):
    """With the real package (not in the test extra): offline mode needs no network."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    _train(tiny_config(out, steps=2, log_every=1, wandb="on"))
    assert (out / "wandb_id.txt").is_file()
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


@pytest.mark.parametrize("stdout_tty, printed", [(False, True), (True, False)])
def test_lines_are_printed_unless_a_bar_shows_on_a_terminal(tmp_path, monkeypatch, stdout_tty, printed):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # the tqdm bar is on
    monkeypatch.setattr(sys.stdout, "isatty", lambda: stdout_tty)
    out = tmp_path / "run"
    lines = _train(tiny_config(out, steps=2, log_every=1, progress=True))
    assert any(ln.startswith("step 2/2") for ln in lines) == printed
    assert "step 2/2" in (out / "log.txt").read_text()  # log.txt always
