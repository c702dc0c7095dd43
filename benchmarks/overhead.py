"""Step-time overhead of AdaScale over the bare optimizer, on the same model and the same batches.

Both arms live in the same process (or the same DDP process group), start from the same weights and
see the same batches; their steps are interleaved A/B, B/A, A/B, ... so that drift in machine load
hits both alike. A timed step is the whole optimizer step: ``accumulation_steps`` forward/backward
passes (``no_sync`` on all but the last under DDP), ``step()`` and ``zero_grad()``. Under DDP the
ranks meet at a barrier before each timed step and rank 0's times are reported. The table gives the
median over ``--steps`` timed steps per arm after a warm-up, of the wall-clock time (what a user
waits for) and of the process CPU time (``time.process_time``: all threads of the process, which on
a shared machine is far less disturbed by other processes than the wall clock; under DDP it leaves
out time spent blocked in communication). The load average is written next to the table.

    python -m benchmarks.overhead [--steps 300] [--warmup 50] [--quick] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F

from benchmarks.common import RESULTS_DIR, markdown_table, single_thread, write_text
from elastic.adascale import AdaScale

MODELS = ("digits", "mlp-wide", "mlp-deep")


class OverheadError(ValueError):
    """An overhead configuration that cannot be measured (one-line message)."""


@dataclass(frozen=True)
class OverheadConfig:
    """One row of the table."""

    model: str
    """``digits`` (examples.digits.DigitsNet, 8x8 images), ``mlp-wide`` (256-2048-2048-10, ~4.7M
    parameters in 6 tensors) or ``mlp-deep`` (16 hidden layers of 256, ~1.1M parameters in 34 tensors)."""
    batch_size: int
    """Samples per micro-batch."""
    accumulation_steps: int = 1
    """Backward passes per step on each rank."""
    world_size: int = 1
    """DDP processes (gloo); 1 means no process group."""

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise OverheadError(f"model: unknown {self.model!r}; allowed: {', '.join(MODELS)}")
        for name in ("batch_size", "accumulation_steps", "world_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise OverheadError(f"{name}: must be an integer >= 1, got {value!r}")

    @property
    def label(self) -> str:
        where = f"DDP x{self.world_size} gloo" if self.world_size > 1 else "1 process"
        return f"{self.model}, batch {self.batch_size}, accum {self.accumulation_steps}, {where}"


@dataclass(frozen=True)
class OverheadResult:
    """Medians over the timed steps of one config (milliseconds per optimizer step)."""

    config: OverheadConfig
    parameters: int
    steps: int
    bare_ms: float
    adascale_ms: float
    bare_cpu_ms: float
    adascale_cpu_ms: float

    @property
    def ratio(self) -> float:
        """Wall-clock AdaScale / bare."""
        return self.adascale_ms / self.bare_ms

    @property
    def cpu_ratio(self) -> float:
        """CPU-time AdaScale / bare."""
        return self.adascale_cpu_ms / self.bare_cpu_ms


def build_model(name: str) -> tuple[nn.Module, int, Sequence[int]]:
    """(model, number of classes, input shape of one sample)."""
    if name == "digits":
        from examples.digits import DigitsNet

        return DigitsNet(), 10, (1, 8, 8)
    if name == "mlp-wide":
        return nn.Sequential(nn.Linear(256, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(),
                             nn.Linear(2048, 10)), 10, (256,)
    layers: list[nn.Module] = []
    for _ in range(16):
        layers += [nn.Linear(256, 256), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(256, 10)), 10, (256,)


def _batches(config: OverheadConfig, classes: int, shape: Sequence[int], rank: int, count: int = 16):
    """A fixed pool of random micro-batches (different on each rank), cycled through by both arms.

    Step time does not depend on the values, so the digits model gets random 8x8 images in [0, 1]
    instead of the real ones (which would cost every spawned rank a scikit-learn import)."""
    gen = torch.Generator().manual_seed(1000 + rank)
    pool = []
    for _ in range(count):
        x = torch.rand(config.batch_size, *shape, generator=gen)
        if config.model != "digits":
            x = 2 * x - 1
        pool.append((x, torch.randint(0, classes, (config.batch_size,), generator=gen)))
    return pool


def _timed_step(model: nn.Module, opt, micro, ddp: bool) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one optimizer step."""
    wall, cpu = time.perf_counter(), time.process_time()
    last = len(micro) - 1
    for i, (x, y) in enumerate(micro):
        with model.no_sync() if ddp and i < last else contextlib.nullcontext():
            (F.cross_entropy(model(x), y) / len(micro)).backward()
    opt.step()
    opt.zero_grad()
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(config: OverheadConfig, steps: int, warmup: int, rank: int = 0) -> OverheadResult:
    """Interleaved timing of the two arms in this process (inside a process group if one is up)."""
    torch.manual_seed(0)
    net, classes, shape = build_model(config.model)
    bare_net, ada_net = net, copy.deepcopy(net)
    ddp = config.world_size > 1
    bare_model = nn.parallel.DistributedDataParallel(bare_net) if ddp else bare_net
    ada_model = nn.parallel.DistributedDataParallel(ada_net) if ddp else ada_net

    def sgd(module: nn.Module) -> torch.optim.SGD:
        return torch.optim.SGD(module.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)

    arms = {
        "bare": (bare_model, sgd(bare_net)),
        "adascale": (ada_model, AdaScale(sgd(ada_net), accumulation_steps=config.accumulation_steps)),
    }
    pool = _batches(config, classes, shape, rank)
    acc = config.accumulation_steps
    times: dict[str, list[tuple[float, float]]] = {"bare": [], "adascale": []}
    for k in range(warmup + steps):
        micro = [pool[(k * acc + i) % len(pool)] for i in range(acc)]
        order = ("bare", "adascale") if k % 2 == 0 else ("adascale", "bare")
        for arm in order:
            if ddp:
                dist.barrier()
            elapsed = _timed_step(*arms[arm], micro, ddp)
            if k >= warmup:
                times[arm].append(elapsed)
    def median_ms(arm: str, which: int) -> float:
        return 1e3 * statistics.median(t[which] for t in times[arm])

    return OverheadResult(
        config=config,
        parameters=sum(p.numel() for p in bare_net.parameters()),
        steps=steps,
        bare_ms=median_ms("bare", 0),
        adascale_ms=median_ms("adascale", 0),
        bare_cpu_ms=median_ms("bare", 1),
        adascale_cpu_ms=median_ms("adascale", 1),
    )


def _ddp_worker(rank: int, config: OverheadConfig, steps: int, warmup: int, port: int, out: str) -> None:
    single_thread()
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=config.world_size)
    try:
        result = measure(config, steps, warmup, rank)
        if rank == 0:
            fields = asdict(result)
            fields.pop("config")
            Path(out).write_text(json.dumps(fields))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure_ddp(config: OverheadConfig, steps: int, warmup: int) -> OverheadResult:
    """Spawn ``world_size`` single-threaded gloo ranks and measure inside them."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.json")
        mp.spawn(_ddp_worker, args=(config, steps, warmup, _free_port(), out), nprocs=config.world_size, join=True)
        data = json.loads(Path(out).read_text())
    return OverheadResult(config=config, **data)


def run(configs: Sequence[OverheadConfig], steps: int, warmup: int, log=print) -> list[OverheadResult]:
    single_thread()
    results = []
    for config in configs:
        if config.world_size > 1:
            res = measure_ddp(config, steps, warmup)
        else:
            res = measure(config, steps, warmup)
        log(f"{config.label}: bare {res.bare_ms:.3f} ms, AdaScale {res.adascale_ms:.3f} ms, ratio {res.ratio:.3f} "
            f"(CPU ratio {res.cpu_ratio:.3f})")
        results.append(res)
    return results


DEFAULT_CONFIGS = (
    OverheadConfig("digits", 32, 1),
    OverheadConfig("digits", 32, 4),
    OverheadConfig("digits", 128, 1),
    OverheadConfig("digits", 128, 4),
    OverheadConfig("digits", 32, 1, world_size=2),
    OverheadConfig("digits", 32, 4, world_size=2),
    OverheadConfig("digits", 128, 1, world_size=2),
    OverheadConfig("mlp-wide", 32, 1),
    OverheadConfig("mlp-wide", 32, 4),
    OverheadConfig("mlp-wide", 32, 1, world_size=2),
    OverheadConfig("mlp-deep", 32, 1),
    OverheadConfig("mlp-deep", 32, 4),
)

QUICK_CONFIGS = (
    OverheadConfig("digits", 32, 1),
    OverheadConfig("digits", 32, 4),
    OverheadConfig("digits", 32, 1, world_size=2),
)

TABLE_HEADERS = ("config", "parameters", "bare median ms", "AdaScale median ms", "ratio",
                 "bare CPU ms", "AdaScale CPU ms", "CPU ratio")


def format_table(results: Sequence[OverheadResult]) -> str:
    return markdown_table(TABLE_HEADERS, [
        (r.config.label, f"{r.parameters:,}", f"{r.bare_ms:.3f}", f"{r.adascale_ms:.3f}", f"{r.ratio:.3f}",
         f"{r.bare_cpu_ms:.3f}", f"{r.adascale_cpu_ms:.3f}", f"{r.cpu_ratio:.3f}")
        for r in results
    ])


def format_report(results: Sequence[OverheadResult], steps: int, warmup: int, wall_s: float,
                  load_before: float, load_after: float) -> str:
    return "\n".join([
        "# AdaScale step-time overhead",
        "",
        f"Median of {steps} interleaved steps per arm after {warmup} warm-up steps; SGD momentum 0.9, "
        f"weight decay 5e-4; torch {torch.__version__}, 1 thread per process, {os.cpu_count()} cores; "
        f"wall time {wall_s:.0f} s; 1-minute load average {load_before:.1f} before, {load_after:.1f} after.",
        "",
        format_table(results),
    ])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="timed steps per arm and config")
    parser.add_argument("--warmup", type=int, default=50, help="untimed steps first")
    parser.add_argument("--quick", action="store_true", help="3 digits configs, 10 steps (a smoke run)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for overhead.md")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    configs, steps, warmup = DEFAULT_CONFIGS, args.steps, args.warmup
    if args.quick:
        configs, steps, warmup = QUICK_CONFIGS, min(steps, 10), min(warmup, 2)

    load_before, start = os.getloadavg()[0], time.perf_counter()
    results = run(configs, steps, warmup)
    report = format_report(results, steps, warmup, time.perf_counter() - start, load_before, os.getloadavg()[0])
    print(report)
    path = write_text(args.out / ("overhead_quick.md" if args.quick else "overhead.md"), report)
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
