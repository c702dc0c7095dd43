"""The size the group moves to: set from other threads, applied by the training thread at step
boundaries, possibly at a trigger (a schedule step announced ahead: calls end there, and its new
workers start warming up before it fires)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Sequence

from elastic.config import JobSpec

logger = logging.getLogger("elastic")

#: (at_progress, at_time_s): applied at the first step boundary at which tau >= at_progress or the
#: trainer's elapsed seconds >= at_time_s; ``NOW`` means at once.
Trigger = tuple[float | None, float | None]
NOW: Trigger = (None, None)


def trigger_due(at: Trigger, progress: float, elapsed_s: float) -> bool:
    """Whether a target with trigger ``at`` may be applied at a boundary at ``progress``."""
    at_progress, at_time_s = at
    if at_progress is None and at_time_s is None:
        return True
    if at_progress is not None and progress >= at_progress:
        return True
    return at_time_s is not None and elapsed_s >= at_time_s


class WorkerTarget:
    """The target, its trigger and cause, the time of the decision behind it, and the announced
    trigger no call may run past. Thread-safe: the controller sets it while the trainer reads it."""

    def __init__(self, workers: int) -> None:
        self._lock = threading.Lock()
        self._workers = workers
        self._at: Trigger = NOW
        self._cause = "schedule"
        self._decided_s = time.time()  # wall time of the newest decision (a target change, or a fault)
        self._hold_at: float | None = None  # tau of the next announced trigger

    def set(self, workers: int, reason: str, at: Trigger = NOW) -> None:
        with self._lock:
            if (workers, at) != (self._workers, self._at):
                logger.info("target %d -> %d workers: %s", self._workers, workers, reason)
                self._decided_s = time.time()
            self._workers, self._at = workers, at
            if at[0] is not None:
                self._hold_at = at[0]

    def lower_to(self, workers: int) -> None:
        """The cluster has room for only this many at the start: the target follows, unannounced."""
        with self._lock:
            self._workers = workers

    def expect(self, at_progress: float | None) -> None:
        """A scheduled resize comes at this tau (its capacity is being added); None withdraws it."""
        with self._lock:
            self._hold_at = at_progress

    def decided_at(self, wall_s: float) -> None:
        """A fault is the decision behind the regrow that follows it."""
        with self._lock:
            self._decided_s = wall_s

    @property
    def workers(self) -> int:
        with self._lock:
            return self._workers

    @property
    def cause(self) -> str:
        """The cause recorded for resizes toward the target (schedule, controller, manual)."""
        with self._lock:
            return self._cause

    @cause.setter
    def cause(self, cause: str) -> None:
        with self._lock:
            self._cause = cause

    def read(self) -> tuple[int, Trigger, str]:
        """(workers, trigger, cause), read together."""
        with self._lock:
            return self._workers, self._at, self._cause

    @property
    def decided_s(self) -> float:
        with self._lock:
            return self._decided_s

    @property
    def hold_at(self) -> float | None:
        with self._lock:
            return self._hold_at

    def await_announced(self, progress: float, spec: JobSpec, stop: threading.Event) -> None:
        """At an announced trigger whose target has not come yet (its capacity is still being added):
        wait for it (scaling.late_workers=wait, up to late_wait_s), else go on; the hold ends."""
        with self._lock:
            hold, target_at = self._hold_at, self._at[0]
        if hold is None or progress < hold:
            return
        if target_at != hold and spec.scaling.late_workers == "wait":
            logger.warning("scheduled resize at tau %.1f: waiting up to %.0f s for its capacity", progress,
                           spec.scaling.late_wait_s)
            deadline = time.monotonic() + spec.scaling.late_wait_s
            while time.monotonic() < deadline and not stop.is_set():
                with self._lock:
                    if self._at[0] == hold:
                        break
                time.sleep(0.02)
        with self._lock:
            if self._hold_at == hold:
                self._hold_at = None


def missed_schedule_steps(spec: JobSpec, resizes: Sequence[Any], progress: float,
                          elapsed_s: float) -> list[dict[str, Any]]:
    """Schedule steps whose resize never happened, each with why (for the summary and the log).

    A step counts as done when the group reached its size at or after its trigger (tau, or any
    time for a time trigger), or was at that size already. ``resizes``: the ``ResizeEvent``s so far."""
    if spec.scaling.policy != "schedule":
        return []
    missed, size = [], spec.workers.initial
    events = [e for e in resizes if e.cause != "failure"]
    cursor = 0  # resizes before this one answered earlier steps
    for number, step in enumerate(spec.scaling.steps, start=1):
        wanted = min(max(step.workers, spec.workers.min), spec.workers.max)
        after = step.at_progress if step.at_time_s is None else 0.0
        if wanted == size:
            continue
        match = next((i for i in range(cursor, len(events))
                      if events[i].to_workers == wanted and events[i].progress >= after - 1e-9), None)
        if match is not None:
            size, cursor = wanted, match + 1
            continue
        reached = (step.at_progress is not None and progress >= step.at_progress) or (
            step.at_time_s is not None and elapsed_s >= step.at_time_s)
        reason = "its workers never joined (no capacity came)" if reached else "the job finished first"
        missed.append({"step": number, "at_progress": step.at_progress, "at_time_s": step.at_time_s,
                       "workers": wanted, "reason": reason})
    return missed


def log_missed_schedule_steps(missed: list[dict[str, Any]]) -> None:
    for step in missed:
        logger.warning("schedule step %d (%d workers at %s) never happened: %s", step["step"], step["workers"],
                       f"tau {step['at_progress']:g}" if step["at_progress"] is not None else f"{step['at_time_s']:g} s",
                       step["reason"])
