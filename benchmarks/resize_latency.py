"""Resize pause: in-place (this project's worker group) vs restart-based (checkpoint, kill, restart).

The pause of a resize is the time during which no step runs: from the end of the last step at the
old size to the start of the first step at the new size, plus the extra time of that first step
over a steady step at the new size (lazy set-up a new group pays on its first step). It is measured
from the driver, with the same calls the trainer makes (``elastic/trainer.py``):

- **in place** (grow): the newcomers are spawned while the group keeps training (the trainer's
  ``spawn`` + ``poll_ready`` between steps); at the next boundary ``group.grow(ready)`` re-forms the
  group and the newcomers take rank 0's state through the object store. (shrink): at a boundary
  ``group.shrink(n)`` releases the highest ranks and the survivors re-form.
- **restart-based** (what Ray Train's elastic mode or torchrun do): at a boundary, rank 0's state and
  the sampler go to a checkpoint file (``elastic.checkpoint.CheckpointManager``), every actor is
  killed, a new group of the new size is started (new processes: imports, dataset, model), the
  checkpoint is loaded into it and training goes on.

Both modes run the same job on the same local multi-node Ray cluster (one Ray node per worker
slot, as ``cluster.backend: local`` does), in the same invocation, with repetitions alternating
between the modes so that machine load hits both alike. Every repetition runs the resize cycle
1 -> 2 -> 4 -> 2 -> 1 (``--quick``: 1 -> 2 -> 1 on the digits CNN only).

    python -m benchmarks.resize_latency [--reps 3] [--models digits,wide-mlp] [--quick] [--out DIR]
    python -m benchmarks.resize_latency --diagnose [--reps 3]   # phases of an in-place grow
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from benchmarks.ray_common import (
    MODELS,
    RESULTS_DIR,
    BenchmarkError,
    GroupDriver,
    job_spec,
    local_cluster,
    machine_load,
    markdown_table,
    median,
    model_spec,
    write_result,
)

#: Worker-count cycle of one repetition.
FULL_CYCLE = (1, 2, 4, 2, 1)
QUICK_CYCLE = (1, 2, 1)
#: Seconds a new worker may take to warm up before the benchmark gives up.
READY_TIMEOUT_S = 300.0
#: Targets of issue 3.
TARGET_PAUSE_S = 1.0
TARGET_RATIO = 10.0


@dataclass(frozen=True)
class ResizeSample:
    """One measured resize."""

    model: str
    mode: str
    """``in-place`` or ``restart``."""
    from_workers: int
    to_workers: int
    gap_s: float
    """End of the last old-size step to the start of the first new-size step."""
    first_step_extra_s: float
    """First new-size step minus the median of the steady steps after it (0 if faster)."""
    parts: dict[str, float] = field(default_factory=dict)
    """Where the gap went (seconds), by phase."""

    @property
    def pause_s(self) -> float:
        return self.gap_s + self.first_step_extra_s

    @property
    def resize(self) -> str:
        return f"{'grow' if self.to_workers > self.from_workers else 'shrink'} {self.from_workers}->{self.to_workers}"


class _Run:
    """One repetition on one model: a group that is resized in place or by restarts."""

    def __init__(self, model: str, cluster: Any, steady_steps: int, ckpt_dir: str, log: Callable[[str], None]) -> None:
        self.model = model
        self.cluster = cluster
        self.steady = steady_steps
        self.ckpt_dir = ckpt_dir
        self.log = log
        self.spec = job_spec(model, checkpoint_dir=ckpt_dir)
        self.batch = model_spec(model).batch_size_per_worker
        self.group: Any = None
        self.driver: GroupDriver | None = None
        self._names = iter(range(1_000_000))

    def _new_group(self) -> Any:
        from elastic.group import WorkerGroup

        return WorkerGroup(self.spec, self.cluster.worker_actor_options(), f"{self.model}-g{next(self._names)}")

    def start(self, workers: int) -> None:
        self.group = self._new_group()
        self.group.spawn(workers)
        ready = self.group.wait_ready(workers, READY_TIMEOUT_S)
        if len(ready) < workers:
            raise BenchmarkError(f"only {len(ready)} of {workers} workers started within {READY_TIMEOUT_S:.0f} s")
        self.group.start(ready, None)
        self.driver = GroupDriver(self.group, ready[0].info["dataset_len"], self.batch)
        self.driver.steps(self.steady)

    def _after(self, first: tuple[float, float]) -> float:
        """Steady steps at the new size; the first step's extra time over their median."""
        steady = self.driver.steps(self.steady)
        return max(0.0, (first[1] - first[0]) - median(steady))

    # ------------------------------------------------------------------ in place
    def in_place(self, to_workers: int) -> ResizeSample:
        g, d = self.group, self.driver
        size = g.size
        if to_workers > size:
            g.spawn(to_workers - size)
            warm_steps = 0
            deadline = time.monotonic() + READY_TIMEOUT_S
            while len(g.poll_ready()) < to_workers - size:  # training goes on while they warm up
                d.step()
                warm_steps += 1
                if time.monotonic() > deadline:
                    raise BenchmarkError(f"newcomers not ready within {READY_TIMEOUT_S:.0f} s")
            d.steps(self.steady)  # the machine settles after the warm-up
            boundary = d.last_end_s
            ready = g.poll_ready()
            reform_s = g.grow(ready[: to_workers - size])
            first = d.step()
            parts = {"reform": reform_s, "warm_steps": float(warm_steps)}
        else:
            d.steps(self.steady)
            boundary = d.last_end_s
            _, reform_s = g.shrink(size - to_workers)
            first = d.step()
            parts = {"reform": reform_s}
        extra = self._after(first)
        return ResizeSample(self.model, "in-place", size, to_workers, first[0] - boundary, extra, parts)

    def grow_by_hand(self, to_workers: int) -> ResizeSample:
        """An in-place grow whose re-form is driven here, call by call, with the same actor calls as
        ``WorkerGroup._reform`` (rendezvous on rank 0, rank 0's state through the object store,
        ``join`` on every rank), to time its phases. Diagnostic only (``--diagnose``)."""
        import ray

        g, d = self.group, self.driver
        size = g.size
        g.spawn(to_workers - size)
        newcomers = g.wait_ready(to_workers - size, READY_TIMEOUT_S)
        d.steps(self.steady)
        boundary = d.last_end_s
        members = g.members + newcomers
        t0 = time.perf_counter()
        host, port = ray.get(members[0].actor.open_rendezvous.remote())
        t1 = time.perf_counter()
        state_ref = members[0].actor.state.remote()
        ray.wait([state_ref], fetch_local=False)
        t2 = time.perf_counter()
        joined = ray.get([m.actor.join.remote(rank, len(members), host, port, state_ref if m in newcomers else None)
                          for rank, m in enumerate(members)])
        t3 = time.perf_counter()
        for m in newcomers:
            g.pending.pop(m.worker_id, None)
        g.members = members
        first = d.step()
        extra = self._after(first)
        parts = {"rendezvous": t1 - t0, "state_to_object_store": t2 - t1, "joins": t3 - t2,
                 "join_in_old_ranks": max(j["join_s"] for j in joined[:size]),
                 "join_in_newcomers": max(j["join_s"] for j in joined[size:])}
        return ResizeSample(self.model, "in-place (by hand)", size, to_workers, first[0] - boundary, extra, parts)

    # ------------------------------------------------------------------ restart-based
    def restart(self, to_workers: int) -> ResizeSample:
        from elastic.checkpoint import CheckpointManager

        d = self.driver
        size = self.group.size
        d.steps(self.steady)
        boundary = d.last_end_s
        t0 = time.perf_counter()
        manager = CheckpointManager(self.ckpt_dir, keep_last=1)
        step = len(d.compute_s)
        manager.save(step, {"worker": self.group.state(), "sampler": d.sampler.state_dict()})
        t1 = time.perf_counter()
        self.group.shutdown()
        self.group = self._new_group()
        self.group.spawn(to_workers)
        ready = self.group.wait_ready(to_workers, READY_TIMEOUT_S)
        if len(ready) < to_workers:
            raise BenchmarkError(f"only {len(ready)} of {to_workers} workers restarted within {READY_TIMEOUT_S:.0f} s")
        t2 = time.perf_counter()
        loaded = manager.load_latest()
        if loaded is None:
            raise BenchmarkError(f"no checkpoint found in {self.ckpt_dir}")
        _, state = loaded
        self.group.start(ready, state["worker"])
        d.group = self.group
        d.sampler.load_state_dict(state["sampler"])
        t3 = time.perf_counter()
        first = d.step()
        extra = self._after(first)
        parts = {"checkpoint": t1 - t0, "kill_and_start": t2 - t1, "load_and_form": t3 - t2}
        return ResizeSample(self.model, "restart", size, to_workers, first[0] - boundary, extra, parts)

    def close(self) -> None:
        if self.group is not None:
            self.group.shutdown()


def measure(models: Sequence[str], reps: int, cycle: Sequence[int], steady_steps: int,
            log: Callable[[str], None] = print, cluster: Any = None) -> list[ResizeSample]:
    """All resizes of ``reps`` cycles per model and mode, alternating modes per repetition, on
    ``cluster`` (a started LocalRayCluster with ``max(cycle)`` slot nodes) or on a new one."""
    for m in models:
        model_spec(m)
    samples: list[ResizeSample] = []
    ckpt_root = tempfile.mkdtemp(prefix="resize-ckpt-")
    try:
        with contextlib.nullcontext(cluster) if cluster is not None else local_cluster(max(cycle)) as cluster:
            for model in models:
                for rep in range(reps):
                    # One group per repetition runs the cycle in both modes, back to back (the cycle
                    # ends where it starts); which mode goes first alternates between repetitions.
                    modes = ("in-place", "restart") if rep % 2 == 0 else ("restart", "in-place")
                    run = _Run(model, cluster, steady_steps, f"{ckpt_root}/{model}-{rep}", log)
                    try:
                        run.start(cycle[0])
                        for mode in modes:
                            for to in cycle[1:]:
                                sample = run.in_place(to) if mode == "in-place" else run.restart(to)
                                samples.append(sample)
                                log(f"{model:9s} {mode:8s} rep {rep + 1}/{reps} {sample.resize:12s} "
                                    f"pause {sample.pause_s:7.3f} s (gap {sample.gap_s:.3f} + first-step extra "
                                    f"{sample.first_step_extra_s:.3f}) "
                                    + " ".join(f"{k}={v:.3f}" for k, v in sample.parts.items()))
                    finally:
                        run.close()
    finally:
        shutil.rmtree(ckpt_root, ignore_errors=True)
    return samples


def diagnose(models: Sequence[str], reps: int, steady_steps: int, log: Callable[[str], None] = print,
             cluster: Any = None) -> list[ResizeSample]:
    """Grows 1 -> 2 -> 4 re-formed by hand (:meth:`_Run.grow_by_hand`), ``reps`` times per model."""
    samples: list[ResizeSample] = []
    with contextlib.nullcontext(cluster) if cluster is not None else local_cluster(4) as cluster:
        for model in models:
            for rep in range(reps):
                run = _Run(model, cluster, steady_steps, "/nonexistent", log)
                try:
                    run.start(1)
                    for to in (2, 4):
                        sample = run.grow_by_hand(to)
                        samples.append(sample)
                        log(f"{model:9s} by hand rep {rep + 1}/{reps} {sample.resize:12s} pause {sample.pause_s:7.3f} s "
                            + " ".join(f"{k}={v:.3f}" for k, v in sample.parts.items()))
                finally:
                    run.close()
    return samples


def summarize(samples: Sequence[ResizeSample]) -> list[list[Any]]:
    """Rows of the main table, one per (model, resize) in order of appearance."""
    keys: list[tuple[str, str]] = []
    for s in samples:
        if (s.model, s.resize) not in keys:
            keys.append((s.model, s.resize))
    rows = []
    for model, resize in keys:
        inplace = [s.pause_s for s in samples if (s.model, s.resize, s.mode) == (model, resize, "in-place")]
        restart = [s.pause_s for s in samples if (s.model, s.resize, s.mode) == (model, resize, "restart")]
        ratio = median(restart) / median(inplace) if inplace and restart and median(inplace) > 0 else float("nan")
        rows.append([model, f"{MODELS[model].parameters:,}", resize, len(inplace),
                     f"{median(inplace):.3f}", f"{max(inplace):.3f}" if inplace else "nan",
                     f"{median(restart):.2f}", f"{max(restart):.2f}" if restart else "nan", f"{ratio:.0f}x"])
    return rows


HEADERS = ["model", "params", "resize", "reps", "in-place pause median (s)", "in-place max (s)",
           "restart-based median (s)", "restart-based max (s)", "ratio (restart / in-place)"]


def detail_rows(samples: Sequence[ResizeSample]) -> list[list[Any]]:
    """Medians of the phases of each (model, resize, mode)."""
    keys: list[tuple[str, str, str]] = []
    for s in samples:
        if (s.model, s.resize, s.mode) not in keys:
            keys.append((s.model, s.resize, s.mode))
    rows = []
    for key in keys:
        group = [s for s in samples if (s.model, s.resize, s.mode) == key]
        phases = sorted({k for s in group for k in s.parts})
        text = ", ".join(f"{k} {median([s.parts[k] for s in group if k in s.parts]):{'.0f' if k == 'warm_steps' else '.3f'}}"
                         for k in phases)
        rows.append([*key, f"{median([s.gap_s for s in group]):.3f}",
                     f"{median([s.first_step_extra_s for s in group]):.3f}", text])
    return rows


DETAIL_HEADERS = ["model", "resize", "mode", "gap median (s)", "first-step extra median (s)",
                  "phases of the gap (medians, s)"]


def report(samples: Sequence[ResizeSample], command: str, load_before: str, load_after: str, elapsed_s: float) -> str:
    rows = summarize(samples)
    lines = [
        "# Resize pause: in place vs restart-based",
        "",
        f"`{command}` — {time.strftime('%Y-%m-%d %H:%M %Z')}, {elapsed_s:.0f} s; "
        f"{load_before} before, {load_after} after (the machine is shared).",
        "",
        "Pause = end of the last step at the old size -> start of the first step at the new size, "
        "plus that first step's extra time over a steady step. Local multi-node Ray cluster "
        "(one node per worker), gloo on CPU, one thread per worker, batch 32 per worker.",
        "",
        markdown_table(HEADERS, rows),
        "Where the time goes (reform = group.grow / group.shrink; warm_steps = steps trained at the old size "
        "while the newcomers warmed up, not part of the pause; kill_and_start = kill every actor, start and "
        "warm up the new ones; load_and_form = read the checkpoint, form the group, load the state):",
        "",
        markdown_table(DETAIL_HEADERS, detail_rows(samples)),
    ]
    checks = []
    for row in rows:
        model, resize, pause, ratio = row[0], row[2], float(row[4]), row[8]
        if model == "digits":
            checks.append(f"- digits {resize}: in-place pause {pause:.3f} s "
                          f"({'meets' if pause <= TARGET_PAUSE_S else 'misses'} the <= {TARGET_PAUSE_S:g} s target)")
        r = float(ratio.rstrip("x")) if ratio != "nanx" else float("nan")
        checks.append(f"- {model} {resize}: restart-based / in-place = {ratio} "
                      f"({'meets' if r >= TARGET_RATIO else 'misses'} the >= {TARGET_RATIO:g}x target)")
    lines += ["Targets:", "", *checks, ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, cluster: Any = None) -> int:
    """The CLI; ``cluster`` (a started LocalRayCluster with enough slot nodes) is for tests that share one."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.resize_latency", description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3, help="repetitions of the resize cycle per model and mode")
    parser.add_argument("--models", default=None, help=f"comma-separated, from {', '.join(MODELS)} (default: all)")
    parser.add_argument("--steady-steps", type=int, default=8, help="steps before and after each resize")
    parser.add_argument("--quick", action="store_true", help="digits only, cycle 1->2->1, 1 repetition, 3 steady steps")
    parser.add_argument("--diagnose", action="store_true",
                        help="instead: time the phases of in-place grows re-formed by hand (to resize_phases.md)")
    parser.add_argument("--out", default=str(RESULTS_DIR), help="folder of resize_latency.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.quick:
        models, reps, cycle, steady = ["digits"], 1, QUICK_CYCLE, 3
    else:
        models = args.models.split(",") if args.models else list(MODELS)
        reps, cycle, steady = args.reps, FULL_CYCLE, args.steady_steps
    if reps < 1 or steady < 2:
        parser.error("--reps must be >= 1 and --steady-steps >= 2")
    try:
        for m in models:
            model_spec(m)
    except BenchmarkError as exc:
        parser.error(str(exc))
    command = "python -m benchmarks.resize_latency " + " ".join(argv if argv is not None else sys.argv[1:])
    load_before = machine_load()
    started = time.monotonic()
    if args.diagnose:
        samples = diagnose(models, reps, steady, cluster=cluster)
        text = "\n".join([
            "# In-place grow, phase by phase (diagnostic)", "",
            f"`{command.strip()}` — {time.strftime('%Y-%m-%d %H:%M %Z')}, {time.monotonic() - started:.0f} s; "
            f"{load_before} before, {machine_load()} after (the machine is shared).", "",
            "The same actor calls as WorkerGroup._reform, driven one by one from the benchmark: rendezvous on "
            "rank 0; rank 0's state put in the object store; join on every rank (newcomers fetch the state "
            "through Ray, then form the gloo group, load it and build DDP, which broadcasts rank 0's weights). "
            "join_in_* is the time inside join() on the slowest rank of each kind, without the argument fetch.", "",
            markdown_table(DETAIL_HEADERS, detail_rows(samples))])
        path = write_result(Path(args.out) / "resize_phases.md", text)
        print(text)
        print(f"written to {path}")
        return 0
    samples = measure(models, reps, cycle, steady, cluster=cluster)
    text = report(samples, command.strip(), load_before, machine_load(), time.monotonic() - started)
    path = write_result(Path(args.out) / "resize_latency.md", text)
    print(text)
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
