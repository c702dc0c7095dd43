"""The report of ``benchmarks.scale_sweep``: runs aggregated over seeds, the markdown table, the
accuracy-drop lines and the figure (accuracy vs. S, AdaScale's effective lr vs. tau)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from benchmarks.common import markdown_table
from benchmarks.scale_sweep_train import RULES, RunResult, TaskSetup


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
