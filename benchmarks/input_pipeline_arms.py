"""The arms of ``benchmarks.input_pipeline`` on its decode-heavy job (``benchmarks.decode_heavy``).

- :class:`PlainLoop`: W ``torch.multiprocessing`` processes with the classic loop (W = 2: DDP over
  gloo), each with ``DataLoader(dataset, batch_size=32, sampler=DistributedSampler(...), ...)``;
  optionally with the elastic workers' malloc options (``retain_heap``), as a control.
- :class:`ElasticArm`: a ``WorkerGroup`` of W Ray actors driven as ``ElasticTrainer`` drives it: calls
  of ``steps_per_call: auto`` steps (about 0.5 s), the following steps handed over as lookahead for
  the loaders, the plans committed after each call.
- :func:`in_process_pairs`: the worker's step path and the plain loop in this one process, no Ray.
- :func:`component_ms`: decode + augment of one batch, and one step on a ready batch.
"""

from __future__ import annotations

import datetime
import os
import statistics
import time
from typing import Any

import torch

from benchmarks.decode_heavy import BATCH, LOADER, DecodeHeavyTask, job_spec
from benchmarks.ray_common import BenchmarkError
from benchmarks.spawned_ranks import SpawnedRanks, serve_commands

READY_TIMEOUT_S = 300.0


def _plain_rank(rank: int, world: int, port: int, retain_heap: bool, commands: Any, results: Any) -> None:
    """One rank of the plain loop; runs blocks of steps on command ("run", n) until ("stop",).
    ``retain_heap``: with the elastic workers' malloc options (elastic/allocator.py), set before the
    DataLoader forks its workers."""
    os.environ["OMP_NUM_THREADS"] = "1"
    if retain_heap:
        from elastic.allocator import retain_freed_memory

        not_set = retain_freed_memory()
        if not_set is not None:
            raise RuntimeError(f"the control arm's malloc options were not set: {not_set}")
    import torch.distributed as dist
    from torch.utils.data import DataLoader, DistributedSampler

    torch.set_num_threads(1)
    torch.manual_seed(0)
    from elastic.worker import build_adascale

    task = DecodeHeavyTask()
    dataset = task.train_dataset()
    model = task.build_model()
    spec = job_spec(world)
    opt = build_adascale(spec, model)  # AdaScale's own cost in both arms (benchmarks/overhead.py measures it)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=120))
        opt.set_scale(world)
        net: torch.nn.Module = torch.nn.parallel.DistributedDataParallel(model)
        opt.attach_ddp(net)
    else:
        net = model
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, seed=0, drop_last=True)
    loader = DataLoader(dataset, batch_size=BATCH, sampler=sampler, drop_last=True, **LOADER)

    def batches():
        epoch = 0
        while True:
            sampler.set_epoch(epoch)
            yield from loader
            epoch += 1

    stream = batches()

    def run(steps: int) -> tuple[str, float, float]:
        started = time.perf_counter()
        waited = 0.0
        for _ in range(steps):
            before = time.perf_counter()
            batch = next(stream)
            waited += time.perf_counter() - before
            loss = task.loss(net, batch)
            loss.backward()
            opt.step()
            opt.zero_grad()
        return "block", time.perf_counter() - started, waited / steps

    try:
        serve_commands(rank, commands, results, run)
    finally:
        net = opt = model = None  # noqa: F841
        if world > 1:
            dist.destroy_process_group()


class PlainLoop:
    """The plain-loop ranks, started once and driven block by block."""

    def __init__(self, world: int, retain_heap: bool = False) -> None:
        self.ranks = SpawnedRanks(_plain_rank, world, (retain_heap,), "plain-loop", READY_TIMEOUT_S)
        self.data_wait_s: list[float] = []
        """Per block: rank 0's mean wait for its next batch per step."""

    def run(self, steps: int) -> float:
        """Seconds for ``steps`` steps (rank 0's clock)."""
        _, seconds, data_wait_s = self.ranks.command("run", steps)
        self.data_wait_s.append(data_wait_s)
        return float(seconds)

    def close(self) -> None:
        self.ranks.close()


class ElasticArm:
    """A WorkerGroup driven as the trainer drives it (calls of auto steps, lookahead, commit)."""

    def __init__(self, cluster: Any, world: int) -> None:
        from elastic.group import WorkerGroup
        from elastic.sampler import ElasticSampler

        self.group = WorkerGroup(job_spec(world), cluster.worker_actor_options(), f"inp-{world}")
        self.group.spawn(world)
        ready = self.group.wait_ready(world, READY_TIMEOUT_S)
        if len(ready) < world:
            raise BenchmarkError(f"only {len(ready)} of {world} workers started")
        self.group.start(ready, None)
        self.world = world
        self.prefetch_batches = int(ready[0].info["prefetch_batches"])
        self.loader_workers = int(ready[0].info["loader_workers"])
        self.sampler = ElasticSampler(ready[0].info["dataset_len"], 0)
        self.steps_per_call = 1
        self.data_wait_s: list[float] = []
        self.compute_s: list[float] = []

    def run(self, steps: int) -> float:
        started = time.perf_counter()
        done = 0
        step_times = []
        while done < steps:
            count = min(self.steps_per_call, steps - done)
            call_started = time.perf_counter()
            plans = self.sampler.plan_many(self.world * BATCH, self.world, 1, count)
            outcomes = self.group.run_steps(plans, lookahead=self.sampler.lookahead(plans[-1], self.prefetch_batches))
            if len(outcomes) < count or not all(o.completed for o in outcomes):
                raise BenchmarkError("an elastic step did not complete")
            for plan in plans:
                self.sampler.commit(plan)
            for outcome in outcomes:
                self.data_wait_s.append(max(r["data_wait_s"] for r in outcome.results))
                self.compute_s.append(max(r["compute_s"] for r in outcome.results))
            step_times.append((time.perf_counter() - call_started) / count)
            done += count
        self._tune(statistics.median(step_times))
        return time.perf_counter() - started

    def _tune(self, step_s: float) -> None:
        from elastic.trainer import CALL_TARGET_S, MAX_AUTO_STEPS_PER_CALL

        self.steps_per_call = min(max(int(CALL_TARGET_S / max(step_s, 1e-6)), 1), MAX_AUTO_STEPS_PER_CALL)

    def close(self) -> None:
        self.group.shutdown()


def component_ms(samples: int = 256) -> tuple[float, float]:
    """(decode + augment of one batch, one training step on a ready batch), ms, in this process."""
    from torch.utils.data import default_collate

    torch.set_num_threads(1)
    torch.manual_seed(0)
    task = DecodeHeavyTask(images=samples)
    dataset, model = task.train_dataset(), task.build_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)  # the step without AdaScale
    started = time.perf_counter()
    batches = [default_collate([dataset[i] for i in range(k, k + BATCH)]) for k in range(0, samples, BATCH)]
    load_ms = 1e3 * (time.perf_counter() - started) / len(batches)
    times = []
    for batch in batches + batches:
        t = time.perf_counter()
        task.loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
    return load_ms, 1e3 * statistics.median(times[2:])


def in_process_pairs(blocks: int, block_steps: int) -> list[float]:
    """Without Ray: the worker's own step path (``ElasticWorker.train_steps`` with its InputPipeline
    and lookahead) and the plain DataLoader loop in this one process, alternating blocks; returns
    each pair's throughput ratio (worker / plain). Isolates the input pipeline from Ray's processes."""
    from torch.utils.data import DataLoader

    from elastic.sampler import ElasticSampler
    from elastic.worker import ElasticWorker, build_adascale

    torch.set_num_threads(1)
    spec = job_spec(1)
    worker = ElasticWorker(spec, "in-process")
    sampler = ElasticSampler(len(worker.dataset), spec.seed)
    calls = 10

    def worker_block() -> float:
        started = time.perf_counter()
        for _ in range(0, block_steps, calls):
            plans = sampler.plan_many(BATCH, 1, 1, calls)
            lookahead = sampler.lookahead(plans[-1], worker.pipeline.settings.prefetch_batches)
            worker.train_steps([p.packed_shard(0) for p in plans], [p.packed_shard(0) for p in lookahead])
            for p in plans:
                sampler.commit(p)
        return time.perf_counter() - started

    torch.manual_seed(0)
    task = DecodeHeavyTask()
    model = task.build_model()
    opt = build_adascale(spec, model)
    loader = DataLoader(task.train_dataset(), batch_size=BATCH, shuffle=True, drop_last=True, **LOADER)

    def batches():
        while True:
            yield from loader

    stream = batches()

    def plain_block() -> float:
        started = time.perf_counter()
        for _ in range(0, block_steps, calls):
            for _ in range(calls):
                task.loss(model, next(stream)).backward()
                opt.step()
                opt.zero_grad()
        return time.perf_counter() - started

    pairs = []
    for b in range(blocks + 1):
        if b % 2 == 0:
            w, p = worker_block(), plain_block()
        else:
            p, w = plain_block(), worker_block()
        if b > 0:  # the first pair is a warm-up
            pairs.append(p / w)
    worker.pipeline.close()
    return pairs
