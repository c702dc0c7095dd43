"""Synthetic: a small MLP on a generated Gaussian-mixture classification set with label noise.

Every class is a mixture of ``clusters_per_class`` Gaussian blobs whose centres are drawn at random,
so the classes are not linearly separable and a hidden layer pays off. A fraction ``label_noise`` of
the *training* labels is replaced by a uniformly random class: the gradient noise stays high all the
way through training (the regime where AdaScale's gain matters), while the held-out split keeps its
true labels so that its accuracy measures the learned decision rule. Everything is a function of
``seed``; nothing is downloaded.

Use it as ``task: examples.synthetic:SyntheticTask`` with ``task_args`` from the constructor.
"""

from __future__ import annotations

import torch
from torch import nn

from examples.classification import TensorClassificationTask


class SyntheticTaskError(ValueError):
    """A synthetic task was configured with impossible values (one-line message)."""


def make_mixture(
    num_samples: int,
    centres: torch.Tensor,
    noise_std: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_samples`` points: a uniformly chosen blob of ``centres`` (classes, clusters, dim) plus noise."""
    num_classes, clusters, dim = centres.shape
    labels = torch.randint(0, num_classes, (num_samples,), generator=generator)
    blob = torch.randint(0, clusters, (num_samples,), generator=generator)
    x = centres[labels, blob] + noise_std * torch.randn(num_samples, dim, generator=generator)
    return x, labels


class SyntheticTask(TensorClassificationTask):
    """Gaussian-mixture classification (train with noisy labels, held-out with clean labels).

    Args:
        num_train: training samples.
        num_test: held-out samples.
        dim: input features.
        num_classes: classes.
        clusters_per_class: Gaussian blobs per class (>= 2 makes the problem non-linear).
        separation: standard deviation of the blob centres; the blobs themselves have unit variance.
        label_noise: fraction of training labels replaced by a uniformly random class, in [0, 1).
        hidden: width of the MLP's hidden layer; 0 gives softmax regression.
        seed: seeds the centres, the samples and the label noise.
    """

    def __init__(
        self,
        num_train: int = 4096,
        num_test: int = 2048,
        dim: int = 16,
        num_classes: int = 8,
        clusters_per_class: int = 3,
        separation: float = 1.2,
        label_noise: float = 0.2,
        hidden: int = 64,
        seed: int = 0,
    ) -> None:
        for name, value in (("num_train", num_train), ("num_test", num_test), ("dim", dim),
                            ("clusters_per_class", clusters_per_class)):
            if not isinstance(value, int) or value < 1:
                raise SyntheticTaskError(f"{name}: must be an integer >= 1, got {value!r}")
        if not isinstance(num_classes, int) or num_classes < 2:
            raise SyntheticTaskError(f"num_classes: must be an integer >= 2, got {num_classes!r}")
        if not separation > 0:
            raise SyntheticTaskError(f"separation: must be > 0, got {separation!r}")
        if not 0.0 <= label_noise < 1.0:
            raise SyntheticTaskError(f"label_noise: must be in [0, 1), got {label_noise!r}")
        if not isinstance(hidden, int) or hidden < 0:
            raise SyntheticTaskError(f"hidden: must be an integer >= 0, got {hidden!r}")
        self.dim = dim
        self.num_classes = num_classes
        self.hidden = hidden

        gen = torch.Generator().manual_seed(seed)
        centres = separation * torch.randn(num_classes, clusters_per_class, dim, generator=gen)
        self.x_train, clean_train = make_mixture(num_train, centres, 1.0, gen)
        self.x_test, self.y_test = make_mixture(num_test, centres, 1.0, gen)
        flip = torch.rand(num_train, generator=gen) < label_noise
        random_labels = torch.randint(0, num_classes, (num_train,), generator=gen)
        self.y_train = torch.where(flip, random_labels, clean_train)

    def build_model(self) -> nn.Module:
        if self.hidden == 0:
            return nn.Linear(self.dim, self.num_classes)
        return nn.Sequential(nn.Linear(self.dim, self.hidden), nn.ReLU(), nn.Linear(self.hidden, self.num_classes))
