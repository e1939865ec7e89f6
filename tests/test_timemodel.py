"""kind_fast.perf.timemodel: the MODELLED time of each launch and of each goal of docs/design.md §6
(no GPU: the code runs on ``meta`` tensors and kind_fast.perf.launches records what it launches)."""

from __future__ import annotations

import math

import pytest

from kind_fast.perf import perfmodel as pm
from kind_fast.perf import timemodel as tm
from kind_fast.perf.launches import Launch, TensorInfo

GPU = tm.H100_TIME


# ------------------------------------------------------------------ pricing rules
def test_a_cublas_gemm_is_compute_or_memory_bound():
    big = tm.gemm_seconds(8192, 1152, 1152, GPU)
    assert big.compute > big.memory  # 21.7 GFLOP at ~690 TFLOP/s vs 40 MB at ~3 TB/s
    assert big.seconds == pytest.approx(big.compute + GPU.hbm_latency + GPU.launch)
    skinny = tm.gemm_seconds(32, 6912, 1152, GPU)  # adaLN: M = batch, the weight dominates
    assert skinny.memory > skinny.compute
    assert skinny.seconds == pytest.approx(skinny.memory + GPU.hbm_latency + GPU.launch)


def test_wave_quantization_and_shared_sms():
    rate = GPU.rate_sm(1.0)
    one = 1e-6 * rate  # FLOPs of a 1 µs program
    assert tm._makespan(((one, 0.0),) * 132, 1, 132, rate) == pytest.approx(1e-6)
    assert tm._makespan(((one, 0.0),) * 133, 1, 132, rate) == pytest.approx(2e-6)  # one more: a second wave
    # two resident programs per SM share its rate and hide each other's exposed time
    assert tm._makespan(((one, 1e-6),) * 264, 2, 132, rate) == pytest.approx(3e-6)
    mixed = ((one, 0.0),) * 100 + ((2 * one, 0.0),) * 50
    assert tm._makespan(mixed, 1, 132, rate) == pytest.approx(3e-6)
    progs = [(one, 0.5e-6)] * 10  # fewer programs than SMs: no sharing, whatever the plan says
    k = tm._tile_kernel("k", progs, 0, 4, GPU, 1.0)
    assert k.compute == pytest.approx(1.5e-6)


def test_memory_bound_kernels_are_capped_by_their_resident_programs():
    few = tm._memory_seconds(20e6, GPU, resident=18)
    assert few == pytest.approx(20e6 / (18 * GPU.cta_bandwidth))
    assert tm._memory_seconds(20e6, GPU, resident=500) == pytest.approx(20e6 / GPU.bandwidth)


def test_aten_ops_are_priced_by_bytes_and_gemms_by_flops():
    t = TensorInfo((8192, 1152), "bfloat16", "meta")
    s = tm.price(Launch("aten", "sum", inputs=[t], outputs=[TensorInfo((1152,), "bfloat16", "meta")]))
    assert s.bytes == 8192 * 1152 * 2 + 1152 * 2 and s.flops == 0
    w = TensorInfo((1152, 1152), "bfloat16", "meta")
    mm = tm.price(Launch("aten", "mm", inputs=[t, w], outputs=[t]))
    assert mm.flops == 2 * 8192 * 1152 * 1152
    with pytest.raises(KeyError, match="no time model"):
        tm.price(Launch("triton", "some_unknown_kernel"))


def test_break_even_efficiency():
    assert tm.break_even(lambda e: 1.0 / e, 1.25) == pytest.approx(0.8, rel=1e-5)
    assert math.isinf(tm.break_even(lambda e: 5.0, 1.0))


def test_flop_floor_says_which_goals_85_percent_of_cublas_cannot_meet():
    """The goals of docs/design.md §6 leave a fixed margin over the op's own FLOPs: a goal whose
    FLOP floor needs more than 85 % of cuBLAS's rate per FLOP cannot be met at 85 % by any
    schedule. This pins the arithmetic the model table's "FLOP floor e*" column shows."""
    fwd = tm.flop_floor("forward", 1152, 1152, 8192)
    assert fwd == pytest.approx(1 + 64 / 1152)
    assert fwd / (1.10 * fwd) == pytest.approx(1 / 1.10)  # forward: e >= 0.909 for any design
    assert tm.flop_floor("sampling M3", 1152, 1152, 8192) / 1.05 == pytest.approx(0.952, abs=1e-3)
    assert tm.flop_floor("transfer", 1152, 1152, 8192) / 0.80 == pytest.approx(0.903, abs=1e-3)
    assert tm.flop_floor("pretrain", 1152, 1152, 8192) / 1.20 == pytest.approx(0.988, abs=1e-3)
    assert tm.flop_floor("pretrain", 1152, 1152, 65536) / 1.20 == pytest.approx(0.893, abs=1e-3)


# ------------------------------------------------------------------ recorded launches
@pytest.fixture(scope="module")
def q8k():
    pytest.importorskip("triton")
    return tm.LayerShape("DiT-XL/2.q", 1152, 1152, 8192)


def test_layer_passes_are_recorded_from_the_real_launchers(q8k):
    fwd = tm.layer_launches(q8k, "kind_fwd")
    names = [r.name for r in fwd if r.kind == "triton"]
    assert names == ["kind_linear_fused_kernel"]
    fused = next(r for r in fwd if r.kind == "triton")
    plan = pm.plan_fused(8192, 1152, 1152, 32, 256)
    assert fused.programs == plan.grid == 132 and fused.meta["BN"] == plan.BN  # a persistent grid
    lin = tm.layer_launches(q8k, "linear_fwd_bwd")
    assert sorted(r.name for r in lin) == ["addmm", "mm", "mm", "sum"]  # forward, dx, dW, db
    assert [r.name for r in tm.layer_launches(q8k, "m3_fwd")] == ["kind_linear_merged_gemm_kernel"]


def test_a_layer_goal_follows_its_launches(q8k):
    rows = [r for r in tm.layer_goal_rows((8192,), layers=(("q/k/v/proj", 1152, 1152),))]
    fwd = next(r for r in rows if r.goal == "forward")
    lin = sum(tm.price(r).seconds for r in tm.layer_launches(q8k, "linear_fwd"))
    kind = sum(tm.price(r, e=0.85).seconds for r in tm.layer_launches(q8k, "kind_fwd"))
    assert fwd.at(0.85) == pytest.approx(kind / lin)
    assert fwd.at(1.0) < fwd.at(0.85)
    assert fwd.target == pytest.approx(1.10 * (1 + 64 / 1152))


def test_the_committed_model_table_is_the_models_current_output():
    """bench/results/model_dit_xl.json (and .md) are what ``python -m kind_fast.perf.timemodel`` gives
    for the code as it is: every DiT-XL/2 layer row at M = 8192 and 65536, at e = 1.00 and 0.85
    (a kernel, plan or launch change that moves a modelled ratio fails here until the table is
    regenerated; the step rows, slower to replay, are checked present)."""
    import json
    from pathlib import Path

    pytest.importorskip("triton")
    data = json.loads((Path(__file__).resolve().parent.parent / "bench/results/model_dit_xl.json").read_text())
    committed = {(r["what"], r["goal"], r["M"]): r for r in data["rows"]}
    rows = tm.rows_json(tm.layer_goal_rows((8192, 65536)))
    assert len(rows) == 24
    for r in rows:
        c = committed[(r["what"], r["goal"], r["M"])]
        for key in ("target", "at_1_00", "at_0_85"):
            assert c[key] == pytest.approx(r[key], abs=2e-3), (r["what"], r["goal"], r["M"], key, c[key], r[key])
    assert {g for (_, g, _) in committed} >= {"transfer step", "transfer peak memory", "pretrain step", "sampling step"}
