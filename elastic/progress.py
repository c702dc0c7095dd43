"""How a run shows its progress: what the trainer calls after each recorded step (``ProgressView``),
the library's own view (a log line every few seconds) and the view that shows nothing.

The command line's live line on a terminal is ``elastic_app.progress.LiveProgress``."""

from __future__ import annotations

import collections
import logging
import time
from typing import Protocol

from elastic.step_report import StepReport

logger = logging.getLogger("elastic")


class ProgressView(Protocol):
    """Started when training starts, updated after each recorded step (and evaluation), closed
    when training ends, whatever the outcome."""

    def start(self) -> None: ...

    def update(self, report: StepReport, workers: int, samples: int) -> None:
        """``samples``: samples consumed so far (a resumed run's restored count included)."""

    def close(self) -> None: ...


class NoProgress:
    """Shows nothing (``show_progress=False``)."""

    def start(self) -> None:
        pass

    def update(self, report: StepReport, workers: int, samples: int) -> None:
        pass

    def close(self) -> None:
        pass


class SampleRate:
    """Samples per second over about the last ``RATE_WINDOW_S`` (None until two counts): counted
    from this process's first count, so a resumed run's restored count never enters the rate."""

    RATE_WINDOW_S = 10.0

    def __init__(self) -> None:
        self._recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, samples consumed)

    def recent(self, now_s: float, samples: int) -> float | None:
        self._recent.append((now_s, samples))
        while len(self._recent) > 2 and now_s - self._recent[1][0] >= self.RATE_WINDOW_S:
            self._recent.popleft()
        (t0, n0), (t1, n1) = self._recent[0], self._recent[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else None


class LoggedProgress:
    """The progress line, logged every ``LOG_EVERY_S`` (the library's default view)."""

    LOG_EVERY_S = 5.0

    def __init__(self, total_progress: float) -> None:
        self.total_progress = total_progress
        self.rate = SampleRate()
        self._last_log = 0.0

    def start(self) -> None:
        pass

    def line(self, report: StepReport, workers: int, samples: int) -> str:
        """The line for this step (it counts toward the sample rate)."""
        rate = self.rate.recent(time.monotonic(), samples)
        line = (f"tau {report.progress:8.1f}/{self.total_progress:g}  workers {workers}  scale {report.scale:g}  "
                f"gain {report.gain:5.2f}  lr {report.learning_rate:.4g}  loss {report.loss:.4f}  "
                + (f"{rate:7.0f} samples/s" if rate is not None else "    ... samples/s"))
        extra = {**report.metrics, **{f"eval_{k}": v for k, v in report.evaluation.items()}}
        if extra:
            line += "  " + "  ".join(f"{k} {v:.4g}" for k, v in extra.items())
        return line

    def update(self, report: StepReport, workers: int, samples: int) -> None:
        line = self.line(report, workers, samples)
        if time.monotonic() - self._last_log >= self.LOG_EVERY_S:
            self._last_log = time.monotonic()
            logger.info(line)

    def close(self) -> None:
        pass
