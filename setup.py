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

The extension must be built against the torch that is already installed, so install with
``pip install --no-build-isolation .`` (pyproject.toml does not list torch as a build
requirement: an isolated build would pull a second torch).
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")
DEFAULT_ARCHS = "8.0;9.0"


def _log(msg: str) -> None:
    print(f"kind_fast setup: {msg}", file=sys.stderr)


def _cuda_sources() -> list[str]:
    srcs = glob.glob(os.path.join(CSRC, "**", "*.cu"), recursive=True)
    srcs += glob.glob(os.path.join(CSRC, "**", "*.cpp"), recursive=True)
    return sorted(os.path.relpath(s, ROOT) for s in srcs)


def _find_cuda_home() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return home
    nvcc = shutil.which("nvcc")
    if nvcc:
        cand = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if os.path.exists(os.path.join(cand, "lib64")) or os.path.exists(os.path.join(cand, "lib")):
            return cand
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    return None


def _why_not_build() -> str | None:
    """None when the CUDA extension can be built here, else the reason it cannot."""
    sources = _cuda_sources()
    if not sources:
        return "csrc/ has no CUDA/C++ sources yet"
    try:
        import torch  # noqa: F401  (only importable with --no-build-isolation)
    except ImportError:
        return "torch is not importable in the build environment (use --no-build-isolation)"
    import torch

    if torch.version.cuda is None:
        return f"the installed torch {torch.__version__} has no CUDA support"
    if _find_cuda_home() is None:
        return "nvcc not found (set CUDA_HOME to the CUDA toolkit folder)"
    return None


def _extensions():
    switch = os.environ.get("KIND_FAST_BUILD_CUDA", "").strip()
    if switch == "0":
        _log("KIND_FAST_BUILD_CUDA=0: not building the CUDA extension")
        return [], {}
    reason = _why_not_build()
    if reason is not None:
        if switch == "1":
            raise RuntimeError(f"KIND_FAST_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
        _log(f"not building the CUDA extension ({reason}); the torch and Triton paths work without it")
        return [], {}

    import torch
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    cuda_home = _find_cuda_home()
    os.environ.setdefault("CUDA_HOME", cuda_home)
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        has_gpu = False
        try:
            has_gpu = torch.cuda.is_available()
        except Exception:  # noqa: BLE001 - a broken driver means "no GPU" here
            pass
        if not has_gpu:
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "(detected from the visible GPU)")
    _log(f"building kind_fast._C with CUDA_HOME={os.environ['CUDA_HOME']} archs={archs}")
    with open(os.path.join(ROOT, "kind_fast", "_build_info.py"), "w") as f:
        f.write(f"TORCH_CUDA_ARCH_LIST = {archs!r}\nTORCH_VERSION = {torch.__version__!r}\n")
    ext = CUDAExtension(
        name="kind_fast._C",
        sources=_cuda_sources(),
        include_dirs=[CSRC],
        extra_compile_args={
            "cxx": ["-O3", "-std=c++17"],
            "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"],
        },
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
