"""The op family's entry point and cost model (kind_fast/ops/paths.py), and the package's import
graph (no cycles: the registry reaches backends by name, backends depend on the family)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kind_fast as kf
from kind_fast.ops.paths import PathChoice, choose_path, force_path, forced_path, kind_linear_layer
from kind_fast.testing import GATE_KINDS, make_gate, naive_kind_linear

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ import graph
def _modules() -> dict[str, Path]:
    mods = {}
    for p in sorted((ROOT / "kind_fast").rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py")):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[0] == "kernels":  # imported as kind_fast.kernels (kind_fast/kernels/__init__.py)
            parts = ["kind_fast", "kernels"] + parts[1:]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


def import_graph() -> dict[str, set[str]]:
    """module -> kind_fast modules it imports, from every import statement in the file
    (module level and inside functions). ``from pkg import name`` counts as importing the
    submodule ``pkg.name`` when there is one, else ``pkg``. A package's implicit import of
    its parents is not counted (every module would reach kind_fast/__init__ otherwise)."""
    mods = _modules()

    def owner(name: str) -> str:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for mod, path in mods.items():
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges.update(owner(a.name) for a in node.names if a.name.startswith("kind_fast"))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                if base.startswith("kind_fast"):
                    edges.update(f"{base}.{a.name}" if f"{base}.{a.name}" in mods else owner(base)
                                 for a in node.names)
        edges.discard(mod)
        graph[mod] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (as a path a -> ... -> a) or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(v):
        state[v] = 1
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in state:
                found = visit(w)
                if found:
                    return found
        stack.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state:
            found = visit(v)
            if found:
                return found
    return None


def test_no_import_cycle():
    graph = import_graph()
    assert "kind_fast.ops.paths" in graph and "kind_fast.ops.backends" in graph["kind_fast.ops.paths"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_the_old_cycle():
    """The checker would have caught issue 9's cycle (kind_linear → backends → autoselect →
    self_check → kind_linear)."""
    graph = import_graph()
    graph["kind_fast.ops.autoselect"] = graph["kind_fast.ops.autoselect"] | {"kind_fast.ops.self_check"}
    cycle = find_cycle(graph)
    assert cycle is not None and "kind_fast.ops.self_check" in cycle


def test_layer_does_not_pick_backend_paths():
    """FastKindLinear reaches paths through the op family only (issue 9 item 6)."""
    graph = import_graph()
    assert "kind_fast.ops.paths" in graph["kind_fast.nn.layers"]
    assert not graph["kind_fast.nn.layers"] & {"kind_fast.ops.kind_linear_triton", "kind_fast.ops.kind_linear_cuda"}
    # the family reaches backends through the registry only
    assert not graph["kind_fast.ops.paths"] & {"kind_fast.ops.kind_linear_triton", "kind_fast.ops.kind_linear_cuda"}


def test_fresh_import_loads_no_backend():
    """A fresh process imports the entry point (and through the package, the layer) without
    importing a backend module: the family reaches backends only on first use. (torch's own
    custom-op machinery may import the triton package; that is not ours.)"""
    code = ("import sys, kind_fast.ops.paths, kind_fast.ops.autoselect, kind_fast.ops.self_check; "
            "bad = [m for m in ('kind_fast.ops.kind_linear_triton', 'kind_fast.ops.kind_linear_cuda', "
            "'kind_fast.kernels.kind_linear') "
            "if m in sys.modules]; assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


# ------------------------------------------------------------------ cost model
def test_cost_model_triton_paths():
    c = choose_path(8192, 1152, 4608, 32, 96, learngene_rank=1056)
    assert (c.path, c.would_prefer, c.backend) == ("M1", "M1", "triton")
    assert c.flop_ratio == pytest.approx(1 + 32 / 1152 + 32 / 4608)
    m2 = choose_path(8192, 1152, 1152, 32, 96, learngene_rank=16)
    assert m2.would_prefer == "M2" and m2.path == "M2"
    assert m2.flop_ratio == pytest.approx(2 * 8192 * 48 * 2304 / (2 * 8192 * 1152 * 1152))
    big = choose_path(8192, 4096, 4096, 32, 96, learngene_rank=512)  # M2 cheaper but > 128 slots
    assert big.would_prefer == "M2" and big.path == "M1" and "128" in big.reason
    assert choose_path(8192, 1152, 1152, 0, 96).path == "M0"
    assert choose_path(8192, 1152, 1152, 129, 1152).path == "M0"
    assert choose_path(8192, 1152, 1152, 129, 1152, max_active=256).path == "M1"


def test_cost_model_backends():
    """M2 exists on the Triton backend only; the reference reports M0 or its lean CPU path M5
    (DiT-XL shapes, T = 256)."""
    for backend in ("torch", "cuda"):
        c = choose_path(8192, 1152, 1152, 32, 96, learngene_rank=16, samples=32, backend=backend)
        assert c.would_prefer == "M2" and c.path in (("M0", "M5") if backend == "torch" else ("M1",))
        assert "Triton" in c.reason
    assert choose_path(64, 64, 80, 8, 16, learngene_rank=8, backend="torch", allow=("M0", "M1", "M2")).path == "M0"


def test_cost_model_tiny_layers_and_sampling():
    """The choices the CPU measurements (bench/results/cpu_paths.md) support: the lean path M5
    for the demo's layers in transfer training (M4 when M5 is not allowed), M3 or M5 for their
    CFG evaluation (measured within noise of each other),
    the reference at DiT-S shapes among the op paths, M3 on cached weights for a DiT-XL-sized
    CFG batch, M1 on the Triton backend when the merged weights would not be cached and the
    batch is small."""
    every = ("M0", "M1", "M2", "M3", "M4")
    demo = dict(samples=64, distinct_classes=3, training=True, backend="torch", device_type="cpu")
    assert choose_path(1024, 64, 64, 4, 16, learngene_rank=48, allow=every, **demo).path == "M4"
    lean = choose_path(1024, 64, 64, 4, 16, learngene_rank=48, union_rank=8, **demo)
    assert (lean.path, lean.plan) == ("M5", "union") and "8 tailors" in lean.reason
    assert choose_path(512, 384, 384, 32, 96, learngene_rank=288, allow=every, **dict(demo, samples=2)).path == "M0"
    cfg = dict(samples=64, distinct_classes=2, training=False, merged_cached=True, backend="torch",
               device_type="cpu")
    for n_in, n_out in ((64, 64), (64, 256), (256, 64)):  # measured within noise of each other at this size
        assert choose_path(1024, n_in, n_out, 4, 16, union_rank=4, **cfg).path in ("M3", "M5")
    assert choose_path(8192, 1152, 1152, 32, 96, **dict(cfg, samples=32), union_rank=32).path == "M3"
    xl = dict(samples=2, distinct_classes=2, training=False, backend="triton")
    assert choose_path(512, 1152, 1152, 32, 96, merged_cached=True, **xl).path == "M3"
    assert choose_path(512, 1152, 1152, 32, 96, merged_cached=False, **xl).path == "M1"
    # M4 and M5 run on the CPU reference only; "allow" restricts the candidates
    for backend in ("triton", "cuda"):
        assert choose_path(1024, 64, 64, 4, 16, union_rank=8, **dict(demo, backend=backend)).path not in ("M4", "M5")
    assert choose_path(1024, 64, 64, 4, 16, union_rank=8, **dict(demo, allow=("M0", "M1"))).path == "M0"


def test_cost_model_sampling_preference():
    assert choose_path(8192, 1152, 1152, 32, 96, distinct_classes=2, training=False).would_prefer == "M3"
    assert choose_path(8192, 1152, 1152, 32, 96, distinct_classes=2, training=True).would_prefer == "M1"
    assert choose_path(512, 1152, 1152, 32, 96, distinct_classes=2, training=False).would_prefer == "M1"


# ------------------------------------------------------------------ entry point
def _layer(kind="block", n_in=24, n_out=20, n_t=8, active=3, classes=4, seed=0):
    torch.manual_seed(seed)
    gate = make_gate(kind, classes, n_t, active, seed=seed)
    layer = kf.FastKindLinear(n_in, n_out, tailor_rank=n_t, gate=gate, dtype=torch.float64)
    return layer.double(), gate.double()


def _components(layer):
    return dict(u_g=layer.u_g, sigma_g=layer.sigma_g, v_g=layer.v_g, bias=layer.bias, u_t=layer.u_t,
                sigma_t=layer.sigma_t, v_t=layer.v_t)


@pytest.mark.parametrize("kind", GATE_KINDS)
def test_entry_point_matches_oracle(kind):
    layer, gate = _layer(kind)
    x = torch.randn(5, 7, 24, dtype=torch.float64)
    labels = torch.tensor([0, 4, 2, 2, 1])
    idx, val = gate.compiled(x.device)
    w_g = layer.learngene_weight()
    ref = naive_kind_linear(x.view(-1, 24), w_g, layer.bias, layer.u_t, layer.sigma_t, layer.v_t, idx, val,
                            labels).view(5, 7, 20)
    for w in (None, w_g, layer.learngene_weight):
        y = kind_linear_layer(x, labels, **_components(layer), idx=idx, val=val, w_g=w)
        torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer(x, labels=labels), ref, rtol=1e-10, atol=1e-10)


def test_force_path():
    layer, gate = _layer()
    x = torch.randn(2, 3, 24, dtype=torch.float64)
    labels = torch.tensor([0, 4])
    assert forced_path() is None
    with force_path("M0"):
        assert forced_path() == "M0"
        y0 = layer(x, labels=labels)
    assert forced_path() is None
    torch.testing.assert_close(y0, layer(x, labels=labels))
    with force_path("M2"), pytest.raises(RuntimeError, match="Triton backend only"):
        layer(x, labels=labels)
    with pytest.raises(ValueError, match="unknown path"):
        with force_path("M7"):
            pass


def test_debug_log(monkeypatch, capsys):
    from kind_fast.ops import paths

    monkeypatch.setenv("KIND_FAST_DEBUG", "1")
    monkeypatch.setattr(paths, "_LOGGED", set())
    layer, _ = _layer()
    x = torch.randn(2, 3, 24, dtype=torch.float64)
    with force_path("M0"):
        layer(x, labels=torch.tensor([0, 1]))
        layer(x, labels=torch.tensor([1, 0]))  # same shape and classes: logged once
    layer(x, labels=torch.tensor([1, 0]))
    err = capsys.readouterr().err
    assert err.count("kind_fast path:") == 2 and "-> M0 (pinned by force_path)" in err and "backend=torch" in err
    assert "-> M5 (lean CPU path" in err


def test_path_choice_is_a_value():
    c = PathChoice("M1", "r", 1.0, "M1")
    assert c.backend == "triton" and c == PathChoice("M1", "r", 1.0, "M1", "triton")


# ------------------------------------------------------------------ labels changed behind the version counter
def _write_behind(labels: torch.Tensor, how: str, i: int, value: int) -> None:
    if how == "data":
        labels.data[i] = value
    else:
        labels.numpy()[i] = value


@pytest.mark.parametrize("how", ["data", "numpy"])
@pytest.mark.parametrize("path", ["M0", "M1", "M3", "M4", "M5:union", "M5:sample", None])
def test_labels_written_behind_the_version_counter_never_serve_a_stale_plan(path, how):
    """A write through labels.data or labels.numpy() does not bump the version counter. The plans
    kept per labels tensor (classes and rows, M3's slots, M5's tailor plans, the range check) must
    still see it: every path answers for the labels as they are now, and an out-of-range value
    written that way is still refused."""
    torch.manual_seed(0)
    gate = kf.ClassGate.random_k(4, 8, 3, seed=1)
    layer = kf.FastKindLinear(24, 16, tailor_rank=8, gate=gate)
    layer.freeze_learngenes()
    x = torch.randn(4, 3, 24)
    labels = torch.tensor([0, 1, 2, 1])
    with force_path(path), torch.no_grad():
        before = layer(x, labels=labels)
        _write_behind(labels, how, 1, 3)
        after = layer(x, labels=labels)
        fresh = layer(x, labels=torch.tensor([0, 3, 2, 1]))
        torch.testing.assert_close(after, fresh, rtol=0, atol=0)
        assert not torch.allclose(after[1], before[1]), "the written label changes sample 1's output"
        torch.testing.assert_close(after[2:], before[2:])  # (a new union plan: rounding only)
        _write_behind(labels, how, 2, 9)  # out of range [0, 4]
        with pytest.raises(ValueError, match="out of range"):
            layer(x, labels=labels)


def test_grouped_layers_see_labels_written_behind_the_version_counter():
    torch.manual_seed(0)
    gate = kf.ClassGate.random_k(4, 8, 3, seed=1)
    layers = [kf.FastKindLinear(24, 16, tailor_rank=8, gate=gate) for _ in range(3)]
    x, labels = torch.randn(4, 3, 24), torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        kf.kind_group(layers, x, labels)
        labels.data[0] = 3
        got = kf.kind_group(layers, x, labels)
        want = kf.kind_group(layers, x, torch.tensor([3, 1, 2, 1]))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
