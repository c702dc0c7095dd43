"""What ``benchmarks.vs_ray_train`` measures: peak PSS of a process tree, and the recovery figures read
off a timeline of executed steps (time to the new size, time without training, rollbacks, skips)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any


class PeakPss(threading.Thread):
    """Samples the PSS of this process and all its descendants every ``interval_s``; keeps the peak."""

    def __init__(self, interval_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.interval_s, self.peak_bytes = interval_s, 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak_bytes = max(self.peak_bytes, tree_pss_bytes(os.getpid()))
            self._stop_event.wait(self.interval_s)

    def stop(self) -> int:
        self._stop_event.set()
        self.join(timeout=5)
        return self.peak_bytes


def tree_pss_bytes(root: int) -> int:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(name))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, ()))
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration, ValueError):
            continue
    return total


def timeline_figures(records: list[dict[str, Any]], event_s: float, new_world: int) -> dict[str, float]:
    """From executed-step records (``t0``, ``t1`` wall times, ``world``, ``step``, ``attempt``,
    ``cursor``, ``n``): seconds from ``event_s`` to the first step at ``new_world``, the longest
    stretch without a step between the event's last step before and that first step, and the steps
    and samples rolled back (trained in an attempt, then trained again after a restart)."""
    records = sorted(records, key=lambda r: r["t0"])
    first_new = next((r for r in records if r["world"] == new_world and r["t0"] >= event_s - 1e-3), None)
    if first_new is None:
        return {"to_new_size_s": float("nan"), "paused_s": float("nan"), "steps_rolled_back": 0, "samples_replayed": 0}
    # Steps may still run after the event (the old group until it notices, or a restart at an
    # intermediate size): the longest stretch of [event, first step at the new size] that no step covers.
    longest, covered_to = 0.0, event_s
    for r in records:
        if r["t0"] >= first_new["t0"]:
            break
        if r["t0"] > covered_to:
            longest = max(longest, r["t0"] - covered_to)
        covered_to = max(covered_to, r["t1"])
    longest = max(longest, first_new["t0"] - covered_to)
    return {"to_new_size_s": first_new["t0"] - event_s, "paused_s": longest, **rollbacks(records)}


def rollbacks(records: list[dict[str, Any]]) -> dict[str, int]:
    """Steps (and their samples) completed in one attempt and done again by a later one."""
    by_step: dict[int, list[dict[str, Any]]] = {}
    for r in records:
        by_step.setdefault(r["step"], []).append(r)
    steps = sum(len(v) - 1 for v in by_step.values())
    samples = sum(r["n"] for v in by_step.values() for r in v[:-1])
    return {"steps_rolled_back": steps, "samples_replayed": samples}


def skipped_samples(records: list[dict[str, Any]]) -> int:
    """Samples never trained between the first and last step kept (the newest attempt of each step)."""
    kept: dict[int, dict[str, Any]] = {}
    for r in sorted(records, key=lambda r: r["t0"]):
        kept[r["step"]] = r
    skipped, cursor = 0, None
    for step in sorted(kept):
        r = kept[step]
        if cursor is not None and r["cursor"] != cursor:
            skipped += max(0, r["cursor"] - cursor)
        cursor = r["cursor"] + r["n"]
    return skipped


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """The records of a JSON-lines file that another process may still be appending to."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line being written
    return out
