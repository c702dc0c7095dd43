"""Throughput of the elastic input pipeline vs a plain PyTorch loop with the same DataLoader settings.

One decode-heavy job in every arm (``benchmarks.decode_heavy``): JPEGs decoded, randomly cropped,
resized and flipped in ``__getitem__``, a small ResNet with BatchNorm, AdaScale-wrapped SGD in every
arm (its own cost is measured by benchmarks/overhead.py), batch 32 per worker, one intra-op thread per
worker, DataLoader ``num_workers=1, prefetch_factor=2, persistent_workers``. The arms
(``benchmarks.input_pipeline_arms``):

- **elastic**: a ``WorkerGroup`` of W Ray actors driven as ``ElasticTrainer`` drives it.
- **plain**: W processes with the classic loop (W = 2: DDP over gloo), the C allocator as it comes:
  what a user runs today. The target is on this ratio. Its ranks are started by ``spawn``, so their
  DataLoader workers are spawned too: the faster choice for a plain loop (forked loader workers,
  ``torchrun``'s default on Linux, made it ~35% slower without the malloc options; docs/design.md).
- **plain, retained heap**: the same loop with the elastic workers' malloc options
  (``elastic/allocator.py``). It is a control: elastic / this ratio is the cost of the elastic
  machinery itself, with the allocator equal on both sides.

The arms take turns in blocks of steps (the idle arms wait blocked; their loaders hold their
prefetched batches; the order rotates), the first block of each is a warm-up, and each block's
throughput is samples / wall time. The ratio that resists load drift is the median over rounds of
elastic / plain throughput.

    python -m benchmarks.input_pipeline [--blocks 8] [--block-steps 40] [--worlds 1,2] [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from benchmarks.common import markdown_table
from benchmarks.decode_heavy import BATCH, LOADER
from benchmarks.input_pipeline_arms import ElasticArm, PlainLoop, component_ms, in_process_pairs
from benchmarks.ray_common import RESULTS_DIR, BenchmarkError, local_cluster, machine_load, write_result

TARGET_RATIO = 0.97
ARMS = ("elastic", "plain", "retained")


@dataclass(frozen=True)
class ThroughputResult:
    world: int
    blocks: int
    block_steps: int
    steps_per_call: int
    plain_samples_s: list[float]
    elastic_samples_s: list[float]
    elastic_data_wait_ms: float = float("nan")
    """Median over timed steps of the slowest rank's wait for its batches inside the step."""
    elastic_step_ms: float = float("nan")
    """Median over timed steps of the slowest rank's time in ``train_step`` (wait included)."""
    retained_samples_s: list[float] = field(default_factory=list)
    """The plain loop with the elastic workers' malloc options (the control); empty if not run."""
    plain_data_wait_ms: float = float("nan")
    """Median over timed blocks of the plain loop's (rank 0's) mean wait for its next batch per step."""

    @property
    def pairs(self) -> list[float]:
        return [e / p for e, p in zip(self.elastic_samples_s, self.plain_samples_s)]

    @property
    def paired_ratio(self) -> float:
        return statistics.median(self.pairs)

    @property
    def control_pairs(self) -> list[float]:
        return [e / p for e, p in zip(self.elastic_samples_s, self.retained_samples_s)]


def measure(worlds: Sequence[int], blocks: int, block_steps: int, log: Callable[[str], None] = print,
            cluster: Any = None) -> list[ThroughputResult]:
    results = []
    with local_cluster(max(worlds)) if cluster is None else _nullcontext(cluster) as cluster:
        for world in worlds:
            arms: dict[str, Any] = {}
            try:
                arms["plain"] = PlainLoop(world)
                arms["retained"] = PlainLoop(world, retain_heap=True)
                arms["elastic"] = elastic = ElasticArm(cluster, world)
                if elastic.loader_workers != LOADER["num_workers"]:
                    raise BenchmarkError(f"elastic workers run {elastic.loader_workers} loader workers")
                rates: dict[str, list[float]] = {arm: [] for arm in ARMS}
                timed_from = 0
                for b in range(blocks + 1):
                    block = {}
                    first = len(elastic.compute_s)
                    for arm in ARMS[b % 3:] + ARMS[:b % 3]:  # each arm goes first in turn
                        block[arm] = world * BATCH * block_steps / arms[arm].run(block_steps)
                    if b == 0:
                        timed_from = len(elastic.data_wait_s)
                    else:  # block 0 of each arm is a warm-up
                        for arm in ARMS:
                            rates[arm].append(block[arm])
                    log(f"world {world}: block {b}/{blocks}{' (warm-up)' if b == 0 else ''}: plain {block['plain']:.0f}, "
                        f"plain with retained heap {block['retained']:.0f}, elastic {block['elastic']:.0f} samples/s "
                        f"({elastic.steps_per_call} steps/call; in the actor {1e3 * statistics.median(elastic.compute_s[first:]):.1f} "
                        f"ms/step, waiting {1e3 * statistics.median(elastic.data_wait_s[first:]):.1f})")
                results.append(ThroughputResult(
                    world, blocks, block_steps, elastic.steps_per_call, rates["plain"], rates["elastic"],
                    elastic_data_wait_ms=1e3 * statistics.median(elastic.data_wait_s[timed_from:]),
                    elastic_step_ms=1e3 * statistics.median(elastic.compute_s[timed_from:]),
                    retained_samples_s=rates["retained"],
                    plain_data_wait_ms=1e3 * statistics.median(arms["plain"].data_wait_s[1:])))
            finally:
                for arm in arms.values():
                    arm.close()
    return results


class _nullcontext:
    def __init__(self, value: Any) -> None:
        self.value = value

    def __enter__(self) -> Any:
        return self.value

    def __exit__(self, *exc: object) -> None:
        return None


HEADERS = ["workers", "plain loop (samples/s, median)", "elastic (samples/s, median)", "ratio of medians",
           "ratio, median of block pairs [min, max]", "target", "elastic: step in the actor / of it waiting for data (ms)",
           "plain: waiting for data (ms)", "control: elastic / plain with retained heap [min, max]"]


def _spread(values: Sequence[float]) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}, {max(values):.3f}]" if values else "not run"


def report(results: Sequence[ThroughputResult], components: tuple[float, float], command: str,
           load_before: str, load_after: str, elapsed_s: float, in_process: Sequence[float] = ()) -> str:
    rows = []
    for r in results:
        plain, elastic = statistics.median(r.plain_samples_s), statistics.median(r.elastic_samples_s)
        verdict = "met" if r.paired_ratio >= TARGET_RATIO else "missed"
        rows.append([f"{r.world} vs {'plain DDP, ' if r.world > 1 else ''}{r.world} process{'es' if r.world > 1 else ''}",
                     f"{plain:.0f}", f"{elastic:.0f}", f"{elastic / plain:.3f}", _spread(r.pairs),
                     f">= {TARGET_RATIO}: {verdict}", f"{r.elastic_step_ms:.1f} / {r.elastic_data_wait_ms:.1f}",
                     f"{r.plain_data_wait_ms:.1f}", _spread(r.control_pairs)])
    load_ms, step_ms = components
    return "\n".join([
        "# Input pipeline: elastic workers vs a plain PyTorch loop, same DataLoader settings",
        "",
        f"`{command}` — {time.strftime('%Y-%m-%d %H:%M %Z')}, {elapsed_s:.0f} s; "
        f"{load_before} before, {load_after} after (the machine is shared).",
        "",
        f"Decode-heavy job: 96x96 JPEGs decoded, randomly crop-resized to 32x32 and flipped in `__getitem__`; "
        f"small ResNet (BatchNorm), batch {BATCH} per worker, one thread per worker, DataLoader "
        f"num_workers={LOADER['num_workers']}, prefetch_factor={LOADER['prefetch_factor']}, persistent workers. "
        f"In one process: decode + augment {load_ms:.1f} ms per batch, training step without AdaScale {step_ms:.1f} ms on a ready batch. "
        f"Every arm: AdaScale-wrapped SGD (its cost is the same in all). Elastic: trainer-style calls of "
        f"auto steps with lookahead, workers with `cluster.retain_heap` (default); plain: the classic loop "
        f"(DDP over gloo for 2 processes) with the C allocator as it comes, in processes started by spawn (so "
        f"are its loader workers); the control: the same loop with "
        f"the workers' malloc options. {results[0].blocks if results else 0} timed blocks of "
        f"{results[0].block_steps if results else 0} steps per arm, taking turns.",
        "",
        markdown_table(HEADERS, rows),
    ] + ([
        "",
        f"Without Ray (the worker's step path with its InputPipeline vs the plain loop, in one process, "
        f"{len(in_process)} alternating block pairs): throughput ratio median {statistics.median(in_process):.3f} "
        f"[{min(in_process):.3f}, {max(in_process):.3f}].",
    ] if in_process else []))


def main(argv: Sequence[str] | None = None, cluster: Any = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.input_pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=8, help="timed blocks per arm (after one warm-up block)")
    parser.add_argument("--block-steps", type=int, default=40, help="steps per block")
    parser.add_argument("--worlds", default="1,2", help="comma-separated world sizes (1 and/or 2)")
    parser.add_argument("--quick", action="store_true", help="world 1 only, 2 blocks of 10 steps")
    parser.add_argument("--out", default=str(RESULTS_DIR), help="folder of input_pipeline.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    worlds = [1] if args.quick else [int(w) for w in args.worlds.split(",")]
    blocks, block_steps = (2, 10) if args.quick else (args.blocks, args.block_steps)
    if blocks < 1 or block_steps < 1 or any(w not in (1, 2) for w in worlds):
        parser.error("--blocks and --block-steps must be >= 1, --worlds from 1,2")
    command = "python -m benchmarks.input_pipeline " + " ".join(argv if argv is not None else sys.argv[1:])
    load_before = machine_load()
    started = time.monotonic()
    components = component_ms()
    in_process = in_process_pairs(blocks, block_steps)
    results = measure(worlds, blocks, block_steps, cluster=cluster)
    text = report(results, components, command.strip(), load_before, machine_load(), time.monotonic() - started,
                  in_process)
    path = write_result(Path(args.out) / "input_pipeline.md", text)
    print(text)
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
