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
