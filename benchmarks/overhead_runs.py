"""Summarize several runs of ``benchmarks.overhead``: each run's median ratio with its 95% CI, and
all their repeats pooled, read back from the tables the runs wrote.

    python -m benchmarks.overhead_runs FILE [FILE ...] [--pool FILE ...]

Every FILE is a table written by ``benchmarks.overhead`` with ``--repeats``; the runs table has a
column per FILE (in the order given, named after the file), and the pooled table pools the repeats
of the ``--pool`` files (default: all of them). A median above 1.03, the target, is in bold.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Sequence

from benchmarks.common import markdown_table, median_ci

TARGET = 1.03
_RATIOS, _CONTROL = "ratio of each repeat", "control ratio of each repeat"


class RunsError(ValueError):
    """A file that is not an overhead table with per-repeat ratios (one-line message)."""


def read_run(path: Path) -> dict[str, tuple[list[float], list[float]]]:
    """config label -> (AdaScale/bare ratio of each repeat, control ratio of each repeat or [])."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("|")]
    if not lines:
        raise RunsError(f"{path}: no table")
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    if _RATIOS not in header:
        raise RunsError(f"{path}: no {_RATIOS!r} column (a run without --repeats?)")
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]

        def floats(column: str) -> list[float]:
            if column not in header or cells[header.index(column)] in ("", "-"):
                return []
            return [float(x) for x in cells[header.index(column)].split(",")]

        rows[cells[0]] = (floats(_RATIOS), floats(_CONTROL))
    return rows


def summary(ratios: Sequence[float]) -> str:
    """'median (low-high)', bold when the median is above the target."""
    if not ratios:
        return "-"
    ci = median_ci(ratios)
    median = statistics.median(ratios)
    text = f"{median:.3f}" + ("" if ci is None else f" ({ci[0]:.3f}-{ci[1]:.3f})")
    return f"**{text}**" if median > TARGET else text


def runs_table(runs: dict[str, dict[str, tuple[list[float], list[float]]]]) -> str:
    configs = list(next(iter(runs.values())))
    return markdown_table(("config", *runs), [
        (config, *(summary(run.get(config, ([], []))[0]) for run in runs.values())) for config in configs
    ])


def pooled_table(runs: Sequence[dict[str, tuple[list[float], list[float]]]]) -> str:
    configs = list(runs[0])
    rows = []
    for config in configs:
        ratios = [x for run in runs for x in run.get(config, ([], []))[0]]
        control = [x for run in runs for x in run.get(config, ([], []))[1]]
        rows.append((config, str(len(ratios)), summary(ratios), summary(control)))
    return markdown_table(("config", "repeats", "ratio (95% CI)", "control (95% CI)"), rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overhead_runs", description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="tables written by benchmarks.overhead --repeats N")
    parser.add_argument("--pool", nargs="+", type=Path, help="the files whose repeats are pooled (default: all)")
    args = parser.parse_args(argv)
    try:
        runs = {path.stem.removeprefix("overhead_"): read_run(path) for path in args.files}
        pooled = [read_run(path) for path in (args.pool or args.files)]
    except (OSError, RunsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("## Median ratio (95% CI) of each run\n")
    print(runs_table(runs))
    print("\n## Pooled\n")
    print(pooled_table(pooled))
    return 0


if __name__ == "__main__":
    sys.exit(main())
