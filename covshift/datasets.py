"""Small real data that ships inside a package, for the examples and tests (no download)."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset


def digits(images: bool = False, val_fraction: float = 0.2, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's 1,797 handwritten digits (8x8 pixels, 10 classes) as a
    ``(train, val)`` pair of TensorDatasets, pixels scaled to [0, 1].

    ``images=False`` gives flat 64-feature rows; ``images=True`` gives ``(1, 8, 8)`` images.
    The split is a fixed shuffle by ``seed``.

    >>> train, val = digits()  # doctest: +SKIP
    >>> train[0][0].shape, len(train), len(val)  # doctest: +SKIP
    (torch.Size([64]), 1438, 359)
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError(
            "covshift.datasets.digits needs scikit-learn: pip install scikit-learn "
            "(or pip install 'covshift[examples]')") from None
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    if images:
        x = x.view(-1, 1, 8, 8)
    y = torch.tensor(y, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = len(x) - int(round(len(x) * val_fraction))
    train, val = order[:cut], order[cut:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])
