"""The plain-DDP arm of ``benchmarks.group_overhead``: ``torch.multiprocessing`` ranks with the classic
loop (each rank plans the same step locally and takes its shard), started once and driven block by
block from the driver; rank 0 reports its step times and last loss."""

from __future__ import annotations

import datetime
import os
import time
from typing import Any

from benchmarks.spawned_ranks import SpawnedRanks, serve_commands


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

    def run(steps: int) -> tuple[str, list[float], float]:
        times, loss = [], float("nan")
        for _ in range(steps):
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
        return "times", times, loss

    try:
        serve_commands(rank, commands, results, run)
    finally:
        ddp = opt = model = None  # noqa: F841 (gone before the group: see destroy_process_group)
        destroy_process_group()


class PlainDDP:
    """The plain-loop ranks, started once and driven block by block."""

    def __init__(self, spec: Any, world: int, ready_timeout_s: float) -> None:
        self.ranks = SpawnedRanks(_ddp_rank, world, (spec,), "plain DDP", ready_timeout_s)

    def run(self, steps: int) -> tuple[list[float], float]:
        msg = self.ranks.command("run", steps)
        return msg[1], msg[2]

    def close(self) -> None:
        self.ranks.close()
