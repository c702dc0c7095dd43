"""The part every classification example shares: tensors in memory, cross-entropy, held-out accuracy."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class TensorClassificationTask:
    """Base of the example tasks: a subclass sets ``x_train, y_train, x_test, y_test`` and
    ``build_model()``; the Task protocol's other three methods are here."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def train_dataset(self) -> torch.utils.data.Dataset:
        return torch.utils.data.TensorDataset(self.x_train, self.y_train)

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        logits = model(self.x_test.to(device))
        model.train(was_training)
        y = self.y_test.to(device)
        return {
            "accuracy": float((logits.argmax(1) == y).float().mean()),
            "loss": float(F.cross_entropy(logits, y)),
        }
