"""The driver side of the ElasticJob contract: publish status.trainer, follow status.targetWorkers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from controller.k8s.contract import MAX_RELEASED_PODS, TrainerReport
from controller.operator_link import OperatorLink


class FakeClient:
    def __init__(self, target=None):
        self.published: list[TrainerReport] = []
        self.target = target

    def publish(self, report: TrainerReport) -> None:
        self.published.append(report)

    def target_workers(self):
        return self.target


class FakeTrainer:
    def __init__(self):
        self.target = 2
        self.calls = []

    def report(self):
        return {"workers": 2, "target_workers": self.target, "progress": 120.5, "gain": 1.8,
                "grad_variance": 3.0, "grad_sqnorm": 0.5, "step_time_s": {2: 0.05},
                "released_pods": ("job-ray-worker-abc",)}

    def target_workers(self):
        return self.target

    def set_target_workers(self, n, reason):
        self.calls.append((n, reason))
        self.target = n


def test_publishes_the_report_and_follows_a_new_target():
    client, trainer = FakeClient(target=4), FakeTrainer()
    link = OperatorLink(client, trainer)
    assert link.sync_once() == 4
    status = client.published[0].to_status()
    assert status["workers"] == 2 and status["progress"] == 120.5 and status["gain"] == 1.8
    assert status["releasedPods"] == ["job-ray-worker-abc"] and status["stepTimeS"] == {"2": 0.05}
    assert trainer.calls == [(4, "operator: status.targetWorkers")]
    link.sync_once()  # the same target again changes nothing
    assert len(trainer.calls) == 1


def test_no_target_yet_keeps_the_trainer_as_it_is():
    client, trainer = FakeClient(target=None), FakeTrainer()
    assert OperatorLink(client, trainer).sync_once() is None
    assert trainer.calls == [] and len(client.published) == 1


def test_released_pods_are_bounded_to_the_newest():
    # The trainer remembers every pod it released; status.trainer must not grow with the job's age.
    names = tuple(f"job-ray-workers-{i}" for i in range(100)) + ("job-ray-workers-7",)
    report = TrainerReport(workers=1, target_workers=1, released_pods=names)
    listed = report.to_status()["releasedPods"]
    assert len(listed) == MAX_RELEASED_PODS and listed[-1] == "job-ray-workers-99" and "job-ray-workers-7" not in listed
    assert TrainerReport.from_status(report.to_status()).released_pods == tuple(listed)


def test_the_driver_path_never_imports_kopf_or_the_handlers():
    """A driver pod runs `elastic run`; it must not load the operator (kopf, its handlers)."""
    probe = ("import sys, elastic, elastic_app.cli, elastic.trainer, controller.operator_link, controller.k8s.contract; "
             "print(sorted(m for m in sys.modules if m.split('.')[0] == 'kopf' "
             "or m in ('controller.k8s.handlers', 'controller.k8s_operator')))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_driver_with_a_bad_job_resource_gets_one_line(tmp_path):
    """`elastic run` in a driver whose ELASTIC_JOB_RESOURCE is not 'namespace/name': one line, no traceback."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "ELASTIC_JOB_RESOURCE": "digits", "RAY_AUTH_MODE": "disabled"}
    out = subprocess.run([sys.executable, "-m", "elastic_app.cli", "run", str(root / "examples" / "quickstart.yaml"),
                          "--set", f"run_dir={tmp_path / 'run'}", "--quiet"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert out.returncode != 0
    assert "ELASTIC_JOB_RESOURCE: must be 'namespace/name', got 'digits'" in out.stderr
    assert "Traceback" not in out.stderr and out.stderr.strip().count("\n") == 0
