"""Throughput of the elastic input pipeline vs a plain PyTorch loop with the same DataLoader settings.

One decode-heavy job in every arm: 96x96 colour JPEGs made by this module, each ``__getitem__``
decodes one (Pillow), takes a random crop resized to 32x32 and a random horizontal flip; the model is
the small ResNet of ``examples/jpeg_digits.py`` (BatchNorm, width 8), AdaScale-wrapped SGD with
momentum in both arms (its own cost is measured by benchmarks/overhead.py), batch 32 per worker,
one intra-op thread per worker, DataLoader ``num_workers=1, prefetch_factor=2, persistent_workers``.

- **elastic**: a ``WorkerGroup`` of W Ray actors driven as ``ElasticTrainer`` drives it: a call of
  ``steps_per_call: auto`` steps (about 0.5 s), the following steps handed over as lookahead for the
  loaders, the plans committed after each call.
- **plain**: W ``torch.multiprocessing`` processes with the classic loop (W = 2: DDP over gloo), each
  with ``DataLoader(dataset, batch_size=32, sampler=DistributedSampler(...), num_workers=1, ...)``.

The arms alternate in blocks of steps (the idle arm waits blocked; its loader holds its prefetched
batches), the first block of each is a warm-up, and each block's throughput is samples / wall time.
The ratio that resists load drift is the median over block pairs of elastic / plain throughput.

    python -m benchmarks.input_pipeline [--blocks 8] [--block-steps 40] [--worlds 1,2] [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import io
import logging
import os
import socket
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from benchmarks.common import markdown_table
from benchmarks.ray_common import RESULTS_DIR, BenchmarkError, local_cluster, machine_load, result_from_ranks, write_result

TARGET_RATIO = 0.97
READY_TIMEOUT_S = 300.0
BATCH = 32
LOADER = {"num_workers": 1, "prefetch_factor": 2, "persistent_workers": True}


# ====================================================================== the decode-heavy job
def make_jpegs(count: int, size: int = 96, seed: int = 0) -> tuple[list[bytes], torch.Tensor]:
    """``count`` JPEGs of smooth colour patterns with noise; the label is the pattern's orientation bin."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    jpegs, labels = [], []
    for _ in range(count):
        label = int(rng.integers(10))
        angle = np.pi * label / 10
        wave = np.sin(2 * np.pi * rng.uniform(2, 5) * (np.cos(angle) * xx + np.sin(angle) * yy) + rng.uniform(0, 6.3))
        colour = rng.uniform(0.2, 1.0, 3)
        rgb = (0.5 + 0.4 * wave)[..., None] * colour + rng.normal(0, 0.08, (size, size, 3))
        buf = io.BytesIO()
        Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8), "RGB").save(buf, format="JPEG", quality=92)
        jpegs.append(buf.getvalue())
        labels.append(label)
    return jpegs, torch.tensor(labels)


class DecodeHeavyImages(torch.utils.data.Dataset):
    """Decode + random resized crop to 32x32 + random flip, per access (the work of a real image loader)."""

    def __init__(self, jpegs: list[bytes], labels: torch.Tensor) -> None:
        self.jpegs, self.labels = jpegs, labels

    def __len__(self) -> int:
        return len(self.jpegs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        from PIL import Image

        with Image.open(io.BytesIO(self.jpegs[i])) as im:
            im = im.convert("RGB")
            side = int(im.width * float(torch.empty(()).uniform_(0.6, 1.0)))
            x0, y0 = (int(v) for v in torch.randint(0, im.width - side + 1, (2,)))
            im = im.resize((32, 32), Image.BILINEAR, box=(x0, y0, x0 + side, y0 + side))
            array = np.asarray(im, dtype=np.uint8)
        image = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)
        if bool(torch.rand(()) < 0.5):
            image = image.flip(2)
        return {"image": (image - 0.5) / 0.25, "label": self.labels[i]}


class DecodeHeavyTask:
    """``task: benchmarks.input_pipeline:DecodeHeavyTask``."""

    def __init__(self, images: int = 2048, width: int = 8) -> None:
        self.jpegs, self.labels = make_jpegs(images)
        self.width = width

    def build_model(self) -> torch.nn.Module:
        from examples.jpeg_digits import SmallResNet

        return SmallResNet(self.width)

    def train_dataset(self) -> torch.utils.data.Dataset:
        return DecodeHeavyImages(self.jpegs, self.labels)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(model(batch["image"]), batch["label"])

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        return {}


def job_spec(world: int) -> Any:
    from elastic.config import parse_job_spec

    return parse_job_spec({
        "name": "bench-input-pipeline", "task": "benchmarks.input_pipeline:DecodeHeavyTask",
        "batch_size_per_worker": BATCH, "total_progress": 1.0e9, "seed": 0,
        "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
        "workers": {"min": 1, "max": max(world, 1), "initial": world},
        "cluster": {"backend": "local", "num_cpus_per_worker": 1.0},
        "data": LOADER, "metrics": {"enabled": False, "log": False},
    })


# ====================================================================== plain arm (child processes)
def _plain_rank(rank: int, world: int, port: int, commands: Any, results: Any) -> None:
    """One rank of the plain loop; runs blocks of steps on command ("run", n) until ("stop",)."""
    os.environ["OMP_NUM_THREADS"] = "1"
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
    results.put(("ready", rank))
    try:
        while True:
            command = commands.get()
            if command[0] == "stop":
                break
            started = time.perf_counter()
            for _ in range(command[1]):
                loss = task.loss(net, next(stream))
                loss.backward()
                opt.step()
                opt.zero_grad()
            if rank == 0:
                results.put(("block", time.perf_counter() - started))
    finally:
        net = opt = model = None  # noqa: F841
        if world > 1:
            dist.destroy_process_group()


class PlainLoop:
    """The plain-loop ranks, started once and driven block by block."""

    def __init__(self, world: int) -> None:
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.results = ctx.Queue()
        self.commands = [ctx.Queue() for _ in range(world)]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        # Not daemonic: their DataLoaders start worker processes of their own (close() ends them).
        self.procs = [ctx.Process(target=_plain_rank, args=(r, world, port, self.commands[r], self.results))
                      for r in range(world)]
        for p in self.procs:
            p.start()
        for _ in range(world):
            self._get(READY_TIMEOUT_S)

    def _get(self, timeout_s: float) -> Any:
        return result_from_ranks(self.results, self.procs, timeout_s, "plain-loop")

    def run(self, steps: int) -> float:
        """Seconds for ``steps`` steps (rank 0's clock)."""
        for q in self.commands:
            q.put(("run", steps))
        return float(self._get(READY_TIMEOUT_S)[1])

    def close(self) -> None:
        for q in self.commands:
            q.put(("stop",))
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


# ====================================================================== elastic arm
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


# ====================================================================== measurement
@dataclass(frozen=True)
class ThroughputResult:
    world: int
    blocks: int
    block_steps: int
    steps_per_call: int
    plain_samples_s: list[float]
    elastic_samples_s: list[float]
    elastic_data_wait_ms: float = float("nan")
    """Median over timed steps of the slowest rank's wait for its batches inside the step."""
    elastic_step_ms: float = float("nan")
    """Median over timed steps of the slowest rank's time in ``train_step`` (wait included)."""

    @property
    def pairs(self) -> list[float]:
        return [e / p for e, p in zip(self.elastic_samples_s, self.plain_samples_s)]

    @property
    def paired_ratio(self) -> float:
        return statistics.median(self.pairs)


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
            worker.train_steps([p.shard_keys(0) for p in plans],
                               [p.shard_keys(0) for p in sampler.lookahead(plans[-1], worker.pipeline.settings.prefetch_batches)])
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


def measure(worlds: Sequence[int], blocks: int, block_steps: int, log: Callable[[str], None] = print,
            cluster: Any = None) -> list[ThroughputResult]:
    results = []
    with local_cluster(max(worlds)) if cluster is None else _nullcontext(cluster) as cluster:
        for world in worlds:
            plain = PlainLoop(world)
            elastic = ElasticArm(cluster, world)
            try:
                if elastic.loader_workers != LOADER["num_workers"]:
                    raise BenchmarkError(f"elastic workers run {elastic.loader_workers} loader workers")
                plain_rates, elastic_rates = [], []
                timed_from = 0
                for b in range(blocks + 1):
                    order = ("elastic", "plain") if b % 2 == 0 else ("plain", "elastic")
                    rates = {}
                    first = len(elastic.compute_s)
                    for arm in order:
                        seconds = (elastic if arm == "elastic" else plain).run(block_steps)
                        rates[arm] = world * BATCH * block_steps / seconds
                    if b == 0:
                        timed_from = len(elastic.data_wait_s)
                    if b > 0:  # block 0 of each arm is a warm-up
                        plain_rates.append(rates["plain"])
                        elastic_rates.append(rates["elastic"])
                    log(f"world {world}: block {b}/{blocks}{' (warm-up)' if b == 0 else ''}: plain {rates['plain']:.0f} "
                        f"samples/s, elastic {rates['elastic']:.0f} samples/s ({elastic.steps_per_call} steps/call; "
                        f"in the actor {1e3 * statistics.median(elastic.compute_s[first:]):.1f} ms/step, waiting "
                        f"{1e3 * statistics.median(elastic.data_wait_s[first:]):.1f})")
                results.append(ThroughputResult(
                    world, blocks, block_steps, elastic.steps_per_call, plain_rates, elastic_rates,
                    elastic_data_wait_ms=1e3 * statistics.median(elastic.data_wait_s[timed_from:]),
                    elastic_step_ms=1e3 * statistics.median(elastic.compute_s[timed_from:])))
            finally:
                elastic.close()
                plain.close()
    return results


class _nullcontext:
    def __init__(self, value: Any) -> None:
        self.value = value

    def __enter__(self) -> Any:
        return self.value

    def __exit__(self, *exc: object) -> None:
        return None


HEADERS = ["workers", "plain loop (samples/s, median)", "elastic (samples/s, median)", "ratio of medians",
           "ratio, median of block pairs [min, max]", "target", "elastic: step in the actor / of it waiting for data (ms)"]


def report(results: Sequence[ThroughputResult], components: tuple[float, float], command: str,
           load_before: str, load_after: str, elapsed_s: float, in_process: Sequence[float] = ()) -> str:
    rows = []
    for r in results:
        plain, elastic = statistics.median(r.plain_samples_s), statistics.median(r.elastic_samples_s)
        verdict = "met" if r.paired_ratio >= TARGET_RATIO else "missed"
        rows.append([f"{r.world} vs {'plain DDP, ' if r.world > 1 else ''}{r.world} process{'es' if r.world > 1 else ''}",
                     f"{plain:.0f}", f"{elastic:.0f}", f"{elastic / plain:.3f}",
                     f"{r.paired_ratio:.3f} [{min(r.pairs):.3f}, {max(r.pairs):.3f}]", f">= {TARGET_RATIO}: {verdict}",
                     f"{r.elastic_step_ms:.1f} / {r.elastic_data_wait_ms:.1f}"])
    load_ms, step_ms = components
    return "\n".join([
        "# Input pipeline: elastic workers vs a plain PyTorch loop, same DataLoader settings",
        "",
        f"`{command}` — {time.strftime('%Y-%m-%d %H:%M %Z')}, {elapsed_s:.0f} s; "
        f"{load_before} before, {load_after} after (the machine is shared).",
        "",
        f"Decode-heavy job: 96x96 JPEGs decoded, randomly crop-resized to 32x32 and flipped in `__getitem__`; "
        f"small ResNet (BatchNorm), batch {BATCH} per worker, one thread per worker, DataLoader "
        f"num_workers={LOADER['num_workers']}, prefetch_factor={LOADER['prefetch_factor']}, persistent workers. "
        f"In one process: decode + augment {load_ms:.1f} ms per batch, training step without AdaScale {step_ms:.1f} ms on a ready batch. "
        f"Both arms: AdaScale-wrapped SGD (its cost is the same in both). Elastic: trainer-style calls of "
        f"auto steps with lookahead; plain: the classic loop (DDP over gloo for 2 processes). {results[0].blocks if results else 0} timed blocks of "
        f"{results[0].block_steps if results else 0} steps per arm, alternating.",
        "",
        markdown_table(HEADERS, rows),
    ] + ([
        "",
        f"Without Ray (the worker's step path with its InputPipeline vs the plain loop, in one process, "
        f"{len(in_process)} alternating block pairs): throughput ratio median {statistics.median(in_process):.3f} "
        f"[{min(in_process):.3f}, {max(in_process):.3f}].",
    ] if in_process else []))


def main(argv: Sequence[str] | None = None, cluster: Any = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.input_pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=8, help="timed blocks per arm (after one warm-up block)")
    parser.add_argument("--block-steps", type=int, default=40, help="steps per block")
    parser.add_argument("--worlds", default="1,2", help="comma-separated world sizes (1 and/or 2)")
    parser.add_argument("--quick", action="store_true", help="world 1 only, 2 blocks of 10 steps")
    parser.add_argument("--out", default=str(RESULTS_DIR), help="folder of input_pipeline.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    worlds = [1] if args.quick else [int(w) for w in args.worlds.split(",")]
    blocks, block_steps = (2, 10) if args.quick else (args.blocks, args.block_steps)
    if blocks < 1 or block_steps < 1 or any(w not in (1, 2) for w in worlds):
        parser.error("--blocks and --block-steps must be >= 1, --worlds from 1,2")
    command = "python -m benchmarks.input_pipeline " + " ".join(argv if argv is not None else sys.argv[1:])
    load_before = machine_load()
    started = time.monotonic()
    components = component_ms()
    in_process = in_process_pairs(blocks, block_steps)
    results = measure(worlds, blocks, block_steps, cluster=cluster)
    text = report(results, components, command.strip(), load_before, machine_load(), time.monotonic() - started,
                  in_process)
    path = write_result(Path(args.out) / "input_pipeline.md", text)
    print(text)
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
