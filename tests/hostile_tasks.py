"""Small Task classes for tests/test_hostile_inputs.py: a good one and several that misbehave.

Each is named in a job spec as ``tests.hostile_tasks:ClassName``; the CLI must turn every failure
into one line and exit code 2 before any Ray cluster starts.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class GoodTask:
    """A valid task: a linear classifier on ``num_samples`` random points (built in milliseconds)."""

    def __init__(self, num_samples: int = 256, dim: int = 4) -> None:
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(num_samples, dim, generator=generator)
        self.y = (self.x[:, 0] > 0).long()
        self.dim = dim

    def build_model(self) -> nn.Module:
        return nn.Linear(self.dim, 2)

    def train_dataset(self) -> torch.utils.data.Dataset:
        return torch.utils.data.TensorDataset(self.x, self.y)

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {"accuracy": float((model(self.x).argmax(1) == self.y).float().mean())}


class TenSamplesTask(GoodTask):
    """A dataset of 10 samples: smaller than any useful global batch."""

    def __init__(self) -> None:
        super().__init__(num_samples=10)


class ConstructorRaisesTask(GoodTask):
    def __init__(self) -> None:
        raise FileNotFoundError("/data/train.csv")


class DatasetRaisesTask(GoodTask):
    def train_dataset(self) -> torch.utils.data.Dataset:
        raise RuntimeError("dataset shard 3 is corrupt")


class _Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield from range(10)


class IterableDatasetTask(GoodTask):
    """train_dataset() returns an iterable-style dataset: no len(), no indexing."""

    def train_dataset(self) -> torch.utils.data.Dataset:
        return _Stream()


class NoLossTask:
    """Lacks ``loss`` (and ``evaluate``): not a Task."""

    def build_model(self) -> nn.Module:
        return nn.Linear(4, 2)

    def train_dataset(self) -> torch.utils.data.Dataset:
        return torch.utils.data.TensorDataset(torch.zeros(8, 4))


NOT_A_CLASS = 42
