"""How many optimizer steps one call hands the workers (``workers.steps_per_call``), and the step
times the ``auto`` setting is planned from. Pure: the trainer passes what it knows."""

from __future__ import annotations

import collections
import math
import statistics

from elastic.config import JobSpec

#: workers.steps_per_call = auto: a call carries about this much work, and at most this many steps,
#: once this many steps at the current world size were timed.
CALL_TARGET_S = 0.5
MAX_AUTO_STEPS_PER_CALL = 128
MIN_TIMED_STEPS = 3
#: Step times kept per world size (the newest).
TIMED_STEPS_KEPT = 50


class StepTimes:
    """Recent step seconds by world size. Not locked: ``RunProgress`` reads and writes it under its own lock."""

    def __init__(self) -> None:
        self._by_workers: dict[int, collections.deque[float]] = {}

    def record(self, workers: int, step_s: float) -> None:
        self._by_workers.setdefault(workers, collections.deque(maxlen=TIMED_STEPS_KEPT)).append(step_s)

    def median_s(self, workers: int, min_count: int = 1) -> float | None:
        """The median at this size, or None with fewer than ``min_count`` timed steps."""
        times = self._by_workers.get(workers)
        return statistics.median(times) if times and len(times) >= min_count else None

    def medians_s(self) -> dict[int, float]:
        return {ws: statistics.median(d) for ws, d in self._by_workers.items() if d}


def steps_per_call(spec: JobSpec, workers: int, median_step_s: float | None, steps_done: int, progress: float,
                   hold_at: float | None) -> int:
    """The next call's step count: ``workers.steps_per_call`` (``auto``: about ``CALL_TARGET_S`` of
    work from ``median_step_s``, one step until timed), bounded so that the call ends at the next
    checkpoint step and carries tau neither past the total nor past ``hold_at`` (an announced
    scheduled resize's trigger)."""
    setting = spec.workers.steps_per_call
    if setting == "auto":
        count = 1 if median_step_s is None else int(CALL_TARGET_S / max(median_step_s, 1e-6))
        count = min(max(count, 1), MAX_AUTO_STEPS_PER_CALL)
    else:
        count = int(setting)
    every = spec.checkpoint.every_steps
    count = min(count, every - steps_done % every)
    # A step advances tau by its gain, at most S = workers * accumulation_steps.
    scale = workers * spec.accumulation_steps
    count = min(count, max(1, int((spec.total_progress - progress) // scale)))
    # Nor past a scheduled resize's trigger: ceil((at - tau) / S) steps cannot carry tau beyond the
    # first boundary at or after it, whatever the gains.
    if hold_at is not None and progress < hold_at:
        count = min(count, max(1, math.ceil((hold_at - progress) / scale)))
    return count
