"""RayAutoscalerActuator with injected fakes: no Ray cluster needed."""

from __future__ import annotations

import pytest

from controller.actuators.base import ActuationError, Actuator, ActuatorConfigError
from controller.actuators.ray_autoscaler import ClusterSnapshot, NodeGroup, RayAutoscalerActuator, capacity_of


class FakeRay:
    """One live node holding ``totals`` (more with ``nodes``), and optionally autoscaler node types."""

    def __init__(self, totals: dict[str, float], nodes=None, groups=None) -> None:
        self.totals = totals
        self.nodes = nodes
        self.groups = groups
        self.requests: list[list[dict[str, float]]] = []
        self.fail = False

    def request_resources(self, *, bundles):
        if self.fail:
            raise ConnectionError("GCS unreachable")
        self.requests.append(bundles)

    def cluster_view(self):
        nodes = self.nodes if self.nodes is not None else [self.totals]
        return ClusterSnapshot(tuple(dict(n) for n in nodes), self.groups)


def make(fake: FakeRay, **kwargs) -> RayAutoscalerActuator:
    return RayAutoscalerActuator(
        {"GPU": 1, "CPU": 4},
        request_resources=fake.request_resources,
        cluster_view=fake.cluster_view,
        **kwargs,
    )


def test_is_an_actuator():
    actuator = make(FakeRay({}))
    assert isinstance(actuator, Actuator)
    assert actuator.name == "ray_autoscaler"


def test_capacity_is_the_scarcest_resource():
    fake = FakeRay({"GPU": 4.0, "CPU": 10.0, "memory": 1e12})
    assert make(fake).capacity_workers() == 2  # CPU: 10 // 4
    fake.totals = {"CPU": 64.0}  # no GPU at all
    assert make(fake).capacity_workers() == 0
    fake.totals = {"GPU": 0.30000000000000004 * 10, "CPU": 12.0}  # float sums still count whole
    assert make(fake).capacity_workers() == 3


def test_capacity_is_the_cluster_not_workers_max(caplog):
    """Issue 19: a cluster without an autoscaler showed max(cluster, workers.max) -- phantom workers."""
    fake = FakeRay({"GPU": 1.0, "CPU": 4.0})
    with caplog.at_level("WARNING"):
        assert make(fake, max_workers=16).capacity_workers() == 1
        assert make(fake, max_workers=1).capacity_workers() == 1
    assert "room for 1 worker(s), not workers.max=16" in caplog.text
    assert "no autoscaler" in caplog.text


def test_shortfall_is_reported_once_per_capacity(caplog):
    fake = FakeRay({"CPU": 3.0}, groups=None)
    actuator = RayAutoscalerActuator({"CPU": 1}, max_workers=5, cluster_view=fake.cluster_view,
                                     request_resources=fake.request_resources)
    with caplog.at_level("WARNING"):
        for _ in range(47):
            assert actuator.capacity_workers() == 3
    assert caplog.text.count("room for 3 worker(s), not workers.max=5") == 1
    assert "3 CPU on 1 live node(s)" in caplog.text


def test_workers_never_span_nodes():
    # 3 nodes of 3 CPUs: 9 CPUs in all, but a 2-CPU worker fits once per node
    snapshot = ClusterSnapshot(({"CPU": 3.0},) * 3)
    assert capacity_of(snapshot, {"CPU": 2.0}) == 3


def test_capacity_adds_what_the_autoscaler_can_start():
    head = {"CPU": 0.0}
    group = NodeGroup({"CPU": 8.0, "GPU": 2.0}, max_count=4)
    snapshot = ClusterSnapshot((head, {"CPU": 8.0, "GPU": 2.0}), (group,))
    assert capacity_of(snapshot, {"GPU": 1.0, "CPU": 4.0}) == 8  # 4 nodes x 2 workers
    assert capacity_of(snapshot, {"GPU": 1.0, "CPU": 4.0}, max_workers=5) == 5
    unbounded = ClusterSnapshot((head,), (NodeGroup({"CPU": 4.0, "GPU": 1.0}, max_count=-1),))
    assert capacity_of(unbounded, {"GPU": 1.0, "CPU": 4.0}, max_workers=12) == 12
    no_fit = ClusterSnapshot((head,), (NodeGroup({"CPU": 4.0}, max_count=-1),))  # no GPU node type
    assert capacity_of(no_fit, {"GPU": 1.0, "CPU": 4.0}, max_workers=12) == 0


def test_close_withdraws_the_request():
    """Issue 19: request_resources stayed in force after the job."""
    fake = FakeRay({})
    actuator = make(fake)
    actuator.close()
    assert fake.requests == []  # never asked: nothing to withdraw
    actuator.scale_to(3)
    actuator.close()
    assert fake.requests[-1] == []
    actuator.scale_to(3)  # a new request after close is made again
    assert fake.requests[-1] == [{"GPU": 1.0, "CPU": 4.0}] * 3


def test_scale_to_requests_bundles_once():
    fake = FakeRay({})
    actuator = make(fake)
    actuator.scale_to(3)
    assert fake.requests == [[{"GPU": 1.0, "CPU": 4.0}] * 3]
    actuator.scale_to(3)  # idempotent
    assert len(fake.requests) == 1
    actuator.scale_to(1, release=("w1", "w2"))  # lower the request; idle nodes go by themselves
    assert fake.requests[-1] == [{"GPU": 1.0, "CPU": 4.0}]
    actuator.scale_to(0)
    assert fake.requests[-1] == []


def test_errors_are_actuation_errors():
    fake = FakeRay({})
    fake.fail = True
    actuator = make(fake)
    with pytest.raises(ActuationError, match="request_resources\\(2 bundles\\) failed: GCS unreachable"):
        actuator.scale_to(2)
    fake.fail = False
    actuator.scale_to(2)  # a failed request is not remembered as done
    assert len(fake.requests) == 1

    def broken():
        raise RuntimeError("not connected")

    with pytest.raises(ActuationError, match="reading the cluster's resources failed"):
        RayAutoscalerActuator({"CPU": 1}, cluster_view=broken).capacity_workers()
    with pytest.raises(ActuationError, match="target_workers"):
        actuator.scale_to(-1)


@pytest.mark.parametrize(
    "resources, kwargs, match",
    [
        ({}, {}, "non-empty"),
        ({"GPU": 0}, {}, r"resources_per_worker\['GPU'\]"),
        ({"CPU": 1}, {"max_workers": -2}, "max_workers"),
    ],
)
def test_config_errors(resources, kwargs, match):
    with pytest.raises(ActuatorConfigError, match=match):
        RayAutoscalerActuator(resources, **kwargs)


def test_default_request_resources_is_rays():
    sdk = pytest.importorskip("ray.autoscaler.sdk")
    import inspect

    assert "bundles" in inspect.signature(sdk.request_resources).parameters
