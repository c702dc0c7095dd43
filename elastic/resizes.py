"""The record of the group's size changes (ResizeEvent), planned or after a failure, with their pauses."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("elastic")


@dataclass(frozen=True)
class ResizeEvent:
    """One change of the group's size. Every duration runs from the event that caused it."""

    time_s: float
    """Wall time at which training resumed at the new size."""
    progress: float
    from_workers: int
    to_workers: int
    direction: str
    cause: str
    pause_s: float
    """Seconds without training: for a planned resize, from the step boundary where the trainer
    acted on the decision to the first step at the new size; for a failure, from the fault's first
    sign (see ``elastic.call_watch.FaultTiming``) to the first step at the new size."""
    since_decision_s: float | None = None
    """Planned resizes: from the decision (the target set by the controller or by hand) to the first
    step at the new size; newcomers warm up while the old group trains, so this exceeds the pause."""
    detection_s: float | None = None
    """Failures: from the fault's first sign to the driver knowing (and aborting the collectives)."""
    reform_s: float | None = None
    """Failures: from detection to the group re-formed at the new size."""


class ResizeLog:
    """The resizes so far, each recorded (event, metric, log line) when training resumes at the new
    size: a failure is remembered until then, so that its pause runs from the fault to that moment."""

    def __init__(self) -> None:
        self.events: list[ResizeEvent] = []
        self.last_resize_s: float | None = None
        """``time.monotonic()`` of the last resize (None before any)."""
        self._failure: tuple[Any, int, int] | None = None  # (fault timing, from, to) until training resumes

    def planned(self, from_workers: int, to_workers: int, direction: str, cause: str, pause_s: float,
                progress: float, decided_s: float, metrics: Any) -> None:
        """A grow or shrink toward the target; ``decided_s``: wall time of the decision behind it."""
        now = time.time()
        since_decision_s = max(pause_s, now - decided_s)
        event = ResizeEvent(now, progress, from_workers, to_workers, direction, cause, pause_s,
                            since_decision_s=since_decision_s)
        self.events.append(event)
        self.last_resize_s = time.monotonic()
        metrics.record_resize(direction, cause, pause_s, from_workers, to_workers)
        logger.info("resized %d -> %d workers in place (%s, %s) at tau %.1f; %.3f s after the decision, "
                    "paused %.3f s", from_workers, to_workers, direction, cause, event.progress, since_decision_s, pause_s)

    def workers_lost(self, outcome: Any, from_workers: int, to_workers: int, metrics: Any) -> int:
        """Workers lost in a call's ``outcome`` (``elastic.group``), the group re-formed at
        ``to_workers``: counted and said now; the resize is recorded when training resumes at the
        new size (``failure_resumed``). Returns how many were lost."""
        lost = len(outcome.lost_workers)
        metrics.record_failure(lost)
        fault = outcome.fault
        logger.warning("worker failure: lost %s; step %s; %s", ", ".join(outcome.lost_workers),
                       "kept" if outcome.completed else "redone",
                       f"re-formed with {to_workers} worker(s): detected {fault.detection_s:.3f} s after the "
                       f"fault's first sign, re-formed {fault.reformed_s - fault.detected_s:.3f} s after detection"
                       if fault is not None and fault.reformed_s else "no survivor")
        if fault is not None and to_workers > 0:
            self._failure = (fault, from_workers, to_workers)
        return lost

    @property
    def failure_pending(self) -> bool:
        return self._failure is not None

    def failure_resumed(self, progress: float, metrics: Any) -> None:
        """Training resumed at the size the group re-formed at after the pending failure."""
        fault, from_workers, to_workers = self._failure
        self._failure = None
        now = time.time()
        pause_s = max(0.0, now - fault.evidence_s)
        reform_s = max(0.0, fault.reformed_s - fault.detected_s)
        self.events.append(ResizeEvent(now, progress, from_workers, to_workers, "shrink", "failure", pause_s,
                                       detection_s=fault.detection_s, reform_s=reform_s))
        self.last_resize_s = time.monotonic()
        if to_workers < from_workers:
            metrics.record_resize("shrink", "failure", pause_s, from_workers, to_workers)
        logger.warning("training again at %d worker(s) %.3f s after the fault's first sign (detection %.3f s, "
                       "re-formation %.3f s)", to_workers, pause_s, fault.detection_s, reform_s)
