"""Rank-aware randomness in real elastic runs: different draws per rank, the same draws when the run
is repeated, and the same augmentation of a sample whatever the number of workers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from elastic.config import parse_job_spec
from elastic_app.wiring import make_trainer

pytestmark = [pytest.mark.ray, pytest.mark.slow]

STEPS = 6


def run_draws(out: Path, workers: int, seed: int = 0) -> dict[int, list[dict]]:
    spec = parse_job_spec({
        "name": "seeding", "task": "tests.workload_tasks:DrawRecordingTask",
        "task_args": {"out_dir": str(out / "draws"), "n": 128},  # one epoch covers every step
        "batch_size_per_worker": 4, "total_progress": STEPS, "seed": seed,
        "optimizer": {"name": "sgd", "lr": 0.05}, "adascale": {"enabled": False},  # tau = steps
        "workers": {"min": 1, "max": 3, "initial": workers},
        "data": {"num_workers": 1},
        "metrics": {"enabled": False, "log": False}, "run_dir": str(out / "run"),
    })
    summary = make_trainer(spec, show_progress=False).run()
    assert summary.steps == STEPS
    return {int(p.stem.split("-")[1]): [json.loads(line) for line in p.read_text().splitlines()]
            for p in sorted((out / "draws").glob("draws-*.jsonl"))}


def test_draws_differ_per_rank_repeat_exactly_and_follow_the_sample(tmp_path):
    first = run_draws(tmp_path / "a", workers=3)
    again = run_draws(tmp_path / "b", workers=3)
    alone = run_draws(tmp_path / "c", workers=1)
    assert sorted(first) == [0, 1, 2] and all(len(v) == STEPS for v in first.values())
    assert {r["world_size"] for v in first.values() for r in v} == {3}

    # Different per rank: each step's own draw (dropout, noise) and the augmentation stream.
    for step in range(STEPS):
        draws = [first[rank][step]["step_draw"] for rank in range(3)]
        assert len(set(draws)) == 3, f"step {step}: ranks drew the same numbers {draws}"
        aug = [tuple(tuple(v) for v in first[rank][step]["samples"].values()) for rank in range(3)]
        assert len(set(aug)) == 3

    # Identical on a repeated run, rank by rank and step by step.
    assert again == first

    # A sample's augmentation depends on (seed, epoch, index) only: the one-worker run drew the
    # same crops and flips for the samples both runs loaded.
    by_sample_3 = {i: d for v in first.values() for r in v for i, d in r["samples"].items()}
    by_sample_1 = {i: d for r in alone[0] for i, d in r["samples"].items()}
    common = set(by_sample_3) & set(by_sample_1)
    assert len(common) == len(by_sample_1) == STEPS * 4
    assert all(by_sample_3[i] == by_sample_1[i] for i in common)
