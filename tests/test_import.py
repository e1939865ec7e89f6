"""Packaging rules: a lean import, no top-level `kernels`, info and CLI entry points."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, cwd) -> subprocess.CompletedProcess:
    # run outside the repository so the source folders are not on sys.path
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_import_does_not_touch_cuda_or_the_extension(tmp_path):
    r = _run("""
        import sys, torch
        def boom(*a, **k):
            raise AssertionError("CUDA was queried at import")
        for name in ("current_device", "_lazy_init", "device_count", "is_available", "get_device_capability"):
            setattr(torch.cuda, name, boom)
        import kind_fast, kind_fast.models.dit, kind_fast.models.kindify, kind_fast.deploy.serialization, kind_fast.models.baselines
        assert "kind_fast._C" not in sys.modules, "extension loaded at import time"
        assert "kind_fast.kernels" not in sys.modules
        gate = kind_fast.ClassGate.block(3, 4, 2)
        layer = kind_fast.FastKindLinear(8, 8, tailor_rank=4, gate=gate)
        y = layer(torch.randn(2, 3, 8), labels=torch.tensor([0, 3]))
        assert y.shape == (2, 3, 8)
        print("ok")
    """, tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_no_top_level_kernels_module_and_kernels_under_the_package(tmp_path):
    r = _run(f"""
        import importlib.util, os
        assert importlib.util.find_spec("kind_fast.kernels") is not None
        import kind_fast.kernels, kind_fast.kernels.kind_linear, kind_fast.kernels.kind_linear_merged
        assert kind_fast.kernels.__name__ == "kind_fast.kernels"
        try:
            import kernels
        except ImportError:
            print("ok")
        else:  # only another distribution's `kernels` (the PyPI package) may answer to that name
            f = os.path.realpath(getattr(kernels, "__file__", None) or "")
            ours = {str(ROOT / "kernels")!r}
            mine = ours in [os.path.realpath(p) for p in kernels.__path__] or os.path.dirname(f) == ours
            print("kernels is ours:", f, list(kernels.__path__)) if mine else print("ok")
    """, tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


def test_repository_root_does_not_shadow_the_installed_kernels_package():
    """From the repository root, ``python -c``/``-m`` put the root first on sys.path. The top-level
    kernels/ folder must not hide the PyPI package ``kernels`` that transformers (through peft)
    and diffusers import: it has no __init__.py, so the installed regular package wins."""
    import importlib.metadata

    import pytest

    assert not (ROOT / "kernels" / "__init__.py").exists(), "kernels/ must stay a folder without __init__.py"
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the PyPI package `kernels` is not installed (the test extra pulls it in)")
    code = """
        import os, sys
        import kind_fast, peft, transformers, diffusers.training_utils
        from kernels import get_kernel
        import kernels
        import kind_fast.kernels.kind_linear as kl
        ours = os.path.join(os.path.realpath(os.getcwd()), "kernels")
        assert ours not in [os.path.realpath(p) for p in kernels.__path__], list(kernels.__path__)
        assert os.path.dirname(os.path.realpath(kl.__file__)) == ours, kl.__file__
        print("ok")
    """
    r = _run(code, ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr[-3000:]
    # and through `python -m` from the root, as the README's commands run it
    r = subprocess.run([sys.executable, "-m", "kind_fast", "transfer", "--help"], capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert r.returncode == 0 and "--method" in r.stdout, r.stderr[-3000:]


def test_info_reports_backends():
    r = subprocess.run([sys.executable, "-m", "kind_fast.info"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for key in ("kind_fast", "torch", "backends", "compiled extension", "torch  "):
        assert key.strip() in r.stdout
    assert "available: pure-PyTorch reference" in r.stdout


def test_cli_help_lists_commands():
    r = subprocess.run([sys.executable, "-m", "kind_fast", "--help"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "demo" in r.stdout and "info" in r.stdout


def test_backend_selection():
    import pytest
    import torch

    import kind_fast as kf
    from kind_fast.ops.backends import resolve_backend

    assert kf.current_backend() == "auto"
    assert resolve_backend(torch.device("cpu"), torch.float32) == "torch"
    with kf.use_backend("torch"):
        assert kf.current_backend() == "torch"
    assert kf.current_backend() == "auto"
    with pytest.raises(ValueError, match="unknown backend"):
        with kf.use_backend("fastest"):
            pass
