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

    python -m benchmarks.overhead [--steps 300] [--warmup 50] [--repeats 1] [--quick] [--no-breakdown]
                                  [--control] [--default-malloc] [--models digits ...] [--out DIR]

``--repeats N`` measures every config N times, each with freshly built models (and, under DDP,
fresh processes), and reports the median of the N ratios with all of them listed: on a shared
machine one run's ratio can be off by several percent for reasons that stay fixed for the run
(where each arm's tensors happen to sit in memory, what else runs), which interleaving cannot cancel.

``--control`` adds a second bare arm, built and timed like the first: the bare/bare ratio shows
what noise alone gives on this machine. Unless ``--default-malloc`` is given, glibc malloc's mmap
and trim thresholds are fixed first (``benchmarks.common.steady_malloc``): by default freed memory
goes back to the system and comes back as page faults, thousands per step, in numbers that differ
from run to run and between arms. The table gives each arm's page faults per step either way.

Without ``--quick`` a second table splits AdaScale's extra time in one process into its parts
(stop-watches around the hooks, the statistics and the step; see ``breakdown``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import resource
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

from benchmarks.common import RESULTS_DIR, markdown_table, median_ci, single_thread, steady_malloc, write_text
from elastic.adascale import AdaScale
from elastic.distributed import destroy_process_group, exit_spawned_rank

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
    bare_faults: float = 0.0
    """Page faults (minor) per timed step of the bare arm, mean over the steps."""
    adascale_faults: float = 0.0
    control_ms: float | None = None
    """A second bare arm, built and timed exactly like the first (``--control``): the ratio of the
    two is what this machine's noise alone gives."""
    repeat_ratios: tuple[float, ...] = ()
    """Wall-clock ratio of each repeat (empty: one measurement)."""
    repeat_cpu_ratios: tuple[float, ...] = ()
    repeat_control_ratios: tuple[float, ...] = ()

    @property
    def ratio(self) -> float:
        """Wall-clock AdaScale / bare (the median over the repeats)."""
        return statistics.median(self.repeat_ratios) if self.repeat_ratios else self.adascale_ms / self.bare_ms

    @property
    def control_ratio(self) -> float | None:
        """Wall-clock second bare arm / bare (the median over the repeats); None without a control."""
        if self.repeat_control_ratios:
            return statistics.median(self.repeat_control_ratios)
        return None if self.control_ms is None else self.control_ms / self.bare_ms

    @property
    def cpu_ratio(self) -> float:
        """CPU-time AdaScale / bare (the median over the repeats)."""
        return statistics.median(self.repeat_cpu_ratios) if self.repeat_cpu_ratios else self.adascale_cpu_ms / self.bare_cpu_ms


def combine(repeats: Sequence[OverheadResult]) -> OverheadResult:
    """One row from several measurements of the same config: medians of times and of ratios."""
    if len(repeats) == 1:
        return repeats[0]
    return OverheadResult(
        config=repeats[0].config, parameters=repeats[0].parameters, steps=repeats[0].steps,
        bare_ms=statistics.median(r.bare_ms for r in repeats),
        adascale_ms=statistics.median(r.adascale_ms for r in repeats),
        bare_cpu_ms=statistics.median(r.bare_cpu_ms for r in repeats),
        adascale_cpu_ms=statistics.median(r.adascale_cpu_ms for r in repeats),
        bare_faults=statistics.median(r.bare_faults for r in repeats),
        adascale_faults=statistics.median(r.adascale_faults for r in repeats),
        control_ms=None if repeats[0].control_ms is None else statistics.median(r.control_ms for r in repeats),
        repeat_ratios=tuple(r.ratio for r in repeats), repeat_cpu_ratios=tuple(r.cpu_ratio for r in repeats),
        repeat_control_ratios=() if repeats[0].control_ms is None else tuple(r.control_ratio for r in repeats))


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


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _timed_step(model: nn.Module, opt, micro, ddp: bool) -> tuple[float, float, int]:
    """(wall seconds, process CPU seconds, minor page faults) of one optimizer step."""
    faults = _minor_faults()
    wall, cpu = time.perf_counter(), time.process_time()
    last = len(micro) - 1
    for i, (x, y) in enumerate(micro):
        with model.no_sync() if ddp and i < last else contextlib.nullcontext():
            (F.cross_entropy(model(x), y) / len(micro)).backward()
    opt.step()
    opt.zero_grad()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return wall, cpu, _minor_faults() - faults


def measure(config: OverheadConfig, steps: int, warmup: int, rank: int = 0, control: bool = False) -> OverheadResult:
    """Interleaved timing of the arms in this process (inside a process group if one is up): bare,
    AdaScale and, with ``control``, a second bare arm; the order rotates from step to step."""
    torch.manual_seed(0)
    net, classes, shape = build_model(config.model)
    bare_net, ada_net = net, copy.deepcopy(net)
    ddp = config.world_size > 1

    def wrap(module: nn.Module) -> nn.Module:
        return nn.parallel.DistributedDataParallel(module) if ddp else module

    bare_model, ada_model = wrap(bare_net), wrap(ada_net)

    def sgd(module: nn.Module) -> torch.optim.SGD:
        return torch.optim.SGD(module.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)

    ada_opt = AdaScale(sgd(ada_net), accumulation_steps=config.accumulation_steps)
    if ddp:  # the statistics ride on DDP's gradient all-reduce, as in the worker group
        ada_opt.attach_ddp(ada_model)
    arms = {"bare": (bare_model, sgd(bare_net)), "adascale": (ada_model, ada_opt)}
    if control:
        control_net = copy.deepcopy(bare_net)
        arms["control"] = (wrap(control_net), sgd(control_net))
    names = tuple(arms)
    pool = _batches(config, classes, shape, rank)
    acc = config.accumulation_steps
    times: dict[str, list[tuple[float, float, int]]] = {name: [] for name in names}
    for k in range(warmup + steps):
        micro = [pool[(k * acc + i) % len(pool)] for i in range(acc)]
        order = names[k % len(names):] + names[:k % len(names)]
        for arm in order:
            if ddp:
                dist.barrier()
            elapsed = _timed_step(*arms[arm], micro, ddp)
            if k >= warmup:
                times[arm].append(elapsed)
    def median_ms(arm: str, which: int) -> float:
        return 1e3 * statistics.median(t[which] for t in times[arm])

    def faults(arm: str) -> float:
        return statistics.fmean(t[2] for t in times[arm])

    return OverheadResult(
        config=config,
        parameters=sum(p.numel() for p in bare_net.parameters()),
        steps=steps,
        bare_ms=median_ms("bare", 0),
        adascale_ms=median_ms("adascale", 0),
        bare_cpu_ms=median_ms("bare", 1),
        adascale_cpu_ms=median_ms("adascale", 1),
        bare_faults=faults("bare"),
        adascale_faults=faults("adascale"),
        control_ms=median_ms("control", 0) if control else None,
    )


def _ddp_worker(rank: int, config: OverheadConfig, steps: int, warmup: int, port: int, out: str,
                control: bool, steady: bool) -> None:
    single_thread()
    if steady:
        steady_malloc()
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=config.world_size)
    try:
        result = measure(config, steps, warmup, rank, control)
        if rank == 0:
            fields = asdict(result)
            fields.pop("config")
            Path(out).write_text(json.dumps(fields))
    finally:
        destroy_process_group()
    exit_spawned_rank()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure_ddp(config: OverheadConfig, steps: int, warmup: int, control: bool = False,
                steady: bool = False) -> OverheadResult:
    """Spawn ``world_size`` single-threaded gloo ranks and measure inside them (``steady``: with
    :func:`~benchmarks.common.steady_malloc` in each rank)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.json")
        mp.spawn(_ddp_worker, args=(config, steps, warmup, _free_port(), out, control, steady),
                 nprocs=config.world_size, join=True)
        data = json.loads(Path(out).read_text())
    data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return OverheadResult(config=config, **data)


class _TimedAdaScale(AdaScale):
    """AdaScale with stopwatches around its own work, for the breakdown (wall clock, seconds)."""

    def __init__(self, *args, **kwargs) -> None:
        self.hooks_s = self.statistics_s = self.step_s = self.inner_step_s = 0.0
        self.hook_calls_total = 0
        super().__init__(*args, **kwargs)
        inner_step = self.optimizer.step

        def timed_inner_step(*a, **k):
            start = time.perf_counter()
            out = inner_step(*a, **k)
            self.inner_step_s += time.perf_counter() - start
            return out

        self.optimizer.step = timed_inner_step

    def _make_hook(self, index: int):
        body = super()._make_hook(index)

        def hook(grad: torch.Tensor) -> None:
            start = time.perf_counter()
            body(grad)
            self.hooks_s += time.perf_counter() - start
            self.hook_calls_total += 1

        return hook

    def _reduced_statistics(self, world_size: int) -> tuple[float, float]:
        if self._hook_kind == "flat":  # list appends: no Python body to time, only calls to count
            self.hook_calls_total += sum(map(len, self._passes))
        start = time.perf_counter()
        out = super()._reduced_statistics(world_size)
        self.statistics_s += time.perf_counter() - start
        return out

    def step(self, closure: None = None) -> bool:
        start = time.perf_counter()
        out = super().step(closure)
        self.step_s += time.perf_counter() - start
        return out


@dataclass(frozen=True)
class Breakdown:
    """Where AdaScale's extra time goes in one process (medians per optimizer step, ms)."""

    config: OverheadConfig
    bare_ms: float
    adascale_ms: float
    hooks_ms: float
    """Time inside the gradient hooks' bodies (norm of each micro-batch gradient)."""
    hook_calls: float
    """Hook calls per step (parameter tensors x accumulation steps)."""
    statistics_ms: float
    """``_reduced_statistics``: norms of the averaged gradient, the one host sync."""
    bookkeeping_ms: float
    """The rest of ``AdaScale.step`` outside the inner optimizer: estimators, gain, lr, tau."""

    @property
    def unexplained_ms(self) -> float:
        """Extra time not inside AdaScale's Python code: calling the Python hooks from autograd, caches."""
        return self.adascale_ms - self.bare_ms - self.hooks_ms - self.statistics_ms - self.bookkeeping_ms


def breakdown(config: OverheadConfig, steps: int, warmup: int) -> Breakdown:
    """Interleave a bare step and a stop-watched AdaScale step; split the extra time by part."""
    if config.world_size != 1:
        raise OverheadError("breakdown: only single-process configs (world_size 1) are broken down")
    torch.manual_seed(0)
    bare_net, classes, shape = build_model(config.model)
    ada_net = copy.deepcopy(bare_net)
    bare_opt = torch.optim.SGD(bare_net.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    ada_opt = _TimedAdaScale(torch.optim.SGD(ada_net.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4),
                             accumulation_steps=config.accumulation_steps)
    pool = _batches(config, classes, shape, 0)
    acc = config.accumulation_steps
    rows: dict[str, list[float]] = {k: [] for k in ("bare", "ada", "hooks", "calls", "stats", "book")}
    for k in range(warmup + steps):
        micro = [pool[(k * acc + i) % len(pool)] for i in range(acc)]
        before = (ada_opt.hooks_s, ada_opt.hook_calls_total, ada_opt.statistics_s, ada_opt.step_s, ada_opt.inner_step_s)
        order = ((bare_net, bare_opt), (ada_net, ada_opt)) if k % 2 == 0 else ((ada_net, ada_opt), (bare_net, bare_opt))
        elapsed = {id(opt): _timed_step(net, opt, micro, ddp=False)[0] for net, opt in order}
        if k < warmup:
            continue
        hooks, calls, stats, step, inner = (now - then for now, then in zip(
            (ada_opt.hooks_s, ada_opt.hook_calls_total, ada_opt.statistics_s, ada_opt.step_s, ada_opt.inner_step_s),
            before))
        rows["bare"].append(elapsed[id(bare_opt)])
        rows["ada"].append(elapsed[id(ada_opt)])
        rows["hooks"].append(hooks)
        rows["calls"].append(calls)
        rows["stats"].append(stats)
        rows["book"].append(step - inner - stats)
    med = {k: statistics.median(v) for k, v in rows.items()}
    return Breakdown(config=config, bare_ms=1e3 * med["bare"], adascale_ms=1e3 * med["ada"],
                     hooks_ms=1e3 * med["hooks"], hook_calls=med["calls"], statistics_ms=1e3 * med["stats"],
                     bookkeeping_ms=1e3 * med["book"])


BREAKDOWN_HEADERS = ("config", "bare ms", "AdaScale ms", "extra ms", "hooks ms (calls/step)",
                     "statistics ms", "step bookkeeping ms", "rest ms")


def format_breakdown(rows: Sequence[Breakdown]) -> str:
    return markdown_table(BREAKDOWN_HEADERS, [
        (b.config.label, f"{b.bare_ms:.3f}", f"{b.adascale_ms:.3f}", f"{b.adascale_ms - b.bare_ms:.3f}",
         f"{b.hooks_ms:.3f} ({b.hook_calls:.0f})", f"{b.statistics_ms:.3f}", f"{b.bookkeeping_ms:.3f}",
         f"{b.unexplained_ms:.3f}")
        for b in rows
    ])


def run(configs: Sequence[OverheadConfig], steps: int, warmup: int, log=print, repeats: int = 1,
        control: bool = False, steady: bool = False) -> list[OverheadResult]:
    """Measure every config ``repeats`` times. ``steady``: the spawned DDP ranks call
    :func:`~benchmarks.common.steady_malloc` (the caller does it for this process)."""
    single_thread()
    results = []
    for config in configs:
        measured = []
        for _ in range(repeats):
            if config.world_size > 1:
                res = measure_ddp(config, steps, warmup, control, steady)
            else:
                res = measure(config, steps, warmup, control=control)
            extra = "" if res.control_ratio is None else f", control {res.control_ratio:.3f}"
            log(f"{config.label}: bare {res.bare_ms:.3f} ms, AdaScale {res.adascale_ms:.3f} ms, ratio {res.ratio:.3f} "
                f"(CPU ratio {res.cpu_ratio:.3f}{extra}), page faults per step {res.bare_faults:.0f} / "
                f"{res.adascale_faults:.0f}")
            measured.append(res)
        results.append(combine(measured))
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

TABLE_HEADERS = ("config", "parameters", "bare median ms", "AdaScale median ms", "ratio", "ratio 95% CI",
                 "bare CPU ms", "AdaScale CPU ms", "CPU ratio", "page faults per step, bare / AdaScale",
                 "ratio of each repeat")
CONTROL_HEADERS = ("control ratio (bare / bare)", "control 95% CI", "control ratio of each repeat")


def format_table(results: Sequence[OverheadResult]) -> str:
    """The results as a markdown table; with the control columns when any result has a control arm."""
    control = any(r.control_ratio is not None for r in results)

    def each(ratios: Sequence[float], one: float | None) -> str:
        return ", ".join(f"{x:.3f}" for x in ratios) or ("-" if one is None else f"{one:.3f}")

    def interval(ratios: Sequence[float]) -> str:
        ci = median_ci(ratios)
        return "-" if ci is None else f"{ci[0]:.3f}-{ci[1]:.3f}"

    def row(r: OverheadResult) -> tuple[str, ...]:
        cells = (r.config.label, f"{r.parameters:,}", f"{r.bare_ms:.3f}", f"{r.adascale_ms:.3f}", f"{r.ratio:.3f}",
                 interval(r.repeat_ratios), f"{r.bare_cpu_ms:.3f}", f"{r.adascale_cpu_ms:.3f}", f"{r.cpu_ratio:.3f}",
                 f"{r.bare_faults:.0f} / {r.adascale_faults:.0f}", each(r.repeat_ratios, r.ratio))
        if control:
            ratio = r.control_ratio
            cells += ("-" if ratio is None else f"{ratio:.3f}", interval(r.repeat_control_ratios),
                      each(r.repeat_control_ratios, ratio))
        return cells

    return markdown_table(TABLE_HEADERS + (CONTROL_HEADERS if control else ()), [row(r) for r in results])


def format_report(results: Sequence[OverheadResult], steps: int, warmup: int, wall_s: float,
                  load_before: float, load_after: float, breakdowns: Sequence[Breakdown] = (), repeats: int = 1,
                  steady: bool = False) -> str:
    times = (f"; each config measured {repeats} times with fresh models, times and ratios are the medians "
             "over those repeats") if repeats > 1 else ""
    malloc = ("glibc malloc with fixed mmap and trim thresholds (benchmarks.common.steady_malloc)" if steady
              else "the C library's default malloc")
    lines = [
        "# AdaScale step-time overhead",
        "",
        f"Median of {steps} interleaved steps per arm after {warmup} warm-up steps{times}; SGD momentum 0.9, "
        f"weight decay 5e-4; torch {torch.__version__}, 1 thread per process, {os.cpu_count()} cores; "
        f"{malloc}; wall time {wall_s:.0f} s; 1-minute load average {load_before:.1f} before, "
        f"{load_after:.1f} after. 95% CI: a distribution-free confidence interval for the median ratio "
        "over the repeats (order statistics, benchmarks.common.median_ci; '-' with fewer than 6 repeats).",
        "",
        format_table(results),
    ]
    if breakdowns:
        lines += [
            "## Where the extra time goes (one process, wall-clock medians per step)",
            "",
            "hooks: the Python gradient hooks' bodies (a large model: keeping small gradients and norming "
            "large ones; a small model's hooks are list appends with no Python body, so only their calls "
            "are counted); statistics: the norms of every pass's gradients and of the averaged gradient, "
            "and the one host sync; step bookkeeping: the rest of AdaScale.step outside the inner SGD step "
            "(with S = 1 there are no hooks, and the fused non-finite check is counted here); rest: extra "
            "time outside AdaScale's Python code (autograd calling the hooks, in-place accumulation into "
            "the flat buffer, cache effects) and noise.",
            "",
            format_breakdown(breakdowns),
        ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="timed steps per arm and config")
    parser.add_argument("--warmup", type=int, default=50, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=1, help="measurements per config (fresh models each)")
    parser.add_argument("--quick", action="store_true", help="3 digits configs, 10 steps (a smoke run)")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the per-part breakdown")
    parser.add_argument("--control", action="store_true",
                        help="time a second bare arm too: the bare/bare ratio is the noise floor")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc malloc's thresholds alone (page faults vary from run to run)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS),
                        help="only the rows of these models (default: all)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for overhead.md")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        parser.error("--steps and --repeats must be >= 1 and --warmup >= 0")
    configs, steps, warmup = DEFAULT_CONFIGS, args.steps, args.warmup
    if args.quick:
        configs, steps, warmup = QUICK_CONFIGS, min(steps, 10), min(warmup, 2)
    configs = tuple(c for c in configs if c.model in args.models)

    steady = not args.default_malloc and steady_malloc()
    load_before, start = os.getloadavg()[0], time.perf_counter()
    results = run(configs, steps, warmup, repeats=args.repeats, control=args.control, steady=steady)
    breakdowns = [] if args.quick or args.no_breakdown else [
        breakdown(c, steps, warmup) for c in configs if c.world_size == 1
    ]
    report = format_report(results, steps, warmup, time.perf_counter() - start, load_before, os.getloadavg()[0],
                           breakdowns, args.repeats, steady)
    print(report)
    path = write_text(args.out / ("overhead_quick.md" if args.quick else "overhead.md"), report)
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
