"""Build script for kind_fast.

Metadata lives in pyproject.toml. This file has one job: decide whether to build the
optional CUDA extension ``kind_fast._C`` from ``csrc/`` and, if so, build it.

Switch (environment):
    KIND_FAST_BUILD_CUDA unset  auto: build when torch is importable *with* CUDA, nvcc is
                                found, and csrc/ has sources; otherwise install pure Python
                                (the torch reference and Triton paths) and say why.
    KIND_FAST_BUILD_CUDA=0      never build.
    KIND_FAST_BUILD_CUDA=1      always build; fail with a clear message when it cannot.
    TORCH_CUDA_ARCH_LIST        honoured; defaults to "8.0;9.0" when no GPU is visible.
    MAX_JOBS                    honoured by torch.utils.cpp_extension (ninja).
    CUDA_HOME / CUDA_PATH       the CUDA toolkit folder (bin/nvcc, include/, lib64/); found
                                from nvcc's real path or /usr/local/cuda when unset. Set to a
                                folder that is not a toolkit, it is an error naming the folder
                                (kind_fast/ops/_cuda_toolkit.py), never silently replaced.

The extension must be built against the torch that is already installed, so install with
``pip install --no-build-isolation .`` (pyproject.toml does not list torch as a build
requirement: an isolated build would pull a second torch). A plain ``pip install .`` (isolated:
no torch in the build environment) builds nothing; ``kind-fast build-ext`` then compiles the
extension from the sources the wheel ships (kind_fast/ops/_ext.py), and ``kind-fast info`` says so.

``build_decision()`` is the whole decision and is importable without running setup()
(tests/test_kind_linear_cuda.py checks it in a subprocess).

What a (non-editable) wheel holds beside the package's own modules, copied by ``build_py``:
    kind_fast/kernels/*.py   the Triton sources of the top-level ``kernels/`` folder (that folder
                             has no ``__init__.py``, so that from the repository root it never
                             hides the PyPI package ``kernels``; see kind_fast/kernels/__init__.py)
    kind_fast/csrc/          the CUDA sources, so ``kind-fast build-ext`` can compile the extension
                             later from any install (kind_fast/ops/_ext.py)
``kind_fast/_build_info.py`` (written next to a CUDA build) is shipped only by the build that
wrote it: a pure build never carries the record, or the binary, of an earlier one (pip builds in
the source tree, so ``build/lib`` can hold them).
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
from collections.abc import Mapping

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")
BUILD_INFO = os.path.join(ROOT, "kind_fast", "_build_info.py")  # generated; gitignored
DEFAULT_ARCHS = "8.0;9.0"


def _log(msg: str) -> None:
    print(f"kind_fast setup: {msg}", file=sys.stderr)


def cuda_sources() -> list[str]:
    """csrc/ sources of the extension (csrc/emulation/ is the CPU test build, not part of it)."""
    srcs = glob.glob(os.path.join(CSRC, "**", "*.cu"), recursive=True)
    srcs += glob.glob(os.path.join(CSRC, "**", "*.cpp"), recursive=True)
    skip = os.path.join(CSRC, "emulation") + os.sep
    return sorted(os.path.relpath(s, ROOT) for s in srcs if not s.startswith(skip))


def _load_toolkit_module():
    """kind_fast/ops/_cuda_toolkit.py, loaded by its path (the package is not installed yet, and
    importing it would import torch): one implementation for setup.py and `kind-fast build-ext`."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("kind_fast_cuda_toolkit",
                                                  os.path.join(ROOT, "kind_fast", "ops", "_cuda_toolkit.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_toolkit = _load_toolkit_module()
find_cuda_home = _toolkit.find_cuda_home  # raises ToolkitError for a CUDA_HOME that is no toolkit
ToolkitError = _toolkit.ToolkitError


def why_not_build(environ: Mapping[str, str] = os.environ) -> str | None:
    """None when the CUDA extension can be built here, else the reason it cannot."""
    if not cuda_sources():
        return "csrc/ has no CUDA/C++ sources"
    try:
        import torch
    except ImportError:
        return "torch is not importable in the build environment (install torch first, then use --no-build-isolation)"
    if torch.version.cuda is None:
        return f"the installed torch {torch.__version__} has no CUDA support (a CPU build)"
    try:
        home = find_cuda_home(environ)
    except ToolkitError as e:  # an explicit CUDA_HOME is never silently replaced by another toolkit
        raise RuntimeError(f"{e}; or set KIND_FAST_BUILD_CUDA=0 to install without the CUDA extension") from None
    if home is None:
        return "nvcc / the CUDA toolkit was not found (set CUDA_HOME to the toolkit folder, e.g. /usr/local/cuda)"
    try:
        import ninja  # noqa: F401
    except ImportError:
        if shutil.which("ninja", path=environ.get("PATH")) is None:
            return "ninja is not installed (pip install ninja)"
    return None


def build_decision(environ: Mapping[str, str] = os.environ) -> tuple[bool, str]:
    """(build the extension?, why). Raises RuntimeError when KIND_FAST_BUILD_CUDA=1 and it
    cannot be built, or when CUDA_HOME/CUDA_PATH names a folder that is not a toolkit (unless
    KIND_FAST_BUILD_CUDA=0); ValueError for a switch value other than unset/0/1."""
    switch = environ.get("KIND_FAST_BUILD_CUDA", "").strip()
    if switch not in ("", "0", "1"):
        raise ValueError(f"KIND_FAST_BUILD_CUDA must be unset, 0 or 1, got {switch!r}")
    if switch == "0":
        return False, "KIND_FAST_BUILD_CUDA=0: not building the CUDA extension"
    reason = why_not_build(environ)
    if reason is not None:
        if switch == "1":
            raise RuntimeError(f"KIND_FAST_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
        return False, f"not building the CUDA extension ({reason}); the torch and Triton paths work without it"
    return True, "building the CUDA extension kind_fast._C"


def arch_list(environ: Mapping[str, str] = os.environ, gpu_visible: bool | None = None) -> str | None:
    """TORCH_CUDA_ARCH_LIST to build for: the user's, else DEFAULT_ARCHS when no GPU is visible,
    else None (torch derives it from the visible GPUs)."""
    if environ.get("TORCH_CUDA_ARCH_LIST", "").strip():
        return environ["TORCH_CUDA_ARCH_LIST"].strip()
    if gpu_visible is None:
        import torch

        try:
            gpu_visible = torch.cuda.is_available()
        except Exception:  # noqa: BLE001 - a broken driver means "no GPU" here
            gpu_visible = False
    return None if gpu_visible else DEFAULT_ARCHS


# what build_py copies into a wheel from outside the package folder: (source glob, destination)
WHEEL_EXTRAS = (("kernels/*.py", "kind_fast/kernels"),
                ("csrc/*.cu", "kind_fast/csrc"), ("csrc/*.cuh", "kind_fast/csrc"),
                ("csrc/*.cpp", "kind_fast/csrc"), ("csrc/*.h", "kind_fast/csrc"))


def _build_py(builds_extension: bool):
    """setuptools' build_py, plus WHEEL_EXTRAS, minus a stale kind_fast/_build_info.py."""
    from setuptools.command.build_py import build_py

    class BuildPy(build_py):
        def find_package_modules(self, package, package_dir):
            modules = super().find_package_modules(package, package_dir)
            if builds_extension:
                return modules
            return [m for m in modules if (m[0], m[1]) != ("kind_fast", "_build_info")]

        def run(self):
            super().run()
            if self.editable_mode:  # an editable install imports kernels/ and csrc/ in place
                return
            if not builds_extension:  # a build folder reused from an earlier CUDA build keeps its outputs
                stale = glob.glob(os.path.join(self.build_lib, "kind_fast", "_C.*"))
                for path in stale + glob.glob(os.path.join(self.build_lib, "kind_fast", "_build_info.py")):
                    _log(f"removing {os.path.relpath(path, ROOT)} of an earlier CUDA build from the build folder")
                    os.remove(path)
            for pattern, dest in WHEEL_EXTRAS:
                for src in sorted(glob.glob(os.path.join(ROOT, pattern))):
                    out = os.path.join(self.build_lib, dest, os.path.basename(src))
                    self.mkpath(os.path.dirname(out))
                    self.copy_file(src, out, preserve_mode=False)

    return BuildPy


def _extensions():
    build, why = build_decision()
    _log(why)
    if not build:
        return [], {"build_py": _build_py(False)}

    cuda_home = find_cuda_home()
    os.environ["CUDA_HOME"] = cuda_home  # before cpp_extension is imported: it reads CUDA_HOME once
    archs = arch_list()
    if archs is not None:
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    import torch
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    shown = archs or "(derived from the visible GPU)"
    _log(f"CUDA_HOME={cuda_home} TORCH_CUDA_ARCH_LIST={shown} MAX_JOBS={os.environ.get('MAX_JOBS', '(ninja default)')}")
    with open(BUILD_INFO, "w") as f:
        f.write("# Written by setup.py when it builds kind_fast._C (not tracked by git).\n"
                f"TORCH_CUDA_ARCH_LIST = {shown!r}\nTORCH_VERSION = {torch.__version__!r}\n"
                f"TORCH_CUDA_VERSION = {torch.version.cuda!r}\n"
                f"CUDA_HOME = {cuda_home!r}\n")
    ext = CUDAExtension(
        name="kind_fast._C",
        sources=cuda_sources(),
        include_dirs=[CSRC],
        extra_compile_args={
            # no -std here: torch.utils.cpp_extension adds the standard its headers need
            "cxx": ["-O3"],
            "nvcc": ["-O3", "-lineinfo"],
        },
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True), "build_py": _build_py(True)}


if __name__ == "__main__":  # also how setuptools' build backend runs this file
    from setuptools import setup

    ext_modules, cmdclass = _extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
