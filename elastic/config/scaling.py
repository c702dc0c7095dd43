"""Job-spec sections of the group's size: worker bounds, the scaling policy and its steps, failures."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from elastic.config.fields import AutoOrInt, Float, Int, Problems, Section


class WorkersConfig(Section):
    """Bounds on the number of data-parallel workers."""

    min: Int = Field(default=1, ge=1)
    """Fewest workers the job runs with (>= 1)."""
    max: Int = Field(default=1, ge=1)
    """Most workers the job may use (>= min)."""
    initial: Int = Field(default=1, ge=1)
    """Workers at start, in [min, max]; defaults to min."""
    steps_per_call: AutoOrInt = "auto"
    """Steps each worker runs per call from the driver. ``auto``: as many as take about
    0.5 s at the measured step time (at most 128; 1 until steps at the current size were timed),
    which spreads the fixed cost of a Ray call over many short steps. A resize, a stop request or
    a checkpoint waits for the running call; a failure loses at most the step it hit. 1: a call per step."""

    @model_validator(mode="before")
    @classmethod
    def _initial_defaults_to_min(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "initial" not in data:
            low = data.get("min", 1)
            if isinstance(low, int) and not isinstance(low, bool) and low >= 1:
                return {**data, "initial": low}
        return data

    @model_validator(mode="after")
    def _check(self) -> WorkersConfig:
        problems = Problems("WorkersConfig")
        if self.min > self.max:
            problems.add(("min",), f"must be <= workers.max (got min={self.min}, max={self.max})", self.min)
        elif not self.min <= self.initial <= self.max:
            problems.add(
                ("initial",),
                f"must be within workers.min..workers.max = {self.min}..{self.max} (got {self.initial})",
                self.initial,
            )
        problems.raise_if_any()
        return self


class ScalingStep(Section):
    """One resize of the ``schedule`` policy: at a progress (tau) or a wall-clock time, go to N workers."""

    at_progress: Optional[Float] = Field(default=None, ge=0)
    """Resize when progress tau reaches this value (scale-1 iterations, < total_progress)."""
    at_time_s: Optional[Float] = Field(default=None, ge=0)
    """Resize this many seconds after training starts."""
    workers: Int
    """Target number of workers, in [workers.min, workers.max]."""

    @model_validator(mode="after")
    def _exactly_one_trigger(self) -> ScalingStep:
        if (self.at_progress is None) == (self.at_time_s is None):
            problems = Problems("ScalingStep")
            got = "neither" if self.at_progress is None else "both"
            problems.add((), f"give exactly one of at_progress or at_time_s (got {got})", None)
            problems.raise_if_any()
        return self


class ScalingConfig(Section):
    """How the controller picks the number of workers."""

    policy: Literal["schedule", "available", "goodput", "fixed"] = "fixed"
    """``fixed`` (stay at workers.initial); ``schedule`` (follow steps); ``available`` (use the
    capacity there is); ``goodput`` (maximise throughput x statistical efficiency)."""
    steps: tuple[ScalingStep, ...] = ()
    """Resizes for policy=schedule, in order (at_progress and at_time_s each increasing)."""
    interval_s: Float = Field(default=2.0, gt=0)
    """Controller period: seconds between observe -> decide -> act rounds."""
    cooldown_s: Float = Field(default=30.0, ge=0)
    """goodput: seconds after a resize before the policy resizes again by choice (bounds still apply)."""
    min_efficiency: Float = Field(default=0.5, gt=0, le=1)
    """goodput: never scale to where predicted statistical efficiency r(S)/S falls below this, in (0, 1]."""
    hysteresis: Float = Field(default=0.05, ge=0, lt=1)
    """goodput: resize only if predicted goodput improves by more than this fraction, in [0, 1)."""
    late_workers: Literal["wait", "continue"] = "wait"
    """schedule: when a step's trigger is reached before its new workers are ready, ``wait`` for them
    (up to late_wait_s, counted as the resize's pause) or ``continue`` at the old size (said once)
    and grow when they are ready."""
    late_wait_s: Float = Field(default=120.0, ge=0)
    """schedule, late_workers=wait: the longest wait at a trigger before going on without them."""

    @model_validator(mode="after")
    def _check(self) -> ScalingConfig:
        problems = Problems("ScalingConfig")
        if self.policy == "schedule" and not self.steps:
            problems.add(("steps",), "policy=schedule needs at least one step ({at_progress | at_time_s, workers})", [])
        if self.policy != "schedule" and self.steps:
            problems.add(("steps",), f"only used by policy=schedule (got policy={self.policy})", None)
        for trigger in ("at_progress", "at_time_s"):
            previous: float | None = None
            for i, step in enumerate(self.steps):
                value = getattr(step, trigger)
                if value is None:
                    continue
                if previous is not None and value <= previous:
                    problems.add(("steps", i, trigger), f"must be increasing along steps (got {value} after {previous})", value)
                previous = value
        problems.raise_if_any()
        return self


class FailureConfig(Section):
    """Tolerance for failed steps and missing workers."""

    max_consecutive_skipped_steps: Int = Field(default=10, ge=1)
    """Stop the job after this many steps in a row are skipped (non-finite gradients, failures)."""
    wait_for_workers_s: Float = Field(default=60.0, ge=0)
    """After losing workers below workers.min, wait this long for capacity before failing."""

