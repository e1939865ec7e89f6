"""Sample quality: FID, sFID, precision/recall, KID, IS, with a pluggable feature network.

Every feature network here takes images in [-1, 1] (N, C, H, W) float32 — the trainer's
convention — and returns (N, d) features (or logits for IS).

The metrics (the definitions of DiT's and KIND's tables, which use the ADM evaluator):

* **FID**: the Fréchet distance of Gaussians fitted to pooled features of real and generated
  images, ‖μ_r − μ_g‖² + Tr(Σ_r + Σ_g − 2 (Σ_r Σ_g)^½) (torchmetrics'
  ``FrechetInceptionDistance`` with our feature network).
* **sFID** (Nash et al. 2021, as the ADM evaluator computes it): the same Fréchet distance on
  *spatial* features, the first 7 channels of Inception's ``mixed_6/conv`` map (17 × 17 × 7 =
  2023 values per image), so it sees spatial structure that pooling averages away.
* **precision / recall** (Kynkäänniemi et al. 2019, k = 3): each real feature vector gets a
  ball reaching its k-th nearest real neighbour; precision is the fraction of generated samples
  inside at least one real ball (fidelity), recall the fraction of real samples inside at least
  one ball of the generated set (coverage). Pooled features, as FID.
* KID and IS through torchmetrics.

torchmetrics (1.9) has FID, KID and IS but neither sFID nor precision/recall. torch-fidelity
has precision/recall (``prc_features_to_metric``); ``precision_recall`` uses it where it is
installed and otherwise its own implementation of the same definition (tests check both
against a direct implementation). torch-fidelity needs torchvision, which the demo does not.

Feature spaces:

* Digits: ``train_digit_classifier`` fits a small CNN on real sklearn digits (seeded, a few
  seconds on a CPU). Its 64-d penultimate layer is the pooled space (FID, KID, precision/recall:
  ``DigitFeatures``); the first 8 channels of its last 4 × 4 convolution map (128 values) are
  the spatial space (sFID: ``DigitSpatialFeatures``, the digits' analogue of ``mixed_6/conv``);
  its logits give IS and the class accuracy of generated samples (``class_accuracy``: does the
  classifier read a generated "8" as an 8?).
* ImageNet scale: ``InceptionFeatures(weights_path)`` wraps torchmetrics' FID Inception-v3
  (torch-fidelity's port of the TF graph) with weights from a local file, e.g.
  ``weights-inception-2015-12-05-6726825d.pth`` that torch-fidelity would download; nothing is
  fetched at run time. ``feature="spatial"`` gives the sFID features (torch-fidelity's
  ``Mixed_6d.branch1x1`` is the TF graph's ``mixed_6/conv``). Needs ``pip install
  torch-fidelity``. Not exercised in CI (no weights). The ADM TF evaluator on the
  ``samples.npz`` that ``kind-fast sample --npz`` writes remains the reference for numbers
  comparable to published tables.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _torchmetrics():
    try:
        import torchmetrics  # noqa: F401
    except ImportError:
        raise ImportError("sample-quality metrics need torchmetrics: pip install torchmetrics "
                          "(or 'kind_fast[demo]')") from None


# =====================================================================================
# Digits classifier
# =====================================================================================
class DigitClassifier(nn.Module):
    """8×8 gray digits → 10 logits; ``features`` is the 64-d penultimate layer."""

    num_features = 64
    spatial_channels = 8  # channels of the 4 × 4 map kept for sFID (ADM keeps 7 of mixed_6/conv)

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 4×4
        )
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(32 * 16, self.num_features), nn.ReLU())
        self.head = nn.Linear(self.num_features, num_classes)

    def _check(self, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[1:] != (1, 8, 8):
            raise ValueError(f"the digit classifier takes (N, 1, 8, 8) images, got {tuple(x.shape)}")

    def features(self, x: Tensor) -> Tensor:
        self._check(x)
        return self.fc(self.conv(x.float()))

    def spatial(self, x: Tensor) -> Tensor:
        """(N, 128): the first ``spatial_channels`` channels of the last 4 × 4 map, flattened."""
        self._check(x)
        return self.conv(x.float())[:, :self.spatial_channels].flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def train_digit_classifier(seed: int = 0, *, epochs: int = 25, holdout: float = 0.2
                           ) -> tuple[DigitClassifier, dict]:
    """Fit ``DigitClassifier`` on a seeded (1 - holdout) split of all 1797 sklearn digits.

    Returns the classifier (eval mode, frozen) and {"train_acc", "test_acc", "n_test"}.
    """
    from kind_fast.train.digits import load_digits

    x, y = load_digits()
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(x.shape[0], generator=g)
    n_test = int(round(holdout * x.shape[0]))
    test, train = perm[:n_test], perm[n_test:]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clf = DigitClassifier()
        opt = torch.optim.Adam(clf.parameters(), lr=3e-3)
        for _ in range(epochs):
            order = train[torch.randperm(train.shape[0], generator=g)]
            for i in range(0, order.shape[0], 128):
                b = order[i:i + 128]
                loss = F.cross_entropy(clf(x[b]), y[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    clf.eval().requires_grad_(False)
    with torch.no_grad():
        acc = lambda idx: (clf(x[idx]).argmax(1) == y[idx]).float().mean().item()  # noqa: E731
        report = {"train_acc": acc(train), "test_acc": acc(test), "n_test": n_test}
    return clf, report


class DigitFeatures(nn.Module):
    """The classifier's 64-d features, as a torchmetrics feature extractor."""

    def __init__(self, clf: DigitClassifier):
        super().__init__()
        self.clf = clf
        self.num_features = clf.num_features

    def forward(self, x: Tensor) -> Tensor:
        return self.clf.features(x)


class DigitSpatialFeatures(nn.Module):
    """The classifier's spatial features (sFID), as a torchmetrics feature extractor."""

    def __init__(self, clf: DigitClassifier):
        super().__init__()
        self.clf = clf
        self.num_features = clf.spatial_channels * 16

    def forward(self, x: Tensor) -> Tensor:
        return self.clf.spatial(x)


class DigitLogits(nn.Module):
    """The classifier's logits (for the Inception Score)."""

    def __init__(self, clf: DigitClassifier):
        super().__init__()
        self.clf = clf
        self.num_features = 10

    def forward(self, x: Tensor) -> Tensor:
        # float64: IS takes log(mean softmax); a confident classifier's float32 softmax underflows to 0
        return self.clf(x).double()


class InceptionFeatures(nn.Module):
    """FID Inception-v3 (2048-d pool features, or ``feature`` = 64/192/768/"logits_unbiased", or
    "spatial": sFID's 2023 values, the first 7 channels of the 17 × 17 ``mixed_6/conv`` map) from
    a local weights file; input [-1, 1] RGB images of any size."""

    SPATIAL_CHANNELS = 7

    def __init__(self, weights_path: str, feature: int | str = 2048):
        super().__init__()
        from pathlib import Path

        if not Path(weights_path).is_file():
            raise FileNotFoundError(f"Inception weights {weights_path} not found")
        _torchmetrics()
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
        except ImportError as e:  # pragma: no cover
            raise ImportError(f"InceptionFeatures needs torchmetrics with torch-fidelity ({e})") from None
        self.spatial = feature == "spatial"
        # the spatial map sits before Mixed_6e: ask the net for its 768-d output, the earliest
        # feature after it, and catch Mixed_6d's 1x1 branch on the way (a forward hook)
        net_feature = "768" if self.spatial else str(feature)
        try:
            self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=[net_feature],
                                          feature_extractor_weights_path=str(weights_path))
        except ModuleNotFoundError as e:
            raise ImportError("InceptionFeatures needs torch-fidelity: pip install torch-fidelity") from e
        self._caught: Tensor | None = None
        if self.spatial:
            self.net.Mixed_6d.branch1x1.register_forward_hook(self._catch)
            self.num_features = self.SPATIAL_CHANNELS * 17 * 17
        else:
            self.num_features = 1008 if str(feature).startswith("logits") else int(feature)

    def _catch(self, module, args, output) -> None:
        self._caught = output[:, :self.SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1).float()  # (h, w, c) as TF

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        u8 = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        out = self.net(u8)
        if self.spatial:
            out, self._caught = self._caught, None
        return out


# =====================================================================================
# Metrics
# =====================================================================================
def _batched(images: Tensor, fn, batch: int = 512) -> None:
    for i in range(0, images.shape[0], batch):
        fn(images[i:i + batch])


@torch.no_grad()
def frechet_distance(real: Tensor, fake: Tensor, features: nn.Module) -> float:
    """FID between two image sets in ``features``' space (torchmetrics)."""
    _torchmetrics()
    from torchmetrics.image.fid import FrechetInceptionDistance

    m = FrechetInceptionDistance(feature=features, normalize=True)
    _batched(real, lambda b: m.update(b, real=True))
    _batched(fake, lambda b: m.update(b, real=False))
    return float(m.compute())


@torch.no_grad()
def spatial_frechet_distance(real: Tensor, fake: Tensor, spatial: nn.Module) -> float:
    """sFID: the Fréchet distance in a spatial feature space (``DigitSpatialFeatures``,
    ``InceptionFeatures(..., feature="spatial")``)."""
    return frechet_distance(real, fake, spatial)


class FeatureIdentity(nn.Module):
    """A torchmetrics "feature network" for features computed already: (N, d) in, (N, d) out."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, x: Tensor) -> Tensor:
        return x


@torch.no_grad()
def frechet_distance_features(real: Tensor, fake: Tensor) -> float:
    """The Fréchet distance of two feature sets (N, d), (M, d) (torchmetrics, float64)."""
    _check_feature_pair(real, fake)
    return frechet_distance(real.double(), fake.double(), FeatureIdentity(real.shape[1]))


def _check_feature_pair(real: Tensor, fake: Tensor) -> None:
    if not (isinstance(real, Tensor) and isinstance(fake, Tensor)) or real.dim() != 2 or fake.dim() != 2:
        raise ValueError("features must be 2-D tensors (samples, dims)")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sizes differ: {real.shape[1]} vs {fake.shape[1]}")


def _kth_neighbour_radii(x: Tensor, k: int, batch: int) -> Tensor:
    """Distance of each row of x to its k-th nearest other row (itself, at distance 0, is the 0th)."""
    return torch.cat([torch.cdist(x[i:i + batch], x).kthvalue(k + 1, dim=1).values
                      for i in range(0, x.shape[0], batch)])


def _covered(points: Tensor, centres: Tensor, radii: Tensor, batch: int) -> Tensor:
    """For each point: is it within radii[j] of some centres[j] (distance <= radius)?"""
    return torch.cat([(torch.cdist(points[i:i + batch], centres) <= radii).any(dim=1)
                      for i in range(0, points.shape[0], batch)])


def _check_precision_recall_args(real: Tensor, fake: Tensor, k) -> None:
    _check_feature_pair(real, fake)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if min(real.shape[0], fake.shape[0]) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set, "
                         f"got {real.shape[0]} real and {fake.shape[0]} generated")


@torch.no_grad()
def knn_precision_recall(real: Tensor, fake: Tensor, *, k: int = 3, batch: int = 2048) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of feature sets (N, d), (M, d):
    the k-NN manifold of a set is the union of balls around its samples, each reaching the
    sample's k-th nearest neighbour in its own set. precision = fraction of ``fake`` inside the
    real manifold; recall = fraction of ``real`` inside the fake manifold. float64, batched."""
    _check_precision_recall_args(real, fake, k)
    real, fake = real.double(), fake.double()
    precision = _covered(fake, real, _kth_neighbour_radii(real, k, batch), batch).double().mean()
    recall = _covered(real, fake, _kth_neighbour_radii(fake, k, batch), batch).double().mean()
    return float(precision), float(recall)


def _torch_fidelity_available() -> bool:
    try:
        import torch_fidelity.metric_prc  # noqa: F401
    except ImportError:  # not installed, or the torchvision it imports is missing
        return False
    return True


def precision_recall(real: Tensor, fake: Tensor, *, k: int = 3, backend: str = "auto") -> tuple[float, float]:
    """Precision and recall (k-NN manifolds, k = 3 as in the paper and the ADM evaluator) of
    feature sets (N, d), (M, d). ``backend``: "torch_fidelity" (its ``prc_features_to_metric``),
    "ours" (``knn_precision_recall``), or "auto" (torch-fidelity where it imports, else ours)."""
    if backend not in ("auto", "torch_fidelity", "ours"):
        raise ValueError(f"backend must be auto, torch_fidelity or ours, got {backend!r}")
    _check_precision_recall_args(real, fake, k)
    if backend != "ours":
        try:
            from torch_fidelity.metric_prc import prc_features_to_metric
        except ImportError:  # torch-fidelity (or the torchvision it imports) is not installed
            if backend == "torch_fidelity":
                raise ImportError("precision_recall(backend='torch_fidelity') needs torch-fidelity: "
                                  "pip install torch-fidelity") from None
        else:
            out = prc_features_to_metric(real.double(), fake.double(), prc_neighborhood=k, prc_batch_size=2048,
                                         save_cpu_ram=True, verbose=False)
            return float(out["precision"]), float(out["recall"])
    return knn_precision_recall(real, fake, k=k)


@torch.no_grad()
def features_of(images: Tensor, net: nn.Module, batch: int = 512) -> Tensor:
    """``net``'s features of ``images`` (N, d), in batches."""
    return torch.cat([net(images[i:i + batch]).float() for i in range(0, images.shape[0], batch)])


@torch.no_grad()
def kernel_distance(real: Tensor, fake: Tensor, features: nn.Module, *, subsets: int = 50,
                    subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID (mean, std over subsets) in ``features``' space (torchmetrics)."""
    _torchmetrics()
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(subset_size, real.shape[0], fake.shape[0])
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)  # KID draws its subsets from the global generator
        m = KernelInceptionDistance(feature=features, subsets=subsets, subset_size=size, normalize=True)
        _batched(real, lambda b: m.update(b, real=True))
        _batched(fake, lambda b: m.update(b, real=False))
        mean, std = m.compute()
    return float(mean), float(std)


@torch.no_grad()
def inception_score(fake: Tensor, logits: nn.Module, *, splits: int = 5, seed: int = 0) -> tuple[float, float]:
    """IS (mean, std over splits) from a logits network (torchmetrics)."""
    _torchmetrics()
    from torchmetrics.image.inception import InceptionScore

    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)  # IS shuffles with the global generator
        # normalize=False: IS casts float inputs to bytes otherwise, even for a custom network
        m = InceptionScore(feature=logits, splits=splits, normalize=False)
        _batched(fake, m.update)
        mean, std = m.compute()
    return float(mean), float(std)


@torch.no_grad()
def class_accuracy(images: Tensor, labels: Tensor, clf: nn.Module) -> tuple[float, dict[int, float]]:
    """Fraction of ``images`` that ``clf`` assigns to ``labels`` (overall, per label)."""
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    pred = torch.cat([clf(images[i:i + 512]).argmax(1) for i in range(0, images.shape[0], 512)])
    hit = (pred == labels).float()
    per = {int(c): hit[labels == c].mean().item() for c in torch.unique(labels)}
    return hit.mean().item(), per


def digits_quality(fake: Tensor, fake_digits: Tensor, real: Tensor, clf: DigitClassifier, *,
                   kid: bool = True, inception: bool = True) -> dict:
    """FID, sFID, precision/recall (k = 3), KID, IS in the digit classifier's spaces and the
    class accuracy of the samples (``fake_digits``: the digit ids 0-9 they were generated for)."""
    feats = DigitFeatures(clf)
    out = {"fid": frechet_distance(real, fake, feats),
           "sfid": spatial_frechet_distance(real, fake, DigitSpatialFeatures(clf))}
    out["precision"], out["recall"] = precision_recall(features_of(real, feats), features_of(fake, feats))
    if kid:
        out["kid"], out["kid_std"] = kernel_distance(real, fake, feats)
    if inception:
        out["is"], out["is_std"] = inception_score(fake, DigitLogits(clf))
    out["class_acc"], per = class_accuracy(fake, fake_digits, clf)
    out["class_acc_per_digit"] = {str(k): v for k, v in per.items()}
    return out
