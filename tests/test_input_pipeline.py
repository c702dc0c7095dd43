"""The worker's input pipeline, its seeding and the training controls (no Ray: workers built in-process)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from elastic.config import parse_job_spec
from elastic.data import (InputPipeline, LoaderSettings, SeededDataset, derive_seed, keys_checksum, resolve_num_workers,
                          sample_seed, seed_everything)
from elastic.sampler import ElasticSampler
from elastic.task import TaskError
from elastic.worker import ElasticWorker
from tests.workload_tasks import DrawingDataset


class IndexDataset(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 100

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor(i)


def batches(*ranges: range, epoch: int = 0) -> list[list[tuple[int, int]]]:
    return [[(epoch, i) for i in r] for r in ranges]


@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_pipeline_delivers_the_wanted_batches_and_drops_prefetched_ones_when_the_plan_changes(num_workers):
    pipe = InputPipeline(IndexDataset(), seed=0, settings=LoaderSettings(num_workers=num_workers, prefetch_factor=2))
    first = batches(range(0, 4), range(4, 8), range(8, 12), range(12, 16), range(16, 20))
    pipe.submit(first)
    for keys in first[:2]:
        assert pipe.next_batch(keys).tolist() == [i for _, i in keys]
    # The next call agrees with what is held: nothing is dropped, the rest is appended.
    pipe.submit(first[2:] + batches(range(20, 24)))
    assert pipe.next_batch(first[2]).tolist() == list(range(8, 12))
    assert pipe.discarded_batches == 0
    # A resize re-plans: the three batches held (two prefetched, one queued) are dropped, never delivered.
    replanned = batches(range(12, 14), range(14, 16), range(50, 52))
    pipe.submit(replanned)
    assert pipe.discarded_batches == 3
    assert [pipe.next_batch(k).tolist() for k in replanned] == [[12, 13], [14, 15], [50, 51]]
    # A step asking for keys never submitted gets them loaded on the spot.
    assert pipe.next_batch(batches(range(90, 93))[0]).tolist() == [90, 91, 92]
    pipe.close()


def test_pipeline_refilled_after_it_ran_dry_keeps_going():
    pipe = InputPipeline(IndexDataset(), seed=0, settings=LoaderSettings(num_workers=1, prefetch_factor=2))
    only = batches(range(0, 3))
    pipe.submit(only)
    assert pipe.next_batch(only[0]).tolist() == [0, 1, 2]
    more = batches(range(3, 6), range(6, 9))
    pipe.submit(more)  # nothing was in flight when the feed was refilled
    assert [pipe.next_batch(k).tolist() for k in more] == [[3, 4, 5], [6, 7, 8]]
    assert pipe.discarded_batches == 0
    pipe.close()


def draws_of(num_workers: int, keys: list[tuple[int, int]], seed: int = 7) -> dict[tuple[int, int], list[float]]:
    pipe = InputPipeline(DrawingDataset(), seed=seed, settings=LoaderSettings(num_workers=num_workers))
    out = {}
    for k in range(0, len(keys), 4):
        chunk = keys[k:k + 4]
        pipe.submit([chunk])
        b = pipe.next_batch(chunk)
        for key, crop, flip, jitter in zip(chunk, b["crop"], b["flip"], b["jitter"]):
            out[key] = crop.tolist() + [float(flip), float(jitter)]
    pipe.close()
    return out


def test_each_sample_draws_from_its_own_seed_whoever_loads_it():
    keys = [(0, i) for i in range(16)] + [(1, i) for i in range(16)]
    in_process = draws_of(0, keys)
    two_workers = draws_of(2, list(reversed(keys)))
    # The same (seed, epoch, index) draws the same numbers in the training process or a loader
    # worker, in any order: what a rank loads does not depend on the world size or the loader.
    assert in_process == two_workers
    # ... and different samples, epochs and seeds draw differently (torch, random and numpy alike).
    epoch0 = [tuple(in_process[(0, i)]) for i in range(16)]
    assert len(set(epoch0)) == 16
    assert all(in_process[(0, i)] != in_process[(1, i)] for i in range(16))
    assert draws_of(0, keys[:8], seed=8) != {k: in_process[k] for k in keys[:8]}


class RareDrawDataset(torch.utils.data.Dataset):
    """Draws from torch for every sample, from numpy only for sample 13 and from random only for 21."""

    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> torch.Tensor:
        extra = float(np.random.rand()) if i == 13 else (random.random() if i == 21 else 0.0)
        return torch.tensor([float(torch.rand(())), extra])


def test_random_and_numpy_are_seeded_once_a_sample_draws_from_them():
    keys = [(0, i) for i in range(32)]

    def loaded(num_workers: int, order: list[tuple[int, int]]) -> dict[tuple[int, int], list[float]]:
        pipe = InputPipeline(RareDrawDataset(), seed=3, settings=LoaderSettings(num_workers=num_workers))
        chunks = [order[k:k + 4] for k in range(0, len(order), 4)]
        pipe.submit(chunks)
        out = {key: row.tolist() for chunk in chunks for key, row in zip(chunk, pipe.next_batch(chunk))}
        pipe.close()
        return out

    # The draws of samples 13 and 21 are those of their own seeds, though the loader process only
    # starts seeding numpy and random when it meets them (the batch is loaded again).
    assert loaded(0, keys) == loaded(1, list(reversed(keys))) == loaded(2, keys)


def test_a_loader_process_leaves_unused_generators_unseeded(monkeypatch):
    monkeypatch.setattr("elastic.data.get_worker_info", lambda: object())  # as in a loader process
    data = SeededDataset(IndexDataset(), seed=0)
    random.seed(5)
    np.random.seed(5)
    expected = random.random(), float(np.random.rand())
    random.seed(5)
    np.random.seed(5)
    data.__getitems__([(0, 1), (0, 2)])
    assert (random.random(), float(np.random.rand())) == expected  # neither was seeded nor drawn from
    rare = SeededDataset(RareDrawDataset(), seed=0)
    first = rare.__getitems__([(0, 12), (0, 13)])
    assert rare._seeds_numpy and not rare._seeds_python
    for (key, got), index in zip(first, (12, 13)):  # each as if every generator had been seeded for it
        seed_everything(sample_seed(0, 0, index))
        assert key == (0, index) and got.tolist() == RareDrawDataset()[index].tolist()


def test_loading_in_process_leaves_the_training_random_state_alone():
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    expected = (torch.rand(3).tolist(), random.random(), float(np.random.rand()))
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    pipe = InputPipeline(DrawingDataset(), seed=0, settings=LoaderSettings(num_workers=0))
    pipe.submit(batches(range(0, 8)))
    pipe.next_batch(batches(range(0, 8))[0])
    assert (torch.rand(3).tolist(), random.random(), float(np.random.rand())) == expected


def test_derived_seeds_are_stable_and_distinct():
    assert derive_seed(0, "sample", 1, 2) == derive_seed(0, "sample", 1, 2)
    seeds = {sample_seed(s, e, i) for s in (0, 1) for e in (0, 1) for i in range(50)}
    assert len(seeds) == 200
    assert derive_seed(0, "step", 0, 5) != derive_seed(0, "step", 1, 5)
    assert 0 <= sample_seed(-3, 0, 0) < 2**63
    assert keys_checksum([(0, 1), (0, 2)]) != keys_checksum([(0, 2), (0, 1)])


def test_auto_num_workers_leaves_one_cpu_to_training(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert resolve_num_workers("auto", 1.0) == 1
    assert resolve_num_workers("auto", 8.0) == 4
    assert resolve_num_workers(0, 8.0) == 0
    monkeypatch.setattr("os.cpu_count", lambda: 1)
    assert resolve_num_workers("auto", 4.0) == 0


# ------------------------------------------------------------------------ the worker's step


def spec_of(**overrides):
    data = {"name": "controls", "task": "tests.workload_tasks:ControlsTask", "batch_size_per_worker": 16,
            "total_progress": 8, "optimizer": {"name": "task"}, "data": {"num_workers": 0}}
    return parse_job_spec(data, overrides=overrides)


def run_worker(spec, steps: int = 4) -> tuple[ElasticWorker, list[dict]]:
    worker = ElasticWorker(spec, "w0")
    sampler = ElasticSampler(len(worker.dataset), spec.seed)
    world, acc = 1, spec.accumulation_steps
    plans = sampler.plan_many(spec.global_batch_size(world), world, acc, steps)
    reports = worker.train_steps([p.packed_shard(0) for p in plans])
    assert all(r["ok"] for r in reports), reports[-1].get("error")
    return worker, reports


def test_task_optimizer_param_groups_scheduler_and_schedule_hook():
    worker, reports = run_worker(spec_of())
    inner = worker.opt.optimizer
    assert isinstance(inner, torch.optim.AdamW)
    assert [g["weight_decay"] for g in inner.param_groups] == [0.1, 0.0]
    # The torch scheduler stepped once per applied update (gamma 0.5 each) under AdaScale's gain.
    assert worker.lr_scheduler.last_epoch == 4
    assert worker.task.schedule_calls, "the task's lr_schedule(tau, total) hook was never consulted"
    assert "lr_scheduler" in worker.state()
    assert {"accuracy", "low_precision"} <= set(reports[-1]["metrics"])


def test_task_optimizer_needs_name_task():
    with pytest.raises(TaskError, match="optimizer: {name: task}"):
        ElasticWorker(spec_of(optimizer={"name": "sgd", "lr": 0.1}), "w0")
    spec = spec_of(optimizer={"name": "task"}, task_args={"use_build_optimizer": False})
    with pytest.raises(TaskError, match="needs a build_optimizer"):
        ElasticWorker(spec, "w0")


CLIP_BASE = {"accumulation_steps": 2, "task_args": {"schedule_hook": False}}


def test_clipping_leaves_adascale_statistics_alone():
    clipped, _ = run_worker(spec_of(**CLIP_BASE, training={"max_grad_norm": 1e-3}), steps=1)
    free_first, _ = run_worker(spec_of(**CLIP_BASE), steps=1)
    assert clipped.opt.num_estimates == free_first.opt.num_estimates > 0
    assert clipped.opt.grad_sqnorm == pytest.approx(free_first.opt.grad_sqnorm, rel=1e-6)
    assert clipped.opt.grad_variance == pytest.approx(free_first.opt.grad_variance, rel=1e-6)


def test_clipping_bounds_the_update_and_reports_the_norm():
    base = CLIP_BASE
    _, free_reports = run_worker(spec_of(**base), steps=1)
    clipped, clipped_reports = run_worker(spec_of(**base, training={"max_grad_norm": 1e-3}), steps=1)
    free_first, _ = run_worker(spec_of(**base), steps=1)
    assert clipped_reports[0]["metrics"]["grad_norm"] > 1e-3  # reported before clipping
    initial = list(ElasticWorker(spec_of(**base), "x").model.parameters())

    def moved(worker):
        return sum(float((a - b).detach().abs().sum()) for a, b in zip(worker.model.parameters(), initial))

    moved_free, moved_clipped = moved(free_first), moved(clipped)
    assert moved_clipped < moved_free
    assert "grad_norm" not in free_reports[0]["metrics"]


def test_bf16_autocasts_the_forward():
    _, fp32 = run_worker(spec_of(training={"precision": "fp32"}), steps=1)
    _, bf16 = run_worker(spec_of(training={"precision": "bf16"}), steps=1)
    assert fp32[0]["metrics"]["low_precision"] == 0.0
    assert bf16[0]["metrics"]["low_precision"] == 1.0
    assert np.isfinite(bf16[0]["loss"])


def test_fp16_uses_a_grad_scaler_whose_state_is_checkpointed():
    worker, reports = run_worker(spec_of(training={"precision": "fp16"}), steps=3)
    assert worker.precision.scaler is not None
    assert reports[0]["metrics"]["low_precision"] == 1.0
    assert "precision" in worker.state()


def test_rank_step_draws_are_reproducible_and_differ_by_step():
    def step_draws(seed: int) -> list[float]:
        spec = parse_job_spec({"name": "draws", "task": "tests.workload_tasks:DrawRecordingTask",
                               "batch_size_per_worker": 4, "total_progress": 8, "seed": seed,
                               "optimizer": {"name": "sgd", "lr": 0.1}, "data": {"num_workers": 0}})
        worker = ElasticWorker(spec, "w0")
        sampler = ElasticSampler(len(worker.dataset), spec.seed)
        draws = []
        for plan in sampler.plan_many(4, 1, 1, 3):
            worker.train_steps([plan.packed_shard(0)])
            draws.append(float(torch.rand(())))  # the state the step left behind
        return draws

    assert step_draws(0) == step_draws(0)
    assert len(set(step_draws(0))) == 3
    assert step_draws(0) != step_draws(1)


class BrokenSampleTask:
    def build_model(self):
        return torch.nn.Linear(4, 2)

    def train_dataset(self):
        class Broken(torch.utils.data.Dataset):
            def __len__(self):
                return 64

            def __getitem__(self, i):
                if i == 5:
                    raise ValueError("sample 5 is corrupt")
                return torch.zeros(4), torch.tensor(0)

        return Broken()

    def loss(self, model, batch):
        x, y = batch
        return torch.nn.functional.cross_entropy(model(x), y)

    def evaluate(self, model):
        return {}


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_failing_sample_is_reported_in_one_line_with_its_message(num_workers):
    spec = parse_job_spec({"name": "broken", "task": "tests.test_input_pipeline:BrokenSampleTask",
                           "batch_size_per_worker": 64, "total_progress": 4,
                           "optimizer": {"name": "sgd", "lr": 0.1}, "data": {"num_workers": num_workers}})
    worker = ElasticWorker(spec, "w0")
    plan = ElasticSampler(64, 0).plan(64, 1, 1)
    report = worker.train_steps([plan.packed_shard(0)])[0]
    assert not report["ok"] and not report["communication"]
    assert "ValueError: sample 5 is corrupt" in report["error"] and "\n" not in report["error"]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="raising priority needs CAP_SYS_NICE")
def test_worker_undoes_rays_niceness():
    # Ray starts worker processes at niceness 15; the training worker (and its loader processes)
    # go back to 0 where the process may do so.
    code = ("import os; os.nice(15); from elastic.worker import _normal_priority; "
            "_normal_priority(); print(os.getpriority(os.PRIO_PROCESS, 0))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "0"
