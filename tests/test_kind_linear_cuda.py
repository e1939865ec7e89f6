"""The CUDA C++ backend (csrc/, kind_fast._C).

Three layers, so that a CPU-only machine checks as much as it can:

* CPU: the backend module, guarded loading, the setup.py switch, and the registry's "auto"
  rules (self-check gate, per-shape choice).
* CPU, emulated: csrc/'s kernels and launchers compiled as plain C++ (csrc/emulation/) and run
  on CPU tensors as ops ``kind_fast_emu::*``: the *same kernel source* against the reference
  (index math, masks, class lookup, both plans, reductions, determinism, device-side checks).
  Integer-valued inputs make fp16 arithmetic exact, so several checks are bit-for-bit.
* GPU (skipped without a GPU and the built extension): the real ops against the reference for
  every output and gradient, graphs, compile, opcheck, determinism, path M3.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch

import kind_fast as kf
from kind_fast.ops import kind_linear_cuda as cuda_backend
from kind_fast.ops.kind_linear import (
    kind_linear_backward_fake,
    kind_linear_backward_ref,
    kind_linear_fake,
    kind_linear_ref,
)
from kind_fast.ops.kind_linear_merged import (
    kind_linear_merged_gemm_backward_fake,
    kind_linear_merged_gemm_backward_ref,
    kind_linear_merged_gemm_fake,
    kind_linear_merged_gemm_ref,
    kind_linear_merged_gemm_setup_context,
    make_kind_linear_merged_gemm_backward,
)
from kind_fast.testing import ATOL_FLOOR, DISTRIBUTIONS, GATE_KINDS, assert_close_to_oracle, make_gate, make_labels

ROOT = Path(__file__).resolve().parents[1]
ORDER = ("x", "w_g", "bias", "u_t", "sigma_t", "v_t", "idx", "val", "labels")
BWD_ORDER = ("x", "w_g", "u_t", "sigma_t", "v_t", "idx", "val", "labels")
GRAD_NAMES = ("dx", "dw_g", "dbias", "du_t", "dsigma_t", "dv_t", "dval")
HALF = (torch.float16, torch.bfloat16)


# =====================================================================================
# Problems and the comparison rule
# =====================================================================================
def make_problem(n_in, n_out, n_t, k, b, t, *, dtype, device="cpu", gate_kind="random_k", dist="uniform",
                 classes=6, seed=0, bias=True, integer=False):
    """Inputs of the op (x, w_g, ... labels) and a grad_y; ``integer`` draws small integers (and
    σ·val in {±0.5, ±1, ±2}) so that every fp16 product and sum below is exact."""
    g = torch.Generator().manual_seed(seed)
    gate = make_gate(gate_kind, classes, n_t, k if gate_kind != "all_on" else n_t, seed=seed)
    idx, val = gate.compiled()
    labels = make_labels(dist, b, classes, generator=g)

    def r(*shape, scale=1.0):
        if integer:
            return torch.randint(-1, 2, shape, generator=g).double()
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    if integer:
        sigma = torch.randint(1, 3, (n_t,), generator=g).double()
        val = torch.where(val != 0, torch.tensor([-1.0, 0.5, 1.0])[torch.randint(0, 3, val.shape, generator=g)],
                          torch.zeros(()))
    else:
        sigma = torch.rand(n_t, generator=g, dtype=torch.float64) + 0.5
    args = dict(x=r(b * t, n_in), w_g=r(n_out, n_in, scale=n_in ** -0.5), bias=r(n_out) if bias else None,
                u_t=r(n_t, n_out, scale=n_out ** -0.5), v_t=r(n_t, n_in, scale=n_in ** -0.5))
    args = {kk: (v.to(device, dtype) if v is not None else None) for kk, v in args.items()}
    args.update(sigma_t=sigma.float().to(device), idx=idx.to(device), val=val.detach().float().to(device),
                labels=labels.to(device))
    grad_y = r(b * t, n_out).to(device, dtype)
    return args, grad_y


def run_op(ops, args, grad_y, mask=(True,) * 7):
    y, h = ops.kind_linear_cuda(*[args[k] for k in ORDER])
    grads = ops.kind_linear_cuda_backward(grad_y, *[args[k] for k in BWD_ORDER], h, list(mask))
    return (y, h, *grads)


def reference(args, grad_y, dtype_of_ref, mask=(True,) * 7):
    """The reference (forward then backward) with floating inputs cast to ``dtype_of_ref``."""
    cast = {k: (v.to(dtype_of_ref) if k in ("x", "w_g", "bias", "u_t", "v_t") and v is not None else v)
            for k, v in args.items()}
    if dtype_of_ref == torch.float64:
        cast.update(sigma_t=args["sigma_t"].double(), val=args["val"].double())
    y, h = kind_linear_ref(*[cast[k] for k in ORDER])
    grads = kind_linear_backward_ref(grad_y.to(dtype_of_ref), *[cast[k] for k in BWD_ORDER], h, list(mask))
    return (y, h, *grads)


def assert_matches_reference(got, args, grad_y, dtype, what=""):
    """Every output within FlashAttention's rule: |got - oracle| <= 2·|torch_lowp - oracle| + floor,
    oracle = the reference in float32 on the same (rounded) inputs."""
    oracle = reference(args, grad_y, torch.float32)
    lowp = reference(args, grad_y, dtype)
    for name, a, o, lp in zip(("y", "h") + GRAD_NAMES, got, oracle, lowp):
        assert a.shape == o.shape, f"{what} {name}: shape {tuple(a.shape)} != {tuple(o.shape)}"
        assert a.dtype == lp.dtype, f"{what} {name}: dtype {a.dtype} != reference's {lp.dtype}"
        if o.numel() == 0:
            continue
        a64, o64 = a.double().cpu(), o.double().cpu()
        err = (a64 - o64).abs().max().item()
        base = (lp.double().cpu() - o64).abs().max().item()
        bound = 2 * base + ATOL_FLOOR[dtype] * max(1.0, o64.abs().max().item())
        assert err <= bound, f"{what} {name}: max error {err:.3e} > bound {bound:.3e} (torch's own {base:.3e})"


# =====================================================================================
# CPU: backend module, loading, registry
# =====================================================================================
def test_backend_module_protocol():
    assert cuda_backend.supports("cuda", torch.bfloat16) and cuda_backend.supports("cuda", torch.float16)
    assert not cuda_backend.supports("cuda", torch.float32) and not cuda_backend.supports("cpu", torch.bfloat16)
    assert not cuda_backend.auto_ready("cpu", torch.bfloat16)
    ok, why = cuda_backend.status()
    assert isinstance(ok, bool) and why


def test_status_says_why_when_not_built():
    from kind_fast.ops._ext import load_extension

    if load_extension()[0] is not None:
        pytest.skip("the extension is built here")
    ok, why = cuda_backend.status()
    assert not ok and "not built" in why and "README" in why
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available: compiled extension not built"):
        kf.set_backend("cuda")
    with pytest.raises(RuntimeError, match="CUDA backend is not available"):
        cuda_backend.OP  # noqa: B018


def test_disable_switch_and_info(tmp_path):
    env = dict(os.environ, KIND_FAST_DISABLE_CUDA_EXT="1")
    r = subprocess.run([sys.executable, "-m", "kind_fast.info"], capture_output=True, text=True, env=env,
                       timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "disabled by KIND_FAST_DISABLE_CUDA_EXT=1" in r.stdout
    assert "cuda" in r.stdout and "unavailable" in r.stdout
    # what the backend is for, and where auto would use its M1
    assert "cross-checking and comparing M1" in r.stdout and "path M3 for sampling on cuBLAS" in r.stdout
    assert "DiT-XL/2.fc2" in r.stdout and "auto M1" in r.stdout


def test_broken_extension_is_one_warning_not_an_import_error(monkeypatch):
    import importlib
    import importlib.util

    from kind_fast.ops import _ext
    real_find, real_import = importlib.util.find_spec, importlib.import_module

    def find_spec(name, *a, **k):
        return object() if name == "kind_fast._C" else real_find(name, *a, **k)

    def import_module(name, *a, **k):
        if name == "kind_fast._C":
            raise OSError("libcudart.so.13: cannot open shared object file")
        return real_import(name, *a, **k)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(importlib, "import_module", import_module)
    monkeypatch.setattr(_ext, "_state", {})
    # (a checkout where scripts/cuda_build_check.sh ran holds a _build_info.py for another torch)
    monkeypatch.setattr(_ext, "_check_build_info", lambda: None)
    with pytest.warns(RuntimeWarning, match="unusable: OSError: libcudart") as rec:
        mod, why = _ext.load_extension()
        again = _ext.load_extension()  # cached: no second warning
    assert mod is None and "unusable" in why and again == (None, why)
    assert len([w for w in rec if issubclass(w.category, RuntimeWarning)]) == 1


def test_jit_switch_without_cuda_torch_says_why(monkeypatch):
    import importlib.util

    from kind_fast.ops import _ext
    if torch.version.cuda is not None:
        pytest.skip("this torch could JIT-build the extension")
    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "kind_fast._C" else real_find(name, *a, **k))
    monkeypatch.setattr(_ext, "_state", {})
    monkeypatch.setenv("KIND_FAST_CUDA_JIT", "1")
    mod, why = _ext.load_extension()
    assert mod is None and "not built: it needs a CUDA-enabled torch" in why


def test_extension_built_for_another_torch_is_refused(monkeypatch):
    import types

    from kind_fast.ops import _ext
    fake = types.SimpleNamespace(TORCH_VERSION="1.0.0")
    assert "built against torch 1.0.0" in _ext._check_loaded(fake)


def _setup_decisions(envs: list[dict]) -> list[dict]:
    """setup.py's decision for each environment, computed in one subprocess (importing setup.py
    does not run setup(); build_decision takes the environment as a mapping)."""
    code = textwrap.dedent(f"""
        import importlib.util, json, os, sys
        spec = importlib.util.spec_from_file_location("kind_fast_setup", {str(ROOT / 'setup.py')!r})
        setup = importlib.util.module_from_spec(spec); spec.loader.exec_module(setup)
        outs = []
        for env in json.loads(sys.stdin.read()):
            out = {{"sources": setup.cuda_sources()}}
            try:
                out["decision"] = list(setup.build_decision({{**os.environ, **env}}))
            except Exception as e:
                out["error"] = [type(e).__name__, str(e)]
            outs.append(out)
        print(json.dumps(outs))
    """)
    r = subprocess.run([sys.executable, "-c", code], input=json.dumps(envs), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_setup_switch():
    auto, off, bad, forced = _setup_decisions([{}, {"KIND_FAST_BUILD_CUDA": "0"}, {"KIND_FAST_BUILD_CUDA": "yes"},
                                               {"KIND_FAST_BUILD_CUDA": "1"}])
    srcs = auto["sources"]
    assert "csrc/kind_linear_cuda.cu" in srcs and "csrc/module.cpp" in srcs
    assert not any("emulation" in s for s in srcs), "the emulated test build must not be compiled into _C"
    assert off["decision"][0] is False and "KIND_FAST_BUILD_CUDA=0" in off["decision"][1]
    assert bad["error"][0] == "ValueError"
    if torch.version.cuda is None:  # this torch cannot build it: auto skips, forcing fails clearly
        assert auto["decision"][0] is False and "has no CUDA support" in auto["decision"][1]
        assert forced["error"][0] == "RuntimeError"
        assert "KIND_FAST_BUILD_CUDA=1 but the CUDA extension cannot be built" in forced["error"][1]
        assert "no CUDA support" in forced["error"][1]


def _load_setup_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("kind_fast_setup", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_setup_finds_the_toolkit_not_a_wrapper_folder(tmp_path):
    setup = _load_setup_module()
    tk = tmp_path / "cuda-13.0"
    for f in ("bin/nvcc", "include/cuda_runtime_api.h", "lib64/libcudart.so"):
        (tk / f).parent.mkdir(parents=True, exist_ok=True)
        (tk / f).write_text("")
    wrap = tmp_path / "usr" / "bin"
    (tmp_path / "usr" / "lib").mkdir(parents=True)  # the wrapper's parent has a lib/, but is no toolkit
    wrap.mkdir(parents=True)
    (wrap / "nvcc").write_text(f'#!/bin/sh\nexec {tk}/bin/nvcc "$@"\n')
    (wrap / "nvcc").chmod(0o755)
    assert setup.find_cuda_home({"PATH": str(wrap)}) == str(tk)
    # an explicit CUDA_HOME that is no toolkit is an error naming the folder, never replaced by nvcc's
    with pytest.raises(setup.ToolkitError, match=rf"CUDA_HOME={tmp_path / 'usr'} is not a CUDA toolkit folder "
                                                 r"\(it has no include/cuda_runtime_api.h\)"):
        setup.find_cuda_home({"PATH": str(wrap), "CUDA_HOME": str(tmp_path / "usr")})
    with pytest.raises(setup.ToolkitError, match="CUDA_PATH=/nonexistent/cuda is not a CUDA toolkit folder"):
        setup.find_cuda_home({"PATH": str(wrap), "CUDA_PATH": "/nonexistent/cuda"})
    assert setup.find_cuda_home({"PATH": "", "CUDA_HOME": str(tk)}) == str(tk)
    assert setup.arch_list({"TORCH_CUDA_ARCH_LIST": "9.0"}) == "9.0"
    assert setup.arch_list({}, gpu_visible=False) == "8.0;9.0"
    assert setup.arch_list({}, gpu_visible=True) is None


def test_setup_refuses_a_cuda_home_that_is_no_toolkit(monkeypatch, tmp_path):
    """With a CUDA torch, a CUDA_HOME without nvcc fails the install naming the folder (never a
    silent pure-Python install, never another toolkit); KIND_FAST_BUILD_CUDA=0 still installs."""
    import types

    setup = _load_setup_module()
    fake_torch = types.SimpleNamespace(__version__="2.14.1+cu130", version=types.SimpleNamespace(cuda="13.0"))
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    with pytest.raises(RuntimeError, match=rf"CUDA_HOME={tmp_path} is not a CUDA toolkit folder \(it has no "
                                           r"bin/nvcc\).*KIND_FAST_BUILD_CUDA=0"):
        setup.build_decision({"CUDA_HOME": str(tmp_path), "PATH": ""})
    assert setup.build_decision({"CUDA_HOME": str(tmp_path), "KIND_FAST_BUILD_CUDA": "0"})[0] is False


def _fake_cuda_torch(monkeypatch, caps):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(caps))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: caps[i])


def test_a_cached_build_is_found_by_torch_cuda_sources_and_the_gpus_arch(monkeypatch, tmp_path):
    from kind_fast.ops import _ext
    monkeypatch.setenv("KIND_FAST_CACHE_DIR", str(tmp_path))
    _fake_cuda_torch(monkeypatch, [(9, 0)])
    key = _ext._build_key(_ext.source_folder())
    assert key.startswith(f"torch{torch.__version__.replace('+', '_')}-cu13.0-src")
    build = _ext.cache_root() / f"{key}-sm80-90"
    build.mkdir(parents=True)
    (build / "_C.so").write_bytes(b"")
    assert _ext._find_cached_build() is None  # no build.json yet: an unfinished build
    (build / "build.json").write_text(json.dumps({"archs": "8.0;9.0", "library": "_C.so"}))
    assert _ext._find_cached_build() == build
    _fake_cuda_torch(monkeypatch, [(8, 6)])
    assert _ext._find_cached_build() is None  # sm_80/sm_90 code does not run on an sm_86 GPU
    _fake_cuda_torch(monkeypatch, [])
    assert _ext._find_cached_build() == build  # no GPU visible: any build will do
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    assert _ext._find_cached_build() is None  # another CUDA: another key
    # the key follows the sources: one changed byte is another build
    src = tmp_path / "src"
    src.mkdir()
    for p in _ext._sources(_ext.source_folder()):
        (src / p.name).write_bytes(p.read_bytes())
    before = _ext._digest(src)
    cu = next(src.glob("*.cu"))
    cu.write_bytes(cu.read_bytes() + b" ")
    assert _ext._digest(src) != before


def test_auto_never_builds_the_extension_an_explicit_request_does(monkeypatch):
    import importlib.util

    from kind_fast.ops import _ext
    calls = []
    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "kind_fast._C" else real_find(name, *a, **k))
    monkeypatch.setattr(_ext, "_state", {})
    monkeypatch.setattr(_ext, "_find_cached_build", lambda: None)
    monkeypatch.setattr(_ext, "build_extension", lambda **k: calls.append(1) or (None, "not built: the test's stub"))
    monkeypatch.setattr(cuda_backend, "_status", [])
    monkeypatch.delenv("KIND_FAST_CUDA_JIT", raising=False)
    monkeypatch.delenv("KIND_FAST_BACKEND", raising=False)
    assert _ext.load_extension() == (None, _ext.NOT_BUILT) and calls == []
    assert not cuda_backend.status()[0] and calls == []  # what "auto" asks before choosing
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available: compiled extension not built: the test"):
        kf.set_backend("cuda")  # use_backend("cuda") builds first
    assert calls == [1] and kf.current_backend() == "auto"
    monkeypatch.setattr(_ext, "_state", {})
    monkeypatch.setenv("KIND_FAST_BACKEND", "cuda")
    _ext.load_extension()
    assert calls == [1, 1]


def test_build_ext_command_says_why_it_cannot_build(tmp_path):
    if torch.version.cuda is not None:
        pytest.skip("this torch can build the extension (scripts/cuda_build_check.sh builds it)")
    env = dict(os.environ, CUDA_HOME="/nonexistent/cuda-13.0", KIND_FAST_CACHE_DIR=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "kind_fast", "build-ext"], capture_output=True, text=True, env=env,
                       timeout=300, cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "it needs a CUDA-enabled torch" in r.stderr
    assert "CUDA_HOME=/nonexistent/cuda-13.0 is not a CUDA toolkit folder (it does not exist)" in r.stderr
    r = subprocess.run([sys.executable, "-m", "kind_fast.info"], capture_output=True, text=True, env=env,
                       timeout=300, cwd=tmp_path)
    assert "kind-fast build-ext" in r.stdout and "cannot build it here" in r.stdout, r.stdout


def _fake_backend(ready: bool, op_name: str):
    import types

    calls = []
    mod = types.SimpleNamespace(
        status=lambda: (True, "fake"), supports=lambda dt, dtype: dt == "cuda",
        auto_ready=lambda dt, dtype: (calls.append((dt, dtype)) or ready), OP=op_name)
    return mod, calls


def test_auto_uses_cuda_only_after_its_self_check(monkeypatch):
    from kind_fast.ops import backends
    from kind_fast.ops.autoselect import PerShapeOp

    dev = torch.device("cuda")
    tri, _ = _fake_backend(True, "triton-op")
    cud, calls = _fake_backend(False, "cuda-op")
    monkeypatch.setattr(backends, "_MODULES", {"triton": (tri, ""), "cuda": (cud, "")})
    assert backends.resolve_backend(dev, torch.bfloat16) == "triton"
    assert backends.resolve_op(dev, torch.bfloat16) == "triton-op"
    assert calls, "auto must ask the CUDA backend whether it passed its self-check"
    monkeypatch.setattr(backends, "_MODULES", {"triton": (None, "missing"), "cuda": (cud, "")})
    assert backends.resolve_backend(dev, torch.bfloat16) == "torch"  # not checked: not used
    cud2, _ = _fake_backend(True, "cuda-op")
    monkeypatch.setattr(backends, "_MODULES", {"triton": (tri, ""), "cuda": (cud2, "")})
    op = backends.resolve_op(dev, torch.bfloat16)
    assert isinstance(op, PerShapeOp) and op.names == ("triton", "cuda")
    with kf.use_backend("cuda"):  # explicit: no gate
        cud3, calls3 = _fake_backend(False, "cuda-op")
        monkeypatch.setattr(backends, "_MODULES", {"triton": (tri, ""), "cuda": (cud3, "")})
        assert backends.resolve_op(dev, torch.bfloat16) == "cuda-op" and not calls3
    assert backends.resolve_backend(torch.device("cpu"), torch.bfloat16) == "torch"


def test_per_shape_choice_without_timing(monkeypatch):
    from kind_fast.ops import autoselect
    monkeypatch.setenv("KIND_FAST_AUTOTUNE", "0")
    autoselect.clear_cache()
    seen = []
    op = autoselect.PerShapeOp(("a", "b"), (lambda *a: seen.append("a") or "A", lambda *a: seen.append("b") or "B"))
    args, _ = make_problem(8, 8, 4, 2, 2, 3, dtype=torch.float32)
    assert op(*[args[k] for k in ORDER]) == "A" and seen == ["a"]  # no timing: first in AUTO_ORDER
    assert autoselect.cached_choices() == {}
    key = autoselect.shape_key([args[k] for k in ORDER], needs_grad=False)
    assert key[2] == 8 and key[7] == 4  # M = 6 and T = 3 bucketed to powers of two
    autoselect._CACHE[key + (("a", "b"),)] = "b"
    assert op(*[args[k] for k in ORDER]) == "B"  # a measured choice is used


# =====================================================================================
# CPU: the cost model and auto's per-shape gate (docs/design.md §6)
# =====================================================================================
def _count_aten_ops(fn) -> int:
    """Kernel-launching ATen ops that ``fn`` runs (views and allocations excluded)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    free = {"view", "reshape", "t", "transpose", "unsqueeze", "_unsafe_view", "expand", "select", "slice", "alias",
            "detach", "as_strided", "squeeze", "permute", "empty", "new_empty", "empty_like", "lift_fresh"}

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.split(".")[0] not in free:
                Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


@pytest.mark.parametrize("t", [64, 3], ids=["sample-plan", "row-plan"])
def test_model_counts_the_reference_launches(t):
    """The model's launch counts for the reference are those of the reference as it runs."""
    n_in, n_out, n_t, k, b = 40, 72, 16, 6, 4
    args, grad_y = make_problem(n_in, n_out, n_t, k, b, t, dtype=torch.bfloat16, seed=1)
    a = [args[kk] for kk in ORDER]
    y, h = kind_linear_ref(*a)
    bwd = [args[kk] for kk in BWD_ORDER]
    counted = {"forward": _count_aten_ops(lambda: kind_linear_ref(*a))}
    for mode, mask in (("transfer", [True, False, False, True, True, True, False]), ("pretrain", [True] * 6 + [False])):
        counted[mode] = counted["forward"] + _count_aten_ops(
            lambda mask=mask: kind_linear_backward_ref(grad_y, *bwd, h, mask))
    for mode, n in counted.items():
        passes = cuda_backend.model_passes("reference", mode, b * t, b, n_in, n_out, n_t, k)
        assert sum(p[4] for p in passes) == n, f"{mode}: model {sum(p[4] for p in passes)} launches, ran {n}"


def test_model_justifies_the_backend_decision():
    """Why the CUDA backend is not the fast M1 (csrc/README.md): at every DiT-XL/2 layer and
    M = 8192 / 65536, neither its M1 nor the cuBLAS K-augmented design meets the forward goal
    1.10 × F.linear × (1 + K/in + K/out); path M3 with CFG groups comes close at large M."""
    d, n_t, k = 1152, 96, 32
    for n_in, n_out in ((d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)):
        goal = 1.10 * (1 + k / n_in + k / n_out)
        for m in (8192, 65536):
            b = m // 256
            lin = cuda_backend.modelled_time("linear", "forward", m, b, n_in, n_out, n_t, k)
            for impl in ("cuda", "k_augmented", "reference"):
                assert cuda_backend.modelled_time(impl, "forward", m, b, n_in, n_out, n_t, k) > goal * lin, impl
        m3 = cuda_backend.modelled_time("cuda_merged", "forward", 65536, 256, n_in, n_out, n_t, k)
        assert m3 < 1.10 * cuda_backend.modelled_time("linear", "forward", 65536, 256, n_in, n_out, n_t, k)
    assert "| DiT-XL/2.fc2 | 65536 |" in cuda_backend.cost_table_markdown()


def test_readme_shows_the_current_model_table():
    assert cuda_backend.cost_table_markdown() in (ROOT / "csrc" / "README.md").read_text(), (
        "csrc/README.md's cost table is stale: paste kind_fast.ops.kind_linear_cuda.cost_table_markdown()")


def test_auto_gate_follows_the_model():
    """auto runs the CUDA M1 only where its modelled time is at most the reference's: fewer
    launches win on small (launch-bound) layers, the assumed lower bandwidth of the hand-written
    kernels loses on large ones."""
    ok = cuda_backend.auto_shape_ok
    assert ok(512, 2, 384, 384, 96, 32, "forward") and ok(512, 2, 384, 384, 96, 32, "transfer")
    assert not ok(65536, 256, 1152, 4608, 96, 32, "forward")
    for args in ((512, 2, 384, 1536, 96, 32), (65536, 256, 4608, 1152, 96, 32), (8192, 32, 1152, 3456, 96, 32)):
        for mode in ("forward", "transfer", "pretrain"):
            cuda = cuda_backend.modelled_time("cuda", mode, *args)
            ref = cuda_backend.modelled_time("reference", mode, *args)
            assert ok(*args, mode) == (cuda <= ref)


def test_auto_op_routes_by_the_gate(monkeypatch):
    """AUTO_OP calls the CUDA op where the gate allows and the reference op elsewhere, with
    the mode read from what needs gradients."""
    seen = []
    monkeypatch.setattr(cuda_backend, "_GATE_CACHE", {})

    def gate(m, b, n_in, n_out, n_t, k, mode):
        seen.append(mode)
        return mode == "transfer"

    monkeypatch.setattr(cuda_backend, "auto_shape_ok", gate)
    calls = []
    op = cuda_backend._AutoOp(fast=lambda *a: calls.append("cuda"), reference=lambda *a: calls.append("ref"))
    args, _ = make_problem(16, 24, 8, 3, 2, 5, dtype=torch.float32)
    a = [args[kk] for kk in ORDER]
    op(*a)
    a_t = list(a)
    a_t[0] = a[0].clone().requires_grad_(True)
    op(*a_t)
    a_p = list(a_t)
    a_p[1] = a[1].clone().requires_grad_(True)
    op(*a_p)
    with torch.no_grad():
        op(*a_p)
    assert seen == ["forward", "transfer", "pretrain"] and calls == ["ref", "cuda", "ref", "ref"]


# =====================================================================================
# CPU, emulated: the kernel source on the host
# =====================================================================================
@pytest.fixture(scope="module")
def emu():
    """torch.ops.kind_fast_emu: csrc/ compiled with g++ as plain C++ (about 15-60 s once)."""
    import hashlib

    from torch.utils.cpp_extension import load

    py = f"{sys.version_info[0]}{sys.version_info[1]}"
    tree = hashlib.sha1(str(ROOT).encode()).hexdigest()[:10]  # one build folder per checkout
    build = Path(tempfile.gettempdir()) / f"kind_fast_emu_{torch.__version__}_{py}_{tree}"
    build.mkdir(parents=True, exist_ok=True)
    load(name="kind_fast_emu", sources=[str(ROOT / "csrc" / "emulation" / "kind_fast_emu.cpp")],
         extra_include_paths=[str(ROOT / "csrc")], extra_cflags=["-O1"], build_directory=str(build),
         is_python_module=False, verbose=False)
    ops = torch.ops.kind_fast_emu
    for name, fake in (("kind_linear_cuda", kind_linear_fake),
                       ("kind_linear_cuda_backward", kind_linear_backward_fake),
                       ("kind_linear_cuda_merged", cuda_backend._fake_merged),
                       ("kind_linear_cuda_merged_gemm", kind_linear_merged_gemm_fake),
                       ("kind_linear_cuda_merged_gemm_backward", kind_linear_merged_gemm_backward_fake)):
        try:
            torch.library.register_fake(f"kind_fast_emu::{name}", fake)
        except RuntimeError:  # already registered (module re-run in one process)
            pass
    try:  # the autograd the real op gets in kind_linear_cuda._register
        torch.library.register_autograd(
            "kind_fast_emu::kind_linear_cuda_merged_gemm",
            make_kind_linear_merged_gemm_backward(ops.kind_linear_cuda_merged_gemm_backward),
            setup_context=kind_linear_merged_gemm_setup_context)
    except RuntimeError:
        pass
    return ops


# (in, out, N_T, K, B, T): the reference's odd shapes plus multi-tile ones: in > 32 (several
# depth steps), out > 64 (several column tiles), K > 32 (several slot tiles), T > 64 and
# T % 64 != 0 (several, partly masked row tiles per sample), depth > 512 with few rows (split-K)
EMU_SHAPES = [
    (37, 53, 11, 5, 4, 7),    # sample plan
    (37, 53, 11, 5, 6, 3),    # row plan (T < K)
    (24, 40, 8, 3, 5, 1),     # one row per sample
    (64, 33, 20, 20, 3, 9),   # K = N_T: row plan
    (70, 130, 40, 33, 2, 70),  # multi-tile everything, sample plan
    (19, 70, 13, 4, 2, 131),  # T prime, 3 row tiles per sample
    (600, 40, 12, 5, 2, 9),   # deep forward shrink: split over depth (split-K) and summed
    (40, 600, 12, 5, 2, 9),   # deep backward shrink (g·U_T[ids]ᵀ over 600 outputs): split-K
]


@pytest.mark.parametrize("shape", EMU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_emulated_exact_on_integers(emu, shape):
    """fp16 with small-integer inputs: the kernels' results are exact, so they must equal the
    float64 reference bit for bit; any index or mask error shows as a wrong integer."""
    n_in, n_out, n_t, k, b, t = shape
    args, grad_y = make_problem(n_in, n_out, n_t, k, b, t, dtype=torch.float16, integer=True, seed=sum(shape))
    got = run_op(emu, args, grad_y)
    ref = reference(args, grad_y, torch.float64)
    for name, a, r in zip(("y", "h") + GRAD_NAMES, got, ref):
        assert a.shape == r.shape, name
        assert torch.equal(a.double(), r.double()), f"{name}: max diff {(a.double() - r.double()).abs().max()}"


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("shape", EMU_SHAPES[:2] + EMU_SHAPES[4:5], ids=lambda s: "x".join(map(str, s)))
def test_emulated_matches_reference(emu, shape, dtype):
    n_in, n_out, n_t, k, b, t = shape
    args, grad_y = make_problem(n_in, n_out, n_t, k, b, t, dtype=dtype, seed=7)
    assert_matches_reference(run_op(emu, args, grad_y), args, grad_y, dtype, f"{shape} {dtype}")


@pytest.mark.parametrize("gate_kind", GATE_KINDS)
def test_emulated_gate_kinds(emu, gate_kind):
    args, grad_y = make_problem(40, 72, 16, 6, 4, 9, dtype=torch.bfloat16, gate_kind=gate_kind, seed=3)
    assert_matches_reference(run_op(emu, args, grad_y), args, grad_y, torch.bfloat16, gate_kind)


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_emulated_class_distributions(emu, dist):
    b = 7 if dist == "distinct" else 10
    args, grad_y = make_problem(24, 40, 16, 6, b, 8, dtype=torch.float16, gate_kind="block", dist=dist,
                                classes=8, integer=True, seed=11)
    got = run_op(emu, args, grad_y)
    for name, a, r in zip(("y", "h") + GRAD_NAMES, got, reference(args, grad_y, torch.float64)):
        assert torch.equal(a.double(), r.double()), f"{dist}: {name}"


@pytest.mark.parametrize("plan_t", [9, 2])
def test_emulated_output_mask_and_no_bias(emu, plan_t):
    args, grad_y = make_problem(24, 40, 12, 4, 3, plan_t, dtype=torch.float16, integer=True, bias=False)
    full = run_op(emu, args, grad_y)
    ref = reference(args, grad_y, torch.float64)
    assert torch.equal(full[0].double(), ref[0].double())
    for i in range(7):
        mask = [j == i for j in range(7)]
        out = run_op(emu, args, grad_y, mask)[2:]
        for j, t in enumerate(out):
            if j == i:
                assert torch.equal(t, full[2 + j]), f"{GRAD_NAMES[j]} alone"
            else:
                assert t.numel() == 0, f"{GRAD_NAMES[j]} computed although not requested"


def test_emulated_padding_and_repeated_ids(emu):
    """Padded slots (id 0, value 0) and a tailor listed twice in a row: duplicates are summed."""
    args, grad_y = make_problem(30, 50, 10, 6, 4, 12, dtype=torch.float16, integer=True, seed=5)
    idx, val = args["idx"].clone(), args["val"].clone()
    idx[0, 4:], val[0, 4:] = 0, 0.0
    idx[1, 1], val[1, 1] = idx[1, 0], 2.0
    args.update(idx=idx, val=val, labels=torch.tensor([0, 1, 1, 0]))
    for t_rows in (12, 2):  # both plans
        a = dict(args, x=args["x"][: 4 * t_rows])
        g = grad_y[: 4 * t_rows]
        got = run_op(emu, a, g)
        for name, x, r in zip(("y", "h") + GRAD_NAMES, got, reference(a, g, torch.float64)):
            assert torch.equal(x.double(), r.double()), f"T={t_rows}: {name}"


def test_emulated_deterministic(emu):
    args, grad_y = make_problem(70, 130, 40, 33, 2, 70, dtype=torch.bfloat16, seed=9, dist="zipf")
    a, b = run_op(emu, args, grad_y), run_op(emu, args, grad_y)
    for name, x, y in zip(("y", "h") + GRAD_NAMES, a, b):
        assert torch.equal(x, y), name


def test_emulated_empty_and_no_tailors(emu):
    args, grad_y = make_problem(16, 24, 8, 3, 2, 5, dtype=torch.float16)
    empty = dict(args, x=args["x"][:0], labels=args["labels"][:0])
    y, h = emu.kind_linear_cuda(*[empty[k] for k in ORDER])
    assert y.shape == (0, 24) and h.shape == (0, 3) and h.dtype == torch.float32
    no_k = dict(args, idx=args["idx"][:, :0], val=args["val"][:, :0])
    got = run_op(emu, no_k, grad_y)
    ref = reference(no_k, grad_y, torch.float32)
    assert got[1].shape == (10, 0)
    assert_matches_reference(got, no_k, grad_y, torch.float16, "K=0")
    assert torch.equal(got[0].float(), ref[0].half().float()) or (got[0].float() - ref[0]).abs().max() < 1e-2


def test_emulated_checks(emu):
    args, grad_y = make_problem(16, 24, 8, 3, 2, 5, dtype=torch.float16)

    def call(**over):
        a = dict(args, **over)
        return emu.kind_linear_cuda(*[a[k] for k in ORDER])

    with pytest.raises(RuntimeError, match="labels out of range"):
        call(labels=torch.tensor([0, 7]))
    with pytest.raises(RuntimeError, match="tailor id outside"):
        bad = args["idx"].clone()
        bad[2, 1] = 8
        call(idx=bad)
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        call(x=args["x"].float(), w_g=args["w_g"].float(), u_t=args["u_t"].float(), v_t=args["v_t"].float(),
             bias=args["bias"].float())
    with pytest.raises(RuntimeError, match="w_g must be"):
        call(w_g=args["w_g"][:, :5])
    with pytest.raises(RuntimeError, match="not a multiple of the 3 samples"):
        call(labels=torch.tensor([0, 1, 2]))
    with pytest.raises(RuntimeError, match="output_mask must have 7"):
        emu.kind_linear_cuda_backward(grad_y, *[args[k] for k in BWD_ORDER],
                                      torch.zeros(10, 3), [True] * 6)


def test_emulated_opcheck(emu):
    """The fake kernels registered for the real ops describe what the kernels return."""
    args, grad_y = make_problem(16, 24, 8, 3, 2, 5, dtype=torch.float16)
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(emu.kind_linear_cuda, tuple(args[k] for k in ORDER), test_utils=utils)
    _, h = emu.kind_linear_cuda(*[args[k] for k in ORDER])
    for mask in ([True] * 7, [True, False, False, True, True, True, False]):
        torch.library.opcheck(emu.kind_linear_cuda_backward,
                              (grad_y, *[args[k] for k in BWD_ORDER], h, mask), test_utils=utils)
    torch.library.opcheck(emu.kind_linear_cuda_merged, (*[args[k] for k in ORDER], 2), test_utils=utils)


@pytest.mark.parametrize("dist,max_classes", [("cfg", 2), ("uniform", 2), ("same", 1), ("distinct", 8)])
def test_emulated_merged_path(emu, dist, max_classes):
    """Path M3: merged weights for up to max_classes classes, M1 for the others; exact on
    integers whether a sample got a merged weight or not."""
    b = 6
    args, _ = make_problem(40, 72, 16, 6, b, 9, dtype=torch.float16, gate_kind="random_k", dist=dist,
                           classes=6, integer=True, seed=13)
    y = emu.kind_linear_cuda_merged(*[args[k] for k in ORDER], max_classes)
    ref = reference(args, torch.zeros(b * 9, 72, dtype=torch.float16), torch.float64)[0]
    assert torch.equal(y.double(), ref), (y.double() - ref).abs().max()
    no_bias = dict(args, bias=None)
    y2 = emu.kind_linear_cuda_merged(*[no_bias[k] for k in ORDER], max_classes)
    assert torch.equal(y2.double(), ref - args["bias"].double())


# (labels, max_classes): CFG halves (no correction), runs shorter than a group, interleaved
# classes, B not divisible by max_classes (fewer, larger groups), one sample per group,
# max_classes > B, and a single group with every other class corrected
MERGED_LAYOUTS = [
    ([2, 2, 2, 6, 6, 6], 2),
    ([1, 1, 3, 3, 6, 6], 2),
    ([0, 6, 0, 6, 0, 6], 2),
    ([4, 4, 4, 4, 6, 6], 4),
    ([5, 1, 6, 0, 2, 3], 6),
    ([3, 3, 6, 6, 1, 1], 9),
    ([0, 1, 2, 3, 4, 6], 1),
]


@pytest.mark.parametrize("labels,max_classes", MERGED_LAYOUTS, ids=lambda v: str(v).replace(" ", ""))
@pytest.mark.parametrize("shape", [(40, 72, 16, 6, 9), (37, 53, 11, 5, 70)], ids=["vec", "odd"])
def test_emulated_merged_groups_and_corrections(emu, shape, labels, max_classes):
    """Path M3 on cuBLAS: merged weights per group of samples, a rank-2K correction for the
    samples whose class differs from their group's. Exact on integers for every layout, in the
    16-byte-vector kernels (widths multiple of 8) and the element-wise ones (odd widths)."""
    from kind_fast.ops.kind_linear_cuda import merged_groups

    n_in, n_out, n_t, k, t = shape
    b = len(labels)
    assert b % merged_groups(b, max_classes) == 0
    args, _ = make_problem(n_in, n_out, n_t, k, b, t, dtype=torch.float16, integer=True, classes=6, seed=21)
    args["labels"] = torch.tensor(labels)
    y = emu.kind_linear_cuda_merged(*[args[kk] for kk in ORDER], max_classes)
    ref = reference(args, torch.zeros(b * t, n_out, dtype=torch.float16), torch.float64)[0]
    assert torch.equal(y.double(), ref), (y.double() - ref).abs().max()


def test_merged_groups_rule():
    from kind_fast.ops.kind_linear_cuda import merged_groups

    assert [merged_groups(6, m) for m in (1, 2, 3, 4, 5, 6, 7)] == [1, 2, 3, 3, 3, 6, 6]
    assert merged_groups(32, 2) == 2 and merged_groups(7, 2) == 1 and merged_groups(1, 4) == 1


def test_emulated_misaligned_rows_take_the_elementwise_kernels(emu):
    """Widths that allow 16-byte vectors but tensors that start 2 bytes off a 16-byte boundary
    (views with a storage offset): the launchers must pick the element-wise kernels (the
    emulated cp.async and vector loads check alignment and would fail the launch)."""
    args, grad_y = make_problem(40, 72, 16, 6, 4, 9, dtype=torch.float16, integer=True, seed=23)
    shifted = {}
    for kk in ("x", "w_g", "u_t", "v_t"):
        v = args[kk]
        buf = torch.empty(v.numel() + 1, dtype=v.dtype)
        buf[1:] = v.reshape(-1)
        shifted[kk] = buf[1:].view(v.shape)
        assert shifted[kk].data_ptr() % 16 != 0
    a = dict(args, **shifted)
    got = run_op(emu, a, grad_y)
    for name, x, r in zip(("y", "h") + GRAD_NAMES, got, reference(args, grad_y, torch.float64)):
        assert torch.equal(x.double(), r.double()), name
    y = emu.kind_linear_cuda_merged(*[a[kk] for kk in ORDER], 2)
    assert torch.equal(y.double(), reference(args, grad_y, torch.float64)[0])


# ---- path M3's segmented GEMM on cuBLAS (kind_linear_cuda_merged_gemm, cached merged weights)
# slot layouts (one slot per sample): CFG halves (one run per slot: row slices, no copy), a slot
# split over several runs (host plan: gather into slot order), interleaved, one slot, a slot
# with no sample, one sample per slot
SLOT_LAYOUTS = [[0, 0, 0, 1, 1, 1], [1, 1, 0, 0, 1, 2], [0, 1, 0, 1, 0, 1], [2, 2, 2, 2, 2, 2], [0, 0, 2, 2, 2, 0],
                [3, 1, 0, 2, 4, 5]]
PLANS = {"host": 0, "host_runs": 1, "device": 2}


def merged_gemm_problem(slots, n_in=40, n_out=72, t=9, n_slots=None, dtype=torch.float16, seed=0):
    """x (B·T, in), weights (S, out, in), bias, slots (B,), grad_y: small integers (fp16-exact)."""
    g = torch.Generator().manual_seed(seed)
    b, s = len(slots), n_slots or max(slots) + 1

    def r(*shape):
        return torch.randint(-3, 4, shape, generator=g).to(dtype)

    return r(b * t, n_in), r(s, n_out, n_in), r(n_out), torch.tensor(slots), r(b * t, n_out)


def merged_gemm_call(emu, plan, x, w, bias, slots):
    if plan == "op":
        return emu.kind_linear_cuda_merged_gemm(x, w, bias, slots)
    return emu.kind_linear_cuda_merged_gemm_plan(x, w, bias, slots, PLANS[plan])


def merged_gemm_backward_call(emu, plan, g, x, w, slots, mask):
    if plan == "op":
        return emu.kind_linear_cuda_merged_gemm_backward(g, x, w, slots, mask)
    return emu.kind_linear_cuda_merged_gemm_backward_plan(g, x, w, slots, mask, PLANS[plan])


@pytest.mark.parametrize("slots", SLOT_LAYOUTS, ids=lambda v: "".join(map(str, v)))
@pytest.mark.parametrize("plan", ["op", "host_runs", "device"])
def test_emulated_merged_gemm_exact(emu, plan, slots):
    """y = x·W[slot]ᵀ + b and (dx, dW, db), bit-for-bit against the reference in float64 on
    integers, for every plan (the registered op takes the host plan here: CPU slots) and
    layout, with and without bias, for every output mask."""
    x, w, bias, sl, g = merged_gemm_problem(slots, n_slots=max(slots) + 2)  # the last slot: no sample
    xd, wd, bd, gd = (t.double() for t in (x, w, bias, g))
    for b_, bd_ in ((bias, bd), (None, None)):
        y = merged_gemm_call(emu, plan, x, w, b_, sl)
        want = kind_linear_merged_gemm_ref(xd, wd, bd_, sl)
        assert y.dtype == x.dtype and torch.equal(y.double(), want), (y.double() - want).abs().max()
    for mask in ([True, True, True], [True, False, False], [False, True, True], [False, False, True]):
        got = merged_gemm_backward_call(emu, plan, g, x, w, sl, mask)
        want = kind_linear_merged_gemm_backward_ref(gd, xd, wd, sl, mask)
        for name, a, r, need in zip(("dx", "dweights", "dbias"), got, want, mask):
            assert a.numel() == 0 if not need else torch.equal(a.double(), r), (name, mask)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_emulated_merged_gemm_random_inputs_and_autograd(emu, dtype):
    """Random inputs within the reference's rounding, and gradients through the registered
    autograd (the emulated op gets the real op's) equal the reference's autograd."""
    gen = torch.Generator().manual_seed(5)
    slots = torch.tensor([1, 1, 0, 0, 0, 1, 2])
    x = torch.randn(7 * 13, 48, generator=gen).to(dtype)
    w = (torch.randn(3, 56, 48, generator=gen) * 48 ** -0.5).to(dtype)
    bias = torch.randn(56, generator=gen).to(dtype)
    g = torch.randn(7 * 13, 56, generator=gen).to(dtype)
    leaves = [t.clone().requires_grad_(True) for t in (x, w, bias)]
    y = emu.kind_linear_cuda_merged_gemm(*leaves, slots)
    grads = torch.autograd.grad(y, leaves, g)
    oracle = [t.double().requires_grad_(True) for t in (x, w, bias)]
    y_o = kind_linear_merged_gemm_ref(*oracle, slots)
    grads_o = torch.autograd.grad(y_o, oracle, g.double())
    low = [t.clone().requires_grad_(True) for t in (x, w, bias)]
    y_l = kind_linear_merged_gemm_ref(*low, slots)
    grads_l = torch.autograd.grad(y_l, low, g)
    for name, a, o, l_ in zip(("y", "dx", "dweights", "dbias"), (y, *grads), (y_o, *grads_o), (y_l, *grads_l)):
        err, base = (a.double() - o).abs().max().item(), (l_.double() - o).abs().max().item()
        assert err <= 2 * base + ATOL_FLOOR[dtype] * max(1.0, o.abs().max().item()), (name, err, base)


def test_emulated_merged_gemm_checks_and_opcheck(emu):
    x, w, bias, sl, g = merged_gemm_problem([0, 1, 1], n_slots=2)
    with pytest.raises(RuntimeError, match="slots out of range: sample 1 has slot 2"):
        emu.kind_linear_cuda_merged_gemm(x, w, bias, torch.tensor([0, 2, 1]))
    for bad, ws in ((torch.tensor([0, -1, 1]), w), (torch.tensor([0, 1, 0]), w[:1])):  # device plan: asserted
        with pytest.raises(RuntimeError, match="slots out of range"):
            emu.kind_linear_cuda_merged_gemm_plan(x, ws, bias, bad, 2)
    with pytest.raises(RuntimeError, match="not a multiple of the 2 samples"):
        emu.kind_linear_cuda_merged_gemm(x, w, bias, torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="weights must be"):
        emu.kind_linear_cuda_merged_gemm(x, w[:, :, :5], bias, sl)
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        emu.kind_linear_cuda_merged_gemm(x.float(), w.float(), bias.float(), sl)
    with pytest.raises(RuntimeError, match="bias must be"):
        emu.kind_linear_cuda_merged_gemm(x, w, bias[:3], sl)
    with pytest.raises(RuntimeError, match="int32 or int64"):
        emu.kind_linear_cuda_merged_gemm(x, w, bias, sl.float())
    with pytest.raises(RuntimeError, match="output_mask must have 3"):
        emu.kind_linear_cuda_merged_gemm_backward(g, x, w, sl, [True, True])
    empty = emu.kind_linear_cuda_merged_gemm(x[:0], w, bias, sl[:0])
    assert empty.shape == (0, 72)
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(emu.kind_linear_cuda_merged_gemm, (x, w, bias, sl.int()), test_utils=utils)
    for mask in ([True, True, True], [False, True, False]):
        torch.library.opcheck(emu.kind_linear_cuda_merged_gemm_backward, (g, x, w, sl, mask), test_utils=utils)


def test_cuda_backend_declares_its_m3_ops():
    """What the op family reads from this backend module (kind_fast.ops.backends.backend_module)."""
    assert cuda_backend.MERGED_GEMM_HOST_SLOTS is True
    assert {"MERGED_GEMM_OP", "MERGED_GEMM_BACKWARD_OP", "MERGED_OP"} <= set(cuda_backend._OP_ATTRS)
    from kind_fast.ops._ext import EXPECTED_OPS

    assert set(cuda_backend._OP_ATTRS.values()) == set(EXPECTED_OPS) == set(cuda_backend.OP_NAMES)


# ---- the op family's side: host slots, the cost model, a layer's M3 on this backend
def test_host_slots_read_once_per_labels_tensor():
    from kind_fast.ops.paths import host_slots

    labels = torch.tensor([3, 3, 6, 1, 6])
    a = host_slots(labels, (1, 3, 6))
    assert a.tolist() == [1, 1, 2, 0, 2] and a.device.type == "cpu" and a.dtype == torch.int64
    assert host_slots(labels, (1, 3, 6)) is a  # cached: not read again
    assert host_slots(labels, (1, 3, 6, 8)) is not a  # other served classes: other slots
    labels[0] = 1  # a write bumps the version: read again
    assert host_slots(labels, (1, 3, 6)).tolist() == [0, 1, 2, 0, 2]
    with pytest.raises(ValueError, match=r"classes \[2, 9\] outside the declared served classes \[1, 3, 6\]"):
        host_slots(torch.tensor([1, 2, 9]), (1, 3, 6))
    with torch.inference_mode():
        assert host_slots(torch.tensor([1, 3]), (1, 3)) is None  # no version counter: never cached
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        assert host_slots(torch.tensor([1, 3]), (1, 3)) is None


def test_cost_model_charges_the_cuda_backend_a_dense_layer_for_m3():
    """M3 on cached weights costs the CUDA backend one GEMM per run of samples (host slots), not
    S GEMMs over all rows: the CFG sampling batch of DiT-XL/2 takes M3 there, as on Triton."""
    from kind_fast.ops.paths import choose_path, path_costs

    cfg = dict(samples=64, distinct_classes=2, training=False, merged_cached=True, learngene_rank=1056)
    for n_in, n_out in ((1152, 1152), (1152, 4608), (4608, 1152)):
        for backend in ("triton", "cuda"):
            c = choose_path(16384, n_in, n_out, 32, 96, backend=backend, **cfg)
            assert c.path == "M3" and c.flop_ratio == pytest.approx(1.0), (backend, n_in, n_out)
    costs = path_costs(16384, 1152, 4608, 32, 96, backend="cuda", **cfg)
    assert costs["M3"][1] == 2 * 16384 * 1152 * 4608
    # the reference on a GPU still multiplies every slot's weight
    assert path_costs(16384, 1152, 4608, 32, 96, backend="torch", device_type="cuda", **cfg)["M3"][1] == \
        2 * costs["M3"][1]


@pytest.fixture
def emulated_cuda_backend(emu, monkeypatch):
    """The registry's "cuda" backend replaced by one whose M3 segmented GEMM is the emulated
    kind_linear_cuda_merged_gemm on CPU fp16/bf16 tensors (M1: the reference op); records the
    slots each M3 call got."""
    import types

    from kind_fast.ops import backends
    seen = []

    def gemm(x, weights, bias, slots):
        seen.append(slots)
        return emu.kind_linear_cuda_merged_gemm(x, weights, bias, slots)

    mod = types.SimpleNamespace(
        status=lambda: (True, "emulated"), supports=lambda dt, dtype: dt == "cpu" and dtype in HALF,
        OP=torch.ops.kind_fast.kind_linear, MERGED_GEMM_OP=gemm, MERGED_GEMM_HOST_SLOTS=True)
    monkeypatch.setitem(backends._MODULES, "cuda", (mod, ""))
    return seen


def test_layer_m3_on_the_cuda_backend_emulated(emulated_cuda_backend):
    """FastKindLinear in eval with its classes declared: the op family picks M3 on the CUDA
    backend, merges once, hands the segmented GEMM host slots, and matches path M0."""
    from kind_fast.ops.paths import force_path, record_paths

    torch.manual_seed(0)
    gate = make_gate("random_k", 6, 16, 5)
    layer = kf.FastKindLinear(40, 56, tailor_rank=16, gate=gate).to(torch.float16).eval()
    x = torch.randn(6, 9, 40).to(torch.float16)
    labels = torch.tensor([3, 3, 3, 6, 6, 6])  # CFG: class 3 and the null class 6
    with torch.no_grad():
        with kf.use_backend("torch"), force_path("M0"):
            ref = layer(x, labels=labels).double()
        with kf.use_backend("cuda"), gate.serving([3, 6]), record_paths() as calls:
            y1 = layer(x, labels=labels)
            y2 = layer(x, labels=labels)
    assert [(c["path"], c["backend"]) for c in calls] == [("M3", "cuda")] * 2
    assert layer.merged_cache.builds == 1 and layer.merged_cache.hits >= 1
    assert len(emulated_cuda_backend) == 2
    assert all(s.device.type == "cpu" and s.tolist() == [0, 0, 0, 1, 1, 1] for s in emulated_cuda_backend)
    assert emulated_cuda_backend[0] is emulated_cuda_backend[1]  # read once for the labels tensor
    tol = 2e-3 * max(1.0, ref.abs().max().item())
    assert (y1.double() - ref).abs().max() <= tol and torch.equal(y1, y2)
    with kf.use_backend("cuda"), gate.serving([3]), pytest.raises(ValueError, match="outside the declared"):
        with torch.no_grad():
            layer(x, labels=labels)


def test_training_through_m3_on_the_cuda_backend_emulated(emulated_cuda_backend):
    """M3 pinned in training on the (emulated) CUDA backend: the registered autograd of
    kind_linear_cuda_merged_gemm carries every gradient as path M0 does."""
    from kind_fast.ops.paths import force_path

    torch.manual_seed(1)
    gate = make_gate("block", 5, 12, 4)
    layer = kf.FastKindLinear(32, 48, tailor_rank=12, gate=gate).to(torch.float16)
    x = torch.randn(4, 7, 32).to(torch.float16).requires_grad_(True)
    labels = torch.tensor([1, 5, 1, 2])
    g = torch.randn(4, 7, 48).to(torch.float16)
    grads = {}
    for name, backend, path in (("m0", "torch", "M0"), ("m3", "cuda", "M3")):
        with kf.use_backend(backend), force_path(path):
            y = layer(x, labels=labels)
        params = [x, layer.u_g, layer.v_g, layer.sigma_g, layer.u_t, layer.v_t, layer.sigma_t, layer.bias]
        grads[name] = [y.double()] + [t.double() for t in torch.autograd.grad(y, params, g)]
    assert emulated_cuda_backend and emulated_cuda_backend[0].device.type == "cpu"
    for i, (a, b) in enumerate(zip(grads["m3"], grads["m0"])):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * max(1.0, b.abs().max().item()), msg=str(i))


def test_emulated_ops_do_not_mutate_inputs(emu):
    for t_rows in (9, 2):  # both plans
        args, grad_y = make_problem(40, 72, 16, 6, 4, t_rows, dtype=torch.bfloat16, dist="cfg", seed=17)
        before = {k: v.clone() for k, v in args.items()}
        g_before = grad_y.clone()
        _, h = emu.kind_linear_cuda(*[args[k] for k in ORDER])
        emu.kind_linear_cuda_backward(grad_y, *[args[k] for k in BWD_ORDER], h, [True] * 7)
        for max_classes in (1, 2):
            emu.kind_linear_cuda_merged(*[args[k] for k in ORDER], max_classes)
        weights = torch.stack([args["w_g"], args["w_g"]])
        slots = torch.tensor([1, 0, 1, 0])
        w_before = weights.clone()
        y = emu.kind_linear_cuda_merged_gemm(args["x"], weights, args["bias"], slots)
        for plan in range(3):
            emu.kind_linear_cuda_merged_gemm_backward_plan(torch.ones_like(y), args["x"], weights, slots,
                                                            [True] * 3, plan)
        assert torch.equal(weights, w_before) and torch.equal(slots, torch.tensor([1, 0, 1, 0]))
        for k, v in before.items():
            assert torch.equal(args[k], v), f"{k} was modified"
        assert torch.equal(grad_y, g_before)


# =====================================================================================
# GPU: the real extension (skipped without a GPU or without the built extension)
# =====================================================================================
def _gpu_ready() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "needs a CUDA GPU"
    ok, why = cuda_backend.status()
    return ok, why


gpu = pytest.mark.skipif(not _gpu_ready()[0], reason=f"CUDA backend: {_gpu_ready()[1]}")


@pytest.fixture
def ops():
    return torch.ops.kind_fast


GPU_SHAPES = EMU_SHAPES + [(1152, 4608, 96, 32, 4, 256), (4608, 1152, 96, 32, 2, 256), (384, 1152, 96, 32, 3, 200)]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gpu_matches_reference(ops, shape, dtype):
    n_in, n_out, n_t, k, b, t = shape
    args, grad_y = make_problem(n_in, n_out, n_t, k, b, t, dtype=dtype, device="cuda", seed=sum(shape))
    assert_matches_reference(run_op(ops, args, grad_y), args, grad_y, dtype, f"{shape} {dtype}")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("shape", EMU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gpu_exact_on_integers(ops, shape):
    n_in, n_out, n_t, k, b, t = shape
    args, grad_y = make_problem(n_in, n_out, n_t, k, b, t, dtype=torch.float16, device="cuda", integer=True,
                                seed=sum(shape))
    for name, a, r in zip(("y", "h") + GRAD_NAMES, run_op(ops, args, grad_y), reference(args, grad_y, torch.float64)):
        assert torch.equal(a.double(), r.double()), f"{name}: max diff {(a.double() - r.double()).abs().max()}"


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("gate_kind", GATE_KINDS)
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_gpu_gates_and_distributions(ops, gate_kind, dist):
    b = 7 if dist == "distinct" else 12
    args, grad_y = make_problem(72, 136, 24, 8, b, 40, dtype=torch.bfloat16, device="cuda", gate_kind=gate_kind,
                                dist=dist, classes=8, seed=2)
    assert_matches_reference(run_op(ops, args, grad_y), args, grad_y, torch.bfloat16, f"{gate_kind} {dist}")


@gpu
@pytest.mark.gpu
def test_gpu_layer_through_autograd_and_backend_switch():
    gate = kf.ClassGate.random_k(10, 24, 8, seed=1)
    layer = kf.FastKindLinear(96, 160, tailor_rank=24, gate=gate).cuda().to(torch.bfloat16)
    x = torch.randn(6, 50, 96, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.tensor([0, 3, 10, 7, 3, 9], device="cuda")
    outs = {}
    for name in ("torch", "cuda"):
        with kf.use_backend(name):
            for p in (x, *layer.parameters()):
                p.grad = None
            y = layer(x, labels=labels)
            y.float().square().sum().backward()
            outs[name] = [y.float()] + [p.grad.float() for p in (x, layer.u_t, layer.v_t, layer.sigma_t)
                                        if p.grad is not None]
    for a, b in zip(outs["cuda"], outs["torch"]):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2 * max(1.0, b.abs().max().item()))


@gpu
@pytest.mark.gpu
def test_gpu_self_check_and_auto():
    ok, msg = cuda_backend.self_check(torch.device("cuda"), torch.bfloat16)
    assert ok, msg
    assert cuda_backend.auto_ready("cuda", torch.bfloat16)
    assert kf.ops.backends.resolve_backend(torch.device("cuda"), torch.bfloat16) in ("triton", "cuda")


@gpu
@pytest.mark.gpu
def test_gpu_deterministic(ops):
    args, grad_y = make_problem(1152, 4608, 96, 32, 4, 256, dtype=torch.bfloat16, device="cuda", dist="zipf")
    a, b = run_op(ops, args, grad_y), run_op(ops, args, grad_y)
    for name, x, y in zip(("y", "h") + GRAD_NAMES, a, b):
        assert torch.equal(x, y), name


@gpu
@pytest.mark.gpu
def test_gpu_cuda_graph_capture(ops):
    args, grad_y = make_problem(72, 136, 24, 8, 4, 40, dtype=torch.bfloat16, device="cuda", seed=4)
    eager = run_op(ops, args, grad_y)
    static = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    static_g = grad_y.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run_op(ops, static, static_g)  # warm-up on the side stream, as torch recommends
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run_op(ops, static, static_g)
    fresh, fresh_g = make_problem(72, 136, 24, 8, 4, 40, dtype=torch.bfloat16, device="cuda", seed=5)
    for k in ("x", "u_t", "v_t", "labels"):
        static[k].copy_(fresh[k])
    static_g.copy_(fresh_g)
    graph.replay()
    want = run_op(ops, static, static_g)
    for name, a, b in zip(("y", "h") + GRAD_NAMES, out, want):
        assert torch.equal(a, b), name
    assert not torch.equal(out[0], eager[0])


@gpu
@pytest.mark.gpu
def test_gpu_opcheck(ops):
    args, grad_y = make_problem(40, 72, 16, 6, 3, 9, dtype=torch.bfloat16, device="cuda")
    leaves = dict(args)
    for k in ("x", "w_g", "bias", "u_t", "sigma_t", "v_t", "val"):
        leaves[k] = args[k].clone().requires_grad_(True)
    torch.library.opcheck(ops.kind_linear_cuda, tuple(leaves[k] for k in ORDER))
    _, h = ops.kind_linear_cuda(*[args[k] for k in ORDER])
    torch.library.opcheck(ops.kind_linear_cuda_backward, (grad_y, *[args[k] for k in BWD_ORDER], h, [True] * 7))
    torch.library.opcheck(ops.kind_linear_cuda_merged, (*[args[k] for k in ORDER], 2))


@gpu
@pytest.mark.gpu
def test_gpu_compile_fullgraph():
    gate = kf.ClassGate.block(5, 16, 8)
    layer = kf.FastKindLinear(64, 96, tailor_rank=16, gate=gate).cuda().to(torch.bfloat16)
    x = torch.randn(3, 40, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.tensor([0, 5, 3], device="cuda")

    def step(x, labels):
        return layer(x, labels=labels).float().square().sum()

    with kf.use_backend("cuda"):
        loss_c = torch.compile(step, fullgraph=True)(x, labels)
        (gx_c,) = torch.autograd.grad(loss_c, (x,))
        loss_e = step(x, labels)
        (gx_e,) = torch.autograd.grad(loss_e, (x,))
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(gx_c.float(), gx_e.float(), rtol=2e-2, atol=2e-2)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dist,max_classes", [("cfg", 2), ("uniform", 2), ("same", 1)])
def test_gpu_merged_path(dist, max_classes):
    args, _ = make_problem(1152, 1152, 96, 32, 8, 256, dtype=torch.bfloat16, device="cuda", dist=dist, seed=6)
    with torch.no_grad():
        y = cuda_backend.kind_linear_merged(*[args[k] for k in ORDER], max_classes=max_classes)
    y_ref = reference(args, torch.zeros_like(args["x"][:, :1]).expand(-1, 1152), torch.float32)[0]
    y_low = reference(args, torch.zeros_like(args["x"][:, :1]).expand(-1, 1152), torch.bfloat16)[0]
    err, base = (y.float() - y_ref).abs().max().item(), (y_low.float() - y_ref).abs().max().item()
    assert err <= 2 * base + ATOL_FLOOR[torch.bfloat16] * max(1.0, y_ref.abs().max().item())


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("labels,max_classes", MERGED_LAYOUTS, ids=lambda v: str(v).replace(" ", ""))
def test_gpu_merged_groups_exact(labels, max_classes):
    """Path M3 on the device (cuBLAS GEMMs, merge, corrections): exact on small integers."""
    b, t = len(labels), 70
    args, _ = make_problem(72, 136, 16, 6, b, t, dtype=torch.float16, device="cuda", integer=True, classes=6, seed=8)
    args["labels"] = torch.tensor(labels, device="cuda")
    with torch.no_grad():
        y = cuda_backend.kind_linear_merged(*[args[k] for k in ORDER], max_classes=max_classes)
    ref = reference(args, torch.zeros(b * t, 136, dtype=torch.float16, device="cuda"), torch.float64)[0]
    assert torch.equal(y.double(), ref), (y.double() - ref).abs().max()


@gpu
@pytest.mark.gpu
def test_gpu_auto_op_matches_reference():
    """What auto calls for this backend (CUDA op or reference, per the cost model) gives the
    reference's result for a small (CUDA) and a large (reference) forward."""
    for shape in ((64, 96, 16, 6, 3, 40), (1152, 4608, 96, 32, 64, 256)):
        args, grad_y = make_problem(*shape, dtype=torch.bfloat16, device="cuda", seed=3)
        n_in, n_out, n_t, k, b, t = shape
        assert cuda_backend.auto_shape_ok(b * t, b, n_in, n_out, n_t, k, "forward") == (shape[0] == 64)
        y, _ = cuda_backend.AUTO_OP(*[args[k] for k in ORDER])
        lowp = reference(args, grad_y, torch.bfloat16)[0]
        oracle = reference(args, grad_y, torch.float32)[0]
        err, base = (y.float() - oracle).abs().max().item(), (lowp.float() - oracle).abs().max().item()
        assert err <= 2 * base + ATOL_FLOOR[torch.bfloat16] * max(1.0, oracle.abs().max().item()), shape


@gpu
@pytest.mark.gpu
def test_gpu_per_shape_timing_caches_a_choice(ops):
    """autoselect on real ops: times both candidates once per shape bucket, then reuses the choice."""
    from kind_fast.ops import autoselect
    autoselect.clear_cache()
    args, _ = make_problem(1152, 4608, 96, 32, 8, 256, dtype=torch.bfloat16, device="cuda")
    op = autoselect.PerShapeOp(("cuda", "torch"), (ops.kind_linear_cuda, ops.kind_linear))
    a = [args[k] for k in ORDER]
    y, _ = op(*a)
    (key, name), = autoselect.cached_choices().items()
    assert name in ("cuda", "torch") and key[2] == 2048
    y2, _ = op(*a)
    assert len(autoselect.cached_choices()) == 1 and torch.equal(y, y2)


def _merged_gemm_gpu_problem(slots, n_in=1152, n_out=1152, t=256, n_slots=3, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    b = len(slots)
    x = torch.randn(b * t, n_in, generator=g, device="cuda").bfloat16()
    w = (torch.randn(n_slots, n_out, n_in, generator=g, device="cuda") * n_in ** -0.5).bfloat16()
    bias = torch.randn(n_out, generator=g, device="cuda").bfloat16()
    gy = torch.randn(b * t, n_out, generator=g, device="cuda").bfloat16()
    return x, w, bias, torch.tensor(slots), gy


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("slots", [[0] * 4 + [1] * 4, [1, 0, 2, 0, 1, 1, 2, 0]], ids=["cfg", "scattered"])
def test_gpu_merged_gemm_host_and_device_slots(ops, slots):
    """MERGED_GEMM_OP on the device, bf16 at a DiT-XL/2 width: host slots (one cuBLAS GEMM per
    run, or a gather into slot order) and device slots (every slot's GEMM), forward and
    backward, against the reference in float32."""
    x, w, bias, host, gy = _merged_gemm_gpu_problem(slots)
    want = (kind_linear_merged_gemm_ref(x.float(), w.float(), bias.float(), host),
            *kind_linear_merged_gemm_backward_ref(gy.float(), x.float(), w.float(), host, [True] * 3))
    low = (kind_linear_merged_gemm_ref(x, w, bias, host),
           *kind_linear_merged_gemm_backward_ref(gy, x, w, host, [True] * 3))
    for sl in (host, host.cuda()):
        got = (ops.kind_linear_cuda_merged_gemm(x, w, bias, sl),
               *ops.kind_linear_cuda_merged_gemm_backward(gy, x, w, sl, [True] * 3))
        for name, a, o, l_ in zip(("y", "dx", "dweights", "dbias"), got, want, low):
            assert_close_to_oracle(a, o, l_, torch.bfloat16, f"{name} ({sl.device} slots)")
    torch.library.opcheck(ops.kind_linear_cuda_merged_gemm, (x[:512], w, bias, host[:2]))


@gpu
@pytest.mark.gpu
def test_gpu_merged_gemm_capture_with_host_slots(ops):
    """Under CUDA-graph capture the host plan runs one GEMM per run (no host-to-device copy of
    a gather order); the replay on new inputs equals the eager op."""
    x, w, bias, host, _ = _merged_gemm_gpu_problem([1, 0, 2, 0, 1, 1, 2, 0], t=64)
    static = x.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ops.kind_linear_cuda_merged_gemm(static, w, bias, host)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.kind_linear_cuda_merged_gemm(static, w, bias, host)
    static.copy_(torch.randn_like(x))
    graph.replay()
    want = ops.kind_linear_cuda_merged_gemm(static, w, bias, host)
    torch.testing.assert_close(out, want)
    oracle = kind_linear_merged_gemm_ref(static.float(), w.float(), bias.float(), host)
    assert_close_to_oracle(out, oracle, kind_linear_merged_gemm_ref(static, w, bias, host), torch.bfloat16, "y")


@gpu
@pytest.mark.gpu
def test_gpu_dit_sampling_step_m3_on_the_cuda_backend():
    """A small KIND-DiT's guided sampling call inside serving() on the CUDA backend: every KIND
    layer takes M3 (MERGED_GEMM_OP from host slots), and the output matches M1's."""
    from kind_fast.perf.benchmark import build_model
    from kind_fast.ops.paths import force_path, record_paths
    from kind_fast.train.sampling import cfg_model_fn
    from kind_fast.nn.utils import serving

    model = build_model("DiT-S/2", "kind", device="cuda", depth=2, input_size=16).to(torch.bfloat16)
    y = torch.full((4,), 3, device="cuda")
    fn = cfg_model_fn(model, y, 4.0, model.num_classes, model.in_channels)
    x = torch.randn(4, model.in_channels, 16, 16, device="cuda", dtype=torch.bfloat16)
    t = torch.full((4,), 500, device="cuda")
    with torch.no_grad(), kf.use_backend("cuda"), serving(model, [3, model.num_classes]):
        with record_paths() as calls:
            out = fn(x, t)
        with force_path("M1"):
            ref = fn(x, t)
    assert calls and {(c["path"], c["backend"]) for c in calls} == {("M3", "cuda")}
    assert (out - ref).abs().max().item() <= 3e-2 * max(1.0, ref.abs().max().item())
