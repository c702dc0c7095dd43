"""The two realistic examples, reduced, run elastic 1 -> 2 -> 1 on a local Ray cluster."""

from __future__ import annotations

import math

import pytest

from elastic.config import load_job_spec
from elastic.trainer import ElasticTrainer
from tests.elastic_runs import ROOT, check_exactly_once, read_ledger

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SCHEDULE = {"policy": "schedule", "interval_s": 0.5,
            "steps": [{"at_progress": 4, "workers": 2}, {"at_progress": 50, "workers": 1}]}


def run_reduced(tmp_path, yaml_name: str, **overrides):
    spec = load_job_spec(ROOT / "examples" / yaml_name, {
        "run_dir": str(tmp_path / "run"), "metrics": {"enabled": False, "log": True},
        "scaling": SCHEDULE, "checkpoint": {"every_steps": 1000}, **overrides})
    summary = ElasticTrainer(spec, ledger=True, show_progress=False).run()
    kinds = [(r.direction, r.from_workers, r.to_workers) for r in summary.resizes]
    assert ("grow", 1, 2) in kinds and ("shrink", 2, 1) in kinds, kinds
    evaluations = summary.extra["evaluations"]
    assert len(evaluations) >= 3, evaluations  # during training, and once at the end
    entries = read_ledger(tmp_path / "run")
    assert all(e["verified_ranks"] == len(e["consumed"]) for e in entries)
    return summary, entries


def test_jpeg_digits_example_reduced(tmp_path):
    from examples.jpeg_digits import JpegDigitsTask

    summary, entries = run_reduced(tmp_path, "jpeg_digits.yaml", total_progress=90,
                                   evaluation={"every_progress": 30},
                                   task_args={"width": 8, "lr": 0.004, "eval_limit": 200})
    check_exactly_once(entries, len(JpegDigitsTask(eval_limit=1).train), seed=0)
    assert summary.extra["loader_workers"] == 1
    assert summary.evaluation["accuracy"] > 0.3  # ten classes: chance is 0.1
    assert any("train_accuracy" in line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())


def test_charlm_example_reduced(tmp_path):
    summary, _ = run_reduced(tmp_path, "charlm.yaml", total_progress=80, evaluation={"every_progress": 25},
                             task_args={"block": 32, "dim": 64, "layers": 2, "heads": 2, "lr": 0.003,
                                        "max_bytes": 300_000, "val_chunks": 32})
    first, last = summary.extra["evaluations"][0], summary.evaluation
    assert last["val_loss"] < first["val_loss"] < math.log(256) + 0.5
    assert last["val_perplexity"] == pytest.approx(math.exp(last["val_loss"]))
    assert last["val_bits_per_byte"] < 6.0  # uniform bytes: 8 bits
