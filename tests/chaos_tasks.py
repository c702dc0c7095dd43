"""Tasks for the chaos and numerical-fault tests (imported by the Ray workers from the repo root)."""

from __future__ import annotations

import torch

from examples.digits import DigitsTask


class _Poisoned(torch.utils.data.Dataset):
    def __init__(self, base: torch.utils.data.Dataset, poison: set[int]) -> None:
        self.base, self.poison = base, poison

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        x, y = self.base[i]
        return (x * float("nan"), y) if i in self.poison else (x, y)


class PoisonedDigitsTask(DigitsTask):
    """Digits where the listed samples are NaN images, so any batch holding one has a NaN loss on
    one rank; ``poison_all`` makes every sample NaN (for the too-many-in-a-row stop)."""

    def __init__(self, poison: list[int] = (), poison_all: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.poison = set(range(len(self.y_train))) if poison_all else set(poison)

    def train_dataset(self) -> torch.utils.data.Dataset:
        return _Poisoned(super().train_dataset(), self.poison)
