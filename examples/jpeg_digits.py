"""A real image workload: a small ResNet (BatchNorm) on JPEG-encoded colour images of handwritten digits.

The images are scikit-learn's 1,797 handwritten digits (they ship inside the package; no download),
turned into 3x32x32 colour pictures (strokes and background in colours drawn once per image) and
JPEG-encoded in memory once, when the task is built. As in an ordinary image pipeline, each
``__getitem__`` decodes a JPEG (Pillow), takes a random 32x32 crop of the image padded by 4 pixels
and jitters its brightness, and returns a dict batch. No flips: a mirrored 2 is not a 2.

What it exercises: the DataLoader pipeline (decode + augment in loader processes), per-sample seeds
(augmentations differ across ranks and repeat exactly on a repeated run), ``build_optimizer`` with
parameter groups (AdamW without weight decay on BatchNorm and biases), bf16 autocast, gradient
clipping, evaluation during training and a per-step metric (training accuracy).

    elastic run examples/jpeg_digits.yaml
"""

from __future__ import annotations

import io
import random

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

IMAGE_SIZE = 32
PAD = 4


def _encode(images: np.ndarray, seed: int, quality: int = 90) -> list[bytes]:
    """8x8 digits (0..16) -> 32x32 colour JPEGs; colours drawn once per image from ``seed``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    encoded = []
    for img in images:
        big = np.kron(img / 16.0, np.ones((4, 4)))  # 32x32, values in [0, 1]
        fg, bg = rng.uniform(0.5, 1.0, 3), rng.uniform(0.0, 0.4, 3)
        if rng.random() < 0.5:
            fg, bg = bg, fg
        rgb = (big[..., None] * fg + (1 - big[..., None]) * bg) * 255
        buf = io.BytesIO()
        Image.fromarray(rgb.astype(np.uint8), "RGB").save(buf, format="JPEG", quality=quality)
        encoded.append(buf.getvalue())
    return encoded


def decode(jpeg: bytes) -> torch.Tensor:
    """JPEG bytes -> float tensor 3xHxW in [0, 1]."""
    from PIL import Image

    with Image.open(io.BytesIO(jpeg)) as im:
        array = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


class JpegImages(torch.utils.data.Dataset):
    """Decodes on every access; ``train=True`` adds a random padded crop and brightness jitter.

    The draws use the global generators (torch and Python's ``random``), which the elastic
    input pipeline seeds per sample from (seed, epoch, index)."""

    def __init__(self, jpegs: list[bytes], labels: torch.Tensor, train: bool) -> None:
        self.jpegs, self.labels, self.train = jpegs, labels, train

    def __len__(self) -> int:
        return len(self.jpegs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        image = decode(self.jpegs[i])
        if self.train:
            padded = F.pad(image, (PAD, PAD, PAD, PAD), mode="replicate")
            dx, dy = torch.randint(0, 2 * PAD + 1, (2,)).tolist()
            image = padded[:, dy:dy + IMAGE_SIZE, dx:dx + IMAGE_SIZE] * random.uniform(0.8, 1.2)
        image = (image - 0.5) / 0.25
        return {"image": image, "label": self.labels[i]}


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a shortcut (a 1x1 projection when the shape changes);
    also the block of the benchmarks' ResNet-18 (``benchmarks.models``)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """ResNet-style: a stem and three stages of one BasicBlock (widths w, 2w, 4w), global pooling."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.stages = nn.Sequential(BasicBlock(width, width, 1), BasicBlock(width, 2 * width, 2),
                                    BasicBlock(2 * width, 4 * width, 2))
        self.head = nn.Linear(4 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class JpegDigitsTask:
    """``task: examples.jpeg_digits:JpegDigitsTask``."""

    def __init__(self, width: int = 16, lr: float = 2e-3, weight_decay: float = 0.05,
                 test_fraction: float = 0.2, split_seed: int = 0, eval_limit: int | None = None) -> None:
        from sklearn.datasets import load_digits

        data = load_digits()
        order = np.random.default_rng(split_seed).permutation(len(data.target))
        n_test = int(len(order) * test_fraction)
        test, train = order[:n_test], order[n_test:]
        if eval_limit is not None:
            test = test[:eval_limit]
        jpegs = _encode(data.images, seed=split_seed)
        labels = torch.tensor(data.target, dtype=torch.long)
        self.train = JpegImages([jpegs[i] for i in train], labels[train], train=True)
        self.test = JpegImages([jpegs[i] for i in test], labels[test], train=False)
        self.width, self.lr, self.weight_decay = width, lr, weight_decay

    def build_model(self) -> nn.Module:
        return SmallResNet(self.width)

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        # Weight decay on conv and linear weights only, not on BatchNorm's scale and shift or biases.
        decay = [p for p in model.parameters() if p.ndim > 1]
        no_decay = [p for p in model.parameters() if p.ndim <= 1]
        return torch.optim.AdamW([{"params": decay, "weight_decay": self.weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}], lr=self.lr)

    def train_dataset(self) -> torch.utils.data.Dataset:
        return self.train

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        logits = model(batch["image"])
        loss = F.cross_entropy(logits.float(), batch["label"])
        return loss, {"train_accuracy": float((logits.argmax(1) == batch["label"]).float().mean())}

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        correct, total, loss_sum = 0, 0, 0.0
        loader = torch.utils.data.DataLoader(self.test, batch_size=256)
        for batch in loader:
            logits = model(batch["image"].to(device)).float()
            labels = batch["label"].to(device)
            loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(1) == labels).sum())
            total += len(labels)
        model.train(was_training)
        return {"accuracy": correct / total, "loss": loss_sum / total}
