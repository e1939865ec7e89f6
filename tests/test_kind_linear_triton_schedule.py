"""The Triton kernels' schedules under TRITON_INTERPRET=1 (kernels/kind_linear.py).

The fused kernel runs a row tile's output tiles as consecutive programs, the first of them
as G owner sub-tiles that carry the shrink columns and publish them into h; every program
then takes h from there, or recomputes a part that is not published (the interpreter runs the
programs one after another, so owner 0 always recomputes the later owners' parts and every
later program loads them: both paths run in every test). Each test pins a plan (owner split,
tile sizes, one-class or mixed tiles, several K-steps so the per-row K-loop rotation matters)
and compares every output of the launchers with the reference in float32; the tailor
gradients with compacted row lists, split reductions and the row-list builder likewise.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kind_fast.perf import perfmodel as pm
from kind_fast.ops.kind_linear import kind_linear_backward_ref, kind_linear_ref
from kind_fast.testing import make_gate, make_labels

pytestmark = pytest.mark.interpret


@pytest.fixture
def K(monkeypatch):
    """The kernel module, decorated for the interpreter."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from kind_fast.ops.kind_linear_triton import _kernels

    K = _kernels()
    try:  # Triton 3.6's interpreter fails on runtime loop bounds with numpy >= 2.4 (fixed in 3.9)
        K.sample_ds(torch.zeros(2, 1, 16), dict(BM=16), 32, 2)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"this Triton's interpreter cannot run loops with runtime bounds: {type(e).__name__}: {e}")
    return K


def problem(n_in, n_out, n_t, k, b, t, *, gate="random_k", dist="uniform", classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx, val = make_gate(gate, classes, n_t, k, seed=seed).compiled()
    labels = make_labels(dist, b, classes, generator=g)

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    return dict(x=r(b * t, n_in), w_g=r(n_out, n_in, scale=n_in ** -0.5), bias=r(n_out),
                u_t=r(n_t, n_out, scale=n_out ** -0.5), sigma_t=r(n_t).abs() + 0.5,
                v_t=r(n_t, n_in, scale=n_in ** -0.5), idx=idx.contiguous(), val=val.detach().float().contiguous(),
                labels=labels, g=r(b * t, n_out))


def run_fused(K, p, plan, *, pass_="forward", **test_switches):
    """(out, shrink, ds per sample or None) of one fused launch under ``plan``. The launcher's
    fresh buffers start as NaN (torch.empty on the CPU often hands back the last run's bytes,
    which would hide a part that nobody wrote)."""
    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "empty", poisoned_empty)
        return _run_fused(K, p, plan, pass_, **test_switches)


def _run_fused(K, p, plan, pass_, **test_switches):
    if pass_ == "forward":
        out, shr, part, cfg = K.fused(p["x"], p["w_g"], True, p["bias"], p["v_t"], p["u_t"], p["sigma_t"], p["idx"],
                                      p["val"], p["labels"], plan=plan, **test_switches)
        return out, shr, None
    h = kind_linear_ref(*[p[n] for n in ("x", "w_g", "bias", "u_t", "sigma_t", "v_t", "idx", "val", "labels")])[1]
    out, shr, part, cfg = K.fused(p["g"], p["w_g"], False, None, p["u_t"], p["v_t"], p["sigma_t"], p["idx"], p["val"],
                                  p["labels"], h_saved=h, plan=plan, **test_switches)
    ds = K.sample_ds(part, cfg, p["x"].shape[0], p["labels"].shape[0])  # (B, KP)
    return out, shr, ds[:, :p["idx"].shape[1]]


def reference(p, pass_):
    args = [p[n] for n in ("x", "w_g", "bias", "u_t", "sigma_t", "v_t", "idx", "val", "labels")]
    y, h = kind_linear_ref(*args)
    if pass_ == "forward":
        return y, h, None
    no_bias = [a for i, a in enumerate(args) if i != 2]
    dx = kind_linear_backward_ref(p["g"], *no_bias, h, [True, False, False, False, False, False, False])[0]
    b, k = p["labels"].shape[0], p["idx"].shape[1]
    ids = p["idx"][p["labels"]].long().repeat_interleave(p["x"].shape[0] // b, 0)       # (M, K)
    dhs = torch.einsum("mo,mko->mk", p["g"], p["u_t"][ids])
    ds = (dhs * h).view(b, -1, k).sum(1)
    return dx, dhs, ds


def plan_for(m, n, kd, k, t, **over):
    return dataclasses.replace(pm.plan_fused(m, n, kd, k, t, interpret=True, sms=4), **over)


# (in, out, N_T, K, B, T, plan overrides): tiles per row, owner splits, K-steps (BK = 32), mixed tiles
CASES = [
    (96, 112, 24, 10, 2, 32, {}),                                  # G=2, NSH=1 (KP=16), 4 N-tiles, 3 K-steps
    (80, 96, 40, 20, 3, 32, {}),                                   # KP=32: two owners carry 16 columns each
    (72, 160, 80, 60, 2, 32, dict(BN=64, G=4, NSH=4)),             # KP=64 over four 16-column owners, 3 tiles
    (64, 40, 24, 12, 2, 32, dict(BN=64, G=1, NSH=1)),              # one tile per row: no owners to wait for
    (70, 90, 20, 9, 4, 7, {}),                                     # mixed tiles (T=7): per-sample masks
    (50, 130, 32, 17, 5, 13, dict(BN=64, G=2, NSH=2)),             # mixed tiles, KP=32, odd sizes
]


@pytest.mark.parametrize("reverse", [False, True], ids=["", "reversed_owners"])
@pytest.mark.parametrize("pass_", ["forward", "dx"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:6])))
def test_fused_schedule_matches_reference(K, case, pass_, reverse):
    """Every output of the fused kernel vs the reference. In launch order, owner 0 recomputes
    the parts of the later owners and the row's other tiles load them all; with the owners
    reversed, each owner's published part is loaded before anything recomputes it."""
    n_in, n_out, n_t, k, b, t, over = case
    if reverse and (over.get("G", 2) == 1 or pass_ == "dx"):
        pytest.skip("one owner: nothing to reverse" if pass_ == "forward" else "owners are the same code for dx")
    p = problem(n_in, n_out, n_t, k, b, t, seed=n_in + t)
    n, kd = (n_out, n_in) if pass_ == "forward" else (n_in, n_out)
    plan = plan_for(b * t, n, kd, k, t, **over)
    assert plan.tiles and pm.cdiv(kd, plan.BK) >= 2  # several K-steps: the rotation is exercised
    got = run_fused(K, p, plan, pass_=pass_, reverse_owners=reverse)
    ref = reference(p, pass_)
    for name, a, r in zip(("out", "shrink", "ds"), got, ref):
        if r is None:
            continue
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4, msg=f"{name} {case} {pass_}")


@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[5]], ids=["kp32", "kp64_g4", "mixed"])
def test_recomputing_every_part_gives_bitwise_the_same_result(K, case):
    """force_local: every program recomputes all of h instead of loading the owners' parts.
    Same bits as the normal run (which loads some parts and recomputes others): an owner's part
    and its recomputation run the same K-steps in the same order, and h is summed in part order."""
    n_in, n_out, n_t, k, b, t, over = case
    p = problem(n_in, n_out, n_t, k, b, t, seed=3)
    plan = plan_for(b * t, n_out, n_in, k, t, **over)
    y1, h1, _ = run_fused(K, p, plan)
    y2, h2, _ = run_fused(K, p, plan, force_local=True)
    assert torch.equal(y1, y2) and torch.equal(h1, h2)


@pytest.mark.parametrize("ng", [1, 3])
@pytest.mark.parametrize("t", [32, 9])
def test_rows_kernel_path_m2_and_shrink_only(K, ng, t):
    """Row programs (no dense term): NG groups of N-tiles per row tile, each with its own
    shrink; and the shrink alone (with_out=False) with the ds partials."""
    p = problem(48, 150, 20, 8, 3, t, seed=t + ng)
    m = p["x"].shape[0]
    plan = dataclasses.replace(pm.plan_fused(m, 150, 48, 8, t, has_base=False, interpret=True, sms=4), NG=ng)
    y, h, _, _ = K.fused(p["x"], None, True, p["bias"], p["v_t"], p["u_t"], p["sigma_t"], p["idx"], p["val"],
                         p["labels"], plan=plan)
    zeros = torch.zeros_like(p["w_g"])
    y_r, h_r = kind_linear_ref(p["x"], zeros, p["bias"], p["u_t"], p["sigma_t"], p["v_t"], p["idx"], p["val"],
                               p["labels"])
    torch.testing.assert_close(y, y_r, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h, h_r, rtol=1e-4, atol=1e-4)
    _, dhs, part, cfg = K.fused(p["g"], None, False, None, p["u_t"], p["v_t"], p["sigma_t"], p["idx"], p["val"],
                                p["labels"], h_saved=h_r, with_out=False)
    dx_r, dhs_r, ds_r = reference({**p, "w_g": zeros}, "dx")
    torch.testing.assert_close(dhs, dhs_r, rtol=1e-4, atol=1e-4)
    ds = K.sample_ds(part, cfg, m, p["labels"].shape[0])[:, :8]
    torch.testing.assert_close(ds, ds_r, rtol=1e-4, atol=1e-4)


def _lists_brute_force(pos, labels, m, plan):
    t = m // labels.shape[0]
    lists, counts = [], []
    for blk in range(plan.t_blocks):
        cols = slice(blk * plan.BT, (blk + 1) * plan.BT)
        tiles = []
        for mt in range(plan.m_tiles):
            rows = range(mt * plan.BM, min((mt + 1) * plan.BM, m))
            if any(bool((pos[labels[r // t], cols] >= 0).any()) for r in rows):
                tiles.append(mt)
        lists.append(tiles)
        counts.append(len(tiles))
    return lists, counts


@pytest.mark.parametrize("t", [32, 7, 1])
def test_row_tile_lists_match_brute_force(K, t):
    p = problem(16, 16, 96, 32, 24 if t > 1 else 200, t, gate="block", classes=6, seed=t)
    m = p["x"].shape[0]
    pos, _ = K.gate_tables(p["idx"], p["val"], 96)
    plan = pm.plan_tailor_grad(m, 16, 96, 32, t, interpret=True, sms=4)
    assert plan.BT == 32 and plan.t_blocks == 3 and plan.ONE_CLASS == (t == 32)
    lists, counts = K.tile_lists(pos, p["labels"], m, plan)
    want_lists, want_counts = _lists_brute_force(pos, p["labels"], m, plan)
    assert counts.tolist() == want_counts
    for blk in range(plan.t_blocks):
        assert lists[blk, :counts[blk]].tolist() == want_lists[blk]
    if t > 1:  # block gates: whole-sample tiles skip the blocks their class does not use
        assert sum(want_counts) < plan.t_blocks * plan.m_tiles


@pytest.mark.parametrize("gate,k,split,t", [("block", 8, 1, 32), ("block", 8, 3, 32), ("block", 8, 2, 5),
                                             ("random_k", 12, 2, 16), ("random_k", 30, 2, 16)])
def test_tailor_grad_lists_and_split_match_reference(K, gate, k, split, t):
    """dU_T and dV_T from the tailor-gradient kernel (compacted row lists when 2K <= N_T, the
    plain walk otherwise; SPLIT programs per block with fp32 partials) vs the reference."""
    n_in, n_out, n_t = 40, 72, 48
    b = 96 // t if t > 5 else 20
    p = problem(n_in, n_out, n_t, k, b, t, gate=gate, classes=6, seed=split + t)
    m = p["x"].shape[0]
    args = [p[n] for n in ("x", "w_g", "u_t", "sigma_t", "v_t", "idx", "val", "labels")]
    h = kind_linear_ref(p["x"], p["w_g"], None, *args[2:])[1]
    _, _, _, du_r, _, dv_r, _ = kind_linear_backward_ref(p["g"], *args, h, [False, False, False, True, False, True,
                                                                             False])
    _, dhs, _ = reference(p, "dx")
    pos, dg = K.gate_tables(p["idx"], p["val"], n_t)
    for w, z, o, want in ((h, p["g"], n_out, du_r), (dhs, p["x"], n_in, dv_r)):
        plan = dataclasses.replace(pm.plan_tailor_grad(m, o, n_t, k, t, interpret=True, sms=4), SPLIT=split)
        assert plan.SKIP == (2 * k <= n_t)
        got = K.tailor_grad(w, z, pos, dg, p["sigma_t"], p["labels"], n_t, torch.float32, plan=plan)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ dx with tailor-gradient partials
def _grads_ref(p, h):
    base = [p[n] for n in ("x", "w_g", "u_t", "sigma_t", "v_t", "idx", "val", "labels")]
    return kind_linear_backward_ref(p["g"], *base, h, [True] * 7)


def _dx_and_reduce(K, p, h, *, split=None, force_local=False, need=(True, True, True, True)):
    need_du, need_dv, need_dsig, need_dval = need
    m, n_in = p["x"].shape
    n_t, k = p["u_t"].shape[0], p["idx"].shape[1]
    dx, part, pu, pv, cfg = K.fused_dx(p["g"], p["w_g"], p["u_t"], p["v_t"], p["sigma_t"], p["idx"], p["val"],
                                       p["labels"], h, p["x"], need_du=need_du, need_dv=need_dv,
                                       need_ds=need_dsig or need_dval, force_local=force_local)
    plan = pm.plan_tailor_reduce(m, p["g"].shape[1], n_in, n_t, k, m // p["labels"].shape[0], cfg["BM"],
                                 interpret=True, sms=4)
    if split is not None:
        plan = dataclasses.replace(plan, SPLIT=split)
    f32 = torch.float32
    du, dv, dval, dsig = K.tailor_reduce(pu, pv, part, p["idx"], p["val"], p["sigma_t"], p["labels"], m, cfg["BM"],
                                         n_t=n_t, du_dtype=f32, dv_dtype=f32, dval_dtype=f32, dsig_dtype=f32,
                                         need_dval=need_dval, need_dsig=need_dsig, plan=plan)
    return dx, du, dsig, dv, dval


# (in, out, N_T, K, B, T, gate): TMA-aligned and odd widths (pointer loads), block / random_k / dense
# gates, several owners and K-steps, 2 row tiles per sample
DX_CASES = [(96, 112, 24, 10, 2, 32, "random_k"), (80, 96, 40, 20, 3, 32, "block"), (72, 160, 80, 60, 2, 32, "dense"),
            (37, 53, 11, 5, 3, 64, "random_k")]


@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("case", DX_CASES, ids=lambda c: "x".join(map(str, c[:6])) + c[6])
def test_dx_partials_and_reduction_match_reference(K, case, split):
    """Path M1's backward in two launches: the dx kernel with the slot partials of dU_T (owners)
    and dV_T (every tile, x read there), then the reduction (split row ranges added by the last
    program to arrive, in order) against the reference, every gradient."""
    n_in, n_out, n_t, k, b, t, gate = case
    p = problem(n_in, n_out, n_t, k, b, t, gate=gate, seed=n_in + split)
    h = kind_linear_ref(*[p[n] for n in ("x", "w_g", "bias", "u_t", "sigma_t", "v_t", "idx", "val", "labels")])[1]
    ref = _grads_ref(p, h)
    got = _dx_and_reduce(K, p, h, split=split)
    for name, a, r in zip(("dx", "du", "dsig", "dv", "dval"), got, (ref[0], ref[3], ref[4], ref[5], ref[6])):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4, msg=f"{name} {case} split={split}")


def test_duplicate_ids_and_padding_slots_carry_their_gradient_once(K):
    """A class row holding a tailor twice (its gradient goes through the first slot, scaled by
    the summed gate values: canonical scale) and padded slots (id 0, value 0), against the
    reference, and only the asked-for gradients computed."""
    p = problem(64, 80, 24, 8, 3, 32, gate="random_k", seed=11)
    idx, val = p["idx"].clone(), p["val"].clone()
    idx[1, 3] = idx[1, 1]          # a repeated tailor in class 1
    val[1, 3] = 0.7
    idx[2, 6:], val[2, 6:] = 0, 0.0  # class 2: two padding slots (id 0, value 0)
    p["idx"], p["val"] = idx.contiguous(), val.contiguous()
    p["labels"] = torch.tensor([1, 2, 1])
    h = kind_linear_ref(*[p[n] for n in ("x", "w_g", "bias", "u_t", "sigma_t", "v_t", "idx", "val", "labels")])[1]
    ref = _grads_ref(p, h)
    got = _dx_and_reduce(K, p, h, split=2)
    for name, a, r in zip(("dx", "du", "dsig", "dv", "dval"), got, (ref[0], ref[3], ref[4], ref[5], ref[6])):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4, msg=name)
    dx, du, dsig, dv, dval = _dx_and_reduce(K, p, h, need=(False, True, True, False))
    assert du is None and dval is None and dv is not None and dsig is not None
    torch.testing.assert_close(dv, ref[5], rtol=1e-4, atol=1e-4)


def test_dx_partials_are_bitwise_the_same_when_every_part_is_recomputed(K):
    p = problem(80, 96, 40, 20, 3, 32, gate="block", seed=4)
    h = kind_linear_ref(*[p[n] for n in ("x", "w_g", "bias", "u_t", "sigma_t", "v_t", "idx", "val", "labels")])[1]
    a = _dx_and_reduce(K, p, h)
    b = _dx_and_reduce(K, p, h, force_local=True)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_a_launch_never_takes_a_previous_launchs_published_part(K):
    """The flags persist across launches (no memset) and carry the launch's epoch: a program
    that runs before its row's owners must recompute their parts, never load what an earlier
    launch of the same shape published at the same place. Owners reversed: each row's tiles
    run before its second owner publishes, so a stale flag would be read."""
    case = CASES[1]
    n_in, n_out, n_t, k, b, t, over = case
    plan = plan_for(b * t, n_out, n_in, k, t, **over)
    first = problem(n_in, n_out, n_t, k, b, t, seed=1)
    second = problem(n_in, n_out, n_t, k, b, t, seed=2)
    run_fused(K, first, plan, reverse_owners=True)
    y, h, _ = run_fused(K, second, plan, reverse_owners=True)
    y_r, h_r, _ = reference(second, "forward")
    torch.testing.assert_close(y, y_r, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h, h_r, rtol=1e-4, atol=1e-4)
    state = K.device_state(torch.device("cpu"))[0]
    assert state[1].item() == 0 and state[2].item() == 0  # the last CTA reset the counters


def test_no_autotuning_while_a_cuda_graph_is_captured(K, monkeypatch):
    monkeypatch.setenv("KIND_FAST_AUTOTUNE", "1")
    cuda = torch.device("cuda")
    monkeypatch.setattr(K, "_capturing", lambda: False)
    assert K._autotune_enabled(cuda)
    monkeypatch.setattr(K, "_capturing", lambda: True)
    assert not K._autotune_enabled(cuda)
    monkeypatch.setattr(K, "_capturing", lambda: False)
    torch.use_deterministic_algorithms(True)
    try:
        assert not K._autotune_enabled(cuda)
    finally:
        torch.use_deterministic_algorithms(False)


def test_the_kernels_capture_probe_agrees_with_the_package(K, monkeypatch):
    """The kernels import nothing of the package, so kernels/kind_linear.py asks torch itself
    whether it runs under torch.compile tracing or CUDA-graph capture: the same answer as
    kind_fast._tracing.capturing_or_tracing in each of the states that test looks at."""
    from torch._guards import TracingContext, tracing

    from kind_fast._tracing import capturing_or_tracing

    assert K._capturing() is False and capturing_or_tracing() is False
    with tracing(TracingContext(None)):  # inside dynamo's/AOTAutograd's tracing context
        assert K._capturing() is True and capturing_or_tracing() is True
    with monkeypatch.context() as m:
        m.setattr(torch.compiler, "is_compiling", lambda: True)
        assert K._capturing() is True and capturing_or_tracing() is True
    with monkeypatch.context() as m:  # a CUDA graph being captured on the current stream
        m.setattr(torch.cuda, "is_available", lambda: True)
        m.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
        assert K._capturing() is True and capturing_or_tracing() is True
        m.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
        assert K._capturing() is False and capturing_or_tracing() is False


# ------------------------------------------------------------------ GPU (skipped without CUDA)
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("t", [256, 64, 37])
@pytest.mark.parametrize("k", [32, 48])
def test_gpu_schedule_paths_agree_bitwise(monkeypatch, t, k):
    """On the GPU, whichever programs load the owners' parts or recompute them (timing decides),
    the result is bitwise that of recomputing everything and of reversed owners; and it matches
    the reference."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from kind_fast.ops.kind_linear_triton import _kernels

    K = _kernels()
    p = {n: (v.cuda() if isinstance(v, torch.Tensor) else v)
         for n, v in problem(640, 1152, 96, k, 8, t, seed=t + k).items()}
    for n in ("x", "w_g", "bias", "u_t", "v_t", "g"):
        p[n] = p[n].to(torch.bfloat16)
    plan = pm.plan_fused(p["x"].shape[0], 1152, 640, k, t)
    runs = [K.fused(p["x"], p["w_g"], True, p["bias"], p["v_t"], p["u_t"], p["sigma_t"], p["idx"], p["val"],
                    p["labels"], plan=plan, **sw)[:2]
            for sw in ({}, dict(force_local=True), dict(reverse_owners=True), {})]
    for y, h in runs[1:]:
        assert torch.equal(y, runs[0][0]) and torch.equal(h, runs[0][1])
    y_r, h_r = kind_linear_ref(*[p[n].float() if p[n].is_floating_point() else p[n]
                                 for n in ("x", "w_g", "bias", "u_t", "sigma_t", "v_t", "idx", "val", "labels")])
    torch.testing.assert_close(runs[0][1], h_r, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(runs[0][0].float(), y_r, rtol=3e-2, atol=3e-2)
