"""The self-check that gates fused backends under use_backend("auto")."""

from __future__ import annotations

import pytest
import torch

from kind_fast.ops.self_check import check_ops


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


def test_fused_backends_are_not_auto_ready_on_cpu():
    from kind_fast.ops import kind_linear_cuda, kind_linear_triton

    assert not kind_linear_triton.auto_ready("cpu", torch.float16)
    assert not kind_linear_cuda.auto_ready("cpu", torch.bfloat16)
