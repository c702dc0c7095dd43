"""Wide MLP: a ~10M-parameter model for benchmarks whose state and gradients are not toy-sized.

The default network (64 -> 2240 -> 2240 -> 2240 -> 10, ReLU) has about 10.2 million parameters, so a
resize moves about 80 MB of model + momentum state and every DDP step all-reduces about 40 MB of
gradients: the costs that grow with the model, which the digits CNN (about 10 thousand parameters)
does not show. Data: the 8x8 digits flattened to 64 features (``data: digits``, no download), or
a synthetic Gaussian-mixture set of any size (``data: synthetic``), both fixed by ``seed``.

Use it as ``task: examples.wide_mlp:WideMLPTask`` with ``task_args`` from the constructor.
"""

from __future__ import annotations

import torch
from torch import nn

from examples.classification import TensorClassificationTask

DATA_KINDS = ("digits", "synthetic")


class WideMLPError(ValueError):
    """A wide-MLP task configured with impossible values (one-line message)."""


def wide_mlp(in_features: int, hidden: int, depth: int, num_classes: int) -> nn.Sequential:
    """``depth`` hidden layers of width ``hidden`` (ReLU), then a linear head."""
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def parameter_count(in_features: int = 64, hidden: int = 2240, depth: int = 3, num_classes: int = 10) -> int:
    """Parameters of :func:`wide_mlp` with these sizes, without building it."""
    count, width = 0, in_features
    for _ in range(depth):
        count += width * hidden + hidden
        width = hidden
    return count + width * num_classes + num_classes


class WideMLPTask(TensorClassificationTask):
    """A wide MLP classifier (see the module docstring).

    Args:
        hidden: width of every hidden layer.
        depth: number of hidden layers (>= 1).
        data: ``digits`` (1437 train / 359 held-out 8x8 images as 64 features) or ``synthetic``.
        num_train: training samples of the synthetic set.
        num_test: held-out samples of the synthetic set.
        seed: seeds the synthetic data (the digits split is fixed).
    """

    def __init__(self, hidden: int = 2240, depth: int = 3, data: str = "digits", num_train: int = 4096,
                 num_test: int = 1024, seed: int = 0) -> None:
        for name, value in (("hidden", hidden), ("depth", depth), ("num_train", num_train), ("num_test", num_test)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise WideMLPError(f"{name}: must be an int >= 1 (got {value!r})")
        if data not in DATA_KINDS:
            raise WideMLPError(f"data: must be one of {', '.join(DATA_KINDS)} (got {data!r})")
        self.hidden, self.depth, self.data = hidden, depth, data
        if data == "digits":
            from examples.digits import load_split

            x_train, self.y_train, x_test, self.y_test = load_split()
            self.x_train, self.x_test = x_train.flatten(1), x_test.flatten(1)
        else:
            gen = torch.Generator().manual_seed(seed)
            teacher = torch.randn(64, 10, generator=gen)
            x = torch.randn(num_train + num_test, 64, generator=gen)
            y = (x @ teacher + 0.5 * torch.randn(num_train + num_test, 10, generator=gen)).argmax(1)
            self.x_train, self.y_train = x[:num_train], y[:num_train]
            self.x_test, self.y_test = x[num_train:], y[num_train:]

    def build_model(self) -> nn.Module:
        return wide_mlp(self.x_train.shape[1], self.hidden, self.depth, 10)
