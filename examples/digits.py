"""Digits: a small CNN on scikit-learn's 8x8 handwritten digits (ships with the package, no download)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from examples.classification import TensorClassificationTask


def load_split(test_fraction: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): images scaled to [0, 1], a fixed held-out split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(y) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


class DigitsNet(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.head = nn.Linear(2 * width * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.head(x.flatten(1))


class DigitsTask(TensorClassificationTask):
    """The quickstart task: ``task: examples.digits:DigitsTask``."""

    def __init__(self, width: int = 16, test_fraction: float = 0.2, split_seed: int = 0) -> None:
        self.width = width
        self.x_train, self.y_train, self.x_test, self.y_test = load_split(test_fraction, split_seed)

    def build_model(self) -> nn.Module:
        return DigitsNet(self.width)
