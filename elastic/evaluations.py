"""Evaluations while training (``evaluation.every_progress``) and at the end: when one is due, and
every result so far."""

from __future__ import annotations

import logging
from typing import Any

from elastic.config import JobSpec

logger = logging.getLogger("elastic")


class Evaluations:
    def __init__(self, spec: JobSpec) -> None:
        self.every_progress = spec.evaluation.every_progress
        self.total_progress = spec.total_progress
        self._next_progress = self.every_progress if self.every_progress is not None else float("inf")
        self.latest: dict[str, float] = {}
        self.history: list[dict[str, float]] = []
        """Each result with the tau and the step it was taken at."""

    def due(self, progress: float) -> bool:
        """Whether tau passed the next multiple of ``every_progress`` (before the total: the end has
        its own evaluation); if so, the one after is due at the multiple after tau."""
        every = self.every_progress
        if every is None or progress < self._next_progress or progress >= self.total_progress:
            return False
        self._next_progress = (progress // every + 1) * every
        return True

    def record(self, evaluation: dict[str, float], progress: float, step: int, metrics: Any) -> None:
        self.latest = dict(evaluation)
        self.history.append({"progress": progress, "step": step, **evaluation})
        metrics.record_eval(evaluation, progress, step)
        logger.info("evaluation at tau %.1f: %s", progress, "  ".join(f"{k} {v:.4g}" for k, v in evaluation.items()))
