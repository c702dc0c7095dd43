"""RayAutoscalerActuator with injected fakes: no Ray cluster needed."""

from __future__ import annotations

import pytest

from controller.actuators.base import ActuationError, Actuator, ActuatorConfigError
from controller.actuators.ray_autoscaler import RayAutoscalerActuator


class FakeRay:
    def __init__(self, totals: dict[str, float]) -> None:
        self.totals = totals
        self.requests: list[list[dict[str, float]]] = []
        self.fail = False

    def request_resources(self, *, bundles):
        if self.fail:
            raise ConnectionError("GCS unreachable")
        self.requests.append(bundles)

    def cluster_resources(self):
        return dict(self.totals)


def make(fake: FakeRay, **kwargs) -> RayAutoscalerActuator:
    return RayAutoscalerActuator(
        {"GPU": 1, "CPU": 4},
        request_resources=fake.request_resources,
        cluster_resources=fake.cluster_resources,
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


def test_capacity_reports_autoscaler_maximum():
    fake = FakeRay({"GPU": 1.0, "CPU": 4.0})
    assert make(fake, max_workers=16).capacity_workers() == 16


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

    with pytest.raises(ActuationError, match="cluster_resources failed"):
        RayAutoscalerActuator({"CPU": 1}, cluster_resources=broken).capacity_workers()
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
