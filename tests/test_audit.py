"""The static kernel audit (kind_fast/perf/audit.py): sm_90a builds of every pinned kernel config,
checked for spills, shared memory, warpgroup MMA and software-pipelined K-loops; no GPU.

CI compiles the short lists of audit cases (kind_fast/perf/replay.py, ``full=False``; the
kernels import nothing of the package, so their replays live there): from
kernels/kind_linear.py every config DiT-XL/2 runs (all layer shapes, B = 32 and 256, bf16 and
fp16, paths M1 and M2) and one shape for each other KP, for mixed-class tiles and for the
narrow DiT-S/2 layers; from kernels/kind_linear_merged.py (path M3) every distinct config of its
full list (the segmented GEMM with and without bias, dW; one-slot 128-row tiles, 64-row tiles
over several slots, masked dW run ends; bf16 and fp16).
``python -m kind_fast.perf.audit`` compiles the full list and the autotune space
(bench/results/static_sm90.md). Skipped only where Triton or its bundled ptxas/cuobjdump is
missing."""

from __future__ import annotations

import dataclasses
import os

import pytest

from kind_fast.perf import audit
from kind_fast.perf import perfmodel as pm  # ------------------------------------------------------------------ parsers (no compiler needed)
PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'kernel_a' for 'sm_90a'
ptxas info    : Function properties for kernel_a
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 192 registers, used 1 barriers, 17408 bytes smem
ptxas info    : Compiling entry function 'kernel_b' for 'sm_90a'
ptxas info    : Function properties for kernel_b
    80 bytes stack frame, 76 bytes spill stores, 44 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers
"""


def test_parse_ptxas():
    got = audit.parse_ptxas(PTXAS_LOG)
    assert got["kernel_a"] == dict(regs=192, stack=0, spill_stores=0, spill_loads=0, smem=17408)
    # every field distinct, so a parser that swaps two of them (stores/loads, stack/stores) fails
    assert got["kernel_b"] == dict(regs=255, stack=80, spill_stores=76, spill_loads=44, smem=0)


def _sass(body):
    return "\n".join(f"        /*{a:04x}*/                   {t} ;" for a, t in body)


def test_sass_loop_rules():
    """A K-loop (innermost loop issuing MMAs) is pipelined when it issues asynchronous copies
    and never waits for all of them; the waits, the copies and the MMAs of nested loops belong
    to the inner loop."""
    piped = [(0x10, "LDGSTS.E.BYPASS.128 [R1], desc[UR4][R2.64]"), (0x20, "LDGDEPBAR"),
             (0x30, "DEPBAR.LE SB0, 0x2"), (0x40, "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24"),
             (0x50, "LDGSTS.E.BYPASS.128 [R1], desc[UR4][R2.64]"), (0x60, "@P0 BRA 0x30"),
             (0x70, "WARPGROUP.DEPBAR.LE gsb0, 0x0"), (0x80, "EXIT")]
    st = audit.sass_stats(audit.split_sass("Function : k\n" + _sass(piped))["k"])
    assert (st.wgmma, st.ldgsts, st.dot_loops, st.pipelined_loops) == (1, 2, 1, 1)
    drained = [(a, "DEPBAR.LE SB0, 0x0") if a == 0x30 else (a, t) for a, t in piped]
    st = audit.sass_stats(audit.split_sass("Function : k\n" + _sass(drained))["k"])
    assert (st.dot_loops, st.pipelined_loops, st.double_buffered_loops) == (1, 0, 1)
    assert "waits for all" in st.loop_notes[0]
    synchronous = [(0x30, "LDG.E.128 R4, desc[UR4][R2.64]"), (0x40, "HMMA.16816.F32.BF16 R24, R4, R8, R24"),
                   (0x50, "@P0 BRA 0x30")]
    st = audit.sass_stats(audit.split_sass("Function : k\n" + _sass(synchronous))["k"])
    assert (st.hmma, st.wgmma, st.dot_loops, st.pipelined_loops, st.double_buffered_loops) == (1, 0, 1, 0, 0)
    nested = [(0x10, "MOV R1, R2"), *piped[2:6], (0x68, "IADD3 R1, R1, 0x1"), (0x6c, "@P1 BRA 0x10")]
    st = audit.sass_stats(audit.split_sass("Function : k\n" + _sass(nested))["k"])
    assert (st.dot_loops, st.pipelined_loops) == (1, 1)  # the outer loop issues no MMA itself


def test_sass_stub_jumps_outer_loops_and_wgmma_waits():
    """An mbarrier wait's out-of-line retry stub (after the last unconditional EXIT) jumps back
    into the body: not a loop. A loop around K-loops (a persistent kernel's loop over tiles,
    with the epilogue's own MMA) is an outer loop, not a K-loop. The wait_group depth of each
    K-loop is read from WARPGROUP.DEPBAR."""
    body = [(0x10, "MOV R1, R2"),                                   # outer loop head
            (0x20, "UTMALDG.2D [UR8], [UR4]"),
            (0x30, "SYNCS.PHASECHK.TRANS64.TRYWAIT P5, [UR13+0x100], R81"),
            (0x40, "@!P5 BRA 0x200"),                               # to the stub
            (0x50, "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24, gsb0"),
            (0x60, "WARPGROUP.DEPBAR.LE gsb0, 0x1"),
            (0x70, "UTMALDG.2D [UR8], [UR4]"),
            (0x80, "@P3 BRA 0x30"),                                 # the K-loop's back-edge
            (0x90, "WARPGROUP.DEPBAR.LE gsb0, 0x0"),
            (0xa0, "HGMMA.64x64x16.F32.BF16 R24, R56, gdesc[UR8].tnspB, R24, gsb0"),  # epilogue expand
            (0xb0, "@P4 BRA 0x10"),                                 # the tile loop's back-edge
            (0xc0, "EXIT"),
            (0x200, "SYNCS.PHASECHK.TRANS64.TRYWAIT P5, [UR13+0x100], R81"),
            (0x210, "@!P5 BRA 0x200"),
            (0x220, "BRA 0x40")]                                    # back into the K-loop
    st = audit.sass_stats(audit.split_sass("Function : k\n" + _sass(body))["k"])
    assert (st.dot_loops, st.pipelined_loops, st.outer_loops, st.tma, st.wgmma_wait) == (1, 1, 1, 2, 1)
    drained = [(a, "WARPGROUP.DEPBAR.LE gsb0, 0x0") if a == 0x60 else (a, t) for a, t in body]
    st = audit.sass_stats(audit.split_sass("Function : k\n" + _sass(drained))["k"])
    assert st.wgmma_wait == 0 and st.wgmma_wait_max == 0
    loads_first = [(0x48, "UTMALDG.2D [UR8], [UR4]") if a == 0x70 else (a, t) for a, t in body]
    st = audit.sass_stats(audit.split_sass("Function : k\n" + _sass(sorted(loads_first)))["k"])
    assert (st.dot_loops, st.pipelined_loops) == (1, 0)  # the loop loads what it multiplies
    no_exit = [(a, t) for a, t in body if t != "EXIT"]  # without the EXIT the stub's jump is a loop
    st = audit.sass_stats(audit.split_sass("Function : k\n" + _sass(no_exit))["k"])
    assert st.dot_loops + st.outer_loops > 2


def test_occupancy_rules():
    assert audit.occupancy(211, 107520, 256) == 1   # the fused kernel's DiT config
    assert audit.occupancy(128, 50692, 128) == 4    # the tailor-gradient kernel
    assert audit.occupancy(64, 120 * 1024, 128) == 1  # shared memory bound
    assert audit.occupancy(32, 0, 1024) == 2        # thread bound


def test_problem_rules():
    ok = audit.AuditRow("k", "", "pinned", "", regs=100, smem=1000, wgmma=4, async_copies=8, dot_loops=1,
                        pipelined_loops=1)
    assert audit.problem(ok) == ""
    assert "spilled" in audit.problem(dataclasses.replace(ok, spill_stores=8))
    assert "shared memory" in audit.problem(dataclasses.replace(ok, smem=228 * 1024))
    assert "HMMA only" in audit.problem(dataclasses.replace(ok, wgmma=0, hmma=4))
    assert "not pipelined" in audit.problem(dataclasses.replace(ok, pipelined_loops=0))
    double = dataclasses.replace(ok, pipelined_loops=0, double_buffered_loops=1)
    assert "not pipelined" in audit.problem(double) and double.pipelined == "NO (0/1; 1 double-buffered)"


# ------------------------------------------------------------------ real builds for sm_90a
def _tools_or_skip():
    pytest.importorskip("triton")
    missing = [t for t, p in (("ptxas", audit.ptxas_path(90)), ("cuobjdump", audit._triton_tool("cuobjdump"))) if not p]
    if missing:
        pytest.skip(f"the compiler tools are missing: {', '.join(missing)}")


@pytest.fixture(scope="module")
def pinned():
    """(spec, row) of every config of the CI list, compiled once for the module."""
    _tools_or_skip()
    old = os.environ.pop("TRITON_INTERPRET", None)
    try:
        specs = audit.collect_specs(include_autotune=False, full=False)
        rows = audit.compile_all(specs, "sm_90", jobs=min(2, os.cpu_count() or 1), include_autotune=False, full=False)
    finally:
        if old is not None:
            os.environ["TRITON_INTERPRET"] = old
    return list(zip(specs, rows))


def test_a_kernel_module_without_audit_cases_is_refused(monkeypatch):
    """Every module of kind_fast.kernels that defines Triton kernels has audit cases in
    kind_fast.perf.replay.AUDIT_CASES (the plans module defines none and needs none): the audit
    refuses one that has no entry, so a new kernel file cannot go unaudited."""
    pytest.importorskip("triton")
    from kind_fast.perf import replay

    assert set(replay.AUDIT_CASES) == {"kind_linear", "kind_linear_merged"}
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(replay, "AUDIT_CASES", {k: v for k, v in replay.AUDIT_CASES.items() if k != "kind_linear"})
    with pytest.raises(RuntimeError, match=r"kind_fast\.kernels\.kind_linear defines Triton kernels"):
        audit.collect_specs(include_autotune=False, full=False)


M3_KERNELS = ("kind_linear_merged_gemm_kernel", "kind_linear_merged_dw_kernel")
DOT_KERNELS = ("kind_linear_fused_kernel", "kind_linear_rows_kernel", "kind_linear_tailor_grad_kernel", *M3_KERNELS)


def test_every_pinned_config_compiles_without_spills_with_wgmma_and_pipelined_k_loops(pinned):
    assert len(pinned) >= 50
    assert {s.kernel for s, _ in pinned} >= {*DOT_KERNELS, "kind_linear_gate_tables_kernel",
                                             "kind_linear_sample_ds_kernel", "kind_linear_gate_grad_kernel"}
    bad = [f"{r.kernel} {r.config} ({s.variant}): {audit.problem(r)}" for s, r in pinned if audit.problem(r)]
    assert not bad, "\n".join(bad)
    for s, r in pinned:
        assert r.spills == 0 and r.smem <= audit.SM90.smem_per_block and r.ctas_per_sm >= 1
        if s.kernel in DOT_KERNELS:  # every kernel with a tl.dot runs it on warpgroup MMA,
            assert r.wgmma > 0 and r.hmma == 0, (s.kernel, r.config)
            assert r.dot_loops >= 1 and r.async_copies > 0 and r.pipelined_loops == r.dot_loops, (s.kernel, r.config)


def test_the_production_forward_is_persistent_loads_through_tma_and_keeps_mmas_in_flight(pinned):
    """docs/design.md §6: the forward configs DiT-XL/2 runs (path M1, one-class 128-row tiles)
    loop over tiles on a grid the GPU holds at once, load x and W_G through TMA descriptors, and
    every K-loop keeps a warpgroup MMA in flight (wgmma.wait_group >= 1). The dx kernel with the
    tailor-gradient partials: persistent and TMA too; its plain tiles' K-loop keeps an MMA in
    flight, its owners' K-loop waits for each (they store every K-step's dU_T slice)."""
    fused = [(s, r) for s, r in pinned if s.kernel == "kind_linear_fused_kernel" and s.variant.startswith("DiT-XL/2")
             and "T=256" in s.variant and dict(s.constexprs)["BM"] == 128]
    fwd = [(s, r) for s, r in fused if dict(s.constexprs)["B_TRANS"]]
    dx = [(s, r) for s, r in fused if dict(s.constexprs)["DU_PART"]]
    assert fwd and dx
    for s, r in fwd + dx:
        assert r.tma > 0 and r.persistent, (s.variant, r.config)
        assert dict(s.constexprs)["TMA"] and s.grid[0] <= audit.SM90.sms * r.ctas_per_sm
    for s, r in fwd:
        assert r.wgmma_wait >= 1, (s.variant, r.config, r.notes)
    for s, r in dx:
        assert r.wgmma_wait_max >= 1, (s.variant, r.config, r.notes)


def test_the_traffic_model_assumes_the_occupancy_the_compiler_gives(pinned):
    """kind_fast.perf.perfmodel simulates sms × ctas_per_sm resident programs; the compiled DiT-XL/2
    kernels must give exactly that (more would make the L2 working set larger than modelled)."""
    checked = 0
    for s, r in pinned:
        cx = dict(s.constexprs)
        if not s.variant.startswith("DiT-XL/2") or "K=32 T=256" not in s.variant:
            continue
        if s.kernel == "kind_linear_fused_kernel":
            plan = pm.plan_fused(8192, 1152, 1152, 32, 256)
            assert (cx["BM"], cx["BN"], cx["BK"], s.num_warps) == (plan.BM, plan.BN, plan.BK, plan.num_warps)
            assert r.ctas_per_sm == plan.ctas_per_sm, (r.config, r.regs, r.smem)
            checked += 1
        elif s.kernel == "kind_linear_tailor_grad_kernel":
            plan = pm.plan_tailor_grad(8192, 1152, 96, 32, 256)
            assert r.ctas_per_sm == plan.ctas_per_sm, (r.config, r.regs, r.smem)
            checked += 1
    assert checked >= 4


def test_the_m3_ci_list_holds_every_distinct_config_of_the_full_list(pinned):
    """Path M3's configs depend on T (row tile, dW chunk) and the dtype, not on the layer
    width: the short list CI compiles covers every distinct config of the full DiT-S/B/L/XL
    list (T = 16 ... 1024, CFG and 4-class batches)."""
    old = os.environ.pop("TRITON_INTERPRET", None)
    try:
        full = {s.key for s in audit.audit_specs("kind_linear_merged", full=True)}
    finally:
        if old is not None:
            os.environ["TRITON_INTERPRET"] = old
    ci = {s.key for s, _ in pinned if s.kernel in M3_KERNELS}
    assert full <= ci, [dict(k[2]) for k in full - ci]
    cx = [dict(s.constexprs) for s, _ in pinned if s.kernel == "kind_linear_merged_gemm_kernel"]
    assert {(c["BM"], c["ONE_SLOT"], c["HAS_BIAS"]) for c in cx} >= {(128, True, True), (128, True, False),
                                                                    (64, False, True), (64, False, False)}


def test_m3_occupancy_is_what_the_traffic_model_assumes(pinned):
    """kind_fast.perf.perfmodel's M3 plans assume one 128-row segmented-GEMM program per SM (the
    4-stage ring) and three 64-row ones (one-slot or over several slots); the compiled kernels
    give exactly that."""
    checked = 0
    for s, r in pinned:
        if s.kernel != "kind_linear_merged_gemm_kernel":
            continue
        cx = dict(s.constexprs)
        t = {(128, True): 256, (64, True): 64, (64, False): 37}[cx["BM"], cx["ONE_SLOT"]]
        plan = pm.plan_merged_gemm(32 * t, 4608, 1152, t)
        assert (cx["BM"], cx["BN"], cx["BK"], s.num_warps, s.num_stages) == (
            plan.BM, plan.BN, plan.BK, plan.num_warps, plan.num_stages)
        assert r.ctas_per_sm == plan.ctas_per_sm, (r.config, r.regs, r.smem)
        checked += 1
    assert checked >= 8


def test_the_audit_flags_an_unpipelined_and_a_spilling_config(pinned):
    """The rules can fail: the production fused config built with one stage (no software
    pipeline) and with half the warps (the accumulators no longer fit) are both flagged."""
    spec = next(s for s, _ in pinned if s.kernel == "kind_linear_fused_kernel" and "K=32 T=256 bf16" in s.variant
                and s.variant.startswith("DiT-XL/2") and dict(s.constexprs)["BM"] == 128)
    old = os.environ.pop("TRITON_INTERPRET", None)
    try:
        one_stage = audit.audit_spec(dataclasses.replace(spec, num_stages=1))
        four_warps = audit.audit_spec(dataclasses.replace(spec, num_warps=4))
    finally:
        if old is not None:
            os.environ["TRITON_INTERPRET"] = old
    assert "not pipelined" in audit.problem(one_stage)
    assert four_warps.spills > 0 and "spilled" in audit.problem(four_warps)


def test_cuda_kernels_compile_without_spills():
    """csrc/*.cu with nvcc -Xptxas -v for sm_90a, where a CUDA toolkit is present."""
    if audit.cuda_home() is None:
        pytest.skip("no CUDA toolkit (nvcc) found: set CUDA_HOME")
    rows, note = audit.audit_cuda()
    assert rows, note
    failed = [f"{r.kernel}: {r.error}" for r in rows if r.error]
    assert not failed, failed
    spilled = [f"{r.kernel} {r.variant}: {r.spills} B" for r in rows if r.spills]
    assert not spilled, spilled
    assert all(r.smem <= audit.SM90.smem_per_block for r in rows)


def test_tables(pinned):
    rows = [r for _, r in pinned]
    table = audit.markdown_table(rows)
    assert table.count("\n") == len(rows) + 2 and "kind_linear_fused_kernel" in table
    summary = audit.summary_table(rows)
    assert "| kind_linear_tailor_grad_kernel | pinned |" in summary
    assert "| kind_linear_tailor_reduce_kernel | pinned |" in summary and "persistent" in summary
