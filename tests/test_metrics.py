"""The paper's sample-quality metrics against direct implementations of their definitions, on
small synthetic feature sets (identical, disjoint, a known shift), without any downloaded
weights: FID / sFID (Fréchet distance of Gaussian fits; sFID on spatial features) and
precision / recall (k-NN manifolds, k = 3, Kynkäänniemi et al. 2019)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from kind_fast.train import metrics as M

pytest.importorskip("torchmetrics")
scipy_linalg = pytest.importorskip("scipy.linalg")


# ------------------------------------------------------------------ direct definitions
def fd_direct(a: np.ndarray, b: np.ndarray) -> float:
    """‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^½), unbiased covariances, scipy's sqrtm."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy_linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def pr_direct(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Loops over samples: the radius of a sample is the distance to its k-th nearest *other*
    sample of its own set; a point is on a set's manifold when it is within some sample's radius."""
    def radii(x):
        out = []
        for i in range(len(x)):
            d = sorted(float(np.linalg.norm(x[i] - x[j])) for j in range(len(x)) if j != i)
            out.append(d[k - 1])
        return out

    def share_inside(points, centres, r):
        inside = 0
        for p in points:
            inside += any(np.linalg.norm(p - c) <= rc for c, rc in zip(centres, r))
        return inside / len(points)

    return share_inside(fake, real, radii(real)), share_inside(real, fake, radii(fake))


def _clouds(seed=0, n=60, m=50, d=6):
    g = np.random.default_rng(seed)
    return g.normal(size=(n, d)), g.normal(size=(m, d)) * 1.3 + 0.4


# ------------------------------------------------------------------ Fréchet distance (FID, sFID)
def test_frechet_identical_sets_is_zero():
    a, _ = _clouds()
    assert abs(M.frechet_distance_features(torch.from_numpy(a), torch.from_numpy(a))) < 1e-8


def test_frechet_known_shift_is_the_squared_norm_of_the_shift():
    a, _ = _clouds()
    shift = np.array([1.0, -2.0, 0.5, 0.0, 3.0, 0.25])
    got = M.frechet_distance_features(torch.from_numpy(a), torch.from_numpy(a + shift))
    assert got == pytest.approx(float((shift ** 2).sum()), rel=1e-6)


def test_frechet_matches_the_direct_formula_on_different_sets():
    a, b = _clouds(1)
    got = M.frechet_distance_features(torch.from_numpy(a), torch.from_numpy(b))
    assert got == pytest.approx(fd_direct(a, b), rel=1e-6)
    far = b + 50.0  # disjoint: the mean term dominates
    assert M.frechet_distance_features(torch.from_numpy(a), torch.from_numpy(far)) == pytest.approx(
        fd_direct(a, far), rel=1e-6)


@pytest.fixture(scope="module")
def clf():
    torch.manual_seed(0)
    return M.DigitClassifier().eval().requires_grad_(False)  # untrained weights: fine for definitions


def test_digit_spatial_features_are_the_first_8_channels_of_the_last_map(clf):
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    net = M.DigitSpatialFeatures(clf)
    feats = net(x)
    assert net.num_features == 128 and feats.shape == (5, 128)
    h = torch.relu(clf.conv[0](x))
    h = torch.max_pool2d(torch.relu(clf.conv[2](h)), 2)  # conv1, relu, conv2, relu, 2×2 max-pool
    torch.testing.assert_close(feats, h[:, :8].reshape(5, -1))


def test_sfid_is_the_frechet_distance_of_spatial_features(clf):
    g = torch.Generator().manual_seed(0)
    real = torch.rand(300, 1, 8, 8, generator=g) * 2 - 1
    fake = (torch.rand(260, 1, 8, 8, generator=g) * 2 - 1) * 0.6 + 0.2
    spatial = M.DigitSpatialFeatures(clf)
    got = M.spatial_frechet_distance(real, fake, spatial)
    a, b = spatial(real).double().numpy(), spatial(fake).double().numpy()
    assert got == pytest.approx(fd_direct(a, b), rel=1e-4)
    assert abs(M.spatial_frechet_distance(real, real, spatial)) < 1e-6
    assert got != pytest.approx(M.frechet_distance(real, fake, M.DigitFeatures(clf)), rel=1e-2), \
        "sFID is not FID: another feature space"


def test_inception_spatial_features_take_mixed_6_conv_channels(monkeypatch, tmp_path):
    """The hook on torch-fidelity's Mixed_6d.branch1x1 (TF's mixed_6/conv) keeps 7 of its 192
    channels at 17 × 17 = 2023 values, flattened (h, w, c) as the ADM evaluator does. A stand-in
    network replaces the Inception weights."""
    tm_fid = pytest.importorskip("torchmetrics.image.fid")
    seen = {}

    class Branch(nn.Module):
        def forward(self, x):
            return torch.nn.functional.interpolate(x, size=(17, 17)).repeat(1, 64, 1, 1)  # 3 → 192 channels

    class FakeInception(nn.Module):
        def __init__(self, name, features_list, feature_extractor_weights_path):
            super().__init__()
            seen["features_list"] = features_list
            self.Mixed_6d = nn.Module()
            self.Mixed_6d.branch1x1 = Branch()

        def forward(self, u8):
            seen["u8"] = u8
            s = self.Mixed_6d.branch1x1(u8.float())
            return s.mean((2, 3))[:, :1].repeat(1, 768)

    monkeypatch.setattr(tm_fid, "NoTrainInceptionV3", FakeInception)
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")
    net = M.InceptionFeatures(str(weights), feature="spatial")
    x = torch.rand(2, 3, 20, 20) * 2 - 1
    out = net(x)
    assert net.num_features == 2023 and out.shape == (2, 2023) and seen["features_list"] == ["768"]
    ref = Branch()(seen["u8"].float())[:, :7].permute(0, 2, 3, 1).reshape(2, -1)
    torch.testing.assert_close(out, ref)


# ------------------------------------------------------------------ precision / recall
BACKENDS = ["ours"] + (["torch_fidelity"] if M._torch_fidelity_available() else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_precision_recall_identical_sets(backend):
    a, _ = _clouds()
    assert M.precision_recall(torch.from_numpy(a), torch.from_numpy(a), backend=backend) == (1.0, 1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_precision_recall_disjoint_sets(backend):
    a, b = _clouds()
    assert M.precision_recall(torch.from_numpy(a), torch.from_numpy(b + 100.0), backend=backend) == (0.0, 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shift", [0.2, 0.8, 1.5])
def test_precision_recall_known_shift_matches_the_definition(backend, shift):
    a, _ = _clouds(2, n=40, m=40, d=3)
    b = a + shift * np.array([1.0, 0.0, 0.0])
    got = M.precision_recall(torch.from_numpy(a), torch.from_numpy(b), backend=backend)
    assert got == pytest.approx(pr_direct(a, b), abs=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_precision_recall_asymmetric_sets_match_the_definition(backend):
    """A narrow generated set inside a wide real one: high precision, low recall."""
    a, b = _clouds(3, n=70, m=45, d=4)
    narrow = a[:45] * 0.3
    got = M.precision_recall(torch.from_numpy(a), torch.from_numpy(narrow), backend=backend)
    want = pr_direct(a, narrow)
    assert got == pytest.approx(want, abs=1e-12)
    assert want[0] > 0.9 and want[1] < 0.6
    assert M.precision_recall(torch.from_numpy(a), torch.from_numpy(b), backend=backend) == pytest.approx(
        pr_direct(a, b), abs=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_precision_recall_ball_includes_its_boundary(backend):
    """A sample exactly at a real sample's k-NN radius is on the manifold (distance <= radius).
    Small integer sets, so every distance is exact."""
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0]])  # radius of 4 (k = 3): |4 - 1| = 3
    fake = torch.tensor([[7.0], [100.0], [200.0], [300.0]])  # 7 is exactly 3 from 4
    got = M.precision_recall(real, fake, backend=backend)
    assert got == pytest.approx(pr_direct(real.numpy(), fake.numpy()), abs=1e-12)
    assert got[0] == 0.25


def test_precision_recall_k_is_3_by_default():
    a, b = _clouds(4, n=30, m=30, d=2)
    default = M.precision_recall(torch.from_numpy(a), torch.from_numpy(b), backend="ours")
    assert default == pytest.approx(pr_direct(a, b, k=3), abs=1e-12)
    assert pr_direct(a, b, k=1) != pr_direct(a, b, k=3)
    assert M.knn_precision_recall(torch.from_numpy(a), torch.from_numpy(b), k=1) == pytest.approx(
        pr_direct(a, b, k=1), abs=1e-12)


def test_precision_recall_batches_do_not_change_the_result():
    a, b = _clouds(5, n=50, m=37, d=5)
    one = M.knn_precision_recall(torch.from_numpy(a), torch.from_numpy(b))
    assert M.knn_precision_recall(torch.from_numpy(a), torch.from_numpy(b), batch=7) == one


def test_precision_recall_bad_input():
    a = torch.randn(10, 3)
    with pytest.raises(ValueError, match="more than 3 samples"):
        M.precision_recall(a, a[:3])
    with pytest.raises(ValueError, match="feature sizes"):
        M.precision_recall(a, torch.randn(10, 4))
    with pytest.raises(ValueError, match="backend"):
        M.precision_recall(a, a, backend="tf")
    with pytest.raises(ValueError, match="k must"):
        M.knn_precision_recall(a, a, k=0)


def test_digits_quality_reports_every_metric(clf):
    g = torch.Generator().manual_seed(0)
    real = torch.rand(60, 1, 8, 8, generator=g) * 2 - 1
    fake = torch.rand(40, 1, 8, 8, generator=g) * 2 - 1
    out = M.digits_quality(fake, torch.zeros(40, dtype=torch.long), real, clf, kid=False, inception=False)
    feats = M.DigitFeatures(clf)
    assert out["sfid"] == pytest.approx(M.spatial_frechet_distance(real, fake, M.DigitSpatialFeatures(clf)))
    assert (out["precision"], out["recall"]) == pytest.approx(
        pr_direct(feats(real).double().numpy(), feats(fake).double().numpy()), abs=1e-12)


# ------------------------------------------------------------------ scoring an .npz (kind-fast sample --eval)
def test_iter_npz_streams_rows_in_batches(tmp_path):
    from kind_fast.train.evaluate import iter_npz
    from kind_fast.train.sample_ddp import write_npz

    arr = np.arange(7 * 3 * 2 * 1, dtype=np.uint8).reshape(7, 3, 2, 1)
    np.savez(tmp_path / "a.npz", arr_0=arr, labels=np.arange(7))
    write_npz(tmp_path / "b.npz", {"arr_0": (arr.shape, np.uint8, [arr[:4], arr[4:]])})
    for name in ("a.npz", "b.npz"):
        parts = list(iter_npz(tmp_path / name, batch=3))
        assert [p.shape[0] for p in parts] == [3, 3, 1] and np.array_equal(np.concatenate(parts), arr)
    assert np.concatenate(list(iter_npz(tmp_path / "a.npz", "labels"))).tolist() == list(range(7))
    with pytest.raises(ValueError, match="no array"):
        list(iter_npz(tmp_path / "b.npz", "labels"))


def test_evaluate_npz_equals_the_metrics_on_the_same_images(tmp_path):
    """The streaming scorer of kind-fast sample --eval gives what the metric functions give on
    the decoded images: FID, sFID, precision/recall, class accuracy (digits classifier)."""
    from kind_fast.train.digits import load_digits
    from kind_fast.train.evaluate import evaluate_npz, uint8_to_images
    from kind_fast.train.sampling import to_uint8

    x, y = load_digits([3, 5])
    g = torch.Generator().manual_seed(0)
    pick = torch.randperm(x.shape[0], generator=g)[:90]
    fake = (x[pick] + 0.3 * torch.randn(90, 1, 8, 8, generator=g)).clamp(-1, 1)
    labels = y[pick].numpy()
    np.savez(tmp_path / "s.npz", arr_0=to_uint8(fake), labels=labels)
    got = evaluate_npz(tmp_path / "s.npz", digits=[3, 5], seed=0, batch=32)
    clf, _ = M.train_digit_classifier(0)
    seen = uint8_to_images(to_uint8(fake))
    assert got["fid"] == pytest.approx(M.frechet_distance(x, seen, M.DigitFeatures(clf)), rel=1e-6)
    assert got["sfid"] == pytest.approx(M.frechet_distance(x, seen, M.DigitSpatialFeatures(clf)), rel=1e-6)
    feats = M.DigitFeatures(clf)
    assert (got["precision"], got["recall"]) == pytest.approx(
        pr_direct(feats(x).double().numpy(), feats(seen).double().numpy()), abs=1e-12)
    acc, _ = M.class_accuracy(seen, torch.tensor([3, 5])[torch.as_tensor(labels)], clf)
    assert got["class_acc"] == pytest.approx(acc) and (got["n_real"], got["n_generated"]) == (x.shape[0], 90)
    with pytest.raises(ValueError, match="--ref"):
        evaluate_npz(tmp_path / "s.npz")
