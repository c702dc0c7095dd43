"""The table and the summary lines of ``benchmarks.vs_ray_train`` (one line per event of every run)."""

from __future__ import annotations

import statistics
from typing import Any

from benchmarks.vs_ray_train_scenarios import SCENARIOS, SYSTEMS


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| scenario | system | run | event | to new size (s) | without training (s) | detection / re-formation (s) "
            "| steps lost | samples replayed / skipped | wall (s) | test accuracy | peak PSS (GiB) |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    runs: dict[tuple[str, str], int] = {}
    for r in rows:
        key = (r["scenario"], r["system"])
        runs[key] = runs.get(key, 0) + 1
        events = r.get("events") or [{"event": "-"}]
        for i, e in enumerate(events):
            split = (f"{e['detection_s']:.3f} / {e['reform_s']:.3f}"
                     if e.get("detection_s") is not None and e.get("reform_s") is not None else "-")
            first = i == 0
            lines.append("| " + " | ".join([
                r["scenario"], r["system"], str(runs[key]), e.get("event", "-"), _f(e.get("to_new_size_s")),
                _f(e.get("paused_s")), split,
                str(r.get("steps_lost", "-")) if first else "",
                f"{r.get('samples_replayed', '-'):,} / {r.get('samples_skipped', '-')}" if first and "samples_replayed" in r else "",
                _f(r.get("wall_s"), 0) if first else "",
                _f(r.get("accuracy"), 4) if first else "",
                _f(r.get("peak_pss_gib"), 2) if first else "",
            ]) + " |" + (f" error: {r['error']}" if first and r.get("error") else ""))
    return head + "\n".join(lines) + "\n"


def summary_lines(rows: list[dict[str, Any]]) -> str:
    out = []
    for scenario in SCENARIOS:
        for system in SYSTEMS:
            mine = [r for r in rows if r["scenario"] == scenario and r["system"] == system]
            if not mine:
                continue
            for what in ("grow", "loss"):
                vals = [e["to_new_size_s"] for r in mine for e in r.get("events", []) if e.get("event") == what
                        and e.get("to_new_size_s") == e.get("to_new_size_s")]
                if vals:
                    out.append(f"- {scenario}, {system}, {what}: to new size median {statistics.median(vals):.2f} s "
                               f"(min {min(vals):.2f}, max {max(vals):.2f}, {len(vals)} runs)")
    return "\n".join(out)


def _f(x: Any, digits: int = 2) -> str:
    if x is None or x != x:
        return "-"
    return f"{x:.{digits}f}"
