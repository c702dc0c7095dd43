"""The run's metrics log: one JSON object per event and line, flushed per line (read by ``elastic report``)."""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path
from typing import IO, Any

from elastic.metrics.registry import MetricsError


class EventLog:
    """Appends one JSON object per line; non-finite floats become null so any JSON reader copes."""

    def __init__(self, path: Path | None, job_name: str) -> None:
        self._job_name = job_name
        self._lock = threading.Lock()
        self._file: IO[str] | None = None
        if path is not None:
            path = Path(path)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._file = path.open("a", encoding="utf-8")
            except OSError as exc:
                raise MetricsError(f"metrics log_path: cannot open {path}: {exc.strerror}") from exc

    def write(self, kind: str, time_s: float | None, **fields: Any) -> None:
        if self._file is None:
            return
        event = {"kind": kind, "time_s": time.time() if time_s is None else float(time_s),
                 "job_name": self._job_name}
        event.update({k: json_safe(v) for k, v in fields.items()})
        line = json.dumps(event, allow_nan=False, separators=(",", ":"))
        with self._lock:
            if self._file is None:
                return
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
