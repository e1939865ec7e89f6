"""The launch budget of one KIND layer (docs/design.md §6), counted without a GPU.

The Triton backend's op implementations run on ``meta`` tensors inside
``kind_fast.perf.launches.record_launches``: the launchers plan for the reference GPU there and every
kernel they would launch is recorded (Triton launches intercepted, aten ops through the
dispatcher). Budget per layer call (path M1, DiT-XL/2 shapes, W_G given as the layer's cache
gives it): forward 1 kernel, transfer backward <= 3, pretrain backward <= 4; no host
synchronisation; no memset (the flags carry a launch epoch, the reduction's counters reset
themselves), so the second call launches exactly what the first did minus the one-time state.
"""

from __future__ import annotations

import os

import pytest
import torch

from kind_fast.perf.launches import kernel_launches, record_launches

pytest.importorskip("triton")

BUDGET = {"forward": 1, "transfer": 3, "pretrain": 4}
MASKS = {"transfer": [True, False, False, True, True, True, False],   # dx, dU_T, dσ_T, dV_T
         "pretrain": [True, True, True, True, True, True, False]}     # + dW_G, db
SHAPES = {"q/k/v/proj": (1152, 1152), "fc1": (1152, 4608), "fc2": (4608, 1152)}


@pytest.fixture
def backend(monkeypatch):
    """The Triton backend's module with the kernels decorated for the GPU (never interpreted)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from kind_fast.ops import kind_linear_triton as T

    assert not T._kernels().INTERPRETED
    return T


def _layer(n_in, n_out, m=8192, k=32, n_t=96, t=256, classes=10):
    def e(*shape, dt=torch.bfloat16):
        return torch.empty(shape, dtype=dt, device="meta")

    return dict(x=e(m, n_in), w_g=e(n_out, n_in), bias=e(n_out), u_t=e(n_t, n_out), sigma_t=e(n_t, dt=torch.float32),
                v_t=e(n_t, n_in), idx=e(classes + 1, k, dt=torch.int32), val=e(classes + 1, k, dt=torch.float32),
                labels=e(m // t, dt=torch.int64), g=e(m, n_out))


def _passes(T, p):
    """{pass: recorded launches} of one layer's forward and backward passes (the second call of
    each: the first one also makes the device's persistent launch state)."""
    fwd_args = [p[n] for n in ("x", "w_g", "bias", "u_t", "sigma_t", "v_t", "idx", "val", "labels")]
    bwd_args = [p[n] for n in ("x", "w_g", "u_t", "sigma_t", "v_t", "idx", "val", "labels")]
    out = {}
    for _ in range(2):
        with record_launches() as rec:
            _, h = T.kind_linear_triton_forward(*fwd_args)
        out["forward"] = rec
        for name, mask in MASKS.items():
            with record_launches() as rec:
                T.kind_linear_triton_backward(p["g"], *bwd_args, h, mask)
            out[name] = rec
    return out


@pytest.mark.parametrize("layer", list(SHAPES))
def test_one_kind_layer_launches_within_its_budget(backend, layer):
    passes = _passes(backend, _layer(*SHAPES[layer]))
    for name, rec in passes.items():
        kernels = kernel_launches(rec)
        assert not [r for r in rec if r.kind == "sync"], f"{name}: a host synchronisation"
        assert len(kernels) <= BUDGET[name], f"{layer} {name}: {len(kernels)} launches > {BUDGET[name]}:\n" + \
            "\n".join(map(str, kernels))
        assert not [r for r in kernels if r.name in ("zeros", "zero_", "fill_", "zeros_like")], f"{name}: a memset"
    assert [r.name for r in passes["forward"]] == ["kind_linear_fused_kernel"]
    assert [r.name for r in passes["transfer"]] == ["kind_linear_fused_kernel", "kind_linear_tailor_reduce_kernel"]
    assert sorted(r.name for r in passes["pretrain"]) == sorted(
        ["mm", "sum", "kind_linear_fused_kernel", "kind_linear_tailor_reduce_kernel"])


def test_the_tailor_gradient_launch_fills_the_gpu_at_m_8192(backend):
    """Every tailor-gradient launch of a DiT-XL/2 layer at M = 8192 has at least one program
    per SM of the reference GPU (the old separate passes ran 18 programs on 132 SMs)."""
    for n_in, n_out in SHAPES.values():
        reduce = next(r for r in _passes(backend, _layer(n_in, n_out))["transfer"]
                      if r.name == "kind_linear_tailor_reduce_kernel")
        assert reduce.programs >= 132, (n_in, n_out, reduce.programs)


def test_the_counter_sees_what_it_should(backend):
    """The recorder counts a memset and a host read when there is one (the budget test could not
    fail otherwise): the previous flags (torch.zeros per launch) and a .item()."""
    x = torch.empty(64, 8, device="meta")
    with record_launches() as rec:
        torch.zeros(16, dtype=torch.int32, device="meta")
        (x @ x.t()).sum()
    assert [r.name for r in kernel_launches(rec)] == ["zeros", "mm", "sum"]
    assert os.environ.get("TRITON_INTERPRET") is None
