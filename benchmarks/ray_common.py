"""Setup shared by the worker-group benchmarks (resize_latency, group_overhead).

- :data:`MODELS`: the two benchmark jobs (the digits CNN and the ~10M-parameter wide MLP);
- :func:`job_spec`: a job spec dict for one of them, as the trainer would hand it to the group;
- :func:`local_cluster`: the embedded multi-node Ray cluster (main thread only, like the trainer);
- :class:`GroupDriver`: the trainer's inner loop (plan -> run_step -> commit) with step timing;
- :func:`machine_load`, :func:`markdown_table`, :func:`write_result`: reporting.

Everything here runs in the driver's main thread: ``ray.cluster_utils`` installs signal handlers
when it adds a node, which Python allows only there.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from benchmarks.common import markdown_table  # noqa: F401  (re-exported for the Ray benchmarks)

#: Where the tables go unless told otherwise.
RESULTS_DIR = Path(__file__).resolve().parent / "results"


class BenchmarkError(RuntimeError):
    """A benchmark that cannot run as asked (one-line message)."""


def result_from_ranks(results: Any, procs: Any, timeout_s: float, what: str) -> Any:
    """The next message on ``results`` (a multiprocessing queue) from the ``procs`` of a plain
    baseline; BenchmarkError when one of them exits with an error or all stay silent for ``timeout_s``."""
    import queue

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return results.get(timeout=1.0)
        except queue.Empty:
            if any(p.exitcode not in (None, 0) for p in procs):
                raise BenchmarkError(f"a {what} rank exited: " +
                                     ", ".join(f"rank {i} code {p.exitcode}" for i, p in enumerate(procs))) from None
            if time.monotonic() > deadline:
                raise BenchmarkError(f"{what} ranks silent for {timeout_s:.0f} s") from None


@dataclass(frozen=True)
class ModelSpec:
    """One benchmark job: which task, with which arguments and per-worker batch."""

    name: str
    task: str
    task_args: dict[str, Any]
    batch_size_per_worker: int
    parameters: int
    """Trainable parameters (for the tables)."""


def _models() -> dict[str, ModelSpec]:
    from examples.wide_mlp import parameter_count

    digits_params = (1 * 16 * 9 + 16) + (16 * 32 * 9 + 32) + (32 * 4 * 4 * 10 + 10)
    return {
        "digits": ModelSpec("digits", "examples.digits:DigitsTask", {}, 32, digits_params),
        "wide-mlp": ModelSpec("wide-mlp", "examples.wide_mlp:WideMLPTask", {}, 32, parameter_count()),
    }


MODELS: dict[str, ModelSpec] = _models()


def model_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise BenchmarkError(f"model: unknown {name!r}; allowed: {', '.join(MODELS)}")
    return MODELS[name]


def job_spec(model: str, max_workers: int = 4, checkpoint_dir: str | None = None) -> Any:
    """The validated job spec (a ``JobSpec``, as the trainer hands it to the group) of a benchmark model."""
    m = model_spec(model)
    spec: dict[str, Any] = {
        "name": f"bench-{m.name}",
        "task": m.task,
        "task_args": dict(m.task_args),
        "batch_size_per_worker": m.batch_size_per_worker,
        "total_progress": 1.0e9,
        "seed": 0,
        "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 5.0e-4},
        "adascale": {"enabled": True},
        "workers": {"min": 1, "max": max_workers, "initial": 1},
        "cluster": {"backend": "local", "num_cpus_per_worker": 1.0},
        "metrics": {"enabled": False, "log": False},
    }
    if checkpoint_dir is not None:
        spec["checkpoint"] = {"dir": checkpoint_dir, "every_steps": 1000000, "keep_last": 1}
    from elastic.config import parse_job_spec

    return parse_job_spec(spec)


@contextlib.contextmanager
def local_cluster(worker_nodes: int, max_workers: int | None = None) -> Iterator[Any]:
    """A :class:`controller.actuators.local.LocalRayCluster` with ``worker_nodes`` slot nodes, shut
    down on exit. Its Ray session lives in a short temp dir (socket paths have a length limit)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from controller.actuators.local import LocalRayCluster

    with tempfile.TemporaryDirectory(prefix="rb-", dir="/tmp") as tmp:
        cluster = LocalRayCluster(num_cpus_per_worker=1.0, max_workers=max_workers or worker_nodes, temp_dir=tmp)
        try:
            cluster.start(worker_nodes)
            yield cluster
        finally:
            cluster.shutdown()


class GroupDriver:
    """The trainer's step loop over a :class:`elastic.group.WorkerGroup`, timed.

    ``step()`` does what ``ElasticTrainer._train`` does per step: plan the global batch for the
    current world size, run it on every rank, commit the plan. It records when the step started
    and ended (``perf_counter``) so that a resize pause can be read off the gaps between steps.
    """

    def __init__(self, group: Any, dataset_len: int, batch_size_per_worker: int, seed: int = 0) -> None:
        from elastic.sampler import ElasticSampler

        self.group = group
        self.sampler = ElasticSampler(dataset_len, seed)
        self.batch = batch_size_per_worker
        self.last_end_s = time.perf_counter()
        self.compute_s: list[float] = []

    def step(self) -> tuple[float, float]:
        """One step; returns (start_s, end_s). Raises BenchmarkError if it did not complete."""
        world = self.group.size
        started = time.perf_counter()
        plan = self.sampler.plan(world * self.batch, world, 1)
        outcome = self.group.run_step(plan)
        if not outcome.completed:
            raise BenchmarkError(f"a step at {world} worker(s) did not complete (lost {outcome.lost_workers})")
        self.sampler.commit(plan)
        ended = time.perf_counter()
        self.last_end_s = ended
        self.compute_s.append(max(r["compute_s"] for r in outcome.results))
        return started, ended

    def steps(self, count: int) -> list[float]:
        """``count`` steps; their durations in seconds."""
        out = []
        for _ in range(count):
            s, e = self.step()
            out.append(e - s)
        return out


def machine_load() -> str:
    """The 1/5/15-minute load averages and the core count, for the record."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} on {os.cpu_count()} cores"


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")




def write_result(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
