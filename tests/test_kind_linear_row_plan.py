"""The reference backward's "row" plan (T < K, or every tailor on) against autograd.

Regression test: the row plan computed dh_s = dY·U_Tᵀ as ``F.linear(g, u_t.t())`` (= g·U_T,
a shape error unless N_T == out), so KIND training crashed on DiT-*/8 (16 tokens < K = 32)
and on one-row-per-sample inputs.
"""

from __future__ import annotations

import pytest
import torch

from kind_fast.nn.gate import ClassGate
from kind_fast.ops.kind_linear import kind_linear_backward_ref, kind_linear_ref, tailor_plan


@pytest.mark.parametrize("t,all_on", [(1, False), (3, False), (8, True)])
def test_row_plan_backward_matches_autograd(t, all_on):
    torch.manual_seed(0)
    b, n_in, n_out, n_t, k, classes = 4, 20, 36, 12, 5, 6
    gate = ClassGate.all_on(classes, n_t) if all_on else ClassGate.random_k(classes, n_t, k, seed=1)
    idx, val = gate.compiled()
    k = idx.shape[1]
    m = b * t
    assert tailor_plan(m, b, k, n_t) == "row"
    dd = dict(dtype=torch.float64)
    x = torch.randn(m, n_in, **dd, requires_grad=True)
    w = torch.randn(n_out, n_in, **dd, requires_grad=True)
    u = torch.randn(n_t, n_out, **dd, requires_grad=True)
    s = torch.rand(n_t, **dd, requires_grad=True)
    v = torch.randn(n_t, n_in, **dd, requires_grad=True)
    labels = torch.tensor([0, 5, 6, 2])  # 6 = the null class
    g = torch.randn(m, n_out, **dd)

    y, h = kind_linear_ref(x, w, None, u, s, v, idx, val.double(), labels)
    want = torch.autograd.grad(y, (x, w, u, s, v), g)
    got = kind_linear_backward_ref(g, x.detach(), w.detach(), u.detach(), s.detach(), v.detach(),
                                   idx, val.double(), labels, h.detach(), [True] * 6 + [False])
    dx, dw, _, du, ds, dv, _ = got
    for name, a, e in zip(("dx", "dw", "du", "ds", "dv"), (dx, dw, du, ds, dv), want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10, msg=name)
