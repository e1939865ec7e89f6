"""Packaging: the sdist carries csrc/ and kernels/, metadata, LICENSE and CITATION.cff; the
compiled extension refuses a build for another torch before loading it; optional dependencies
fail with one clear line (simulated as missing with sys.modules[name] = None in a subprocess)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _source_files() -> list[str]:
    """What a clean clone holds: tracked and untracked-but-not-ignored files."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.split("\n")
    return [f for f in out if f and (ROOT / f).is_file()]


def test_sdist_carries_the_sources_and_metadata(tmp_path):
    src = tmp_path / "src"
    for f in _source_files():
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    code = "from setuptools import build_meta; print(build_meta.build_sdist('dist'))"
    env = dict(os.environ, KIND_FAST_BUILD_CUDA="0")  # an sdist never compiles anything
    r = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    sdist = src / "dist" / r.stdout.strip().splitlines()[-1]
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        pkg_info = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith("/PKG-INFO")
                                        and m.name.count("/") == 1)).read().decode()
    csrc = [f for f in _source_files() if f.startswith("csrc/")]
    assert any(f.endswith(".cu") for f in csrc) and set(csrc) <= names, sorted(set(csrc) - names)
    kernels = [f for f in _source_files() if f.startswith("kernels/")]
    assert kernels and set(kernels) <= names
    for f in ("LICENSE", "CITATION.cff", "setup.py", "pyproject.toml", "docs/design.md", "README.md",
              "kind_fast/train/convert.py", "kind_fast/integrations/diffusers.py"):
        assert f in names, f
    assert "License-Expression: Apache-2.0" in pkg_info
    assert "Project-URL: Paper, https://arxiv.org/abs/2408.07337" in pkg_info
    assert "Classifier: Environment :: GPU :: NVIDIA CUDA" in pkg_info and "Author: " in pkg_info


def test_wheel_ships_the_kernels_and_cuda_sources_but_no_stale_build_record(tmp_path):
    """A pure wheel (no CUDA build) holds kind_fast/kernels/*.py (imported from there, no top-level
    `kernels`) and kind_fast/csrc/ (what `kind-fast build-ext` compiles), and never a
    kind_fast/_build_info.py left in the source tree by an earlier CUDA build; neither does the sdist."""
    import zipfile

    src = tmp_path / "src"
    for f in _source_files():
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    (src / "kind_fast" / "_build_info.py").write_text("TORCH_VERSION = '1.0.0'  # an earlier build's record\n")
    (src / "build" / "lib" / "kind_fast").mkdir(parents=True)  # pip builds in the tree: an earlier CUDA build's
    (src / "build" / "lib" / "kind_fast" / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")  # outputs
    shutil.copy2(src / "kind_fast" / "_build_info.py", src / "build" / "lib" / "kind_fast" / "_build_info.py")
    code = ("from setuptools import build_meta; w = build_meta.build_wheel('dist'); s = build_meta.build_sdist('dist'); "
            "print('BUILT', w, s)")
    env = dict(os.environ, KIND_FAST_BUILD_CUDA="0")
    r = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    wheel_name, sdist_name = next(ln for ln in r.stdout.splitlines() if ln.startswith("BUILT ")).split()[1:]
    with zipfile.ZipFile(src / "dist" / wheel_name) as z:
        names = set(z.namelist())
        z.extractall(tmp_path / "site")
    kernels = {f"kind_fast/kernels/{Path(f).name}" for f in _source_files() if f.startswith("kernels/") and
               f.endswith(".py")}
    assert kernels and kernels <= names and "kind_fast/kernels/__init__.py" in names, sorted(names)
    assert "kind_fast/csrc/module.cpp" in names and "kind_fast/csrc/kind_linear_cuda.cu" in names
    assert not [n for n in names if n.split("/")[0] in ("kernels", "csrc")], "nothing top-level but the package"
    assert "kind_fast/_build_info.py" not in names and not [n for n in names if n.startswith("kind_fast/_C.")]
    with tarfile.open(src / "dist" / sdist_name) as tar:
        assert not [n for n in tar.getnames() if n.endswith("kind_fast/_build_info.py")]
    # the installed layout imports its kernels from the wheel and finds the CUDA sources there
    check = ("import kind_fast, kind_fast.kernels.kind_linear as k, kind_fast.ops._ext as e; "
             "print(k.__file__); print(e.source_folder()); print(kind_fast.kernels.__path__)")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    r = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    kl, csrc, path = r.stdout.strip().splitlines()
    site = str(tmp_path / "site" / "kind_fast")
    assert kl == f"{site}/kernels/kind_linear.py" and csrc == f"{site}/csrc" and path == f"['{site}/kernels']"


def test_license_and_citation():
    assert "Apache License" in (ROOT / "LICENSE").read_text()
    cff = (ROOT / "CITATION.cff").read_text()
    for fact in ("KIND: Knowledge Integration and Diversion for Training Decomposable Models", "2408.07337",
                 "family-names: Xie", "family-names: Geng", "volume: 267", "year: 2025"):
        assert fact in cff, fact
    readme = (ROOT / "README.md").read_text()
    assert "CC-BY-NC" in readme and "Apache-2.0" in readme


# what no file may cite, spelled in pieces so that a repository-wide `git grep` for these
# strings finds nothing at all (this test included)
NEEDLES = ("../" "shared", "refer" "ence/" "kind_" "paper", "kind_" "paper.md", "DESIGN" " §", "DESIGN" ".md")


def test_no_file_points_outside_the_repository():
    bad = []
    for f in _source_files():
        if f.endswith((".py", ".md", ".sh", ".cu", ".cuh", ".cpp", ".h", ".toml", ".cff")) and \
                f != "tests/test_packaging.py":
            text = (ROOT / f).read_text(errors="replace")
            for needle in NEEDLES:
                if needle in text:
                    bad.append((f, needle))
    assert not bad, bad
    assert (ROOT / "docs" / "design.md").is_file()


# =====================================================================================
# The compiled extension and the torch it was built for
# =====================================================================================
def _pretend_built(monkeypatch, torch_version: str | None):
    """kind_fast._C "exists"; its import is recorded; _build_info says ``torch_version``."""
    import importlib
    import importlib.util

    from kind_fast.ops import _ext
    imported = []
    real_find, real_import = importlib.util.find_spec, importlib.import_module

    def find_spec(name, *a, **k):
        return object() if name == "kind_fast._C" else real_find(name, *a, **k)

    def import_module(name, *a, **k):
        if name == "kind_fast._C":
            imported.append(name)
            raise OSError("the test's stand-in for the binary")
        return real_import(name, *a, **k)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(importlib, "import_module", import_module)
    monkeypatch.setattr(_ext, "_state", {})
    if torch_version is not None:
        info = types.ModuleType("kind_fast._build_info")
        info.TORCH_VERSION = torch_version
        monkeypatch.setitem(sys.modules, "kind_fast._build_info", info)
    return _ext, imported


def test_extension_for_another_torch_is_refused_before_loading(monkeypatch):
    _ext, imported = _pretend_built(monkeypatch, "2.0.1+cu118")
    with pytest.warns(RuntimeWarning, match=r"built against torch 2\.0\.1\+cu118 but torch .* is running") as rec:
        mod, why = _ext.load_extension()
        assert _ext.load_extension() == (None, why)  # cached: warned once
    assert mod is None and "rebuild: pip install --no-build-isolation" in why
    assert imported == [], "a mismatched binary must not even be imported"
    assert len([w for w in rec if issubclass(w.category, RuntimeWarning)]) == 1


def test_extension_for_this_torch_is_loaded(monkeypatch):
    import torch

    _ext, imported = _pretend_built(monkeypatch, torch.__version__)
    with pytest.warns(RuntimeWarning, match="stand-in"):
        _ext.load_extension()
    assert imported == ["kind_fast._C"], "a matching build goes on to the import"


# =====================================================================================
# Optional dependencies
# =====================================================================================
def _without(monkeypatch, *modules: str) -> None:
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)  # `import name` fails as if it were not installed


def test_flops_without_matplotlib_writes_markdown_and_skips_the_png(tmp_path, monkeypatch, capsys):
    from kind_fast.__main__ import main

    _without(monkeypatch, "matplotlib", "matplotlib.pyplot")
    assert main(["flops", "--models", "DiT-S/2", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "flops.md").is_file() and not (tmp_path / "flops.png").exists()
    png_lines = [line for line in capsys.readouterr().out.splitlines() if "flops.png" in line]
    assert png_lines == ["skipped flops.png: matplotlib is not installed (pip install 'kind_fast[report]')"]


@pytest.mark.parametrize("missing,methods", [("torchmetrics", "kind"), ("peft", "kind,lora"), ("sklearn", "kind"),
                                             ("PIL", "kind")])
def test_demo_checks_its_extras_before_training(tmp_path, monkeypatch, missing, methods):
    from kind_fast.__main__ import main

    _without(monkeypatch, missing)
    out = tmp_path / "demo"
    with pytest.raises(SystemExit) as e:
        main(["demo", "--out", str(out), "--methods", methods, "--pretrain-steps", "1", "--steps", "1",
              "--threads", "1"])
    pip_name = {"sklearn": "scikit-learn", "PIL": "pillow"}.get(missing, missing)
    assert str(e.value) == (f"kind-fast demo needs {pip_name}: pip install 'kind_fast[demo]' "
                            f"(or pip install {pip_name})")
    assert not (out / "pretrain").exists(), "nothing was trained"


def test_demo_requirements_follow_the_methods():
    from kind_fast.train.demo import requirements

    assert "peft" not in requirements(["kind", "full"]) and requirements(["lora"])["peft"] == "peft"
    from kind_fast._optional import available, missing

    assert available("sys") and not available("kind_fast_no_such_module")
    assert missing({"sys": "sys", "kind_fast_no_such_module": "nope"}) == ["nope"]


def test_lora_transfer_without_peft_is_one_line(tmp_path, monkeypatch, capsys, one_thread):
    from kind_fast.__main__ import main

    sys.path.insert(0, os.path.dirname(__file__))
    from train_helpers import TINY_FLAGS

    pre = tmp_path / "pre"
    assert main(["pretrain", "--steps", "1", "--out", str(pre), "--no-sample", *TINY_FLAGS]) == 0
    _without(monkeypatch, "peft")
    capsys.readouterr()
    assert main(["transfer", "--init", str(pre), "--method", "lora", "--steps", "1", "--out",
                 str(tmp_path / "lora"), "--no-sample", *TINY_FLAGS]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "kind-fast transfer: the LoRA baseline runs through PEFT: pip install peft (or 'kind_fast[train]')"
