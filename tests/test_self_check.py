"""The self-check that gates fused backends under use_backend("auto")."""

from __future__ import annotations

import pytest
import torch

from kind_fast.ops.self_check import SelfCheckGate, check_ops


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_ops_pass_their_own_check(dtype):
    ok, msg = check_ops(torch.ops.kind_fast.kind_linear, torch.ops.kind_fast.kind_linear_backward,
                        torch.device("cpu"), dtype)
    assert ok, msg


def test_a_wrong_forward_fails_and_a_crash_is_reported():
    ref_fwd, ref_bwd = torch.ops.kind_fast.kind_linear, torch.ops.kind_fast.kind_linear_backward

    def off_by_ten_percent(*args):
        y, h = ref_fwd(*args)
        return y * 1.1, h

    ok, msg = check_ops(off_by_ten_percent, ref_bwd, torch.device("cpu"), torch.float16)
    assert not ok and "y max error" in msg

    def wrong_dval(*args):
        grads = list(ref_bwd(*args))
        grads[6] = grads[6] + 1.0
        return tuple(grads)

    ok, msg = check_ops(ref_fwd, wrong_dval, torch.device("cpu"), torch.float16)
    assert not ok and "dval" in msg

    def crash(*args):
        raise RuntimeError("illegal memory access")

    ok, msg = check_ops(crash, ref_bwd, torch.device("cpu"), torch.float16)
    assert not ok and "illegal memory access" in msg


class _CpuGate(SelfCheckGate):
    """The gate's logic with its check run on the CPU (this machine has no GPU)."""

    def check(self, device, dtype):
        self.runs += 1
        return check_ops(*self._ops(), torch.device("cpu"), dtype)


def _gate(forward, ready=True):
    seen = []
    g = _CpuGate("fake", lambda: (forward, torch.ops.kind_fast.kind_linear_backward),
                 lambda device_type, dtype: ready, on_result=lambda: seen.append(1))
    g.runs = 0
    return g, seen


def test_the_gate_admits_a_backend_only_after_its_check_passed(monkeypatch):
    """SelfCheckGate.auto_ready: a backend that reproduces the reference is admitted (the check
    runs once per device and dtype); a wrong one is refused with one warning; a backend that
    is not statically ready is refused without running anything."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    ref = torch.ops.kind_fast.kind_linear

    good, seen = _gate(ref)
    assert good.auto_ready("cuda", torch.float16) and good.auto_ready("cuda", torch.float16)
    assert good.runs == 1 and seen == [1]
    assert good.results()[(0, torch.float16)][0] is True

    def wrong(*args):
        y, h = ref(*args)
        return y * 1.05, h

    bad, _ = _gate(wrong)
    with pytest.warns(RuntimeWarning, match="failed its self-check.*y max error"):
        assert not bad.auto_ready("cuda", torch.float16)
    assert not bad.auto_ready("cuda", torch.float16) and bad.runs == 1  # refused, not re-run

    off, _ = _gate(ref, ready=False)
    assert not off.auto_ready("cuda", torch.float16) and off.runs == 0


def test_fused_backends_are_not_auto_ready_on_cpu():
    from kind_fast.ops import kind_linear_cuda, kind_linear_triton

    assert not kind_linear_triton.auto_ready("cpu", torch.float16)
    assert not kind_linear_cuda.auto_ready("cpu", torch.bfloat16)
    assert kind_linear_triton._gate.results() == {}, "no self-check ran for a CPU device"


# ------------------------------------------------------------------ path M2 and coverage
def _factored_ref_ops():
    from kind_fast.ops.kind_linear import kind_linear_backward_ref, kind_linear_ref

    def fwd(x, bias, u, sigma, v, idx, val, labels):
        return kind_linear_ref(x, x.new_zeros(u.shape[1], x.shape[1]), bias, u, sigma, v, idx, val, labels)

    def bwd(g, x, u, sigma, v, idx, val, labels, h, mask):
        out = kind_linear_backward_ref(g, x, x.new_zeros(u.shape[1], x.shape[1]), u, sigma, v, idx, val, labels,
                                       h, [True] * 7)
        return out[0], out[2], out[3], out[4], out[5], out[6]

    return fwd, bwd


def test_factored_check_passes_the_reference_and_catches_a_wrong_gradient():
    from kind_fast.ops.self_check import check_factored_ops

    small = ((40, 56, 8, 16, 6, 2, 16, 3),)  # (in, out, N_G, N_T, K, B, T, C)
    fwd, bwd = _factored_ref_ops()
    ok, msg = check_factored_ops(fwd, bwd, torch.device("cpu"), torch.float16, cases=small)
    assert ok, msg

    def wrong_dsigma(*args):
        out = list(bwd(*args))
        out[3] = out[3] * 1.5
        return tuple(out)

    ok, msg = check_factored_ops(fwd, wrong_dsigma, torch.device("cpu"), torch.float16, cases=small)
    assert not ok and "M2 dsigma" in msg


def test_triton_gate_checks_the_production_cases_and_path_m2(monkeypatch):
    """The Triton backend's gate runs CHECK_CASES + TRITON_CASES through its op pair and then the
    M2 check (FACTORED_CASES); a failing M2 check fails the gate."""
    from kind_fast.ops import kind_linear_triton as kt
    from kind_fast.ops import self_check as sc

    seen = {}

    def fake_check_ops(fwd, bwd, device, dtype, cases):
        seen["cases"] = cases
        return True, "ok"

    monkeypatch.setattr(sc, "check_ops", fake_check_ops)
    monkeypatch.setattr(kt, "check_factored_ops", lambda *a, **k: (False, "M2 dx wrong"))
    ok, msg = kt._gate.check(torch.device("cpu"), torch.float16)
    assert seen["cases"] == sc.CHECK_CASES + sc.TRITON_CASES
    assert not ok and "M2" in msg
    # then path M3: its ops are checked too, and a failing M3 check fails the gate
    monkeypatch.setattr(kt, "check_factored_ops", lambda *a, **k: (True, "ok"))
    merged = {}

    def failing_m3(gemm, backward, device, dtype):
        merged["ops"] = (gemm, backward)
        return False, "M3 dweights max error 1"

    monkeypatch.setattr(kt, "check_merged_ops", failing_m3)
    ok, msg = kt._gate.check(torch.device("cpu"), torch.float16)
    assert not ok and "M3 dweights" in msg
    assert merged["ops"] == (kt.MERGED_GEMM_OP, kt.MERGED_GEMM_BACKWARD_OP)
    monkeypatch.setattr(kt, "check_merged_ops", lambda *a, **k: (True, "fine"))
    assert kt._gate.check(torch.device("cpu"), torch.float16)[0]


def _specs(*args, **kwargs):
    """{key: spec} of every launch kind_fast.perf.replay.replay_kind_linear(*args, **kwargs) makes."""
    from kind_fast.perf.audit import capture_launches
    from kind_fast.perf.replay import replay_kind_linear

    with capture_launches("") as got:
        replay_kind_linear(*args, **kwargs)
    return {s.key: s for s in got}


def test_check_cases_select_the_production_configs(monkeypatch):
    """What 'auto' runs for DiT-XL/2 (every layer shape, B = 32 and 256, K = 32 of 96, bf16 and
    fp16: forward, dx, the shrink alone, tailor gradients, gate kernels) is compiled and checked
    by the self-check: the launchers, replayed on meta tensors, launch no production config
    that the self-check's cases do not launch too (same kernel, constexprs, warps, stages and
    specialisation). The cases also reach BM = 128 one-class tiles with >= 2 owner sub-tiles,
    KP 32/64/128, both tailor-gradient variants, split tailor gradients, and path M2 with
    several N-groups."""
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from kind_fast.ops.self_check import FACTORED_CASES, TRITON_CASES
    from kind_fast.perf.perfmodel import plan_fused, plan_tailor_grad

    prod, cases = {}, {}
    for dtype in (torch.bfloat16, torch.float16):
        for n_in, n_out in ((1152, 1152), (1152, 3456), (1152, 4608), (4608, 1152)):
            for m in (8192, 65536):
                prod.update(_specs(n_in, n_out, m, 32, 96, 256, dtype))
        for i, o, n_t, k, b, t, _ in TRITON_CASES:
            cases.update(_specs(i, o, b * t, k, n_t, t, dtype))
        for i, o, n_g, n_t, k, b, t, _ in FACTORED_CASES:
            cases.update(_specs(i, o, b * t, k, n_t, t, dtype, m1=False, m2_learngenes=n_g))
    missing = [(s.kernel, dict(s.constexprs), s.num_warps, s.num_stages) for k, s in prod.items() if k not in cases]
    assert not missing, f"production configs the self-check never runs: {missing}"

    fused = [dict(s.constexprs) for s in cases.values() if s.kernel == "kind_linear_fused_kernel"]
    assert {c["KP"] for c in fused} >= {32, 64, 128}
    assert any(c["BM"] == 128 and c["ONE_CLASS"] and c["G"] >= 2 and c["NSH"] >= 2 for c in fused)
    tg = [dict(s.constexprs) for s in cases.values() if s.kernel == "kind_linear_tailor_grad_kernel"]
    assert {c["PARTIALS"] for c in tg} == {True, False}
    assert {pm_plan.SKIP for pm_plan in (plan_tailor_grad(b * t, o, n_t, k, t) for i, o, n_t, k, b, t, _ in
                                         TRITON_CASES)} == {True, False}  # compacted lists and the dense walk
    rows = [dict(s.constexprs) for s in cases.values() if s.kernel == "kind_linear_rows_kernel"]
    assert {c["KP"] for c in rows if c["HAS_OUT"]} >= {64, 128}
    for i, o, n_g, _, k, b, t, _ in FACTORED_CASES:  # NG is a runtime argument: ask the plan
        assert plan_fused(b * t, o, i, n_g + k, t, has_base=False).NG >= 2


def test_merged_check_passes_the_triton_ops_and_catches_a_wrong_dweights(monkeypatch):
    """check_merged_ops runs the Triton backend's M3 ops (here under the interpreter, small cases
    in MERGED_CASES' format: a CFG batch and interleaved slots with T = 7) against the reference,
    and a wrong dW fails it."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from test_kind_linear_triton import _interpreter_broken

    if _interpreter_broken():
        pytest.skip(_interpreter_broken())
    from kind_fast.ops.kind_linear_merged_triton import MERGED_GEMM_BACKWARD_OP, MERGED_GEMM_OP
    from kind_fast.ops.self_check import check_merged_ops

    small = ((40, 36, 2, 32, (0, 0, 1, 1)), (24, 20, 3, 7, (1, 0, 1, 0, 2)))
    ok, msg = check_merged_ops(MERGED_GEMM_OP, MERGED_GEMM_BACKWARD_OP, torch.device("cpu"), torch.float16,
                               cases=small)
    assert ok, msg

    def wrong_dweights(*args):
        dx, dw, db = MERGED_GEMM_BACKWARD_OP(*args)
        return dx, dw.flip(0), db  # the slots' gradients swapped

    ok, msg = check_merged_ops(MERGED_GEMM_OP, wrong_dweights, torch.device("cpu"), torch.float16, cases=small)
    assert not ok and "M3 dweights" in msg


def test_merged_cases_select_the_production_configs(monkeypatch):
    """Path M3 as DiT-XL/2 runs it (every layer shape, a CFG batch of B = 32 and 256 at T = 256,
    bf16 and fp16: the segmented GEMM with bias, dx, dW) launches no config that the
    self-check's MERGED_CASES do not launch too; the cases also reach 64-row tiles over
    several slots and dW with masked run ends."""
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from kind_fast.ops.self_check import MERGED_CASES
    from kind_fast.perf.audit import capture_launches
    from kind_fast.perf.replay import audit_layers, replay_kind_linear_merged

    def specs(*args):
        with capture_launches("") as got:
            replay_kind_linear_merged(*args)
        return {s.key: s for s in got}

    prod, cases = {}, {}
    for dtype in (torch.bfloat16, torch.float16):
        for _, n_in, n_out in audit_layers(1152):
            for b in (32, 256):
                prod.update(specs(n_in, n_out, b, 256, 2, dtype))
        for n_in, n_out, n_slots, t, slot_of in MERGED_CASES:
            cases.update(specs(n_in, n_out, len(slot_of), t, n_slots, dtype))
    missing = [(s.kernel, dict(s.constexprs), s.num_warps, s.num_stages) for k, s in prod.items() if k not in cases]
    assert not missing, f"production M3 configs the self-check never runs: {missing}"
    gemm = [dict(s.constexprs) for s in cases.values() if s.kernel == "kind_linear_merged_gemm_kernel"]
    assert {(c["BM"], c["ONE_SLOT"]) for c in gemm} == {(128, True), (64, False)}
    dw = [dict(s.constexprs) for s in cases.values() if s.kernel == "kind_linear_merged_dw_kernel"]
    assert {(c["BR"], c["FULL"]) for c in dw} == {(64, True), (16, False)}
