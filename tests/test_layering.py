"""The package layout and its layering rules (docs/design.md, "Package layout").

The subpackages of kind_fast are layers: ``ops`` (the op family) under ``nn`` (the modules users
put in models) under ``models`` under ``deploy`` and ``perf``, with ``train`` on top; the Triton
sources of ``kernels/`` sit under ``ops``. These tests walk the import graph (every import
statement, module level and inside functions: tests/test_paths.py ``import_graph``) and check
that no import runs back up, that there is no cycle, and that README.md and docs/ name only
module paths and files that exist.
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import pytest
from test_paths import find_cycle, import_graph

ROOT = Path(__file__).resolve().parents[1]

SUBPACKAGES = ("ops", "nn", "models", "deploy", "perf", "train", "integrations", "kernels")

# subpackage -> the subpackages it must never import (kernels/, imported as kind_fast.kernels,
# imports nothing from the package at all)
FORBIDDEN = {
    "ops": {"perf", "nn", "models", "deploy", "train", "integrations"},
    "nn": {"models", "deploy", "perf", "train", "integrations"},
    "models": {"deploy", "perf", "train", "integrations"},
    "deploy": {"perf", "train", "integrations"},
    "perf": {"deploy", "train", "integrations"},
}
TOP_LEVEL_HELPERS = {"kind_fast._optional", "kind_fast._tracing", "kind_fast._version", "kind_fast.atomic"}


def layer(module: str) -> str:
    """The subpackage a module belongs to, or "top" for the package's top-level modules."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in SUBPACKAGES else "top"


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import that breaks a layering rule, as "importer -> imported (rule)"."""
    bad = []
    for mod, targets in sorted(graph.items()):
        src = layer(mod)
        for t in sorted(targets):
            dst = layer(t)
            if src == "kernels":
                if dst != "kernels":
                    bad.append(f"{mod} -> {t} (kernels/ imports nothing from the package)")
            elif dst in FORBIDDEN.get(src, ()):
                bad.append(f"{mod} -> {t} ({src} never imports {dst})")
            elif mod in TOP_LEVEL_HELPERS and t != mod:
                bad.append(f"{mod} -> {t} (the top-level helpers import nothing from the package)")
    return bad


def test_layering_holds():
    graph = import_graph()
    for sub in ("ops", "nn", "models", "deploy", "perf", "train"):  # the walk sees every subpackage
        assert any(layer(m) == sub and m != f"kind_fast.{sub}" for m in graph), sub
    bad = violations(graph)
    assert not bad, "imports that run back up:\n" + "\n".join(bad)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("importer, imported", [
    ("kind_fast.ops.labels", "kind_fast.nn.gate"),
    ("kind_fast.ops.paths", "kind_fast.models.dit"),
    ("kind_fast.ops.backends", "kind_fast.deploy.tasks"),
    ("kind_fast.ops.kind_linear", "kind_fast.train.loop"),
    ("kind_fast.ops.kind_linear_triton", "kind_fast.perf.timemodel"),
    ("kind_fast.ops.kind_linear_triton", "kind_fast.perf.perfmodel"),
    ("kind_fast.nn.layers", "kind_fast.train.config"),
    ("kind_fast.models.dit", "kind_fast.train.models"),
    ("kind_fast.models.dit", "kind_fast.deploy.export_io"),
    ("kind_fast.deploy.tasks", "kind_fast.train.loop"),
    ("kind_fast.kernels.kind_linear", "kind_fast.ops.paths"),
    ("kind_fast.kernels.kind_linear", "kind_fast.perf.perfmodel"),
    ("kind_fast.kernels.kind_linear", "kind_fast.perf.audit"),
    ("kind_fast.kernels.kind_linear_merged", "kind_fast._tracing"),
    ("kind_fast.kernels.kind_linear_plans", "kind_fast._version"),
    ("kind_fast.atomic", "kind_fast.nn.gate"),
])
def test_checker_sees_an_import_that_runs_back_up(importer, imported):
    graph = import_graph()
    assert importer in graph and imported in graph
    graph[importer] = graph[importer] | {imported}
    assert any(v.startswith(f"{importer} -> {imported} ") for v in violations(graph))


def test_top_level_stays_small():
    """kind_fast/ holds at most 8 modules beside its subpackages; every subpackage's __init__
    opens with what lives there and what it may import."""
    pkg = ROOT / "kind_fast"
    modules = sorted(p.name for p in pkg.glob("*.py") if p.name != "_build_info.py")  # that one is generated
    assert len(modules) <= 8, modules
    for sub in ("ops", "nn", "models", "deploy", "perf", "train"):
        doc = importlib.import_module(f"kind_fast.{sub}").__doc__ or ""
        opening = " ".join(doc.split("\n\n")[0].split())
        assert "import" in opening, (sub, opening)


def test_save_folders_keep_the_class_names_of_their_format(tmp_path):
    """The layout moved kind_fast.dit to kind_fast.models.dit; the file formats still record the
    names they were defined with, so folders saved before the move load and new ones match them."""
    import torch

    from kind_fast.deploy.serialization import load_pretrained, save_pretrained
    from kind_fast.models.export import FORMAT
    from kind_fast.testing import tiny_dit

    assert FORMAT == "kind_fast.export"
    model = tiny_dit(seed=3)
    save_pretrained(model, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "kind_config.json").read_text())
    assert cfg["model"]["class"] == "kind_fast.dit.DiT"
    back = load_pretrained(tmp_path / "m")
    for (k, a), (k2, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k


# ------------------------------------------------------------------ docs name what exists
DOCS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")), "bench/README.md",
        "kernels/README.md"]
# names a wheel or a build has and a checkout does not
GENERATED = {"kind_fast/_build_info.py", "kind_fast/csrc", "kind_fast._build_info", "kind_fast._C"}
# a dotted name in double quotes is a string a file format records ("kind_fast.dit.DiT", the
# format "kind_fast.export"), not a module path
DOTTED = re.compile(r"(?<![\w./\"-])kind_fast(?:\.\w+)+")
FILE = re.compile(r"(?<![\w./-])(?:kind_fast|kernels|csrc|tests|bench|scripts|docs)/[\w./-]*\w")


def _module_prefix(parts: list[str]) -> int:
    """How many leading parts of a dotted name are a module or package of this checkout."""
    n = 1
    for i in range(2, len(parts) + 1):
        rel = Path(*parts[:i])
        base = ROOT / rel
        if parts[:2] == ["kind_fast", "kernels"] and i > 2:
            base = ROOT / "kernels" / Path(*parts[2:i])
        if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file() or base.is_dir():
            n = i
        else:
            break
    return n


def dead_paths(text: str) -> list[str]:
    dead = []
    for name in sorted(set(DOTTED.findall(text))):
        parts = name.split(".")
        if ".".join(parts[:2]) in GENERATED:
            continue
        n = _module_prefix(parts)
        if n == len(parts):
            continue
        mod = importlib.import_module(".".join(parts[:n]))
        if not hasattr(mod, parts[n]):
            dead.append(name)
    for path in sorted(set(FILE.findall(text))):
        path = path.rstrip(".")
        if any(path == g or path.startswith(g + "/") for g in GENERATED) or "*" in path:
            continue
        if path.startswith("kind_fast/kernels/") and (ROOT / "kernels" / path.removeprefix("kind_fast/kernels/")).exists():
            continue
        if not (ROOT / path).exists():
            dead.append(path)
    return dead


def test_docs_name_only_paths_that_exist():
    dead = {doc: dead_paths((ROOT / doc).read_text()) for doc in DOCS}
    dead = {k: v for k, v in dead.items() if v}
    assert not dead, dead


def test_dead_path_checker_can_fail():
    assert dead_paths("see `kind_fast.audit` and kind_fast/layers.py") == ["kind_fast.audit", "kind_fast/layers.py"]
    assert dead_paths("`python -m kind_fast.perf.audit`, kind_fast/nn/layers.py, kind_fast.FastKindLinear") == []
    assert dead_paths("kind_fast.nn.gate.no_such_name") == ["kind_fast.nn.gate.no_such_name"]
    assert dead_paths('records "kind_fast.dit.DiT"; the module is `kind_fast.dit`') == ["kind_fast.dit"]
