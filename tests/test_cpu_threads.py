"""CPU thread choice of the training and sampling commands (kind_fast/train/cpu_threads.py)."""

from __future__ import annotations

import pytest
import torch

from kind_fast.__main__ import main
from kind_fast.train import cpu_threads

from train_helpers import TINY_FLAGS  # noqa: E402


@pytest.fixture
def machine(monkeypatch):
    """Pretend to be a machine with ``cores`` cores, a 1-minute load ``load`` and torch's
    default of ``default`` threads, without OMP_NUM_THREADS."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)

    def set_(cores, load, default):
        monkeypatch.setattr(cpu_threads, "_cores", lambda: cores)
        monkeypatch.setattr(cpu_threads, "_load", lambda: load)
        monkeypatch.setattr(cpu_threads.torch, "get_num_threads", lambda: default)

    return set_


@pytest.mark.parametrize("cores,load,default,want", [
    (2, 0.3, 2, 2),     # idle: torch's own count
    (2, 0.99, 2, 2),    # under half the cores busy
    (2, 1.12, 2, 1),    # one core busy (the demo VM with one other job)
    (2, 3.7, 2, 1),     # overloaded: never below one
    (16, 8.3, 16, 7),   # the cores the load leaves free
    (16, 8.3, 4, 4),    # never more than torch's own count
    (2, None, 2, 2),    # no load average on this platform
])
def test_auto_choice_follows_the_load(machine, cores, load, default, want):
    machine(cores, load, default)
    n, why = cpu_threads.choose(0)
    assert n == want
    assert ("load average" in why) == (load is not None and load >= cores / 2)


def test_an_explicit_count_or_omp_num_threads_is_followed(machine, monkeypatch):
    machine(2, 3.7, 2)
    assert cpu_threads.choose(3) == (3, "as requested")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert cpu_threads.choose(0) == (2, "OMP_NUM_THREADS")
    with pytest.raises(ValueError, match="--threads must be >= 0"):
        cpu_threads.choose(-1)


def test_apply_sets_cpu_threads_only_on_the_cpu():
    before = torch.get_num_threads()
    try:
        assert cpu_threads.apply(1, "cuda") is None
        assert torch.get_num_threads() == before
        assert cpu_threads.apply(1, "cpu") == "CPU: 1 torch thread (as requested)"
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_commands_take_threads_and_give_the_caller_its_count_back(tmp_path, capsys):
    before = torch.get_num_threads()
    want = 1 if before > 1 else 2
    out = tmp_path / "pre"
    assert main(["pretrain", "--steps", "2", "--out", str(out), "--no-sample", "--threads", str(want),
                 *TINY_FLAGS]) == 0
    assert f"CPU: {want} torch thread{'s' if want > 1 else ''} (as requested)" in capsys.readouterr().out
    assert torch.get_num_threads() == before
    assert main(["sample", str(out), "--steps", "2", "--n-per-class", "1", "--out", str(tmp_path / "g.png"),
                 "--threads", str(want)]) == 0
    assert f"CPU: {want} torch thread" in capsys.readouterr().out
    assert torch.get_num_threads() == before
    for argv in (["pretrain", "--out", str(tmp_path / "x")], ["sample", str(out)]):
        assert main([*argv, "--threads", "-1"]) == 2
        assert "--threads must be >= 0" in capsys.readouterr().err
