"""The command line's progress view: a live line on a terminal (rich), else the library's log line
every few seconds."""

from __future__ import annotations

from typing import Any

from elastic.progress import LoggedProgress
from elastic.step_report import StepReport


class LiveProgress:
    """An ``elastic.progress.ProgressView``: rich's live line while stderr is a terminal."""

    def __init__(self, total_progress: float) -> None:
        self._lines = LoggedProgress(total_progress)
        self._live: Any = None

    def start(self) -> None:
        from rich.console import Console

        console = Console(stderr=True)
        if console.is_terminal:
            from rich.live import Live

            self._live = Live(console=console, refresh_per_second=4, transient=False)
            self._live.start()

    def update(self, report: StepReport, workers: int, samples: int) -> None:
        if self._live is None:
            self._lines.update(report, workers, samples)
        else:
            self._live.update(self._lines.line(report, workers, samples))

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
