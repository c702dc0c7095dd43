"""Convergence versus scale: the paper's Table 2 in miniature (AdaScale vs. LSW vs. identity).

Scale ``S`` is simulated in one process with gradient accumulation: a step runs ``S`` backward
passes, each on one micro-batch of fixed size (one "worker's" batch) drawn by a seeded
``ElasticSampler`` (a fresh permutation per epoch, no replacement), of ``loss / S``. Rules:

- ``adascale``: ``elastic.AdaScale(accumulation_steps=S)`` with the step schedule written in tau;
  training stops when ``opt.progress >= T``.
- ``lsw``: linear scaling, lr * S, with a linear warm-up over the first 5.5% of the iterations,
  for ``ceil(T / S)`` steps (plain SGD with the same accumulation).
- ``identity``: lr unchanged, ``ceil(T / S)`` steps.

All rules share the step schedule in tau (LSW and identity use ``steps * S`` as their tau), SGD
with momentum 0.9 and weight decay 5e-4, the model initialisation and the data order of a seed.
The table reports the final held-out accuracy and loss (mean +- std over seeds), the steps taken,
the speed-up in steps ``T / steps`` and the mean lr multiplier (AdaScale's gain r_t; S for LSW;
1 for identity). The figure draws accuracy against S and AdaScale's effective lr against tau.
The runs are in ``scale_sweep_train``, the table and figure in ``scale_sweep_report``.

    python -m benchmarks.scale_sweep [--seeds 3] [--scales 1,2,4,8,16,32] [--quick] [--out DIR]
        [--tasks digits,synthetic] [--total-progress T] [--processes 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Sequence

from benchmarks.common import RESULTS_DIR, write_text
from benchmarks.scale_sweep_report import format_report, plot, summarize
from benchmarks.scale_sweep_train import TASKS, make_specs, run_sweep


def _parse_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale_sweep", description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds per (task, S, rule)")
    parser.add_argument("--scales", type=_parse_ints, default=[1, 2, 4, 8, 16, 32], help="comma-separated S values")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from {', '.join(TASKS)}")
    parser.add_argument("--quick", action="store_true", help="T/5, one seed, scales 1,8 (a smoke run)")
    parser.add_argument("--total-progress", type=int, default=None,
                        help="override T (scale-1 iterations) of every task")
    parser.add_argument("--processes", type=int, default=2, help="worker processes (1 = inline)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for scale_sweep.md and .png")
    args = parser.parse_args(argv)

    names = [n.strip() for n in args.tasks.split(",") if n.strip()]
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        parser.error(f"--tasks: unknown {', '.join(unknown)}; allowed: {', '.join(TASKS)}")
    setups = [TASKS[n] for n in names]
    seeds, scales = args.seeds, args.scales
    if args.total_progress is not None:
        if args.total_progress < 1:
            parser.error("--total-progress: must be >= 1")
        setups = [dataclasses.replace(s, total_progress=args.total_progress) for s in setups]
    if args.seeds < 1:
        parser.error("--seeds: must be >= 1")
    if args.quick:
        setups = [dataclasses.replace(s, total_progress=max(s.total_progress // 5, 1)) for s in setups]
        seeds, scales = 1, [s for s in scales if s in (1, 8)] or scales[:2]

    start = time.perf_counter()
    results = run_sweep(make_specs(setups, scales, range(seeds)), processes=args.processes)
    wall_s = time.perf_counter() - start
    rows = summarize(results, {s.name: s.total_progress for s in setups})
    report = format_report(rows, setups, seeds, wall_s)
    print(report)
    stem = "scale_sweep_quick" if args.quick else "scale_sweep"
    write_text(args.out / f"{stem}.md", report)
    plot(results, rows, args.out / f"{stem}.png")
    print(f"wrote {args.out / (stem + '.md')} and {args.out / (stem + '.png')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
