"""Representative models for the benchmarks: a ResNet-18-style CNN and a GPT-style decoder (the
byte-level model of ``examples/charlm.py`` at ~10.8M parameters).

Both are written with torch.nn alone (torchvision does not install beside the pinned CPU torch).
Each builder returns the model and a function that makes one synthetic batch of the shape the
model trains on, so a benchmark times the real forward/backward cost without any data loading.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from examples.jpeg_digits import BasicBlock  # the same residual block as the example's small ResNet

Batch = tuple[torch.Tensor, torch.Tensor]
MakeBatch = Callable[[torch.Generator, int], Batch]


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 images (CIFAR stem: one 3x3 convolution, no max-pool): ~11.2M parameters."""

    def __init__(self, classes: int = 10, width: int = 64) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers, c_in = [], width
        for i, c_out in enumerate((width, 2 * width, 4 * width, 8 * width)):
            stride = 1 if i == 0 else 2
            layers += [BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)]
            c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1))


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def resnet18() -> tuple[nn.Module, MakeBatch, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    def batch(gen: torch.Generator, size: int) -> Batch:
        return torch.randn(size, 3, 32, 32, generator=gen), torch.randint(0, 10, (size,), generator=gen)

    return ResNet18(), batch, F.cross_entropy


def gpt(context: int = 128) -> tuple[nn.Module, MakeBatch, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """The byte-level decoder of ``examples/charlm.py`` at benchmark size: 6 layers, width 384,
    6 heads, context 128, tied embeddings (~10.8M parameters)."""
    from examples.charlm import ByteGPT

    model = ByteGPT(block=context, dim=384, layers=6, heads=6)

    def batch(gen: torch.Generator, size: int) -> Batch:
        tokens = torch.randint(0, 256, (size, context + 1), generator=gen)
        return tokens[:, :-1], tokens[:, 1:]

    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    return model, batch, loss


def digits() -> tuple[nn.Module, MakeBatch, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    from examples.digits import DigitsNet

    def batch(gen: torch.Generator, size: int) -> Batch:
        return torch.randn(size, 1, 8, 8, generator=gen), torch.randint(0, 10, (size,), generator=gen)

    return DigitsNet(), batch, F.cross_entropy


BUILDERS = {"resnet18": resnet18, "gpt": gpt, "digits": digits}


def check_sizes() -> dict[str, int]:
    """Parameter counts, for the docs (ResNet-18 ~11.2M, GPT ~10.8M, digits ~10k)."""
    return {name: parameter_count(build()[0]) for name, build in BUILDERS.items()}


if __name__ == "__main__":  # pragma: no cover
    for name, count in check_sizes().items():
        print(f"{name}: {count:,} parameters ({math.log2(count):.1f} bits)")
