"""ClassGate: builders, compiled form, null row, sharing, trainable gates, bad input."""

from __future__ import annotations

import pytest
import torch

import kind_fast as kf
from kind_fast.gate import ClassGate, check_labels


def test_block_gate_structure():
    g = ClassGate.block(num_classes=10, tailor_rank=96, active=32)
    assert (g.num_classes, g.null_class, g.tailor_rank, g.active) == (10, 10, 96, 32)
    idx, val = g.compiled()
    assert idx.dtype == torch.int32 and val.dtype == torch.float32
    assert idx.shape == val.shape == (11, 32)
    for c in range(10):
        b = c % 3
        assert idx[c].tolist() == list(range(32 * b, 32 * b + 32))
        assert torch.all(val[c] == 1)
    assert torch.all(val[10] == 0), "null class switches on no tailor by default"
    torch.testing.assert_close(g.row(10), torch.zeros(96))


@pytest.mark.parametrize("null,expected", [("off", 0), ("all", 96), ("class", 32)])
def test_null_policies(null, expected):
    g = ClassGate.block(5, 96, 32, null=null)
    assert int(g.row(5).sum()) == expected


def test_random_k_is_seeded_and_sized():
    a = ClassGate.random_k(20, 64, 7, seed=3)
    b = ClassGate.random_k(20, 64, 7, seed=3)
    c = ClassGate.random_k(20, 64, 7, seed=4)
    assert torch.equal(a.table, b.table) and not torch.equal(a.table, c.table)
    assert torch.all(a.table[:20].sum(1) == 7)
    ids = a.idx[:20].long()
    assert torch.all(ids[:, 1:] > ids[:, :-1]), "active ids are sorted and distinct"


def test_dense_gate_padding_and_values():
    table = torch.tensor([[0.5, 0.0, -2.0, 0.0], [0.0, 0.0, 0.0, 1.5], [0.0, 0.0, 0.0, 0.0]])
    g = ClassGate.dense(table)
    idx, val = g.compiled()
    assert g.active == 2 and g.num_classes == 3
    assert idx[0].tolist() == [0, 2] and val[0].tolist() == [0.5, -2.0]
    assert idx[1].tolist() == [3, 0] and val[1].tolist() == [1.5, 0.0], "padding slot: id 0, value 0"
    assert val[2].tolist() == [0.0, 0.0] and val[3].tolist() == [0.0, 0.0]


def test_all_on_gate():
    g = ClassGate.all_on(4, 6)
    assert g.active == 6 and torch.all(g.support_mask() == 1)
    assert torch.all(ClassGate.all_on(4, 6, null="off").row(4) == 0)


def test_trainable_gate_gets_gradient_only_on_support():
    torch.manual_seed(0)
    table = torch.randn(3, 8)
    g = ClassGate.dense(table, trainable=True)
    layer = kf.FastKindLinear(12, 16, tailor_rank=8, gate=g)
    x = torch.randn(3, 4, 12)
    layer(x, labels=torch.tensor([0, 2, 2])).square().sum().backward()
    grad = g.table.grad
    assert grad is not None
    assert grad[0].abs().sum() > 0 and grad[2].abs().sum() > 0
    assert torch.all(grad[1] == 0) and torch.all(grad[3] == 0), "classes absent from the batch"


def test_trainable_sparse_support_masks_padding_grads():
    table = torch.zeros(2, 6)
    table[0, 1] = 1.0
    support = torch.zeros(3, 6, dtype=torch.bool)
    support[0, 1] = support[1, 2] = support[1, 4] = True
    g = ClassGate(torch.cat([table, torch.zeros(1, 6)]), support=support, trainable=True)
    assert g.active == 2
    idx, val = g.compiled()
    (val * torch.arange(1.0, 7.0).view(3, 2)).sum().backward()
    grad = g.table.grad
    assert grad[0, 1] == 1 and grad[0, 0] == 0, "row 0's padding slot (id 0) must not get gradient"
    assert grad[1, 2] == 3 and grad[1, 4] == 4 and grad[2].abs().sum() == 0


def test_shared_gate_change_in_one_place():
    g = ClassGate.block(4, 8, 4)
    layers = [kf.FastKindLinear(8, 8, tailor_rank=8, gate=g) for _ in range(3)]
    x = torch.randn(2, 3, 8)
    labels = torch.tensor([0, 1])
    before = [m(x, labels=labels) for m in layers]
    with torch.no_grad():
        g.table[0] = 0.0  # switch class 0 off everywhere
    after = [m(x, labels=labels) for m in layers]
    for m, b, a in zip(layers, before, after):
        assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1])
        torch.testing.assert_close(a[0], x[0] @ m.to_dense(None).t() + m.bias)


def test_compiled_cache_per_device_and_version():
    g = ClassGate.block(3, 8, 4)
    idx1, val1 = g.compiled("cpu")
    idx2, val2 = g.compiled("cpu")
    assert val1 is val2
    with torch.no_grad():
        g.table.mul_(2)
    _, val3 = g.compiled("cpu")
    assert val3 is not val1 and val3.max() == 2


def test_config_roundtrip():
    for g in (ClassGate.block(5, 16, 4, null="class"), ClassGate.random_k(5, 16, 4, seed=2),
              ClassGate.all_on(5, 16), ClassGate.dense(torch.randn(5, 16))):
        h = ClassGate.from_config(g.to_config(), g.table)
        assert torch.equal(h.table, g.table) and torch.equal(h.idx, g.idx) and h.kind == g.kind
    with pytest.raises(ValueError, match="does not match"):
        ClassGate.from_config(ClassGate.block(5, 16, 4).to_config(), torch.ones(6, 16))


def test_builder_errors():
    with pytest.raises(ValueError, match="active"):
        ClassGate.block(4, 8, 9)
    with pytest.raises(ValueError, match="num_classes"):
        ClassGate.block(0, 8, 2)
    with pytest.raises(TypeError, match="tailor_rank"):
        ClassGate.random_k(4, 8.0, 2)
    with pytest.raises(ValueError, match="null"):
        ClassGate.block(4, 8, 2, null="sometimes")
    with pytest.raises(ValueError, match="table must be 2-D"):
        ClassGate(torch.ones(5))
    with pytest.raises(TypeError, match="floating-point"):
        ClassGate(torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="class_id"):
        ClassGate.block(4, 8, 2).row(5)


def test_check_labels():
    assert check_labels(torch.tensor([0, 4]), 4).tolist() == [0, 4]
    with pytest.raises(ValueError, match=r"\[0, 4\]"):
        check_labels(torch.tensor([5]), 4)
    with pytest.raises(TypeError):
        check_labels([1, 2], 4)


def test_gate_built_under_meta_device_context_is_real():
    with torch.device("meta"):
        g = ClassGate.random_k(3, 8, 2)
    assert g.table.device.type == "cpu" and g.idx.device.type == "cpu"


def test_check_labels_rechecks_after_in_place_change():
    labels = torch.tensor([0, 1])
    check_labels(labels, 3)
    check_labels(labels, 3)  # cached
    labels[1] = 7
    with pytest.raises(ValueError, match="out of range"):
        check_labels(labels, 3)
    with pytest.raises(ValueError, match="out of range"):
        check_labels(torch.tensor([0, 1]), 0)
