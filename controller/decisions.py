"""What a policy sees and what it returns: the frozen JobSnapshot, Resize/Noop decisions, bounds.

Shared by every policy (:mod:`controller.policy`, :mod:`controller.goodput`) and the reconcile loop.
This module must not import ray, kubernetes or torch (tests check it).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping, Protocol, Union

__all__ = [
    "PolicyError", "SnapshotError", "PolicyConfigError", "UnknownPolicyError", "JobSnapshot", "ResizeDecision",
    "NoopDecision", "Decision", "Policy", "worker_bounds",
]


class PolicyError(ValueError):
    """Base of the errors raised by this module (all are ValueErrors with a one-line message)."""


class SnapshotError(PolicyError):
    """A JobSnapshot field is missing, of the wrong type or out of range."""


class PolicyConfigError(PolicyError):
    """A policy parameter is invalid."""


class UnknownPolicyError(PolicyConfigError):
    """make_policy() was given a name that is not a policy."""


# --------------------------------------------------------------------------- snapshot


def _is_int(value: Any) -> bool:
    # numbers.Integral admits numpy integers too; bool is an int but never a count.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class JobSnapshot:
    """What the controller observed about one job at one moment (all times in seconds)."""

    now_s: float
    """Clock reading at observation (the same clock as ``last_resize_s``; monotonic is fine)."""
    current_workers: int
    """Workers training now (world size)."""
    min_workers: int
    """Fewest workers the job may run with (>= 1); a hard floor."""
    max_workers: int
    """Most workers the job may use (>= min_workers)."""
    capacity_workers: int
    """Workers the cluster can host now, counting the ones already running (>= 0)."""
    progress: float = 0.0
    """tau: scale-invariant iterations done so far."""
    total_progress: float | None = None
    """tau at which the job stops; None when unknown."""
    grad_variance: float | None = None
    """sigma^2: variance (trace of covariance) of one scale-1 batch gradient; None before any estimate."""
    grad_sqnorm: float | None = None
    """mu^2: squared norm of the true gradient; None before any estimate."""
    accumulation_steps: int = 1
    """Backward passes per step on each worker; the scale is S = workers * accumulation_steps."""
    step_time_s_by_workers: Mapping[int, float] = field(default_factory=dict, hash=False)
    """Measured median step seconds at each world size seen so far."""
    last_resize_s: float | None = None
    """``now_s``-clock time of the last completed resize; None if the job never resized."""
    elapsed_s: float = 0.0
    """Seconds since the job started (drives time-triggered schedule steps)."""
    progress_rate_per_s: float | None = None
    """Recent tau per second at the current size; None before it was measured."""
    worker_startup_s: float | None = None
    """Measured seconds from asking for a new worker to its being ready (process, imports, model);
    None before any was measured."""

    def __post_init__(self) -> None:
        if not _is_real(self.now_s):
            raise SnapshotError(f"JobSnapshot.now_s must be a finite number, got {self.now_s!r}")
        for name, low in (
            ("current_workers", 0),
            ("min_workers", 1),
            ("max_workers", 1),
            ("capacity_workers", 0),
            ("accumulation_steps", 1),
        ):
            value = getattr(self, name)
            if not _is_int(value) or value < low:
                raise SnapshotError(f"JobSnapshot.{name} must be an integer >= {low}, got {value!r}")
        if self.max_workers < self.min_workers:
            raise SnapshotError(
                f"JobSnapshot.max_workers ({self.max_workers}) must be >= min_workers ({self.min_workers})"
            )
        for name in ("progress", "elapsed_s"):
            if not _is_real(getattr(self, name)):
                raise SnapshotError(f"JobSnapshot.{name} must be a finite number, got {getattr(self, name)!r}")
        for name in ("total_progress", "grad_variance", "grad_sqnorm", "last_resize_s", "progress_rate_per_s",
                     "worker_startup_s"):
            value = getattr(self, name)
            if value is not None and not _is_real(value):
                raise SnapshotError(f"JobSnapshot.{name} must be a finite number or None, got {value!r}")
        times = self.step_time_s_by_workers
        if not isinstance(times, Mapping):
            raise SnapshotError(
                f"JobSnapshot.step_time_s_by_workers must be a mapping workers -> seconds, got {type(times).__name__}"
            )
        for workers, seconds in times.items():
            if not _is_int(workers) or workers < 1:
                raise SnapshotError(f"JobSnapshot.step_time_s_by_workers key must be an integer >= 1, got {workers!r}")
            if not _is_real(seconds) or seconds <= 0:
                raise SnapshotError(
                    f"JobSnapshot.step_time_s_by_workers[{workers}] must be a positive finite number, got {seconds!r}"
                )
        # A private read-only copy: the caller's dict may keep changing.
        object.__setattr__(self, "step_time_s_by_workers", MappingProxyType(dict(times)))


# --------------------------------------------------------------------------- decisions


@dataclass(frozen=True)
class ResizeDecision:
    """Resize the job to ``target_workers``; ``reason`` says why, with the numbers.

    With a trigger (``at_progress`` and/or ``at_time_s``) the decision is announced ahead: capacity
    and new workers are prepared now, and the trainer resizes at the first step boundary at which
    either trigger has fired (tau >= at_progress, or elapsed >= at_time_s). Without one, at once."""

    target_workers: int
    reason: str
    at_progress: float | None = None
    at_time_s: float | None = None

    @property
    def triggered(self) -> bool:
        return self.at_progress is not None or self.at_time_s is not None


@dataclass(frozen=True)
class NoopDecision:
    """Keep the current size; ``reason`` says why."""

    reason: str


Decision = Union[ResizeDecision, NoopDecision]


class Policy(Protocol):
    """Anything with ``decide(snapshot) -> Decision``; must be pure (no I/O, no clocks, no state)."""

    def decide(self, snapshot: JobSnapshot) -> Decision: ...


def worker_bounds(snapshot: JobSnapshot) -> tuple[int, int]:
    """(lowest, highest) target any policy may choose: [min, max(min, min(max, capacity))]."""
    high = max(snapshot.min_workers, min(snapshot.max_workers, snapshot.capacity_workers))
    return snapshot.min_workers, high


def _bounds_text(snapshot: JobSnapshot) -> str:
    return (
        f"min {snapshot.min_workers}, max {snapshot.max_workers}, capacity {snapshot.capacity_workers}"
    )


def _plural(n: int) -> str:
    return f"{n} worker" if n == 1 else f"{n} workers"


def _decision(snapshot: JobSnapshot, target: int, reason: str) -> Decision:
    """The one place that turns a target into a Resize or a Noop decision."""
    if target == snapshot.current_workers:
        return NoopDecision(reason)
    return ResizeDecision(target, reason)


