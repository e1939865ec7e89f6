"""Where the CUDA toolkit is (nvcc, the runtime headers, libcudart), for building kind_fast._C.

Standard library only: ``setup.py`` loads this file by its path before the package is installed
(no ``import kind_fast``, no torch), and ``kind_fast.ops._ext`` uses it for ``kind-fast build-ext``.

A ``CUDA_HOME`` (or ``CUDA_PATH``) that is set is the user's explicit choice: when it is not a
toolkit, that is an error naming the folder and what it lacks (``ToolkitError``), never a silent
fallback to another toolkit. Unset, the toolkit is found from ``nvcc``'s real path (a ``nvcc`` on
PATH may be a wrapper script elsewhere: its target is read, not trusted), then
``/usr/local/cuda``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping

ENV_VARS = ("CUDA_HOME", "CUDA_PATH")


class ToolkitError(RuntimeError):
    """CUDA_HOME/CUDA_PATH names a folder that is not a CUDA toolkit."""


def toolkit_problem(home: str) -> str | None:
    """None when ``home`` is a CUDA toolkit folder, else what it lacks."""
    if not os.path.isdir(home):
        return "it does not exist"
    if not os.path.exists(os.path.join(home, "bin", "nvcc")):
        return "it has no bin/nvcc"
    if not os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h")):
        return "it has no include/cuda_runtime_api.h"
    libs = ("lib64", "lib", os.path.join("lib", "x86_64-linux-gnu"), os.path.join("targets", "x86_64-linux", "lib"))
    if not any(os.path.exists(os.path.join(home, d, "libcudart.so")) for d in libs):
        return "it has no lib64/libcudart.so"
    return None


def find_cuda_home(environ: Mapping[str, str] = os.environ) -> str | None:
    """The CUDA toolkit folder, or None when none is found. Raises ToolkitError when
    CUDA_HOME/CUDA_PATH is set to a folder that is not a toolkit."""
    for var in ENV_VARS:
        home = environ.get(var, "").strip()
        if home:
            problem = toolkit_problem(home)
            if problem is not None:
                raise ToolkitError(f"{var}={home} is not a CUDA toolkit folder ({problem}); point {var} at the "
                                   "toolkit (the folder with bin/nvcc and lib64/libcudart.so), or unset it")
            return home
    nvcc = shutil.which("nvcc", path=environ.get("PATH"))
    if nvcc:
        cand = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if toolkit_problem(cand) is None:
            return cand
        try:  # a wrapper script such as `exec /usr/local/cuda-13.0/bin/nvcc "$@"`
            with open(nvcc, errors="replace") as f:
                head = f.read(4096)
            for tok in head.replace('"', " ").replace("'", " ").split():
                if tok.endswith("/bin/nvcc"):
                    cand = os.path.dirname(os.path.dirname(tok))
                    if toolkit_problem(cand) is None:
                        return cand
        except OSError:
            pass
    if toolkit_problem("/usr/local/cuda") is None:
        return "/usr/local/cuda"
    return None
