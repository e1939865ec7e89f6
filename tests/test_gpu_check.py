"""The GPU check (bench/gpu_check.sh + bench/gpu_check.py) works before a GPU ever sees it:
its dry run (CPU, tiny shapes, reference backend) goes through every section, the budget and
skip logic, the result files and the ratio table; the M3 routing of the sampling section is
checked against M1 on a small KIND-DiT."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _gpu_check_module():
    spec = importlib.util.spec_from_file_location("kind_fast_gpu_check", ROOT / "bench" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _table_is_well_formed(lines: list[str]) -> None:
    cols = {len(re.split(r"(?<!\\)\|", line)) for line in lines if line.startswith("|")}
    assert len(cols) == 1, f"ragged markdown table (column counts {cols})"


@pytest.mark.slow
def test_dry_run_goes_through_every_section(tmp_path):
    out = tmp_path / "res"
    env = dict(os.environ, PYTHON=sys.executable, KIND_FAST_CHECK_SECONDS="400")
    env.pop("OUT", None)
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", str(out)], capture_output=True,
                       text=True, env=env, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for f in ("env.md", "summary.md", "results.json", "layers.json", "steps.json", "cuda.json", "sampling.json",
              "bench_a.log", "bench_b.log", "gpu_tests.summary"):
        assert (out / f).exists(), f
    res = json.loads((out / "results.json").read_text())
    rows = res["rows"]
    assert not [r for r in rows if "error" in r], [r for r in rows if "error" in r]
    layers = [r for r in rows if r["section"] == "layers" and r["mode"] != "self-check"]
    assert len(layers) == 3 * 3 * 2  # modes × shapes × M
    assert all("t_linear_ms" in r and "t_reference_ms" in r for r in layers)
    assert all("skipped:" in r["triton"] for r in layers)  # no GPU: the fused backend is skipped, with why
    assert {g for r in layers for g in r.get("goals", {})} == {"forward_vs_linear", "pretrain_vs_linear"}
    steps = {r["mode"]: r for r in rows if r["section"] == "steps"}
    assert set(steps) == {"full_ft", "transfer", "pretrain"} and "step_time_vs_full_ft" in steps["transfer"]["goals"]
    cuda = [r for r in rows if r["section"] == "cuda"]
    assert cuda and all(r["skipped"].startswith("CUDA backend:") for r in cuda)
    assert [r for r in cuda if r["mode"] == "sampling step"]
    (samp,) = [r for r in rows if r["section"] == "sampling"]
    # the cost model's paths: M3 on a GPU; on this CPU dry run it may take the lean CPU path M5
    assert "m1_vs_dense" in samp and "sampling_m3_vs_dense" in samp["goals"]
    assert samp["m3_paths"].startswith(("M3 on", "M5 on torch"))
    selfchecks = [r for r in rows if r.get("mode") == "self-check"]
    assert [r["backend"] for r in selfchecks] == ["triton", "triton"] and all("skipped" in r for r in selfchecks)
    assert "collected" in res["tests"]
    # the ratio table comes last, and is a well-formed markdown table
    tail = r.stdout.rstrip().splitlines()
    assert tail[-1].startswith("goals met:")
    table = [line for line in tail if line.startswith("|")]
    assert table[0].startswith("| section | row | ratio | goal | met |")
    _table_is_well_formed(table)
    assert "## Ratios" in (out / "summary.md").read_text()


def test_deadline_skips_rows_with_the_reason(tmp_path):
    gc = _gpu_check_module()
    cfg = gc.Config(dry_run=True)
    rows = [r for r in gc.section_layers(cfg, gc.Deadline(0.0, "layers")) if r["mode"] != "self-check"]  # over
    assert len(rows) == 18 and all(r["skipped"] == "over the time budget" for r in rows)
    rows = gc.section_steps(cfg, gc.Deadline(0.0, "steps"))
    assert len(rows) == 3 and all(r["skipped"] == "over the time budget" for r in rows)
    (row,) = gc.section_sampling(cfg, gc.Deadline(0.0, "sampling"))
    assert row["skipped"] == "over the time budget"


def test_summary_marks_goals_skips_and_errors(tmp_path):
    gc = _gpu_check_module()
    rows = [
        {"section": "layers", "shape": "DiT-XL/2.fc1", "tokens": 8192, "mode": "forward", "primary": "triton",
         "goals": {"forward_vs_linear": [1.12, 1.138, True]}, "reference_vs_linear": 1.7},
        {"section": "layers", "shape": "DiT-XL/2.fc2", "tokens": 65536, "mode": "pretrain",
         "skipped": "over the time budget"},
        {"section": "steps", "model": "DiT-XL/2", "mode": "transfer", "error": "RuntimeError: out of memory"},
        {"section": "cuda", "mode": "self-check", "dtype": "bfloat16", "passed": False, "message": "dx | mismatch"},
        {"section": "sampling", "model": "DiT-XL/2", "goals": {"sampling_m3_vs_dense": [1.2, 1.05, False]},
         "m1_vs_dense": 1.3},
    ]
    lines = gc.ratio_table(rows)
    _table_is_well_formed(lines)
    text = "\n".join(lines)
    assert "| 1.12 | <= 1.14 | yes |" in text and "| 1.20 | <= 1.05 | NO |" in text
    assert "over the time budget" in text and "ERROR: RuntimeError: out of memory" in text
    assert "self-check bfloat16" in text and "| NO |" in text
    (tmp_path / "layers.json").write_text(json.dumps({"rows": rows[:2]}))
    assert gc.summarize(tmp_path) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert any("section steps: no results" in n for n in res["notes"])


def test_sampling_row_runs_the_package_path(one_thread):
    """The sampling row times the sampler's own model call with KIND-DiT inside serving(): on
    the CPU dry run the cost model's decisions are recorded (every KIND layer, one path), its
    output equals M1's, and the goal is computed from the measured times."""
    from kind_fast.perf.benchmark import build_model
    from kind_fast.nn.layers import FastKindLinear

    gc = _gpu_check_module()
    cfg = gc.Config(dry_run=True)
    (row,) = gc.section_sampling(cfg, gc.Deadline(None, "sampling"))
    assert "error" not in row, row.get("error")
    n_kind = sum(isinstance(m, FastKindLinear) for m in build_model(cfg.model, "kind", depth=cfg.depth,
                                                                    input_size=cfg.input_size).modules())
    # every KIND layer's path: M3 on a GPU; on the CPU the cost model may take the lean path M5
    import re

    taken = [re.fullmatch(r"(M3|M5) on torch ×(\d+)", part) for part in row["m3_paths"].split(", ")]
    assert all(taken) and sum(int(m.group(2)) for m in taken) == n_kind, row["m3_paths"]
    assert row["m1_paths"] == f"M1 on torch ×{n_kind}", row["m1_paths"]  # pinned (the reference runs it)
    assert row["m3_vs_m1_rel_diff"] < 1e-4
    assert row["goals"]["sampling_m3_vs_dense"][0] == pytest.approx(row["t_kind_m3_ms"] / row["t_dense_ms"])
    assert row["backend"] == "auto" and "graphed" not in row  # graphs: GPU only
    (cuda_row,) = [r for r in gc.section_cuda(cfg, gc.Deadline(None, "cuda")) if r["mode"] == "sampling step"]
    assert cuda_row["skipped"].startswith("CUDA backend:")


def test_self_check_rows_record_pass_or_why(monkeypatch):
    gc = _gpu_check_module()
    cfg = gc.Config(dry_run=True)
    rows = gc.self_check_rows("layers", "triton", cfg)
    assert [r["dtype"] for r in rows] == ["bfloat16", "float16"] and all("skipped" in r for r in rows)
    monkeypatch.setattr(gc, "backend_ready", lambda name, cfg: (True, ""))
    from kind_fast.ops import kind_linear_triton

    monkeypatch.setattr(kind_linear_triton, "self_check", lambda dev, dt: (dt == torch.bfloat16, f"checked {dt}"))
    rows = gc.self_check_rows("layers", "triton", cfg)
    assert [r["passed"] for r in rows] == [True, False]
    text = "\n".join(gc.ratio_table(rows))
    assert "| layers | triton self-check bfloat16 | - | passes | yes |" in text
    assert "| layers | triton self-check float16 | - | passes | NO |" in text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_triton_self_check_passes_on_the_production_configs(dtype, monkeypatch):
    """The Triton backend's self-check on this GPU: the production configs a DiT layer launches
    (TRITON_CASES, M2's FACTORED_CASES) and the odd-shape cases, every output and gradient."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from kind_fast.ops import kind_linear_triton
    from kind_fast.ops.self_check import FACTORED_CASES, TRITON_CASES

    assert TRITON_CASES and FACTORED_CASES
    ok, msg = kind_linear_triton.self_check(torch.device("cuda"), dtype)
    assert ok, msg
