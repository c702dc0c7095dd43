"""The driver side of the ElasticJob contract: publish status.trainer, follow status.targetWorkers."""

from __future__ import annotations

from controller.k8s_operator import TrainerReport
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
