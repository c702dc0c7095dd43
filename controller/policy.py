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
import math
import numbers
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping, Protocol, Sequence, Union

from elastic.estimators import gain_ratio

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


# --------------------------------------------------------------------------- AdaScale predictions


def predicted_gain(scale: float, sigma2: float, mu2: float) -> float:
    """Gain ratio r(S) = (sigma^2 + mu^2) / (sigma^2 / S + mu^2), in [1, S] (PAPER.md).

    ``sigma2`` (sigma^2, gradient variance of a scale-1 batch) is clipped to >= 1e-6 and ``mu2``
    (mu^2, squared norm of the true gradient) to >= 0, as AdaScale does, so r stays in [1, S].
    """
    if not _is_real(scale) or scale < 1:
        raise PolicyError(f"scale must be a finite number >= 1, got {scale!r}")
    if not _is_real(sigma2) or not _is_real(mu2):
        raise PolicyError(f"sigma2 and mu2 must be finite numbers, got {sigma2!r} and {mu2!r}")
    return gain_ratio(float(sigma2), float(mu2), scale)


def predicted_efficiency(scale: float, sigma2: float, mu2: float) -> float:
    """Statistical efficiency r(S) / S in [1/S, 1]: the fraction of scale-S samples that count."""
    return predicted_gain(scale, sigma2, mu2) / scale


# --------------------------------------------------------------------------- step-time model


@dataclass(frozen=True)
class StepTimeModel:
    """Predicted step seconds t(n) = intercept_s + slope_s_per_worker * n, positive for n >= 1.

    With a fixed per-worker batch, a data-parallel step costs the same compute at every size plus
    communication that grows with the world size, hence the affine model.
    """

    intercept_s: float
    slope_s_per_worker: float

    def __call__(self, workers: int) -> float:
        return self.intercept_s + self.slope_s_per_worker * workers


def fit_step_time(step_time_s_by_workers: Mapping[int, float]) -> StepTimeModel:
    """Least-squares fit of t(n) = a + b*n to the measured (workers, seconds) points.

    * One measured size: t(n) = t1 for every n (perfect scaling assumed until a second size is seen).
    * b < 0 (more workers measured faster: noise) is clipped to b = 0, a = mean(t).
    * a < 0 (would predict t <= 0 at small n) falls back to the fit through the origin, t = b'n.
    Every branch keeps t(n) > 0 for n >= 1.
    """
    if not step_time_s_by_workers:
        raise PolicyError("step_time_s_by_workers is empty: no step time measured yet")
    points = sorted(step_time_s_by_workers.items())
    ns = [float(n) for n, _ in points]
    ts = [float(t) for _, t in points]
    mean_t = sum(ts) / len(ts)
    if len(points) == 1:
        return StepTimeModel(mean_t, 0.0)
    mean_n = sum(ns) / len(ns)
    var_n = sum((n - mean_n) ** 2 for n in ns)
    slope = sum((n - mean_n) * (t - mean_t) for n, t in zip(ns, ts)) / var_n
    if slope <= 0:
        return StepTimeModel(mean_t, 0.0)
    intercept = mean_t - slope * mean_n
    if intercept < 0:
        return StepTimeModel(0.0, sum(n * t for n, t in zip(ns, ts)) / sum(n * n for n in ns))
    return StepTimeModel(intercept, slope)


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


# --------------------------------------------------------------------------- goodput


@dataclass(frozen=True)
class _Prediction:
    workers: int
    efficiency: float
    goodput: float  # tau per second


@dataclass(frozen=True)
class GoodputPolicy:
    """Choose the size that maximises predicted goodput, in tau (scale-invariant iterations) per second.

    For a candidate n workers, S' = n * accumulation_steps and, with the paper's symbols,

        throughput(n) = S' / t(n)                 scale-1 batches per second (batch size cancels)
        efficiency(n) = r(S') / S'                r from AdaScale's sigma^2 and mu^2 (predicted_gain)
        goodput(n)    = throughput * efficiency = r(S') / t(n)

    where t(n) is the step-time model fitted to the measured sizes (:func:`fit_step_time`).

    Candidates are n in [min, min(max, capacity)].  A size other than the current one is eligible
    only if efficiency >= ``min_efficiency`` (``min_workers`` is always eligible); the current size
    stays eligible down to ``min_efficiency / (1 + hysteresis)**2``.  The policy moves to the best
    eligible size (ties: fewer workers) only when its goodput beats the current size's by more than
    the factor (1 + ``hysteresis``) -- or when the current size is no longer eligible -- and at least
    ``cooldown_s`` after the last resize.  ``max_step`` (if set) limits how many workers one decision
    adds or removes.  A current size outside the bounds is clamped at once, ignoring hysteresis and
    cooldown.

    Why these bands: undoing a move A -> B needs a predicted log-goodput ratio or a log-efficiency
    to swing by 2 ln(1 + h) between two snapshots.  If sigma^2 and mu^2 are each estimated within
    +-j, every such quantity moves by less than ln((1+j)/(1-j)), so the policy never flaps
    (A -> B -> A with the truth unchanged) when h >= (1+j)/(1-j) - 1, about 2j
    (tests/test_policy.py checks this property).

    Without gradient statistics (at S = 1 AdaScale has nothing to estimate) the policy grows to the
    smallest size with S >= 2 so that they can be measured; without any step time it keeps the size.
    """

    min_efficiency: float = 0.5
    """Efficiency floor r/S for growing to a size (0 <= floor <= 1)."""
    hysteresis: float = 0.05
    """Relative goodput improvement a move must exceed; also widens the floor for the current size."""
    cooldown_s: float = 30.0
    """Seconds after the last resize during which the policy does not move by preference."""
    max_step: int | None = None
    """Most workers added or removed by one decision; None for no limit."""

    def __post_init__(self) -> None:
        if not _is_real(self.min_efficiency) or not 0.0 <= self.min_efficiency <= 1.0:
            raise PolicyConfigError(f"goodput min_efficiency must be in [0, 1], got {self.min_efficiency!r}")
        if not _is_real(self.hysteresis) or self.hysteresis < 0:
            raise PolicyConfigError(f"goodput hysteresis must be a finite number >= 0, got {self.hysteresis!r}")
        if not _is_real(self.cooldown_s) or self.cooldown_s < 0:
            raise PolicyConfigError(f"goodput cooldown_s must be a finite number >= 0, got {self.cooldown_s!r}")
        if self.max_step is not None and (not _is_int(self.max_step) or self.max_step < 1):
            raise PolicyConfigError(f"goodput max_step must be an integer >= 1 or None, got {self.max_step!r}")

    def _cooldown_left_s(self, snapshot: JobSnapshot) -> float:
        if snapshot.last_resize_s is None:
            return 0.0
        return max(0.0, self.cooldown_s - (snapshot.now_s - snapshot.last_resize_s))

    def _limit_step(self, start: int, wanted: int) -> int:
        if self.max_step is None:
            return wanted
        return start + max(-self.max_step, min(self.max_step, wanted - start))

    def decide(self, snapshot: JobSnapshot) -> Decision:
        low, high = worker_bounds(snapshot)
        current = snapshot.current_workers
        # Where the bounds force us, whatever the preference (ignores hysteresis and cooldown).
        start = min(max(current, low), high)
        forced = ""
        if start != current:
            forced = f"{_plural(current)} outside bounds ({_bounds_text(snapshot)}); "
        if snapshot.total_progress is not None and snapshot.progress >= snapshot.total_progress:
            return _decision(snapshot, start, f"{forced}job finished (tau {snapshot.progress:.1f})")

        cooldown_left_s = self._cooldown_left_s(snapshot)
        sigma2, mu2 = snapshot.grad_variance, snapshot.grad_sqnorm
        acc = snapshot.accumulation_steps
        if sigma2 is None or mu2 is None:
            explore = max(start, math.ceil(2 / acc))
            if start * acc >= 2 or explore > high:
                return _decision(snapshot, start, f"{forced}no gradient statistics yet: keeping {_plural(start)}")
            if cooldown_left_s > 0:
                return _decision(snapshot, start, f"{forced}no gradient statistics yet; cooldown {cooldown_left_s:.1f} s left")
            return _decision(
                snapshot,
                self._limit_step(start, explore),
                f"{forced}no gradient statistics at scale 1: growing to {_plural(explore)} to measure them",
            )
        if not snapshot.step_time_s_by_workers:
            return _decision(snapshot, start, f"{forced}no step time measured yet: keeping {_plural(start)}")

        model = fit_step_time(snapshot.step_time_s_by_workers)

        def predict(n: int) -> _Prediction:
            scale = n * acc
            gain = predicted_gain(scale, sigma2, mu2)
            return _Prediction(n, gain / scale, gain / model(n))

        predictions = {n: predict(n) for n in range(low, high + 1)}
        eligible = [p for p in predictions.values() if p.workers == low or p.efficiency >= self.min_efficiency]
        # Ties go to the fewer workers (cheaper).
        best = max(eligible, key=lambda p: (p.goodput, -p.workers))
        here = predictions[start]
        floor_here = self.min_efficiency / (1.0 + self.hysteresis) ** 2
        summary = (
            f"goodput {_plural(best.workers)} {best.goodput:#.3g} vs {_plural(start)} {here.goodput:#.3g} tau/s "
            f"(eff {best.efficiency:.2f} vs {here.efficiency:.2f})"
        )
        if start != low and here.efficiency < floor_here:
            why = f"efficiency {here.efficiency:.2f} at {_plural(start)} below floor {self.min_efficiency:g}; {summary}"
        elif best.workers != start and best.goodput > here.goodput * (1.0 + self.hysteresis):
            why = summary
        else:
            return _decision(snapshot, start, f"{forced}{summary}: within hysteresis {self.hysteresis:g}")
        if cooldown_left_s > 0:
            return _decision(snapshot, start, f"{forced}{why}; cooldown {cooldown_left_s:.1f} s left")
        return _decision(snapshot, self._limit_step(start, best.workers), f"{forced}{why}")


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
