"""The decode-heavy job of ``benchmarks.input_pipeline``: 96x96 colour JPEGs made here, each
``__getitem__`` decodes one (Pillow), takes a random crop resized to 32x32 and a random horizontal
flip; the model is the small ResNet of ``examples/jpeg_digits.py`` (BatchNorm, width 8), batch 32 per
worker, AdaScale-wrapped SGD with momentum, DataLoader ``num_workers=1, prefetch_factor=2,
persistent_workers``."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

BATCH = 32
LOADER = {"num_workers": 1, "prefetch_factor": 2, "persistent_workers": True}


def make_jpegs(count: int, size: int = 96, seed: int = 0) -> tuple[list[bytes], torch.Tensor]:
    """``count`` JPEGs of smooth colour patterns with noise; the label is the pattern's orientation bin."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    jpegs, labels = [], []
    for _ in range(count):
        label = int(rng.integers(10))
        angle = np.pi * label / 10
        wave = np.sin(2 * np.pi * rng.uniform(2, 5) * (np.cos(angle) * xx + np.sin(angle) * yy) + rng.uniform(0, 6.3))
        colour = rng.uniform(0.2, 1.0, 3)
        rgb = (0.5 + 0.4 * wave)[..., None] * colour + rng.normal(0, 0.08, (size, size, 3))
        buf = io.BytesIO()
        Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8), "RGB").save(buf, format="JPEG", quality=92)
        jpegs.append(buf.getvalue())
        labels.append(label)
    return jpegs, torch.tensor(labels)


class DecodeHeavyImages(torch.utils.data.Dataset):
    """Decode + random resized crop to 32x32 + random flip, per access (the work of a real image loader)."""

    def __init__(self, jpegs: list[bytes], labels: torch.Tensor) -> None:
        self.jpegs, self.labels = jpegs, labels

    def __len__(self) -> int:
        return len(self.jpegs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        from PIL import Image

        with Image.open(io.BytesIO(self.jpegs[i])) as im:
            im = im.convert("RGB")
            side = int(im.width * float(torch.empty(()).uniform_(0.6, 1.0)))
            x0, y0 = (int(v) for v in torch.randint(0, im.width - side + 1, (2,)))
            im = im.resize((32, 32), Image.BILINEAR, box=(x0, y0, x0 + side, y0 + side))
            array = np.asarray(im, dtype=np.uint8)
        image = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)
        if bool(torch.rand(()) < 0.5):
            image = image.flip(2)
        return {"image": (image - 0.5) / 0.25, "label": self.labels[i]}


class DecodeHeavyTask:
    """``task: benchmarks.decode_heavy:DecodeHeavyTask``."""

    def __init__(self, images: int = 2048, width: int = 8) -> None:
        self.jpegs, self.labels = make_jpegs(images)
        self.width = width

    def build_model(self) -> torch.nn.Module:
        from examples.jpeg_digits import SmallResNet

        return SmallResNet(self.width)

    def train_dataset(self) -> torch.utils.data.Dataset:
        return DecodeHeavyImages(self.jpegs, self.labels)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(model(batch["image"]), batch["label"])

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        return {}


def job_spec(world: int) -> Any:
    from elastic.config import parse_job_spec

    return parse_job_spec({
        "name": "bench-input-pipeline", "task": "benchmarks.decode_heavy:DecodeHeavyTask",
        "batch_size_per_worker": BATCH, "total_progress": 1.0e9, "seed": 0,
        "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
        "workers": {"min": 1, "max": max(world, 1), "initial": world},
        "cluster": {"backend": "local", "num_cpus_per_worker": 1.0},
        "data": LOADER, "metrics": {"enabled": False, "log": False},
    })
