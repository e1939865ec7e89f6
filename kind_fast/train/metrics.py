"""Sample quality through torchmetrics (FID, KID, IS) with a pluggable feature network.

Every feature network here takes images in [-1, 1] (N, C, H, W) float32 — the trainer's
convention — and returns (N, d) features (or logits for IS).

* Digits: ``train_digit_classifier`` fits a small CNN on real sklearn digits (seeded, a few
  seconds on a CPU). Its 64-d penultimate layer is the FID/KID feature space
  (``DigitFeatures``), its logits give IS and the class accuracy of generated samples
  (``class_accuracy``: does the classifier read a generated "8" as an 8?).
* ImageNet scale: ``InceptionFeatures(weights_path)`` wraps torchmetrics' FID Inception-v3
  (torch-fidelity's port of the TF graph) with weights from a local file, e.g.
  ``weights-inception-2015-12-05-6726825d.pth`` that torch-fidelity would download; nothing is
  fetched at run time. Needs ``pip install torch-fidelity``. Not exercised in CI. Numbers
  comparable to DiT's tables come from the ADM TF evaluator on the ``samples.npz`` that
  ``kind-fast sample --npz`` writes.
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

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 4×4
        )
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(32 * 16, self.num_features), nn.ReLU())
        self.head = nn.Linear(self.num_features, num_classes)

    def features(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1:] != (1, 8, 8):
            raise ValueError(f"the digit classifier takes (N, 1, 8, 8) images, got {tuple(x.shape)}")
        return self.fc(self.conv(x.float()))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def train_digit_classifier(seed: int = 0, *, epochs: int = 25, holdout: float = 0.2
                           ) -> tuple[DigitClassifier, dict]:
    """Fit ``DigitClassifier`` on a seeded (1 - holdout) split of all 1797 sklearn digits.

    Returns the classifier (eval mode, frozen) and {"train_acc", "test_acc", "n_test"}.
    """
    from kind_fast.data import load_digits

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
    """FID Inception-v3 (2048-d pool features, or ``feature`` = 64/192/768/"logits_unbiased")
    from a local weights file; input [-1, 1] RGB images of any size."""

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
        try:
            self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(feature)],
                                          feature_extractor_weights_path=str(weights_path))
        except ModuleNotFoundError as e:
            raise ImportError("InceptionFeatures needs torch-fidelity: pip install torch-fidelity") from e
        self.num_features = 1008 if str(feature).startswith("logits") else int(feature)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        u8 = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return self.net(u8)


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
    """FID / KID / IS in the digit classifier's space and class accuracy of the samples
    (``fake_digits`` are the digit ids 0-9 the samples were generated for)."""
    feats = DigitFeatures(clf)
    out = {"fid": frechet_distance(real, fake, feats)}
    if kid:
        out["kid"], out["kid_std"] = kernel_distance(real, fake, feats)
    if inception:
        out["is"], out["is_std"] = inception_score(fake, DigitLogits(clf))
    out["class_acc"], per = class_accuracy(fake, fake_digits, clf)
    out["class_acc_per_digit"] = {str(k): v for k, v in per.items()}
    return out
