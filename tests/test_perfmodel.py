"""kind_fast.perfmodel: the launch plans of the Triton kernels and the HBM-traffic model of
their schedules (pure Python; no GPU, no Triton needed)."""

from __future__ import annotations

import dataclasses

import pytest

from kind_fast import perfmodel as pm

BOUND = 1.15  # modelled HBM bytes / compulsory bytes, every DiT-XL/2 layer pass (docs/design.md §6)


@pytest.fixture(scope="module")
def dit_rows():
    return pm.dit_xl_rows((8192, 65536))


def test_every_dit_xl_pass_moves_at_most_115_percent_of_the_compulsory_bytes(dit_rows):
    layers = {r["layer"] for r in dit_rows}
    assert layers == {f"DiT-XL/2.{n}" for n in ("q", "k", "v", "proj", "fc1", "fc2")}
    assert {r["pass_"] for r in dit_rows} == {"forward", "dx", "dU_T", "dV_T"}
    assert {r["M"] for r in dit_rows} == {8192, 65536}
    over = [(r["layer"], r["pass_"], r["M"], round(r["ratio"], 3)) for r in dit_rows if r["ratio"] > BOUND]
    assert not over, f"passes over {BOUND}x the compulsory HBM bytes: {over}"
    for r in dit_rows:
        assert r["modelled"] >= r["compulsory"] * 0.99  # nothing comes for free
        if r["pass_"] in ("forward", "dx"):  # owners publish h before the row's other tiles need it
            assert r["recomputed"] <= 0.01 * (r["recomputed"] + r["slices_loaded"]), r


def test_the_model_flags_the_schedules_it_replaced():
    """What-ifs on DiT-XL/2.fc2 forward (A = x, 4608 wide, the case with the least L2 headroom):
    one owner per row carrying the whole shrink (G = 1, it finishes after its row's other tiles,
    which then recompute h) and, separately, an L2 only a fifth as large are both caught."""
    m, n, kd = 8192, 1152, 4608
    good = pm.traffic_fused(m, n, kd, 32, 256)
    plan = pm.plan_fused(m, n, kd, 32, 256)
    late_owner = pm.traffic_fused(m, n, kd, 32, 256, plan=dataclasses.replace(plan, G=1, NSH=1))
    assert good.recomputed == 0 or good.recomputed < late_owner.recomputed
    assert late_owner.recomputed > 0.5 * plan.m_tiles * (plan.n_tiles - 1)
    small_l2 = pm.Gpu("5 MB budget", 132, 10 * pm.MB, 0.5)
    assert pm.traffic_fused(m, n, kd, 32, 256, gpu=small_l2).ratio > BOUND


def test_lru_hits_misses_write_back_and_evict_first():
    lru = pm._Lru(100)
    assert not lru.access("a", 60, False) and lru.read == 60
    assert lru.access("a", 60, False)
    lru.access("y", 30, True, evict_first=True)  # written, parked at the cold end
    lru.access("b", 30, False)                   # evicts y first (written back), keeps a
    assert lru.written == 30 and lru.access("a", 60, False)
    lru.flush()
    assert lru.read == 90 and lru.written == 30


def test_dispatch_fills_free_slots_in_launch_order():
    assert pm._dispatch([1.0, 1.0, 1.0], 2) == [0.0, 0.0, 1.0]
    assert pm._dispatch([2.0, 1.0, 1.0, 1.0], 2) == [0.0, 0.0, 1.0, 2.0]


@pytest.mark.parametrize("kp", [16, 32, 64, 128])
@pytest.mark.parametrize("bn", [64, 128])
def test_owner_split_keeps_owners_short_and_tiles_legal(kp, bn):
    g, nsh = pm.owner_split(kp, bn, 4 * bn)
    assert g >= 2 and bn // g >= 16 and kp // nsh >= 16 and nsh <= g
    assert nsh * (kp // nsh) == kp  # the owners' shrink columns cover KP exactly
    assert (bn // g + kp // nsh) / bn <= 0.75  # an owner publishes before the row's other tiles end
    assert pm.owner_split(kp, bn, bn) == (1, 1)  # a row of one tile is one program


def test_plans_of_the_dit_shapes():
    """The pinned plans DiT-XL/2 runs on (kernels/kind_linear.py launches exactly these)."""
    fwd = pm.plan_fused(8192, 1152, 4608, 32, 256)
    assert (fwd.tiles, fwd.BM, fwd.BN, fwd.BK, fwd.KP, fwd.G, fwd.NSH, fwd.ONE_CLASS) == (
        True, 128, 128, 64, 32, 2, 2, True)
    assert fwd.programs == 64 * (2 + 9 - 1)
    assert pm.plan_fused(8192, 384, 384, 32, 256).BN == 64  # narrow layers: more tiles
    kp128 = pm.plan_fused(8192, 1152, 1152, 100, 256)
    assert (kp128.BM, kp128.BN, kp128.KP, kp128.G) == (64, 64, 128, 4)
    mixed = pm.plan_fused(8192, 1152, 1152, 32, 37)
    assert not mixed.ONE_CLASS and mixed.SPT == pm.samples_per_tile(mixed.BM, 37)
    m2 = pm.plan_fused(512, 640, 640, 64, 256, has_base=False)
    assert not m2.tiles and m2.NG >= 2  # few row tiles: split the N-tiles over programs
    assert pm.plan_fused(512, 640, 640, 64, 256, has_base=True, has_out=False).NG == 1


def test_tailor_grad_split_keeps_partials_small():
    for m, o in ((8192, 1152), (8192, 4608), (65536, 1152), (65536, 4608)):
        plan = pm.plan_tailor_grad(m, o, 96, 32, 256)
        assert plan.SKIP and plan.ONE_CLASS
        assert plan.SPLIT * 96 * o * 4 * 2 <= 0.05 * 2 * (m * o + m * 32 * 2)
        assert pm.cdiv(plan.m_tiles, pm.cdiv(plan.m_tiles, plan.SPLIT)) == plan.SPLIT  # no empty split
    assert not pm.plan_tailor_grad(8192, 1152, 96, 64, 256).SKIP  # 2K > N_T: dense gates


def test_k_rotation_spreads_the_rows_that_run_together():
    steps = 72
    starts = [pm.k_rotation(r, steps) for r in range(16)]
    assert len(set(starts)) == 16 and pm.k_rotation(5, 1) == 0
    gaps = sorted(starts)
    assert max(b - a for a, b in zip(gaps, gaps[1:])) <= steps // 4


def test_launchers_take_their_plans_from_the_model(monkeypatch):
    """kernels/kind_linear.py asks kind_fast.perfmodel for every config (meta device = the
    reference GPU, as the static audit uses it)."""
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    import torch

    from kind_fast.ops.kind_linear_triton import _kernels

    K = _kernels()
    meta = torch.device("meta")
    for args in ((8192, 1152, 4608, 32, 256), (8192, 4608, 1152, 32, 256), (65536, 384, 384, 48, 256),
                 (8192, 1152, 1152, 32, 37)):
        assert K.fused_config(*args[:3], args[3], args[4], meta) == pm.plan_fused(*args).as_dict()
