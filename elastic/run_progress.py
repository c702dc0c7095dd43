"""How far the run is: tau, the step counters, the newest StepReport and recent step times.

Written by the training thread, read by the controller's (the observation): one lock guards what
both touch. The counters are what a checkpoint keeps of them (``state_dict``)."""

from __future__ import annotations

import logging
import threading
from typing import Any, Mapping

from elastic.call_plan import StepTimes
from elastic.step_report import StepReport

logger = logging.getLogger("elastic")


class RunProgress:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.progress = 0.0
        """tau: set by each recorded step, or by a restored checkpoint."""
        self.steps = 0
        """Optimizer steps completed (skipped ones included)."""
        self.skipped = 0
        self.consecutive_skips = 0
        self.failures = 0
        """Workers lost."""
        self.abandoned_steps = 0
        """Steps a failure interrupted and that were redone."""
        self._report: StepReport | None = None  # the newest step recorded since the start or a restore
        self._step_times = StepTimes()

    def record(self, report: StepReport, workers: int) -> None:
        """A step, completed at ``workers`` (a skipped one is said so)."""
        self.steps += 1
        with self._lock:
            self._report, self.progress = report, float(report.progress)
            self._step_times.record(workers, report.step_s)
        if report.skipped:
            self.skipped += 1
            self.consecutive_skips += 1
            logger.warning("step %d skipped: non-finite gradients (%d in a row)", self.steps, self.consecutive_skips)
        else:
            self.consecutive_skips = 0

    def record_evaluation(self, evaluation: Mapping[str, float]) -> None:
        with self._lock:
            if self._report is not None:
                self._report = self._report.with_evaluation(evaluation)

    @property
    def report(self) -> StepReport | None:
        """The newest step recorded since the start or the last restore (None before one)."""
        with self._lock:
            return self._report

    def median_step_s(self, workers: int, min_count: int = 1) -> float | None:
        with self._lock:
            return self._step_times.median_s(workers, min_count)

    def observed(self) -> dict[str, Any]:
        """The observation's part (``ElasticTrainer.observation``): tau, the gain (1 before a step),
        the estimates (None before the first) and the median step times by world size."""
        with self._lock:
            report, progress, times = self._report, self.progress, self._step_times.medians_s()
        estimated = report is not None and report.estimated
        return {"progress": float(progress), "gain": float(report.gain) if report is not None else 1.0,
                "grad_variance": report.grad_variance if estimated else None,
                "grad_sqnorm": report.grad_sqnorm if estimated else None, "step_time_s": times}

    def rate_per_s(self, workers: int) -> float | None:
        """tau per second at this size: the last gain over the median step time (None until known)."""
        with self._lock:
            step_s, report = self._step_times.median_s(workers), self._report
        if step_s is None or report is None:
            return None
        return float(report.gain) / max(step_s, 1e-9)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "skipped": self.skipped, "progress": self.progress, "failures": self.failures,
                "abandoned_steps": self.abandoned_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps, self.skipped, self.failures = int(state["steps"]), int(state["skipped"]), int(state["failures"])
        self.abandoned_steps = int(state.get("abandoned_steps", 0))
        with self._lock:
            self.progress, self._report = float(state["progress"]), None

    def restart(self) -> None:
        """Every worker was lost and no checkpoint exists: training starts again from the beginning."""
        self.steps = 0
        with self._lock:
            self.progress, self._report = 0.0, None
