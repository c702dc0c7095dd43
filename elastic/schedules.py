"""Learning-rate schedules written in scale-invariant iterations (tau).

Every schedule is a callable ``tau -> multiplier`` of the base learning rate. AdaScale calls it
with ``floor(tau)``; because tau counts scale-1 iterations, a schedule written once holds at every
batch size and across resizes (PAPER.md: "every schedule is written in tau").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

Schedule = Callable[[float], float]


class ScheduleError(ValueError):
    """A schedule was configured with impossible values."""


@dataclass(frozen=True)
class Constant:
    """Multiplier 1 for every tau."""

    def __call__(self, tau: float) -> float:
        return 1.0


@dataclass(frozen=True)
class Step:
    """Multiply by ``gamma`` at each milestone; milestones are fractions of ``total_progress``."""

    total_progress: float
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1

    def __post_init__(self) -> None:
        _check_total(self.total_progress)
        if any(not 0.0 < m < 1.0 for m in self.milestones):
            raise ScheduleError(f"lr_schedule.milestones: each must be in (0, 1), got {list(self.milestones)}")
        if list(self.milestones) != sorted(self.milestones):
            raise ScheduleError(f"lr_schedule.milestones: must be increasing, got {list(self.milestones)}")
        if not 0.0 < self.gamma <= 1.0:
            raise ScheduleError(f"lr_schedule.gamma: must be in (0, 1], got {self.gamma}")

    def __call__(self, tau: float) -> float:
        passed = sum(1 for m in self.milestones if tau >= m * self.total_progress)
        return self.gamma**passed


@dataclass(frozen=True)
class Cosine:
    """Cosine decay from 1 to ``min_factor`` over ``total_progress``."""

    total_progress: float
    min_factor: float = 0.0

    def __post_init__(self) -> None:
        _check_total(self.total_progress)
        if not 0.0 <= self.min_factor <= 1.0:
            raise ScheduleError(f"lr_schedule.min_factor: must be in [0, 1], got {self.min_factor}")

    def __call__(self, tau: float) -> float:
        frac = min(max(tau / self.total_progress, 0.0), 1.0)
        return self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + math.cos(math.pi * frac))


@dataclass(frozen=True)
class Exponential:
    """Decay to ``final_factor`` at ``total_progress`` geometrically: gamma**(tau / total)."""

    total_progress: float
    final_factor: float = 0.01

    def __post_init__(self) -> None:
        _check_total(self.total_progress)
        if not 0.0 < self.final_factor <= 1.0:
            raise ScheduleError(f"lr_schedule.gamma: must be in (0, 1], got {self.final_factor}")

    def __call__(self, tau: float) -> float:
        frac = min(max(tau / self.total_progress, 0.0), 1.0)
        return self.final_factor**frac


@dataclass(frozen=True)
class LinearWarmup:
    """Linear warm-up from ~0 to 1 over ``warmup`` iterations, then ``inner``.

    Used by the LSW baseline (linear scaling + warm-up over 5.5% of the iterations).
    """

    warmup: float
    inner: Schedule = Constant()

    def __call__(self, tau: float) -> float:
        factor = min(1.0, (tau + 1.0) / self.warmup) if self.warmup > 0 else 1.0
        return factor * self.inner(tau)


def _check_total(total: float) -> None:
    if not total > 0:
        raise ScheduleError(f"total_progress: must be > 0, got {total}")


def make_schedule(
    kind: str,
    total_progress: float,
    milestones: Sequence[float] = (0.5, 0.75),
    gamma: float = 0.1,
    warmup_fraction: float = 0.0,
) -> Schedule:
    """Build a schedule from job-spec values (``lr_schedule: {kind, milestones, gamma}``).

    ``step`` multiplies by ``gamma`` at each milestone (fractions of ``total_progress``);
    ``exponential`` reaches ``gamma`` at ``total_progress``; ``cosine`` decays to 0.
    """
    if kind == "constant":
        base: Schedule = Constant()
    elif kind == "step":
        base = Step(total_progress, tuple(milestones), gamma)
    elif kind == "cosine":
        base = Cosine(total_progress)
    elif kind == "exponential":
        base = Exponential(total_progress, gamma)
    else:
        raise ScheduleError(f"lr_schedule.kind: unknown {kind!r}; allowed: constant, step, cosine, exponential")
    if warmup_fraction > 0:
        return LinearWarmup(warmup_fraction * total_progress, base)
    return base
