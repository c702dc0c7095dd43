"""The reconcile loop: observe -> decide -> act, one pass at a time.

Each pass (:meth:`ReconcileLoop.reconcile_once`) reads a fresh :class:`JobSnapshot`, asks the policy
for a decision and carries it out in the order that keeps training safe:

* **grow** (target > current): ``actuator.scale_to(target)`` first, so the capacity exists, then
  ``trainer.set_target_workers(target)``; the trainer grows in place at its next step boundary.
  If the actuator fails, the trainer is not told (it would wait for capacity that is not coming).
* **shrink** (target < current): ``trainer.set_target_workers(target)`` first; the trainer releases
  the leaving workers at its next step boundary.  Capacity is removed only for workers the trainer
  reports in ``released_workers()``, on this pass if they are already released, else on a later one.
* **no-op**: if the trainer reports released workers, their capacity is removed
  (``scale_to(trainer.current_workers(), release=...)``); this is how a deferred scale-down finishes.

The loop keeps no state of its own between passes: everything it does follows from the
observation, the decision and the trainer's answers, and both ``scale_to`` and
``set_target_workers`` are idempotent.  A restarted loop (a new object) that sees the same
observations therefore repeats the same idempotent calls and changes nothing.

Failures (observation, policy, actuator or trainer raising) are logged, counted with
``metrics.record_reconcile_error()`` and answered with a NoopDecision; the next pass retries.

This module must not import ray, kubernetes or torch (tests check it).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Callable, Protocol, Sequence

from controller.actuators.base import Actuator
from controller.policy import Decision, JobSnapshot, NoopDecision, Policy, ResizeDecision

__all__ = [
    "TrainerControl",
    "ControllerMetrics",
    "NullControllerMetrics",
    "LoopConfigError",
    "ReconcileLoop",
    "decision_action",
]

logger = logging.getLogger(__name__)


class TrainerControl(Protocol):
    """What the loop needs from the trainer (ElasticTrainer implements it)."""

    def set_target_workers(self, n: int, reason: str, at_progress: float | None = None,
                           at_time_s: float | None = None) -> None:
        """Grow or shrink in place to ``n`` workers at the next step boundary; idempotent. With a
        trigger, new workers are started now and the resize waits for the first boundary at which
        tau >= ``at_progress`` or elapsed >= ``at_time_s`` (only triggered decisions pass them)."""

    def expect_resize(self, at_progress: float | None, at_time_s: float | None) -> None:
        """Optional: a resize is coming at this trigger; end calls there (sent before capacity is added)."""

    def released_workers(self) -> Sequence[str]:
        """Ids of workers the trainer has released whose capacity may now be removed.

        May keep listing an id after its capacity is gone: actuators ignore names that no longer exist.
        """

    def current_workers(self) -> int:
        """Workers training now (released ones excluded)."""


class ControllerMetrics(Protocol):
    """Duck-typed metrics sink (elastic.metrics provides the Prometheus one)."""

    def record_decision(self, action: str, desired: int, capacity: int) -> None:
        """action in {"grow", "shrink", "noop"}; desired = target workers; capacity = capacity_workers."""

    def record_actuation(self, seconds: float) -> None:
        """Wall seconds one actuator.scale_to call took."""

    def record_reconcile_error(self) -> None:
        """One pass failed somewhere (observation, policy, actuator or trainer)."""


class NullControllerMetrics:
    """Metrics that record nothing (used when ``metrics=None``)."""

    def record_decision(self, action: str, desired: int, capacity: int) -> None:
        pass

    def record_actuation(self, seconds: float) -> None:
        pass

    def record_reconcile_error(self) -> None:
        pass


class LoopConfigError(ValueError):
    """ReconcileLoop.run() or start() was given an invalid argument."""


def _check_interval(interval_s: float) -> None:
    if (
        isinstance(interval_s, bool)
        or not isinstance(interval_s, (int, float))
        or not math.isfinite(interval_s)
        or interval_s < 0
    ):
        raise LoopConfigError(f"interval_s must be a finite number >= 0, got {interval_s!r}")


def decision_action(decision: Decision, snapshot: JobSnapshot) -> tuple[str, int]:
    """("grow" | "shrink" | "noop", desired workers) of a decision taken on ``snapshot``."""
    if isinstance(decision, ResizeDecision):
        if decision.target_workers > snapshot.current_workers:
            return "grow", decision.target_workers
        if decision.target_workers < snapshot.current_workers:
            return "shrink", decision.target_workers
    return "noop", snapshot.current_workers


class ReconcileLoop:
    """Observe -> decide -> act.  See the module docstring for the ordering guarantees.

    Args:
        policy: anything with ``decide(JobSnapshot) -> Decision`` (see controller.policy).
        actuator: the cluster backend (controller.actuators.base.Actuator).
        observe: returns a fresh JobSnapshot each call.
        trainer: the TrainerControl of the running job.
        metrics: a ControllerMetrics, or None for none.
        clock: seconds, used to time actuator calls.
    """

    def __init__(
        self,
        policy: Policy,
        actuator: Actuator,
        observe: Callable[[], JobSnapshot],
        trainer: TrainerControl,
        metrics: ControllerMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy
        self.actuator = actuator
        self._observe = observe
        self.trainer = trainer
        self.metrics: ControllerMetrics = metrics if metrics is not None else NullControllerMetrics()
        self._clock = clock
        self._last_logged: tuple[str, int] | None = None

    # ------------------------------------------------------------------ one pass

    def reconcile_once(self) -> Decision:
        """Run one observe -> decide -> act pass and return the decision (never raises)."""
        try:
            snapshot = self._observe()
            decision = self.policy.decide(snapshot)
        except Exception as exc:  # noqa: BLE001 - a failed pass must not stop the loop
            return self._failed("observe/decide", exc)

        action, desired = decision_action(decision, snapshot)
        self.metrics.record_decision(action, desired, snapshot.capacity_workers)
        if action == "noop":
            logger.debug("Keeping %d workers, since %s", snapshot.current_workers, decision.reason)
        else:
            # A resize in flight is decided again on every pass until the trainer reaches it; say so
            # once (this memory only quiets the log, it never changes what the loop does).
            repeated = self._last_logged == (action, desired)
            logger.log(
                logging.DEBUG if repeated else logging.INFO,
                "Deciding to resize from %d -> %d workers, since %s",
                snapshot.current_workers,
                desired,
                decision.reason,
            )
        self._last_logged = (action, desired) if action != "noop" else None

        trigger = {}
        if isinstance(decision, ResizeDecision) and decision.triggered:
            trigger = {"at_progress": decision.at_progress, "at_time_s": decision.at_time_s}
        try:
            if action == "grow":
                if trigger:  # calls stop at the trigger while capacity comes (a trainer may not know how)
                    expect = getattr(self.trainer, "expect_resize", None)
                    if expect is not None:
                        expect(**trigger)
                # Capacity first, so the new workers have somewhere to start.
                self._scale(desired, ())
                self.trainer.set_target_workers(desired, decision.reason, **trigger)
            elif action == "shrink":
                # Trainer first: it releases workers at a step boundary; only then may capacity go.
                self.trainer.set_target_workers(desired, decision.reason, **trigger)
                self._remove_released(desired)
            else:
                self._remove_released(self.trainer.current_workers())
        except Exception as exc:  # noqa: BLE001
            if trigger and getattr(self.trainer, "expect_resize", None) is not None:
                self.trainer.expect_resize(None, None)  # no capacity: the trainer must not wait at the trigger
            self._failed(f"{action} to {desired} workers via {getattr(self.actuator, 'name', 'actuator')}", exc)
        return decision

    def _failed(self, stage: str, exc: Exception) -> NoopDecision:
        self.metrics.record_reconcile_error()
        logger.warning("Reconcile failed during %s: %s: %s", stage, type(exc).__name__, exc)
        logger.debug("Reconcile failure traceback", exc_info=exc)
        return NoopDecision(f"reconcile failed during {stage}: {type(exc).__name__}: {exc}")

    def _remove_released(self, keep_workers: int) -> None:
        """Remove capacity of the workers the trainer has released, keeping ``keep_workers``."""
        released = tuple(self.trainer.released_workers())
        if released:
            self._scale(keep_workers, released)

    def _scale(self, target_workers: int, release: Sequence[str]) -> None:
        started = self._clock()
        try:
            self.actuator.scale_to(target_workers, release=release)
        finally:
            self.metrics.record_actuation(max(0.0, self._clock() - started))

    # ------------------------------------------------------------------ periodic

    def run(self, stop_event: threading.Event, interval_s: float) -> None:
        """Reconcile every ``interval_s`` seconds until ``stop_event`` is set (blocks; see start())."""
        _check_interval(interval_s)
        while not stop_event.is_set():
            try:
                self.reconcile_once()
            except Exception:  # noqa: BLE001 - e.g. a metrics sink raising; the loop must go on
                logger.exception("Reconcile pass raised")
            stop_event.wait(interval_s)

    def start(
        self, stop_event: threading.Event, interval_s: float, name: str = "elastic-controller"
    ) -> threading.Thread:
        """Run :meth:`run` in a daemon thread and return it; set ``stop_event`` and join to stop."""
        _check_interval(interval_s)
        thread = threading.Thread(target=self.run, args=(stop_event, interval_s), name=name, daemon=True)
        thread.start()
        return thread
