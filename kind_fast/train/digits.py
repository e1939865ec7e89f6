"""The embedded default data: scikit-learn's ``digits`` (1797 real 8×8 images, 10 classes).

It ships inside the scikit-learn wheel, so it needs no download (``pip install 'kind_fast[demo]'``).
"""

from __future__ import annotations

import torch
from torch import Tensor


def load_digits(classes: list[int] | None = None, *, relabel: bool = True) -> tuple[Tensor, Tensor]:
    """Digits as (N, 1, 8, 8) float32 in [-1, 1] and (N,) int64 labels.

    ``classes`` keeps only those digits; with ``relabel`` they are renumbered 0..len-1 in the
    given order (digits 8, 9 become classes 0, 1 for a transfer run).
    """
    try:
        from sklearn.datasets import load_digits as _sk_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the digits data needs scikit-learn: pip install 'kind_fast[demo]'") from e
    d = _sk_digits()
    x = torch.from_numpy(d.images).float().div(16.0).mul(2.0).sub(1.0).unsqueeze(1)
    y = torch.from_numpy(d.target).long()
    if classes is not None:
        classes = list(classes)
        bad = [c for c in classes if not 0 <= c <= 9]
        if bad:
            raise ValueError(f"digits classes must be in 0..9, got {bad}")
        keep = torch.isin(y, torch.tensor(classes))
        x, y = x[keep], y[keep]
        if relabel:
            remap = torch.full((10,), -1, dtype=torch.long)
            remap[torch.tensor(classes)] = torch.arange(len(classes))
            y = remap[y]
    return x, y
