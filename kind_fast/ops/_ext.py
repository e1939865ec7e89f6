"""Guarded loading of the optional compiled extension ``kind_fast._C`` (csrc/), and building it
after installation.

Nothing here runs at ``import kind_fast``. The first caller that asks (the backend registry,
``python -m kind_fast.info``) triggers one load attempt; a missing extension is a reason string,
a broken one is additionally one warning (never an ImportError). Set
``KIND_FAST_DISABLE_CUDA_EXT=1`` to never load it.

Three ways the extension comes to exist, and ``info`` says which one happened:

1. **At install time**: ``pip install --no-build-isolation .`` with a CUDA-enabled torch and nvcc
   (setup.py) builds ``kind_fast/_C*.so`` into the package.
2. **After installation, just in time**: a plain ``pip install .`` cannot build it (pip's build
   isolation hides the installed torch), so the wheel ships the CUDA sources
   (``kind_fast/csrc/``; a source checkout uses ``csrc/``). ``kind-fast build-ext`` compiles them
   with torch's extension loader and ninja into a cache folder, one per torch version, CUDA
   version, architecture list and source digest (``KIND_FAST_CACHE_DIR``, default
   ``~/.cache/kind_fast``); later processes load the cached binary without a toolkit. The first
   explicit request for the CUDA backend (``use_backend("cuda")``, ``KIND_FAST_BACKEND=cuda``,
   or ``KIND_FAST_CUDA_JIT=1``) builds it the same way. ``auto`` never starts a multi-minute
   build by itself; ``info`` says how to get one.
3. **Not at all**: the reason says which piece is missing (a CUDA torch, nvcc, ninja, sources).

"Broken" covers: the import itself fails (missing CUDA libraries, undefined symbols), the
extension was built against another torch minor version (its C++ ABI is not stable), or it
imported but did not register its ops.

The torch version check happens twice for an install-time build. ``setup.py`` records the torch
it built against in ``kind_fast/_build_info.py`` (``TORCH_VERSION``); that record is compared
with the running torch *before* ``kind_fast._C`` is imported, so a mismatched build is refused
without loading it (a mismatched binary can fail in obscure ways, or crash, at import). The
extension's own ``TORCH_VERSION`` constant is checked again after import. A cached build is
keyed by the torch version, so another torch never finds it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import sys
import time
import warnings
from pathlib import Path
from types import ModuleType

_state: dict = {}

EXPECTED_OPS = ("kind_linear_cuda", "kind_linear_cuda_backward", "kind_linear_cuda_merged",
                "kind_linear_cuda_merged_gemm", "kind_linear_cuda_merged_gemm_backward")
DEFAULT_ARCHS = "8.0;9.0"  # without a visible GPU (setup.py builds the same)
NOT_BUILT = ("not built; to get it: `kind-fast build-ext` (compiles csrc/ once, a few minutes; needs a "
             "CUDA-enabled torch, nvcc and ninja) or `pip install --no-build-isolation .` with those present "
             "(README, 'CUDA extension')")
_ORIGINS = {"install": "built at install time (pip install --no-build-isolation)",
            "jit": "built after installation (kind-fast build-ext / first explicit use), cached in {dir}"}


def arch_names(arch_list: str) -> str:
    """nvcc's __CUDA_ARCH_LIST__ ("800,900") as "sm_80, sm_90" (other text unchanged)."""
    parts = [p.strip() for p in str(arch_list).split(",")]
    if parts and all(p.isdigit() for p in parts):
        return ", ".join(f"sm_{int(p) // 10}" for p in parts)
    return str(arch_list)


def _minor(version: str) -> tuple[str, ...]:
    return tuple(version.split("+")[0].split(".")[:2])


def _mismatch(built: str | None) -> str | None:
    import torch

    if built is not None and _minor(built) != _minor(torch.__version__):
        return (f"it was built against torch {built} but torch {torch.__version__} is running "
                "(rebuild: pip install --no-build-isolation . or kind-fast build-ext)")
    return None


def _check_build_info() -> str | None:
    """None when kind_fast/_build_info.py (written by setup.py next to the build) matches the
    running torch, or is absent; else why the build must not be loaded."""
    try:
        info = importlib.import_module("kind_fast._build_info")
    except ImportError:
        return None
    return _mismatch(getattr(info, "TORCH_VERSION", None))


def _check_loaded(mod: ModuleType) -> str | None:
    """None when the loaded extension is usable, else why not."""
    import torch

    problem = _mismatch(getattr(mod, "TORCH_VERSION", None))
    if problem is not None:
        return problem
    missing = [op for op in EXPECTED_OPS if not hasattr(torch.ops.kind_fast, op)]
    if missing:
        return f"it did not register the ops {missing}"
    return None


def _wants_build() -> bool:
    """Whether the environment asks for the CUDA backend explicitly (then a missing extension is
    built on first use): KIND_FAST_CUDA_JIT=1 or KIND_FAST_BACKEND=cuda."""
    return os.environ.get("KIND_FAST_CUDA_JIT", "") == "1" or os.environ.get("KIND_FAST_BACKEND", "") == "cuda"


def load_extension(build: bool | None = None) -> tuple[ModuleType | None, str]:
    """(module or None, human-readable status). Cached after the first call, except that a later
    call with ``build=True`` still builds an extension that was merely missing.

    ``build``: compile the extension now when it is neither installed nor cached (``None``: only
    when the environment asks for the CUDA backend explicitly, see ``_wants_build``)."""
    build = _wants_build() if build is None else build
    if "result" in _state and not (build and _state.get("missing")):
        return _state["result"]
    _state.pop("missing", None)
    if os.environ.get("KIND_FAST_DISABLE_CUDA_EXT", "") == "1":
        result = (None, "disabled by KIND_FAST_DISABLE_CUDA_EXT=1")
    elif importlib.util.find_spec("kind_fast._C") is not None:
        result = _load_installed()
    else:
        cached = _find_cached_build()
        if cached is not None:
            result = _load_cached(cached)
        elif build:
            result = build_extension()
        else:
            result = (None, NOT_BUILT)
            _state["missing"] = True
    _state["result"] = result
    return result


def origin() -> str | None:
    """How the loaded extension came to exist ("built at install time ...", "built after
    installation ..."), or None when none is loaded."""
    return _state.get("origin")


def _load_installed() -> tuple[ModuleType | None, str]:
    mod, problem = None, _check_build_info()  # refused before import when built for another torch
    if problem is None:
        try:
            mod = importlib.import_module("kind_fast._C")
            problem = _check_loaded(mod)
        except Exception as e:  # noqa: BLE001 - any load failure becomes a reason, never an ImportError
            mod, problem = None, f"{type(e).__name__}: {e}"
    if problem is None:
        _state["origin"] = _ORIGINS["install"]
        return mod, "loaded"
    return None, _unusable(problem)


def _unusable(problem: str) -> str:
    reason = f"built but unusable: {problem}"
    warnings.warn(f"kind_fast: the CUDA extension kind_fast._C is {reason}; "
                  "falling back to the torch/Triton backends", RuntimeWarning, stacklevel=4)
    return reason


# ----------------------------------------------------------------------------- building after install
def cache_root() -> Path:
    """Where built extensions are cached: KIND_FAST_CACHE_DIR, else $XDG_CACHE_HOME/kind_fast,
    else ~/.cache/kind_fast (a subfolder ext/ per build)."""
    root = os.environ.get("KIND_FAST_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "kind_fast")
    return Path(root) / "ext"


def source_folder() -> Path | None:
    """The CUDA sources: kind_fast/csrc/ in a wheel, else csrc/ of the source checkout."""
    package = Path(__file__).resolve().parent.parent  # kind_fast/ (this file is kind_fast/ops/_ext.py)
    for folder in (package / "csrc", package.parent / "csrc"):
        if any(folder.glob("*.cu")):
            return folder
    return None


def _sources(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in (".cu", ".cuh", ".cpp", ".h") and p.is_file())


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in _sources(folder):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def _arch_key(archs: str) -> str:
    return "-".join(a.strip().replace(".", "").replace("+PTX", "ptx") for a in archs.split(";") if a.strip())


def _target_archs() -> str:
    """TORCH_CUDA_ARCH_LIST to build for: the user's, else the visible GPUs', else DEFAULT_ARCHS."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip():
        return os.environ["TORCH_CUDA_ARCH_LIST"].strip()
    import torch

    try:
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    except Exception:  # noqa: BLE001 - a broken driver means "no GPU" here
        caps = []
    return ";".join(f"{a}.{b}" for a, b in caps) or DEFAULT_ARCHS


def _build_key(folder: Path) -> str:
    """torch version, CUDA version and source digest: the part of a cache folder's name every
    usable build shares (the architecture list follows it)."""
    import torch

    return f"torch{torch.__version__.replace('+', '_')}-cu{torch.version.cuda}-src{_digest(folder)}"


def _covers(archs: str) -> bool:
    """Whether a build for ``archs`` runs on every visible GPU (True without one)."""
    import torch

    try:
        caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    except Exception:  # noqa: BLE001
        caps = set()
    built = {a.strip().split("+")[0].rstrip("af") for a in archs.split(";") if a.strip()}
    return all(f"{a}.{b}" in built for a, b in caps)


def _find_cached_build() -> Path | None:
    """The cache folder of a finished build for this torch, CUDA and sources that runs on the
    visible GPUs, or None."""
    import torch

    folder = source_folder()
    if torch.version.cuda is None or folder is None or not cache_root().is_dir():
        return None
    key = _build_key(folder)
    for d in sorted(cache_root().glob(f"{key}-*")):
        try:
            meta = json.loads((d / "build.json").read_text())
        except (OSError, ValueError):
            continue  # an unfinished or foreign folder
        if (d / meta.get("library", "_C.so")).is_file() and _covers(meta.get("archs", "")):
            return d
    return None


def _load_cached(folder: Path) -> tuple[ModuleType | None, str]:
    meta = json.loads((folder / "build.json").read_text())
    try:
        spec = importlib.util.spec_from_file_location("kind_fast._C", folder / meta.get("library", "_C.so"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        problem = _check_loaded(mod)
    except Exception as e:  # noqa: BLE001
        mod, problem = None, f"{type(e).__name__}: {e}"
    if problem is not None:
        return None, _unusable(f"{problem} (cached build {folder}; remove it and run kind-fast build-ext)")
    sys.modules["kind_fast._C"] = mod
    _state["origin"] = _ORIGINS["jit"].format(dir=folder)
    return mod, "loaded"


def _ninja_on_path() -> None:
    """torch runs `ninja --version` from PATH: a ninja installed in this interpreter's environment
    counts even when that environment is not activated."""
    bindir = os.path.dirname(sys.executable)
    if os.path.exists(os.path.join(bindir, "ninja")) and bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")


def why_cannot_build() -> str | None:
    """None when ``build_extension`` can compile here, else every reason it cannot, joined (a
    CUDA_HOME/CUDA_PATH set to a folder that is not a toolkit is named)."""
    import torch

    from kind_fast.ops._cuda_toolkit import ToolkitError, find_cuda_home

    problems = []
    if source_folder() is None:
        problems.append("the CUDA sources are missing (neither kind_fast/csrc/ nor a source checkout's csrc/ has them)")
    if torch.version.cuda is None:
        problems.append(f"it needs a CUDA-enabled torch (this is {torch.__version__}, a CPU build; "
                        "pip install torch from the CUDA index)")
    try:
        if find_cuda_home() is None:
            problems.append("nvcc / the CUDA toolkit was not found (set CUDA_HOME to the toolkit folder, "
                            "e.g. /usr/local/cuda)")
    except ToolkitError as e:
        problems.append(str(e))
    _ninja_on_path()
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        problems.append("ninja is not installed (pip install ninja)")
    return "; ".join(problems) or None


def build_extension(*, quiet: bool = False) -> tuple[ModuleType | None, str]:
    """Compile the CUDA sources now with torch's JIT extension loader and ninja (or load the
    cached build), and load the result as ``kind_fast._C``: (module, "loaded") or (None, why not).
    One line on stderr says what is being built (unless ``quiet``)."""
    why = why_cannot_build()
    if why is not None:
        _state["result"] = (None, f"not built: {why}")
        return _state["result"]
    cached = _find_cached_build()
    if cached is not None:
        _state["result"] = _load_cached(cached)
        return _state["result"]
    import torch

    from kind_fast.ops._cuda_toolkit import find_cuda_home

    folder, home, archs = source_folder(), find_cuda_home(), _target_archs()
    build = cache_root() / f"{_build_key(folder)}-sm{_arch_key(archs)}"
    build.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print(f"kind_fast: building the CUDA extension kind_fast._C for torch {torch.__version__}, CUDA "
              f"{torch.version.cuda}, archs {archs} in {build} (once; a few minutes) ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    saved = {k: os.environ.get(k) for k in ("CUDA_HOME", "TORCH_CUDA_ARCH_LIST")}
    try:
        from torch.utils import cpp_extension

        os.environ.update(CUDA_HOME=home, TORCH_CUDA_ARCH_LIST=archs)
        cpp_extension.CUDA_HOME = home  # read once when the module was first imported
        # the module's init function is PyInit__C, so the library is named _C
        mod = cpp_extension.load(name="_C", sources=[str(p) for p in _sources(folder) if p.suffix in (".cu", ".cpp")],
                                 extra_include_paths=[str(folder)], extra_cflags=["-O3"],
                                 extra_cuda_cflags=["-O3", "-lineinfo"], build_directory=str(build), verbose=False)
        problem = _check_loaded(mod)
    except Exception as e:  # noqa: BLE001 - a failed build is a reason, never an ImportError
        mod, problem = None, f"{type(e).__name__}: {e}"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if problem is not None:
        reason = f"not built: the build in {build} failed: {problem}"
        warnings.warn(f"kind_fast: {reason}; falling back to the torch/Triton backends", RuntimeWarning, stacklevel=2)
        _state["result"] = (None, reason)
        return _state["result"]
    library = Path(mod.__file__).name
    meta = {"torch": torch.__version__, "cuda": torch.version.cuda, "archs": archs, "cuda_home": home,
            "sources": str(folder), "library": library, "seconds": round(time.perf_counter() - t0, 1),
            "built": time.strftime("%Y-%m-%d %H:%M:%S")}
    tmp = build / f".build.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(tmp, build / "build.json")  # written last: a folder without it is an unfinished build
    sys.modules["kind_fast._C"] = mod
    _state["origin"] = _ORIGINS["jit"].format(dir=build)
    _state["result"] = (mod, "loaded")
    return _state["result"]


# ----------------------------------------------------------------------------- `kind-fast build-ext`
def add_arguments(p) -> None:
    p.description = ("Compile the CUDA extension kind_fast._C from the sources this install ships, with torch's "
                     "extension loader and ninja, into a cache folder (once per torch, CUDA, architectures and "
                     "sources); later runs load it. Needs a CUDA-enabled torch, nvcc (CUDA_HOME) and ninja.")
    p.add_argument("--arch-list", default=None,
                   help="TORCH_CUDA_ARCH_LIST to build for (default: the visible GPUs', else 8.0;9.0)")


def run(args) -> int:
    if getattr(args, "arch_list", None):
        os.environ["TORCH_CUDA_ARCH_LIST"] = args.arch_list
    mod, why = load_extension(build=False)
    if mod is None and _state.get("missing"):
        mod, why = build_extension()
    if mod is None:
        print(f"kind-fast build-ext: the CUDA extension is {why}", file=sys.stderr)
        return 1
    print(f"kind_fast._C: {why}, {origin()}; archs {arch_names(getattr(mod, 'ARCH_LIST', '?'))}, "
          f"CUDA {getattr(mod, 'CUDA_VERSION', '?')}, torch {getattr(mod, 'TORCH_VERSION', '?')}")
    return 0
