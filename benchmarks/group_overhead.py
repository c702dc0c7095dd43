"""Steady-state step time of the worker group vs a plain torch DDP loop doing the same work.

Both arms run the same job at world size 2 (gloo on CPU, one thread per rank), from the same
initial weights (``torch.manual_seed(spec.seed)`` before ``task.build_model()``), with the same
AdaScale-wrapped optimizer, the same per-worker batch, and the same data indexing (an
``ElasticSampler`` plan per step, rank r takes ``plan.shard(r)``, collated with ``default_collate``):

- **group**: the trainer's loop in the driver (``sampler.plan`` -> ``WorkerGroup.run_step`` ->
  ``sampler.commit``): two Ray actor calls per step carrying the index lists, a DDP step in each
  actor, two reports back. Timed in the driver, per step.
- **plain DDP**: two ``torch.multiprocessing`` processes with the classic loop (each rank plans the
  same step locally and takes its shard). Timed on rank 0, per step.

The arms alternate in blocks of steps (the idle arm waits blocked, using no CPU) so that drift in
machine load hits both alike; the first block of each is a warm-up. The ratio that resists load drift
is the median over block pairs of (group block median / plain-DDP block median). After every block the rank-0
losses of the two arms, at the same step, are compared: they run the same computation, so they agree
to float rounding. The breakdown under the table says where the group's extra time goes.

AdaScale's own cost is the same in both arms (benchmarks/overhead.py measures it).
The plain-DDP arm is in ``group_overhead_ddp``, the measurement in ``group_overhead_measure``;
this file writes the tables.

    python -m benchmarks.group_overhead [--steps 400] [--block 25] [--models digits,wide-mlp] [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from benchmarks.group_overhead_measure import WORLD_SIZE, OverheadResult, measure
from benchmarks.ray_common import MODELS, RESULTS_DIR, BenchmarkError, machine_load, markdown_table, model_spec, write_result

TARGET_RATIO = 1.10

HEADERS = ["model", "params", "world size", "steps per call", "steps", "plain DDP step median (ms)", "group step median (ms)",
           "ratio of medians", "ratio, median of block pairs", "target (paired ratio)"]
DETAIL_HEADERS = ["model", "steps per call", "group step (ms)", "in the actors: collate + DDP step, slower / faster rank (ms)",
                  "outside the actors (ms)",
                  "Ray round trip to the workers, 2 empty calls (ms)",
                  "probe actors: 2 empty calls / 2 step-sized calls (ms)", "driver plan + shard + commit (ms)", "max rank-0 loss diff"]


def report(results: Sequence[OverheadResult], command: str, load_before: str, load_after: str, elapsed_s: float) -> str:
    rows = []
    for r in results:
        target = (f"<= {TARGET_RATIO:.2f}: {'met' if r.paired_ratio <= TARGET_RATIO else 'missed'}" if r.model == "digits"
                  else "(reported)")
        rows.append([r.model, f"{MODELS[r.model].parameters:,}", WORLD_SIZE, r.steps_per_call, r.steps, f"{r.ddp_ms:.2f}",
                     f"{r.group_ms:.2f}", f"{r.ratio:.3f}", f"{r.paired_ratio:.3f}", target])
    details = [[r.model, r.steps_per_call, f"{r.group_ms:.2f}", f"{r.worker_compute_ms:.2f} / {r.worker_compute_fast_ms:.2f}", f"{r.group_ms - r.worker_compute_ms:.2f}",
                f"{r.ray_roundtrip_ms:.2f}", f"{r.probe_empty_ms:.2f} / {r.probe_payload_ms:.2f}", f"{r.driver_plan_ms:.3f}", f"{r.max_loss_diff:.2e}"] for r in results]
    return "\n".join([
        "# Worker-group overhead: group step vs plain torch DDP",
        "",
        f"`{command}` — {time.strftime('%Y-%m-%d %H:%M %Z')}, {elapsed_s:.0f} s; "
        f"{load_before} before, {load_after} after (the machine is shared).",
        "",
        "Same job in both arms: world size 2, gloo on CPU, one thread per rank, batch 32 per rank, "
        "AdaScale-wrapped SGD, ElasticSampler shards collated with default_collate. Medians over the "
        "timed steps (the arms alternate in blocks; the first block of each is a warm-up). The paired "
        "ratio compares each group block with the plain-DDP block run next to it, then takes the median.",
        "",
        markdown_table(HEADERS, rows),
        "Where the group's time goes (medians; 'outside the actors' = group step - in the actors: "
        "Ray calls, shipping the index lists and the reports, driver work; the plain DDP step is the "
        "counterpart of 'in the actors'):",
        "",
        markdown_table(DETAIL_HEADERS, details),
    ])


def main(argv: Sequence[str] | None = None, cluster: Any = None) -> int:
    """The CLI; ``cluster`` (a started LocalRayCluster with enough slot nodes) is for tests that share one."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.group_overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="timed steps per arm and model")
    parser.add_argument("--block", type=int, default=25, help="steps per block (the arms alternate block by block)")
    parser.add_argument("--models", default=None, help=f"comma-separated, from {', '.join(MODELS)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="digits only, 40 timed steps in blocks of 20, 50 probe calls")
    parser.add_argument("--out", default=str(RESULTS_DIR), help="folder of group_overhead.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.quick:
        models, steps, block = ["digits"], 40, 20
    else:
        models = args.models.split(",") if args.models else list(MODELS)
        steps, block = args.steps, args.block
    if steps < 1 or block < 1:
        parser.error("--steps and --block must be >= 1")
    try:
        for m in models:
            model_spec(m)
    except BenchmarkError as exc:
        parser.error(str(exc))
    command = "python -m benchmarks.group_overhead " + " ".join(argv if argv is not None else sys.argv[1:])
    load_before = machine_load()
    started = time.monotonic()
    results = measure(models, steps, block, cluster=cluster, probe_calls=50 if args.quick else 200)
    text = report(results, command.strip(), load_before, machine_load(), time.monotonic() - started)
    path = write_result(Path(args.out) / "group_overhead.md", text)
    print(text)
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
