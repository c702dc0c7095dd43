"""Scaling policies: pure functions of a frozen :class:`JobSnapshot` returning a Decision.

A policy answers one question, "how many workers should this job have now?", from a snapshot of
what was observed (current size, bounds, capacity, AdaScale's gradient statistics, measured step
times, the time of the last resize).  It holds no timers, does no I/O and keeps no state between
calls, so the same snapshot always gives the same decision; the reconcile loop
(:mod:`controller.loop`) observes, asks the policy and carries the decision out.

Policies (built with :func:`make_policy` from the job spec's ``scaling`` section):

* ``schedule``  -- resize when tau (or elapsed time) passes given points; demos, paper reproductions.
* ``available`` -- use whatever the cluster can host, within [min, max].
* ``goodput``   -- Pollux-style: maximise (throughput x statistical efficiency) predicted from
  AdaScale's sigma^2 / mu^2 estimates, with an efficiency floor, hysteresis and a cooldown.
* ``fixed``     -- never resize.

Every target lies in ``[min_workers, max(min_workers, min(max_workers, capacity_workers))]``:
``min_workers`` is a hard floor (the job cannot run with fewer), so when capacity falls below it the
policies still ask for ``min_workers`` and the actuator is asked to provide it.

This module must not import ray, kubernetes or torch (tests check it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from controller.decisions import (
    Decision,
    JobSnapshot,
    NoopDecision,
    Policy,
    PolicyConfigError,
    PolicyError,
    ResizeDecision,
    SnapshotError,
    UnknownPolicyError,
    _bounds_text,
    _decision,
    _is_int,
    _is_real,
    _plural,
    worker_bounds,
)
from controller.goodput import GoodputPolicy, StepTimeModel, fit_step_time, predicted_efficiency, predicted_gain

__all__ = [
    "PolicyError",
    "SnapshotError",
    "PolicyConfigError",
    "UnknownPolicyError",
    "JobSnapshot",
    "ResizeDecision",
    "NoopDecision",
    "Decision",
    "Policy",
    "predicted_gain",
    "predicted_efficiency",
    "StepTimeModel",
    "fit_step_time",
    "worker_bounds",
    "ScheduleStep",
    "SchedulePolicy",
    "AvailablePolicy",
    "GoodputPolicy",
    "FixedPolicy",
    "POLICY_NAMES",
    "make_policy",
    "policy_for",
]


# --------------------------------------------------------------------------- schedule


@dataclass(frozen=True)
class ScheduleStep:
    """Resize to ``workers`` once tau >= ``at_progress`` or elapsed >= ``at_time_s`` (either fires)."""

    at_progress: float | None = None
    at_time_s: float | None = None
    workers: int = None  # type: ignore[assignment]  # required; None only so the triggers can default

    def __post_init__(self) -> None:
        if self.at_progress is None and self.at_time_s is None:
            raise PolicyConfigError("schedule step needs at_progress or at_time_s")
        for name in ("at_progress", "at_time_s"):
            value = getattr(self, name)
            if value is not None and (not _is_real(value) or value < 0):
                raise PolicyConfigError(f"schedule step {name} must be a finite number >= 0, got {value!r}")
        if not _is_int(self.workers) or self.workers < 1:
            raise PolicyConfigError(f"schedule step workers must be an integer >= 1, got {self.workers!r}")

    def trigger(self, snapshot: JobSnapshot) -> str | None:
        """Text of the trigger that has fired ("tau 600.0 >= 600"), or None if none has."""
        if self.at_progress is not None and snapshot.progress >= self.at_progress:
            return f"tau {snapshot.progress:.1f} >= {self.at_progress:g}"
        if self.at_time_s is not None and snapshot.elapsed_s >= self.at_time_s:
            return f"elapsed {snapshot.elapsed_s:.1f} s >= {self.at_time_s:g} s"
        return None


def _as_step(index: int, raw: Any) -> ScheduleStep:
    if isinstance(raw, ScheduleStep):
        return raw
    if isinstance(raw, Mapping):
        unknown = set(raw) - {"at_progress", "at_time_s", "workers"}
        if unknown:
            raise PolicyConfigError(
                f"schedule step {index}: unknown key {sorted(unknown)[0]!r}; allowed: at_progress, at_time_s, workers"
            )
        if "workers" not in raw:
            raise PolicyConfigError(f"schedule step {index}: missing 'workers'")
        return ScheduleStep(raw.get("at_progress"), raw.get("at_time_s"), raw["workers"])
    if isinstance(raw, Sequence) and not isinstance(raw, str) and len(raw) == 3:
        return ScheduleStep(raw[0], raw[1], raw[2])
    raise PolicyConfigError(
        f"schedule step {index} must be (at_progress, at_time_s, workers) or a mapping, got {raw!r}"
    )


#: Worker start-up seconds assumed before one was measured (ENVIRONMENT.md: a new actor takes 2-6 s).
DEFAULT_WORKER_STARTUP_S = 6.0


@dataclass(frozen=True)
class SchedulePolicy:
    """Target = ``workers`` of the last step (in the given order) whose trigger has passed; the
    next step is announced ahead of its trigger.

    A schedule is a plan known in advance: once the current target is reached, the next step is
    returned as a triggered ResizeDecision (applied by the trainer at the first step boundary at or
    after its trigger) as soon as its expected time of arrival is within ``lead_factor`` times the
    measured worker start-up plus ``lead_s``; with no measured progress rate it is announced at
    once. Before any step fires the current size is kept. Steps are numbered from 1 in reasons.
    Derived from the snapshot only, so a restarted controller reaches the same decision.
    """

    steps: Sequence[ScheduleStep]
    lead_factor: float = 2.0
    """Announce a step this many start-up times before its trigger (new workers must be warm by then)."""
    lead_s: float = 4.0
    """... plus this many seconds (at least the controller's interval, so a pass falls in between)."""

    def __post_init__(self) -> None:
        if isinstance(self.steps, (str, bytes)) or not isinstance(self.steps, Sequence):
            raise PolicyConfigError(f"schedule steps must be a list, got {type(self.steps).__name__}")
        try:
            steps = tuple(_as_step(i + 1, raw) for i, raw in enumerate(self.steps))
        except PolicyConfigError:
            raise
        except (TypeError, ValueError) as exc:
            raise PolicyConfigError(f"schedule steps: {exc}") from None
        object.__setattr__(self, "steps", steps)
        for name in ("lead_factor", "lead_s"):
            value = getattr(self, name)
            if not _is_real(value) or value < 0:
                raise PolicyConfigError(f"schedule {name} must be a finite number >= 0, got {value!r}")

    def decide(self, snapshot: JobSnapshot) -> Decision:
        low, high = worker_bounds(snapshot)
        fired = None
        for number, step in enumerate(self.steps, start=1):
            trigger = step.trigger(snapshot)
            if trigger is not None:
                fired = (number, step, trigger)
        if fired is None:
            wanted = snapshot.current_workers
            pending = (
                f"no schedule step reached yet (tau {snapshot.progress:.1f}, elapsed {snapshot.elapsed_s:.1f} s)"
                if self.steps
                else "empty schedule"
            )
            reason = f"{pending}: keeping {_plural(wanted)}"
        else:
            number, step, trigger = fired
            wanted = step.workers
            reason = f"{trigger}: schedule step {number} wants {_plural(wanted)}"
        target = min(max(wanted, low), high)
        if target != wanted:
            reason += f" (clamped to {target}: {_bounds_text(snapshot)})"
        if target == snapshot.current_workers:
            ahead = self._announce_next(snapshot, 0 if fired is None else fired[0], low, high)
            if ahead is not None:
                return ahead
        return _decision(snapshot, target, reason)

    def _announce_next(self, snapshot: JobSnapshot, fired_number: int, low: int, high: int) -> ResizeDecision | None:
        """The first step after the fired one that changes the size, if it is due to be prepared."""
        for number, step in enumerate(self.steps[fired_number:], start=fired_number + 1):
            target = min(max(step.workers, low), high)
            if target == snapshot.current_workers:
                continue
            eta_s = self._eta_s(step, snapshot)
            startup_s = snapshot.worker_startup_s if snapshot.worker_startup_s is not None else DEFAULT_WORKER_STARTUP_S
            lead_s = self.lead_factor * startup_s + self.lead_s
            if eta_s is not None and eta_s > lead_s:
                return None
            when = "rate not measured yet" if eta_s is None else f"expected in {eta_s:.1f} s, lead {lead_s:.1f} s"
            return ResizeDecision(
                target,
                f"schedule step {number} wants {_plural(target)} at "
                f"{_trigger_text(step)} ({when}): preparing now",
                at_progress=step.at_progress,
                at_time_s=step.at_time_s,
            )
        return None

    @staticmethod
    def _eta_s(step: ScheduleStep, snapshot: JobSnapshot) -> float | None:
        """Seconds until the step's first trigger fires; None when the progress rate is unknown."""
        etas = []
        if step.at_time_s is not None:
            etas.append(max(step.at_time_s - snapshot.elapsed_s, 0.0))
        if step.at_progress is not None:
            rate = snapshot.progress_rate_per_s
            if rate is None or rate <= 0:
                if step.at_time_s is None:
                    return None
            else:
                etas.append(max(step.at_progress - snapshot.progress, 0.0) / rate)
        return min(etas)


def _trigger_text(step: ScheduleStep) -> str:
    parts = []
    if step.at_progress is not None:
        parts.append(f"tau {step.at_progress:g}")
    if step.at_time_s is not None:
        parts.append(f"{step.at_time_s:g} s")
    return " or ".join(parts)


# --------------------------------------------------------------------------- available / fixed


@dataclass(frozen=True)
class AvailablePolicy:
    """Target = clamp(capacity, min, max): use everything the cluster can host."""

    def decide(self, snapshot: JobSnapshot) -> Decision:
        low, high = worker_bounds(snapshot)
        target = min(max(snapshot.capacity_workers, low), high)
        return _decision(snapshot, target, f"available: {_bounds_text(snapshot)} -> {_plural(target)}")


@dataclass(frozen=True)
class FixedPolicy:
    """Never resize (the trainer still survives lost workers on its own)."""

    def decide(self, snapshot: JobSnapshot) -> Decision:
        return NoopDecision(f"fixed policy keeps {_plural(snapshot.current_workers)}")



# --------------------------------------------------------------------------- factory

_POLICIES: dict[str, type] = {
    "schedule": SchedulePolicy,
    "available": AvailablePolicy,
    "goodput": GoodputPolicy,
    "fixed": FixedPolicy,
}
POLICY_NAMES: tuple[str, ...] = tuple(sorted(_POLICIES))


def make_policy(name: str, **params: Any) -> Policy:
    """Build a policy by name ("schedule" | "available" | "goodput" | "fixed") from plain parameters."""
    cls = _POLICIES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise UnknownPolicyError(f"unknown scaling policy {name!r}; allowed: {', '.join(POLICY_NAMES)}")
    allowed = [f.name for f in dataclasses.fields(cls)]
    for key in params:
        if key not in allowed:
            hint = ", ".join(allowed) if allowed else "none"
            raise PolicyConfigError(f"{name} policy: unknown parameter {key!r}; allowed: {hint}")
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in params
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
    ]
    if missing:
        raise PolicyConfigError(f"{name} policy: missing parameter {missing[0]!r}")
    return cls(**params)


def policy_for(scaling: Any) -> Policy:
    """The one policy factory for a validated ``elastic.config.ScalingConfig`` (trainer and operator).

    A schedule announces its steps ahead by their warm-up plus two controller periods."""
    if scaling.policy == "schedule":
        steps = [{"at_progress": s.at_progress, "at_time_s": s.at_time_s, "workers": s.workers} for s in scaling.steps]
        return make_policy("schedule", steps=steps, lead_s=2 * scaling.interval_s)
    if scaling.policy == "goodput":
        return make_policy("goodput", min_efficiency=scaling.min_efficiency, hysteresis=scaling.hysteresis,
                           cooldown_s=scaling.cooldown_s)
    return make_policy(scaling.policy)
