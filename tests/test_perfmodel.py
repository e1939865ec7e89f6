"""kind_fast.perf.perfmodel: the launch plans of the Triton kernels and the HBM-traffic model of
their schedules (pure Python; no GPU, no Triton needed)."""

from __future__ import annotations

import dataclasses

import pytest

from kind_fast.perf import perfmodel as pm
BOUND = 1.15  # modelled HBM bytes / compulsory bytes, every DiT-XL/2 layer pass (docs/design.md §6)


@pytest.fixture(scope="module")
def dit_rows():
    return pm.dit_xl_rows((8192, 65536))


@pytest.fixture(scope="module")
def merged_rows():
    return pm.dit_xl_merged_rows((32, 256))


def test_every_dit_xl_pass_moves_at_most_115_percent_of_the_compulsory_bytes(dit_rows):
    layers = {r["layer"] for r in dit_rows}
    assert layers == {f"DiT-XL/2.{n}" for n in ("q", "k", "v", "proj", "fc1", "fc2")}
    assert {r["pass_"] for r in dit_rows} == {"forward", "dx", "tailor reduce"}
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


def test_the_tailor_reduction_fills_the_gpu_and_keeps_its_sums_small():
    """kind_linear_tailor_reduce_kernel's plan for the DiT-XL/2 layers: at least one program per
    SM at M = 8192 (the separate passes it replaces ran 18), no split (no fp32 sums) there, and
    at M = 65536 splits that keep each program to REDUCE_ROWS row tiles with sums worth < 10 %
    of the partials it reads."""
    for n_in, n_out in ((1152, 1152), (1152, 4608), (4608, 1152)):
        small = pm.plan_tailor_reduce(8192, n_out, n_in, 96, 32, 256, 128)
        assert small.programs >= 132 and small.SPLIT == 1
        big = pm.plan_tailor_reduce(65536, n_out, n_in, 96, 32, 256, 128)
        assert pm.cdiv(512, big.SPLIT) <= pm.REDUCE_ROWS
        assert big.SPLIT * 96 * (n_in + n_out) * 4 * 2 < 0.10 * 512 * 32 * (n_in + n_out) * 2
    assert pm.partials_supported(256, 32) and pm.partials_supported(256, 64)
    assert not pm.partials_supported(256, 100) and not pm.partials_supported(37, 32)


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
    """kernels/kind_linear.py asks kind_fast.perf.perfmodel for every config (meta device = the
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


# ------------------------------------------------------------------ path M3 (segmented GEMM)
def test_m3_sampling_passes_move_at_most_115_percent_of_the_compulsory_bytes(merged_rows):
    """DiT-XL/2 sampling on path M3: a CFG batch (B = 32 and 256 images, half class c, half
    null; two cached merged weights, no merge), the segmented GEMM of every layer."""
    assert {r["layer"] for r in merged_rows} == {f"DiT-XL/2.{n}" for n in ("q", "k", "v", "proj", "fc1", "fc2")}
    assert {r["M"] for r in merged_rows} == {8192, 65536}
    over = [(r["layer"], r["M"], round(r["ratio"], 3)) for r in merged_rows if r["ratio"] > BOUND]
    assert not over, f"M3 passes over {BOUND}x the compulsory HBM bytes: {over}"
    for r in merged_rows:
        assert r["modelled"] >= r["compulsory"] * 0.99
        # compulsory: x, both slots' weights and y once
        assert r["compulsory"] == 2 * (r["M"] * r["n_in"] + 2 * r["n_in"] * r["n_out"] + r["M"] * r["n_out"]
                                       + r["n_out"])


def test_the_model_flags_the_m3_orders_it_replaced():
    """What-ifs on DiT-XL/2.fc2 (KD = 4608: a wave's A blocks alone exceed the L2 budget) at
    B = 256: the grouped order (GROUP_M = 8) and the row-major order without K-rotation both
    re-read the weights every wave; two programs per SM (more rows in flight) is worse too."""
    m, n, kd = 65536, 1152, 4608
    slots = pm.cfg_slots(256)
    plan = pm.plan_merged_gemm(m, n, kd, 256)
    assert (plan.GROUP_M, plan.ROTATE, plan.ctas_per_sm) == (1, True, 1)
    good = pm.traffic_merged_gemm(m, n, kd, 256, slots).ratio
    assert good <= 1.05
    for what in (dict(GROUP_M=8, ROTATE=False), dict(ROTATE=False), dict(ctas_per_sm=2, GROUP_M=8)):
        assert pm.traffic_merged_gemm(m, n, kd, 256, slots, plan=dataclasses.replace(plan, **what)).ratio > BOUND, what


def test_merged_grouped_order_visits_every_tile_once():
    for m_tiles, n_tiles, g in ((7, 5, 1), (7, 5, 3), (64, 9, 8), (1, 4, 8)):
        tiles = [pm.merged_grouped_tile(p, m_tiles, n_tiles, g) for p in range(m_tiles * n_tiles)]
        assert sorted(tiles) == [(r, j) for r in range(m_tiles) for j in range(n_tiles)]
    assert [pm.merged_grouped_tile(p, 3, 2, 1) for p in range(6)] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]


def test_m3_launchers_take_their_plans_from_the_model(monkeypatch):
    """kernels/kind_linear_merged.py's configs on meta tensors are kind_fast.perf.perfmodel's GPU plans."""
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    import torch

    from kind_fast.ops.kind_linear_merged_triton import _kernels

    K = _kernels()
    meta = torch.device("meta")
    for m, n, kd, t in ((8192, 4608, 1152, 256), (8192, 1152, 4608, 256), (2048, 384, 384, 64), (1184, 4608, 1152, 37)):
        p = pm.plan_merged_gemm(m, n, kd, t)
        cfg = K.gemm_config(m, n, kd, t, meta)
        assert (cfg["BM"], cfg["BN"], cfg["BK"], cfg["GROUP_M"], cfg["ONE_SLOT"], cfg["num_warps"],
                cfg["num_stages"]) == (p.BM, p.BN, p.BK, p.GROUP_M, p.ONE_SLOT, p.num_warps, p.num_stages)
        assert cfg["ROT"] == pm.rotation_stride(pm.cdiv(kd, p.BK))
        d = pm.plan_merged_dw(n, kd, t)
        assert K.dw_config(n, kd, t, meta) == dict(BN=d.BN, BK=d.BK, BR=d.BR, FULL=d.FULL, num_warps=d.num_warps,
                                                   num_stages=d.num_stages)
