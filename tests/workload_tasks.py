"""Tasks for the input-pipeline, seeding and training-control tests (small, CPU, no download)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from elastic.task import get_context


class DrawingDataset(torch.utils.data.Dataset):
    """Each item records the random draws its ``__getitem__`` made (an 'augmentation')."""

    def __init__(self, n: int = 64) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        crop = torch.randint(0, 9, (2,))                     # torch's generator
        flip = torch.tensor(float(random.random() < 0.5))    # Python's
        jitter = torch.tensor(float(np.random.rand()))       # numpy's legacy global
        x = torch.full((4,), float(i) / self.n)
        return {"x": x, "y": torch.tensor(i % 2), "index": torch.tensor(i), "crop": crop, "flip": flip,
                "jitter": jitter}


class DrawRecordingTask:
    """Writes, per rank and step, the augmentation draws of its samples and the step's own draw."""

    def __init__(self, out_dir: str = "", n: int = 64) -> None:
        self.out_dir = Path(out_dir) if out_dir else None
        self.n = n

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 2))

    def train_dataset(self) -> torch.utils.data.Dataset:
        return DrawingDataset(self.n)

    def loss(self, model: nn.Module, batch):
        ctx = get_context()
        step_draw = float(torch.rand(()))
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            record = {"rank": ctx.rank, "world_size": ctx.world_size, "step": ctx.step, "step_draw": step_draw,
                      "samples": {str(int(i)): [int(c) for c in crop] + [float(f), float(j)]
                                  for i, crop, f, j in zip(batch["index"], batch["crop"], batch["flip"], batch["jitter"])}}
            with (self.out_dir / f"draws-{ctx.rank}.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")
        return F.cross_entropy(model(batch["x"]), batch["y"])

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {"calls": 1.0}


class ControlsTask:
    """A task using every optional hook: param groups + AdamW + a torch scheduler, a schedule in tau,
    metrics from the loss (including whether autocast was on)."""

    def __init__(self, n: int = 256, schedule_hook: bool = True, use_build_optimizer: bool = True) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 6, generator=g)
        self.y = (self.x[:, 0] > 0).long()
        self.schedule_calls: list[float] = []
        if not schedule_hook:
            self.lr_schedule = None  # type: ignore[assignment]
        if not use_build_optimizer:
            self.build_optimizer = None  # type: ignore[assignment]

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))

    def build_optimizer(self, model: nn.Module):
        decay = [p for n, p in model.named_parameters() if p.ndim > 1]
        no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=0.01)
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    def lr_schedule(self, tau: float, total_progress: float) -> float:
        self.schedule_calls.append(tau)
        return 1.0 if tau < total_progress / 2 else 0.1

    def train_dataset(self):
        return torch.utils.data.TensorDataset(self.x, self.y)

    def loss(self, model: nn.Module, batch):
        x, y = batch
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        return loss, {"low_precision": float(logits.dtype != torch.float32), "accuracy": float((logits.argmax(1) == y).float().mean())}

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        model.eval()
        acc = float((model(self.x).argmax(1) == self.y).float().mean())
        model.train()
        return {"accuracy": acc}
