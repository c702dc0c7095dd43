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

    python -m benchmarks.group_overhead [--steps 400] [--block 25] [--models digits,wide-mlp] [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass
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
    result_from_ranks,
    write_result,
)

WORLD_SIZE = 2
TARGET_RATIO = 1.10
READY_TIMEOUT_S = 300.0


# ====================================================================== plain DDP arm (child processes)
def _ddp_rank(rank: int, world: int, port: int, job: Any, commands: Any, results: Any) -> None:
    """One rank of the plain loop; runs blocks of steps on command ("run", n) until ("stop",)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    import torch.distributed as dist
    from torch.utils.data import default_collate

    from elastic.sampler import ElasticSampler
    from elastic.task import load_task
    from elastic.distributed import destroy_process_group
    from elastic.worker import build_adascale

    torch.set_num_threads(max(1, int(job.cluster.num_cpus_per_worker)))
    torch.manual_seed(job.seed)
    task = load_task(job.task, job.task_args)
    dataset = task.train_dataset()
    model = task.build_model()
    opt = build_adascale(job, model)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    opt.set_scale(world * job.accumulation_steps)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt.attach_ddp(ddp)  # as the group's workers do: AdaScale's statistics ride on DDP's all-reduce
    sampler = ElasticSampler(len(dataset), job.seed)
    batch = job.batch_size_per_worker
    results.put(("ready", rank))
    try:
        while True:
            command = commands.get()
            if command[0] == "stop":
                break
            times, loss = [], float("nan")
            for _ in range(command[1]):
                started = time.perf_counter()
                plan = sampler.plan(world * batch, world, 1)
                indices = plan.shard(rank)[0]
                data = default_collate([dataset[j] for j in indices])
                out = task.loss(ddp, data)
                out.backward()
                opt.step()
                opt.zero_grad()
                loss = float(out.detach())
                sampler.commit(plan)
                times.append(time.perf_counter() - started)
            if rank == 0:
                results.put(("times", times, loss))
    finally:
        ddp = opt = model = None  # noqa: F841 (gone before the group: see destroy_process_group)
        destroy_process_group()


class PlainDDP:
    """The plain-loop ranks, started once and driven block by block."""

    def __init__(self, spec: Any, world: int = WORLD_SIZE) -> None:
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.results = ctx.Queue()
        self.commands = [ctx.Queue() for _ in range(world)]
        port = _free_port()
        self.procs = [ctx.Process(target=_ddp_rank, args=(r, world, port, spec, self.commands[r], self.results), daemon=True)
                      for r in range(world)]
        for p in self.procs:
            p.start()
        for _ in range(world):
            msg = self._get(READY_TIMEOUT_S)
            if msg[0] != "ready":
                raise BenchmarkError(f"plain DDP rank sent {msg[0]!r} instead of 'ready'")

    def _get(self, timeout_s: float) -> Any:
        return result_from_ranks(self.results, self.procs, timeout_s, "plain DDP")

    def run(self, steps: int) -> tuple[list[float], float]:
        for q in self.commands:
            q.put(("run", steps))
        msg = self._get(READY_TIMEOUT_S)
        return msg[1], msg[2]

    def close(self) -> None:
        for q in self.commands:
            q.put(("stop",))
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ====================================================================== measurement
@dataclass(frozen=True)
class OverheadResult:
    model: str
    steps_per_call: int
    """Steps per actor call in the group arm."""
    steps: int
    group_ms: float
    """Median driver-side step time of the group (plan + run_steps + commit, per step)."""
    ddp_ms: float
    """Median step time of the plain loop (rank 0)."""
    worker_compute_ms: float
    """Median over steps of the slower rank's time inside ``train_step`` (collate + DDP step)."""
    worker_compute_fast_ms: float
    """The same for the faster rank (the gap to the slower one is mostly the two calls' arrival skew:
    the first rank to start waits in the all-reduce for the other)."""
    ray_roundtrip_ms: float
    """Median of ``ray.get([a.ping.remote() for a in actors])`` (two empty actor calls)."""
    probe_empty_ms: float
    """Median of 2 parallel empty calls to 2 idle probe actors."""
    probe_payload_ms: float
    """Median of 2 parallel calls to the probes carrying a step's index list and returning a report."""
    driver_plan_ms: float
    """Median of ``sampler.plan`` + ``plan.shard`` for all ranks + ``commit`` in the driver."""
    max_loss_diff: float
    """Largest |loss_group - loss_ddp| at the same step over the blocks (same computation: ~0)."""
    paired_ratio: float
    """Median over block pairs of (group block median / plain-DDP block median): adjacent blocks see
    about the same machine load, so this is the figure that resists load drift."""

    @property
    def ratio(self) -> float:
        """Ratio of the overall medians."""
        return self.group_ms / self.ddp_ms


def _ping_ms(group: Any, count: int) -> float:
    import ray

    actors = [m.actor for m in group.members]
    times = []
    for _ in range(count):
        started = time.perf_counter()
        ray.get([a.ping.remote() for a in actors])
        times.append(time.perf_counter() - started)
    return 1e3 * median(times)


class _Probe:
    """An empty actor: what one Ray call costs without and with a step's payload (an index list
    in, a report dict out), apart from any training."""

    def empty(self) -> bool:
        return True

    def step_like(self, micro_batches: list[list[int]]) -> dict[str, Any]:
        return {"ok": True, "worker_id": "probe", "steps_done": len(micro_batches[0]), "skipped": False,
                "loss": 0.5, "gain": 1.5, "scale": 2.0, "efficiency": 0.75, "progress": 10.0,
                "learning_rate": 0.01, "grad_variance": 1.0, "grad_sqnorm": 1.0, "num_estimates": 10,
                "compute_s": 0.01}


def _start_probes() -> list[Any]:
    """Two idle probe actors (no resources reserved); started early so that they warm up meanwhile."""
    import ray

    return [ray.remote(num_cpus=0)(_Probe).remote() for _ in range(WORLD_SIZE)]


def _probe_ms(probes: list[Any], count: int, batch: int) -> tuple[float, float]:
    """(median ms of 2 parallel empty calls, median ms of 2 parallel step-sized calls) on the probes."""
    import ray

    try:
        ray.get([p.empty.remote() for p in probes])
        shards = [[list(range(r * batch, (r + 1) * batch))] for r in range(WORLD_SIZE)]
        empty, payload = [], []
        for _ in range(count):
            started = time.perf_counter()
            ray.get([p.empty.remote() for p in probes])
            empty.append(time.perf_counter() - started)
            started = time.perf_counter()
            ray.get([p.step_like.remote(shard) for p, shard in zip(probes, shards)])
            payload.append(time.perf_counter() - started)
        return 1e3 * median(empty), 1e3 * median(payload)
    finally:
        _kill(probes)


def _kill(actors: list[Any]) -> None:
    import ray

    for actor in actors:
        with contextlib.suppress(Exception):
            ray.kill(actor)


def _plan_ms(dataset_len: int, batch: int, count: int) -> float:
    from elastic.sampler import ElasticSampler

    sampler = ElasticSampler(dataset_len, 0)
    times = []
    for _ in range(count):
        started = time.perf_counter()
        plan = sampler.plan(WORLD_SIZE * batch, WORLD_SIZE, 1)
        for r in range(WORLD_SIZE):
            plan.shard(r)
        sampler.commit(plan)
        times.append(time.perf_counter() - started)
    return 1e3 * median(times)


def measure_model(model: str, cluster: Any, steps: int, block: int, log: Callable[[str], None] = print,
                  probe_calls: int = 200, steps_per_call: int = 1) -> OverheadResult:
    """Both arms for one model; the group arm hands its workers ``steps_per_call`` steps per call
    (as ``workers.steps_per_call`` does in the trainer), in blocks of a multiple of it."""
    from elastic.group import WorkerGroup

    spec = job_spec(model, max_workers=WORLD_SIZE)
    batch = model_spec(model).batch_size_per_worker
    block = steps_per_call * max(1, round(block / steps_per_call))
    group = WorkerGroup(spec, cluster.worker_actor_options(), f"ovh-{model}")
    ddp = None
    probes = _start_probes()
    try:
        group.spawn(WORLD_SIZE)
        ddp = PlainDDP(spec)  # its ranks warm up while the actors do
        ready = group.wait_ready(WORLD_SIZE, READY_TIMEOUT_S)
        if len(ready) < WORLD_SIZE:
            raise BenchmarkError(f"only {len(ready)} of {WORLD_SIZE} workers started within {READY_TIMEOUT_S:.0f} s")
        group.start(ready, None)
        driver = GroupDriver(group, ready[0].info["dataset_len"], batch)
        group_times: list[float] = []
        ddp_times: list[float] = []
        compute: list[float] = []
        compute_fast: list[float] = []
        diffs: list[float] = []
        pairs: list[float] = []
        blocks = 1 + -(-steps // block)
        for b in range(blocks):
            timed = b > 0  # the first block of each arm is a warm-up
            order = ("group", "ddp") if b % 2 == 0 else ("ddp", "group")
            losses: dict[str, float] = {}
            for arm in order:
                if arm == "group":
                    before = len(driver.compute_s)
                    times = []
                    last: Any = None
                    done = 0
                    while done < block:
                        count = min(steps_per_call, block - done)
                        world = group.size
                        started = time.perf_counter()
                        plans = driver.sampler.plan_many(world * batch, world, 1, count)
                        outcomes = group.run_steps(plans)
                        if len(outcomes) < count or not all(o.completed for o in outcomes):
                            raise BenchmarkError(f"a group step did not complete (lost {outcomes[-1].lost_workers})")
                        for plan in plans:
                            driver.sampler.commit(plan)
                        elapsed = time.perf_counter() - started
                        times += [elapsed / count] * count
                        for last in outcomes:
                            driver.compute_s.append(max(r["compute_s"] for r in last.results))
                            if timed:
                                compute_fast.append(min(r["compute_s"] for r in last.results))
                        done += count
                    losses["group"] = last.results[0]["loss"]
                    if timed:
                        group_times += times
                        compute += driver.compute_s[before:]
                else:
                    times, losses["ddp"] = ddp.run(block)
                    if timed:
                        ddp_times += times
            diffs.append(abs(losses["group"] - losses["ddp"]))
            if timed:
                pairs.append(median(group_times[-block:]) / median(ddp_times[-block:]))
            log(f"{model}, {steps_per_call} step(s)/call: block {b + 1}/{blocks}{'' if timed else ' (warm-up)'}: group {1e3 * median(group_times[-block:] if timed else [0]):.2f} ms, "
                f"plain DDP {1e3 * median(ddp_times[-block:] if timed else [0]):.2f} ms, "
                f"rank-0 loss {losses['group']:.6f} vs {losses['ddp']:.6f}")
        probe = _probe_ms(probes, probe_calls, batch)
        result = OverheadResult(
            model=model, steps_per_call=steps_per_call, steps=len(group_times), group_ms=1e3 * median(group_times), ddp_ms=1e3 * median(ddp_times),
            worker_compute_ms=1e3 * median(compute), worker_compute_fast_ms=1e3 * median(compute_fast),
            ray_roundtrip_ms=_ping_ms(group, probe_calls),
            probe_empty_ms=probe[0], probe_payload_ms=probe[1],
            driver_plan_ms=_plan_ms(ready[0].info["dataset_len"], batch, probe_calls), max_loss_diff=max(diffs),
            paired_ratio=median(pairs))
        return result
    finally:
        _kill(probes)
        group.shutdown()
        if ddp is not None:
            ddp.close()


def auto_steps_per_call(step_ms: float) -> int:
    """What ``workers.steps_per_call: auto`` picks for a step of ``step_ms`` (elastic.trainer's rule)."""
    from elastic.trainer import CALL_TARGET_S, MAX_AUTO_STEPS_PER_CALL

    return min(max(int(CALL_TARGET_S / max(step_ms / 1e3, 1e-6)), 1), MAX_AUTO_STEPS_PER_CALL)


def measure(models: Sequence[str], steps: int, block: int, log: Callable[[str], None] = print,
            cluster: Any = None, probe_calls: int = 200, auto: bool = True) -> list[OverheadResult]:
    """Both arms for each model, on ``cluster`` (a started LocalRayCluster with 2 slot nodes) or a new one:
    first one step per call, then (``auto``) the number ``steps_per_call: auto`` picks from that
    run's group step time, when it is more than one."""
    for m in models:
        model_spec(m)
    results = []
    with contextlib.nullcontext(cluster) if cluster is not None else local_cluster(WORLD_SIZE) as cluster:
        for m in models:
            single = measure_model(m, cluster, steps, block, log, probe_calls)
            results.append(single)
            count = auto_steps_per_call(single.group_ms)
            if auto and count > 1:
                results.append(measure_model(m, cluster, steps, block, log, probe_calls, steps_per_call=count))
    return results


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
