"""ClassGate: builders, compiled form, null row, sharing, trainable gates, bad input."""

from __future__ import annotations

import pytest
import torch

import kind_fast as kf
from kind_fast.nn.gate import ClassGate, check_labels


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


def _overlaps(support: torch.Tensor) -> torch.Tensor:
    g = support.long()
    o = g @ g.t()
    return o[~torch.eye(g.shape[0], dtype=torch.bool)]


@pytest.mark.parametrize("classes,n_t,k,max_overlap", [
    (8, 16, 4, 1),     # the demo's pretraining gate
    (2, 16, 4, 0),     # the demo's transfer gate
    (9, 16, 4, 1),     # C·K/N_T not an integer
    (150, 96, 32, 16),  # KIND's 150 pretraining classes at the DiT defaults
    (35, 7, 3, 2),     # every 3-subset of 7 tailors: distinct sets only just exist
])
def test_balanced_gate_is_class_specific_and_balanced(classes, n_t, k, max_overlap):
    g = ClassGate.balanced(classes, n_t, k, seed=0)
    s = g.table[:classes] != 0
    assert g.kind == "balanced" and torch.all(s.sum(1) == k)
    assert torch.unique(s, dim=0).shape[0] == classes, "every class has its own set of tailors"
    use = s.sum(0)
    lo, hi = classes * k // n_t, -(-classes * k // n_t)
    assert int(use.min()) >= lo and int(use.max()) <= hi, "each tailor serves floor/ceil(C·K/N_T) classes"
    if classes > 1:
        assert int(_overlaps(s).max()) <= max_overlap
    assert torch.all(g.table[classes] == 0), "null class: learngenes only"


def test_balanced_gate_beats_block_and_random_k_on_its_properties():
    """At KIND's scale (150 classes, N_T = 96, K = 32): block gives 3 distinct sets (50 classes
    each, overlap 32); random_k gives distinct sets with unequal tailor use and a longer overlap
    tail than the balanced gate."""
    bal = ClassGate.balanced(150, 96, 32).table[:150] != 0
    blk = ClassGate.block(150, 96, 32).table[:150] != 0
    rnd = ClassGate.random_k(150, 96, 32).table[:150] != 0
    assert torch.unique(blk, dim=0).shape[0] == 3 and int(_overlaps(blk).max()) == 32
    assert int(rnd.sum(0).max() - rnd.sum(0).min()) > 1 and int(bal.sum(0).max() - bal.sum(0).min()) == 0
    assert int(_overlaps(bal).max()) < int(_overlaps(rnd).max())


def test_balanced_gate_is_deterministic_across_versions():
    a = ClassGate.balanced(8, 16, 4, seed=0)
    assert torch.equal(a.table, ClassGate.balanced(8, 16, 4, seed=0).table)
    assert not torch.equal(a.table, ClassGate.balanced(8, 16, 4, seed=1).table)
    # the gate's own PRNG (SplitMix64): these ids may never change, or saved models would stop loading
    assert a.idx[:8].tolist() == [[3, 6, 12, 15], [1, 8, 11, 14], [1, 7, 10, 13], [0, 3, 4, 9],
                                  [2, 10, 14, 15], [4, 5, 6, 7], [0, 2, 11, 12], [5, 8, 9, 13]]


@pytest.mark.parametrize("null,expected", [("off", 0), ("all", 16), ("class", 4)])
def test_balanced_gate_null_policies(null, expected):
    g = ClassGate.balanced(8, 16, 4, null=null)
    assert int(g.row(8).sum()) == expected
    if null == "class":  # the null class is one more class of the design: its own set
        s = g.table != 0
        assert torch.unique(s, dim=0).shape[0] == 9


def test_balanced_gate_errors():
    with pytest.warns(UserWarning, match="binomial"):  # only 10 distinct 2-subsets of 5: sets repeat
        g = ClassGate.balanced(11, 5, 2)
    s = g.table[:11] != 0
    assert torch.all(s.sum(1) == 2) and torch.unique(s, dim=0).shape[0] == 10
    assert int(s.sum(0).max() - s.sum(0).min()) <= 1, "still balanced"
    with pytest.raises(ValueError, match="active"):
        ClassGate.balanced(4, 8, 9)
    with pytest.raises(TypeError, match="seed"):
        ClassGate.balanced(4, 8, 2, seed=1.5)


def test_default_gate_is_the_documented_kind():
    from kind_fast.models.dit import KindConfig
    from kind_fast.nn.gate import DEFAULT_GATE, default_gate
    from kind_fast.train.config import RunConfig

    assert KindConfig().gate == DEFAULT_GATE == RunConfig().model.gate
    assert default_gate(10, 16, 4).kind == DEFAULT_GATE
    assert default_gate(10).active == 32 and default_gate(10).tailor_rank == 96


def test_kindify_without_a_gate_uses_the_default():
    from kind_fast.models.dit import DiT
    from kind_fast.nn.gate import DEFAULT_GATE

    dit = DiT(input_size=4, patch_size=2, in_channels=1, hidden_size=24, depth=1, num_heads=2, num_classes=5)
    kf.kindify(dit, tailor_rank=12)
    assert dit.kind_gate.kind == DEFAULT_GATE and dit.kind_gate.num_classes == 5
    assert dit.kind_gate.active == 4 and dit.kind.gate == DEFAULT_GATE


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
              ClassGate.balanced(5, 16, 4, seed=3, null="class"),
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


def test_check_labels_takes_inference_tensors_and_rechecks_them():
    """Labels made under torch.inference_mode have no version counter: they are checked (and
    rechecked after an in-place change) instead of crashing the cache."""
    from kind_fast.models.dit import DiT, KindConfig

    with torch.inference_mode():
        labels = torch.tensor([0, 1])
        assert check_labels(labels, 3) is labels and check_labels(labels, 3) is labels
        labels[1] = 7
        with pytest.raises(ValueError, match="out of range"):
            check_labels(labels, 3)
    kind = KindConfig(tailor_rank=8, active=2)
    model = DiT(input_size=4, patch_size=2, in_channels=1, hidden_size=16, depth=1, num_heads=2, num_classes=3,
                kind=kind)
    x, t = torch.randn(2, 1, 4, 4), torch.tensor([5, 9])
    with torch.inference_mode():
        y = torch.tensor([0, 3])
        out = model(x, t, y)
        with torch.device("cpu"):  # a model built under inference_mode too (its gate table has no version)
            inner = DiT(input_size=4, patch_size=2, in_channels=1, hidden_size=16, depth=1, num_heads=2,
                        num_classes=3, kind=kind)
        inner.load_state_dict(model.state_dict())
        assert torch.equal(inner(x, t, y), out)
    torch.testing.assert_close(out, model(x, t, torch.tensor([0, 3])))


def test_saves_with_the_old_block_default_keep_their_gate(tmp_path):
    """A KIND-DiT saved with gate="block" (the default before the balanced gate) loads with its
    block gate whatever the default now is, and its transfer builds a block gate too."""
    from kind_fast.models.dit import DiT, KindConfig
    from kind_fast.deploy.serialization import load_pretrained, save_pretrained

    torch.manual_seed(0)
    kind = KindConfig(tailor_rank=8, active=2, gate="block")
    model = DiT(input_size=4, patch_size=2, in_channels=1, hidden_size=16, depth=1, num_heads=2,
                num_classes=6, kind=kind)
    save_pretrained(model, tmp_path / "old")
    back = load_pretrained(tmp_path / "old")
    assert back.kind.gate == "block" and back.kind_gate.kind == "block"
    assert torch.equal(back.kind_gate.table, ClassGate.block(6, 8, 2).table)
    back.prepare_transfer(3)
    assert back.kind_gate.kind == "block" and back.kind_gate.num_classes == 3


def test_resume_with_another_gate_names_the_fix():
    from kind_fast.train.checkpoint import CheckpointError, check_compatible

    spec = {"mode": "pretrain", "method": "kind", "kind": {"gate": "block", "active": 4}}
    with pytest.raises(CheckpointError, match="--set model.gate=block"):
        check_compatible({"spec": spec}, dict(spec, kind={"gate": "balanced", "active": 4}), "ck.pt")
