"""`elastic report RUN_DIR`: one PNG of a run, drawn from the event log ``RUN_DIR/metrics.jsonl``.

Stacked panels share the x axis (wall time since the first event): workers and target, AdaScale
scale S, gain ratio r_t, effective learning rate, progress tau, loss, and (when the run evaluated
during training) the task's evaluation metrics, one line per metric. Resizes are vertical
lines across all panels (green: grow, red: shrink); worker failures are dotted black lines.
The log is the one ``elastic.metrics.TrainerMetrics`` writes (one JSON object per line).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["LOG_NAME", "REPORT_NAME", "ReportError", "RunLog", "draw_report", "read_log"]

LOG_NAME = "metrics.jsonl"
REPORT_NAME = "report.png"


class ReportError(ValueError):
    """The run directory has no usable event log; the message says which file and why."""


@dataclass
class RunLog:
    """The events of one run, split by kind, in file order."""

    steps: list[dict[str, Any]] = field(default_factory=list)
    resizes: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    other: list[dict[str, Any]] = field(default_factory=list)

    @property
    def start_s(self) -> float:
        return min(e["time_s"] for e in self.steps + self.resizes + self.failures + self.other)


def read_log(path: Path) -> RunLog:
    """Parses the JSONL event log. A truncated last line (a crash mid-write) is ignored."""
    if not path.is_file():
        raise ReportError(f"report: {path} does not exist (was the run started with a metrics log?)")
    lines = path.read_text(encoding="utf-8").splitlines()
    log = RunLog()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):
                break
            raise ReportError(f"report: {path} line {number} is not JSON ({exc.msg})") from exc
        if not isinstance(event, dict) or not isinstance(event.get("time_s"), (int, float)):
            raise ReportError(f"report: {path} line {number} has no numeric time_s")
        kind = event.get("kind")
        if kind == "step":
            log.steps.append(event)
        elif kind == "resize":
            log.resizes.append(event)
        elif kind == "failure":
            log.failures.append(event)
        elif kind == "eval" and isinstance(event.get("metrics"), dict):
            log.evals.append(event)
        else:
            log.other.append(event)
    if not log.steps:
        raise ReportError(f"report: {path} has no step events (empty log: did the run complete a step?)")
    return log


def run_ids(log: RunLog) -> list[str]:
    """Run ids named by the log's ``run`` events, first seen first (more than one: the log mixes runs,
    which a run directory's lock now prevents but older directories may hold)."""
    return list(dict.fromkeys(e["run_id"] for e in log.other if e.get("kind") == "run" and e.get("run_id")))


# Workers and scale are step functions: step i ran at its value during (t_{i-1}, t_i], hence steps-pre.
def _series(steps: list[dict[str, Any]], key: str) -> list[float]:
    # null in the log stands for a non-finite value (e.g. a NaN loss): draw it as a gap.
    return [math.nan if s.get(key) is None else float(s[key]) for s in steps]


def draw_report(run_dir: Path, out: Path | None = None) -> Path:
    """Draws ``run_dir/metrics.jsonl`` to ``out`` (default ``run_dir/report.png``); returns the PNG path."""
    run_dir = Path(run_dir)
    log = read_log(run_dir / LOG_NAME)
    out = Path(out) if out is not None else run_dir / REPORT_NAME

    import matplotlib

    matplotlib.use("Agg")  # headless: no display on training nodes or CI
    import matplotlib.pyplot as plt

    t0 = log.start_s
    span_s = max(e["time_s"] for e in log.steps) - t0
    unit, divisor = ("min", 60.0) if span_s > 1200 else ("s", 1.0)

    def x(events: list[dict[str, Any]]) -> list[float]:
        return [(e["time_s"] - t0) / divisor for e in events]

    xs = x(log.steps)
    panels: list[tuple[str, list[tuple[str, list[float], dict[str, Any]]], bool]] = [
        ("workers", [("workers", _series(log.steps, "workers"), {"drawstyle": "steps-pre"}),
                     ("target", _series(log.steps, "target_workers"),
                      {"drawstyle": "steps-pre", "linestyle": "--"})], False),
        ("scale S", [("scale", _series(log.steps, "scale"), {"drawstyle": "steps-pre"})], False),
        ("gain r_t", [("gain", _series(log.steps, "gain"), {})], False),
        ("effective lr", [("lr", _series(log.steps, "learning_rate"), {})], False),
        ("progress tau", [("tau", _series(log.steps, "progress"), {})], False),
        ("loss", [("loss", _series(log.steps, "loss"), {})], True),
    ]
    eval_x = x(log.evals)
    if log.evals:
        names = sorted({k for e in log.evals for k in e["metrics"]})
        panels.append(("evaluation", [(n, [math.nan if e["metrics"].get(n) is None else float(e["metrics"][n])
                                           for e in log.evals], {"marker": "o", "x": eval_x}) for n in names], False))

    fig, axes = plt.subplots(len(panels), 1, sharex=True, figsize=(10, 2.0 * len(panels)),
                             constrained_layout=True)
    name = log.steps[-1].get("job_name") or run_dir.name
    failures = sum(int(f.get("count", 1)) for f in log.failures)
    ids = run_ids(log)
    run = f" (run {ids[0]})" if len(ids) == 1 else f" (MIXED runs {', '.join(ids)})" if ids else ""
    fig.suptitle(f"{name}{run}: {len(log.steps)} steps, resizes: {len(log.resizes)}, worker failures: {failures}")
    starts = [e for e in log.other if e.get("kind") == "run" and e.get("resume")]  # where each resume began
    for ax, (ylabel, lines, log_scale) in zip(axes, panels):
        for label, ys, style in lines:
            style = dict(style)
            ax.plot(style.pop("x", xs), ys, label=label, linewidth=1.2, **style)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if log_scale and all(v > 0 for v in lines[0][1] if not math.isnan(v)):
            ax.set_yscale("log")
        if len(lines) > 1 or ylabel == "evaluation":
            ax.legend(loc="upper left", fontsize="small")
        for event, t in zip(log.resizes, x(log.resizes)):
            ax.axvline(t, color="tab:green" if event.get("direction") == "grow" else "tab:red",
                       linewidth=0.9, alpha=0.7)
        for t in x(log.failures):
            ax.axvline(t, color="black", linestyle=":", linewidth=0.9)
        for t in x(starts):
            ax.axvline(t, color="tab:gray", linestyle="-.", linewidth=0.9)
    axes[0].yaxis.get_major_locator().set_params(integer=True)
    axes[-1].set_xlabel(f"wall time since start ({unit})")

    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
