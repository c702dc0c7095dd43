"""The runs of ``benchmarks.scale_sweep``: the tasks and their settings, the three lr rules (AdaScale,
LSW, identity), one training run at scale S by gradient accumulation, and the pool that runs them all."""

from __future__ import annotations

import math
import multiprocessing
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch

from benchmarks.common import fetch_batch, single_thread
from elastic.adascale import AdaScale
from elastic.sampler import ElasticSampler
from elastic.schedules import LinearWarmup, Schedule, Step
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
