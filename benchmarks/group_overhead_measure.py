"""The measurement of ``benchmarks.group_overhead``: both arms of one model in alternating blocks, and
the breakdown of the group's step (Ray round trips, probe actors, the driver's planning)."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from benchmarks.group_overhead_ddp import PlainDDP
from benchmarks.ray_common import BenchmarkError, GroupDriver, job_spec, local_cluster, median, model_spec

WORLD_SIZE = 2
READY_TIMEOUT_S = 300.0


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
        ddp = PlainDDP(spec, WORLD_SIZE, READY_TIMEOUT_S)  # its ranks warm up while the actors do
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
