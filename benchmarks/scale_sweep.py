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

    python -m benchmarks.scale_sweep [--seeds 3] [--scales 1,2,4,8,16,32] [--quick] [--out DIR]
        [--tasks digits,synthetic] [--total-progress T] [--processes 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import multiprocessing
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from benchmarks.common import RESULTS_DIR, fetch_batch, markdown_table, single_thread, write_text
from elastic.adascale import AdaScale
from elastic.sampler import ElasticSampler
from elastic.schedules import Constant, LinearWarmup, Schedule, Step
from elastic.task import Task, load_task

RULES = ("adascale", "lsw", "identity")


class SweepError(ValueError):
    """A sweep was configured with impossible values (one-line message)."""


@dataclass(frozen=True)
class TaskSetup:
    """How one task is trained in the sweep (identical for every rule and scale)."""

    name: str
    """Short name used in the table."""
    task_path: str
    """Import path of the Task, ``module:Class``."""
    total_progress: int
    """T: scale-1 iterations; AdaScale stops at tau >= T, the fixed rules after ceil(T / S) steps."""
    base_lr: float
    """Scale-1 learning rate."""
    micro_batch: int
    """Samples in one micro-batch (one scale-1 batch)."""
    task_args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the Task's constructor."""
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: tuple[float, ...] = (0.5, 0.75)
    """Step-schedule milestones as fractions of T (in tau)."""
    gamma: float = 0.1
    """Step-schedule decay factor."""
    warmup_fraction: float = 0.055
    """LSW's linear warm-up, as a fraction of the iterations."""

    def __post_init__(self) -> None:
        if not isinstance(self.total_progress, int) or self.total_progress < 1:
            raise SweepError(f"total_progress: must be an integer >= 1, got {self.total_progress!r}")
        if not self.base_lr > 0:
            raise SweepError(f"base_lr: must be > 0, got {self.base_lr!r}")
        if not isinstance(self.micro_batch, int) or self.micro_batch < 1:
            raise SweepError(f"micro_batch: must be an integer >= 1, got {self.micro_batch!r}")

    def schedule(self) -> Schedule:
        """The step schedule in tau shared by all rules."""
        return Step(float(self.total_progress), self.milestones, self.gamma)


#: The two tasks of the sweep. The base learning rates were tuned at S=1 (seed 0, T=1000): 0.05 is
#: the best of {0.02, 0.05, 0.1, 0.2} on both tasks, 0.1 already loses 1-2 points and 0.2 fails,
#: so lr * S is far past the stable range at large S -- the regime where LSW is expected to degrade.
TASKS: dict[str, TaskSetup] = {
    "digits": TaskSetup(name="digits", task_path="examples.digits:DigitsTask",
                        total_progress=1000, base_lr=0.05, micro_batch=16),
    "synthetic": TaskSetup(name="synthetic", task_path="examples.synthetic:SyntheticTask",
                           total_progress=1000, base_lr=0.05, micro_batch=16),
}


@dataclass(frozen=True)
class RunSpec:
    """One training run of the sweep."""

    setup: TaskSetup
    rule: str
    scale: int
    seed: int

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise SweepError(f"rule: unknown {self.rule!r}; allowed: {', '.join(RULES)}")
        if not isinstance(self.scale, int) or self.scale < 1:
            raise SweepError(f"scale: must be an integer >= 1, got {self.scale!r}")


@dataclass(frozen=True)
class RunResult:
    """The outcome of one run; ``lr_trace`` holds (tau, effective lr) for every step."""

    task: str
    rule: str
    scale: int
    seed: int
    accuracy: float
    loss: float
    steps: int
    progress: float
    mean_gain: float
    diverged: bool
    wall_s: float
    lr_trace: tuple[tuple[float, float], ...] = ()


# ------------------------------------------------------------------------------------- rules
class _AdaScaleRule:
    """AdaScale: lr = r_t * base_lr * schedule(floor(tau)); stops at tau >= T."""

    def __init__(self, sgd: torch.optim.SGD, scale: int, setup: TaskSetup) -> None:
        self.opt = AdaScale(sgd, accumulation_steps=scale, lr_schedule=setup.schedule())
        self.total = setup.total_progress
        self.gains: list[float] = []

    @property
    def done(self) -> bool:
        return self.opt.progress >= self.total

    @property
    def progress(self) -> float:
        return self.opt.progress

    def step(self) -> tuple[float, float]:
        """Apply one step; returns (tau before the step, effective lr used)."""
        tau = self.opt.progress
        if self.opt.step():
            self.gains.append(self.opt.gain)
        self.opt.zero_grad()
        return tau, self.opt.learning_rate


class _FixedRule:
    """LSW or identity: plain SGD, lr = base_lr * multiplier * schedule(tau) with tau = steps * S."""

    def __init__(self, sgd: torch.optim.SGD, scale: int, setup: TaskSetup, multiplier: float, schedule: Schedule) -> None:
        self.sgd = sgd
        self.scale = scale
        self.base_lr = setup.base_lr
        self.multiplier = multiplier
        self.schedule = schedule
        self.total_steps = math.ceil(setup.total_progress / scale)
        self.gains: list[float] = []

    @property
    def done(self) -> bool:
        return len(self.gains) >= self.total_steps

    @property
    def progress(self) -> float:
        return float(len(self.gains) * self.scale)

    def step(self) -> tuple[float, float]:
        tau = self.progress
        lr = self.base_lr * self.multiplier * self.schedule(tau)
        for group in self.sgd.param_groups:
            group["lr"] = lr
        self.sgd.step()
        self.sgd.zero_grad()
        self.gains.append(self.multiplier)
        return tau, lr


def _make_rule(rule: str, sgd: torch.optim.SGD, scale: int, setup: TaskSetup) -> _AdaScaleRule | _FixedRule:
    if rule == "adascale":
        return _AdaScaleRule(sgd, scale, setup)
    if rule == "lsw":
        warmup = LinearWarmup(setup.warmup_fraction * setup.total_progress, setup.schedule())
        return _FixedRule(sgd, scale, setup, float(scale), warmup)
    return _FixedRule(sgd, scale, setup, 1.0, setup.schedule())


# ---------------------------------------------------------------------------------- training
_TASK_CACHE: dict[tuple[str, tuple], Task] = {}


def _task(setup: TaskSetup) -> Task:
    key = (setup.task_path, tuple(sorted(setup.task_args.items())))
    if key not in _TASK_CACHE:
        _TASK_CACHE[key] = load_task(setup.task_path, setup.task_args)
    return _TASK_CACHE[key]


def train_run(spec: RunSpec) -> RunResult:
    """Train one (task, rule, S, seed) to its end and evaluate on the held-out split."""
    start = time.perf_counter()
    setup, scale = spec.setup, spec.scale
    task = _task(setup)
    dataset = task.train_dataset()
    torch.manual_seed(spec.seed)
    model = task.build_model()
    sgd = torch.optim.SGD(model.parameters(), lr=setup.base_lr, momentum=setup.momentum,
                          weight_decay=setup.weight_decay)
    rule = _make_rule(spec.rule, sgd, scale, setup)
    sampler = ElasticSampler(len(dataset), seed=spec.seed)
    trace: list[tuple[float, float]] = []
    diverged = False
    steps = 0
    while not rule.done:
        plan = sampler.plan(global_batch=scale * setup.micro_batch, world_size=1, accumulation_steps=scale)
        step_loss = 0.0
        for indices in plan.shard(0):
            loss = task.loss(model, fetch_batch(dataset, indices)) / scale
            loss.backward()
            step_loss += float(loss.detach())
        if not math.isfinite(step_loss):
            diverged = True  # the model is lost (AdaScale would skip such steps forever)
            break
        trace.append(rule.step())
        sampler.commit(plan)
        steps += 1
    metrics = task.evaluate(model)
    gains = rule.gains
    return RunResult(
        task=setup.name,
        rule=spec.rule,
        scale=scale,
        seed=spec.seed,
        accuracy=float(metrics["accuracy"]),
        loss=float(metrics["loss"]),
        steps=steps,
        progress=float(rule.progress),
        mean_gain=statistics.fmean(gains) if gains else float("nan"),
        diverged=diverged or not math.isfinite(metrics["loss"]),
        wall_s=time.perf_counter() - start,
        lr_trace=tuple(trace),
    )


def _estimated_cost(spec: RunSpec) -> float:
    # Micro-batches to run: ~T for the fixed rules, up to T * S / gain for AdaScale (gain unknown
    # before the run; sqrt(S) is a fair guess). Longest first keeps the pool busy to the end.
    total = spec.setup.total_progress * spec.setup.micro_batch
    return total * (math.sqrt(spec.scale) if spec.rule == "adascale" else 1.0)


def run_sweep(specs: Sequence[RunSpec], processes: int = 2, log=print) -> list[RunResult]:
    """Run every spec (in a spawn pool of ``processes`` single-threaded workers when > 1)."""
    ordered = sorted(specs, key=_estimated_cost, reverse=True)
    results: list[RunResult] = []

    def report(res: RunResult) -> None:
        results.append(res)
        state = "DIVERGED" if res.diverged else f"acc {100 * res.accuracy:.2f}%"
        log(f"[{len(results)}/{len(ordered)}] {res.task} S={res.scale} {res.rule} seed={res.seed}: "
            f"{state}, {res.steps} steps, mean gain {res.mean_gain:.2f}, {res.wall_s:.1f} s")

    if processes <= 1:
        single_thread()
        for spec in ordered:
            report(train_run(spec))
    else:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(processes, initializer=single_thread) as pool:
            for res in pool.imap_unordered(train_run, ordered):
                report(res)
    return sorted(results, key=lambda r: (r.task, r.scale, RULES.index(r.rule), r.seed))


def make_specs(setups: Iterable[TaskSetup], scales: Iterable[int], seeds: Iterable[int],
               rules: Iterable[str] = RULES) -> list[RunSpec]:
    return [RunSpec(setup, rule, s, seed) for setup in setups for s in scales for rule in rules for seed in seeds]


# ------------------------------------------------------------------------------------ report
@dataclass(frozen=True)
class SummaryRow:
    """One (task, S, rule) line of the table, aggregated over seeds."""

    task: str
    scale: int
    rule: str
    accuracy_mean: float
    accuracy_std: float
    loss_mean: float
    steps_mean: float
    speedup: float
    mean_gain: float
    diverged: int
    seeds: int


def summarize(results: Sequence[RunResult], total_progress: dict[str, int]) -> list[SummaryRow]:
    """Aggregate over seeds; speed-up is T / steps (scale-1 iterations per step taken)."""
    groups: dict[tuple[str, int, str], list[RunResult]] = {}
    for res in results:
        groups.setdefault((res.task, res.scale, res.rule), []).append(res)
    rows = []
    for (task, scale, rule), runs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], RULES.index(kv[0][2]))):
        acc = [r.accuracy for r in runs]
        steps = statistics.fmean(r.steps for r in runs)
        rows.append(SummaryRow(
            task=task, scale=scale, rule=rule,
            accuracy_mean=statistics.fmean(acc),
            accuracy_std=statistics.stdev(acc) if len(acc) > 1 else 0.0,
            loss_mean=statistics.fmean(r.loss for r in runs),
            steps_mean=steps,
            speedup=total_progress[task] / steps if steps else float("nan"),
            mean_gain=statistics.fmean(r.mean_gain for r in runs),
            diverged=sum(r.diverged for r in runs),
            seeds=len(runs),
        ))
    return rows


TABLE_HEADERS = ("task", "S", "rule", "test accuracy % (mean +- std)", "test loss", "steps",
                 "speed-up T/steps", "mean gain", "non-finite runs")


def format_table(rows: Sequence[SummaryRow]) -> str:
    return markdown_table(TABLE_HEADERS, [
        (r.task, r.scale, r.rule, f"{100 * r.accuracy_mean:.2f} +- {100 * r.accuracy_std:.2f}",
         f"{r.loss_mean:.3f}", f"{r.steps_mean:.0f}", f"{r.speedup:.2f}x", f"{r.mean_gain:.2f}",
         f"{r.diverged}/{r.seeds}")
        for r in rows
    ])


def accuracy_checks(rows: Sequence[SummaryRow]) -> list[str]:
    """Per task and rule: the largest drop in mean accuracy from S=1 to any larger S (in points)."""
    lines = []
    for task in sorted({r.task for r in rows}):
        for rule in RULES:
            mine = {r.scale: r for r in rows if r.task == task and r.rule == rule}
            if 1 not in mine or len(mine) < 2:
                continue
            base = mine[1].accuracy_mean
            worst = min((r for s, r in mine.items() if s > 1), key=lambda r: r.accuracy_mean)
            drop = 100 * (base - worst.accuracy_mean)
            lines.append(f"- {task}, {rule}: S=1 {100 * base:.2f}%; largest drop {drop:+.2f} points "
                         f"(at S={worst.scale}, {100 * worst.accuracy_mean:.2f}%)")
    return lines


def format_report(rows: Sequence[SummaryRow], setups: Sequence[TaskSetup], seeds: int, wall_s: float) -> str:
    lines = ["# Scale sweep: AdaScale vs. LSW vs. identity (gradient accumulation, one process)", ""]
    for s in setups:
        lines.append(f"- {s.name}: `{s.task_path}` {s.task_args or ''} T={s.total_progress} scale-1 iterations, "
                     f"micro-batch {s.micro_batch}, base lr {s.base_lr}, SGD momentum {s.momentum}, weight decay "
                     f"{s.weight_decay}, step schedule x{s.gamma} at {list(s.milestones)} of T (in tau), "
                     f"LSW warm-up {100 * s.warmup_fraction:.1f}% of the iterations")
    lines += [f"- {seeds} seed(s); wall time {wall_s:.0f} s", "", format_table(rows),
              "Accuracy drop from S=1 (mean over seeds; a negative drop is a gain):", "", *accuracy_checks(rows), ""]
    return "\n".join(lines)


def plot(results: Sequence[RunResult], rows: Sequence[SummaryRow], path: Path) -> Path:
    """Accuracy vs. S per rule (top) and AdaScale's effective lr vs. tau at a few S (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r.task for r in rows})
    fig, axes = plt.subplots(2, len(tasks), figsize=(6 * len(tasks), 8), squeeze=False)
    for col, task in enumerate(tasks):
        ax = axes[0][col]
        for rule, marker in zip(RULES, "osd"):
            pts = [r for r in rows if r.task == task and r.rule == rule]
            ax.errorbar([r.scale for r in pts], [100 * r.accuracy_mean for r in pts],
                        yerr=[100 * r.accuracy_std for r in pts], marker=marker, capsize=3, label=rule)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("scale S")
        ax.set_ylabel("final test accuracy (%)")
        ax.set_title(f"{task}: accuracy at the end of training")
        ax.grid(alpha=0.3)
        ax.legend()

        ax = axes[1][col]
        scales = sorted({r.scale for r in results if r.task == task and r.rule == "adascale"})
        shown = [s for s in scales if s in (1, 4, 16, 32)] or scales
        seed = min(r.seed for r in results if r.task == task)
        for s in shown:
            run = next(r for r in results if (r.task, r.rule, r.scale, r.seed) == (task, "adascale", s, seed))
            taus, lrs = zip(*run.lr_trace) if run.lr_trace else ((), ())
            ax.plot(taus, lrs, label=f"AdaScale S={s}")
        lsw = [r for r in results if (r.task, r.rule, r.seed) == (task, "lsw", seed)]
        if lsw:
            big = max(lsw, key=lambda r: r.scale)
            if big.lr_trace:
                taus, lrs = zip(*big.lr_trace)
                ax.plot(taus, lrs, "k--", lw=1, label=f"LSW S={big.scale}")
        ax.set_yscale("log")
        ax.set_xlabel("tau (scale-1 iterations)")
        ax.set_ylabel("effective learning rate")
        ax.set_title(f"{task}: effective lr (seed {seed})")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------- CLI
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
