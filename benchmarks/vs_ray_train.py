"""This project side by side with Ray Train 2.60's elastic ``TorchTrainer``, alternating in one run.

    python -m benchmarks.vs_ray_train [--reps 3] [--scenarios grow,loss,e2e] [--out benchmarks/results/vs_ray_train.md]

Both systems train the same job: the digits CNN (``examples.digits``), batch 32 per worker, SGD
(lr 0.05, momentum 0.9, weight decay 5e-4) wrapped in this project's AdaScale, in the global sample
order of ``ElasticSampler`` (seed 0), one Ray node per worker slot on a ``ray.cluster_utils`` cluster
of 1-CPU nodes started fresh for every run (each run is its own process). Ray Train runs with fair
settings: health check every 0.1 s (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``), elastic resize monitor
every 2 s, worker-group start timeout 20 s instead of 60 s (measured better for it), unlimited
retries (``FailureConfig(max_failures=-1)``); its loop reports a checkpoint (model, optimizer +
AdaScale, sampler position, step) every ``CHECKPOINT_EVERY_STEPS`` steps and resumes from
``ray.train.get_checkpoint()``. This project checkpoints as often (it never reads them back here).

Scenarios (times from the first completed step):
- ``grow``: 1 node; 3 more nodes at ``GROW_AT_S``; ends ``STEADY_S`` after training at 4.
- ``loss``: 4 nodes; rank 1's node is removed (``remove_node(allow_graceful=False)``) at
  ``LOSS_AT_S``; ends ``STEADY_S`` after training at 3.
- ``e2e``: 1 node; +3 nodes at ``E2E_GROW_AT_S``, rank 1's node removed at ``E2E_LOSS_AT_S``;
  ends when tau reaches ``E2E_TOTAL_PROGRESS``.

Per run: time from the event (capacity added, node removed) to the first step at the new size;
time without training (no step running: the longest gap around the event); steps lost (completed
steps rolled back + in-flight steps abandoned; Ray Train's in-flight step at a kill is not visible
and not counted); samples replayed (samples of rolled-back steps, trained again) and skipped; wall
time; final test accuracy; peak PSS of the run's process tree (driver, GCS, raylets, workers).

The parts: ``vs_ray_train_scenarios`` (the job, the schedules), ``vs_ray_train_elastic`` and
``vs_ray_train_ray`` (one side each), ``vs_ray_train_figures`` (what is measured and how it is read
off a step timeline), ``vs_ray_train_report`` (the table); this file runs each (system, scenario)
in its own process and writes the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from benchmarks.common import write_text
from benchmarks.vs_ray_train_elastic import run_elastic
from benchmarks.vs_ray_train_figures import PeakPss, read_jsonl
from benchmarks.vs_ray_train_ray import run_ray_train
from benchmarks.vs_ray_train_report import summary_lines, table
from benchmarks.vs_ray_train_scenarios import RUN_LIMIT_S, SCENARIOS, SYSTEMS

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


RUNNERS: dict[str, Callable[[str, Path], dict[str, Any]]] = {"elastic": run_elastic, "ray-train": run_ray_train}


def child(system: str, scenario: str, out: Path) -> int:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    pss = PeakPss()
    pss.start()
    with tempfile.TemporaryDirectory(prefix="vsrt-") as tmp:
        row = RUNNERS[system](scenario, Path(tmp))
    row["peak_pss_gib"] = pss.stop() / 2**30
    out.write_text(json.dumps(row))
    return 0


def run_one(system: str, scenario: str, log: Callable[[str], None]) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    cmd = [sys.executable, "-m", "benchmarks.vs_ray_train", "--child", system, scenario, "--result", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=RUN_LIMIT_S + 180)
    try:
        row = json.loads(out.read_text())
    except (OSError, json.JSONDecodeError):
        row = {"events": [], "error": f"exit {proc.returncode}: {(proc.stderr.strip().splitlines() or ['?'])[-1][:200]}"}
    out.unlink(missing_ok=True)
    row.update(system=system, scenario=scenario)
    log(f"{scenario:5s} {system:9s} {time.time() - started:6.0f} s  " + json.dumps(
        {k: v for k, v in row.items() if k not in ("system", "scenario")}, default=str))
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--out", default=str(RESULTS / "vs_ray_train.md"))
    parser.add_argument("--rows", help="also append every run's row to this JSON-lines file")
    parser.add_argument("--table-from", help="write the table from a --rows file instead of running")
    parser.add_argument("--child", nargs=2, metavar=("SYSTEM", "SCENARIO"), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child[0], args.child[1], Path(args.result))
    scenarios = [s for s in args.scenarios.split(",") if s]
    systems = [s for s in args.systems.split(",") if s]
    for name, allowed, what in ((scenarios, SCENARIOS, "scenario"), (systems, SYSTEMS, "system")):
        bad = [x for x in name if x not in allowed]
        if bad:
            parser.error(f"{what}: unknown {bad}; allowed: {', '.join(allowed)}")
    import ray

    if args.table_from:
        rows = read_jsonl(args.table_from)
        header = f"Rows of `{Path(args.table_from).name}` (Ray {ray.__version__})"
    else:
        rows = []
        started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        load_before = os.getloadavg()[0]
        for scenario in scenarios:
            for rep in range(args.reps):
                order = systems if rep % 2 == 0 else list(reversed(systems))  # alternate who goes first
                for system in order:
                    row = run_one(system, scenario, lambda m: print(m, file=sys.stderr, flush=True))
                    row["load_average"] = os.getloadavg()[0]
                    rows.append(row)
                    if args.rows:
                        with open(args.rows, "a") as f:
                            f.write(json.dumps(row) + "\n")
        header = (f"Measured {started} on this 2-core machine (load average {load_before:.1f} before, "
                  f"{os.getloadavg()[0]:.1f} after; Ray {ray.__version__}); "
                  f"`python -m benchmarks.vs_ray_train --reps {args.reps} --scenarios {','.join(scenarios)}`")
    text = f"{header}\n\n{table(rows)}\n{summary_lines(rows)}\n"
    print(text)
    write_text(Path(args.out), text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
