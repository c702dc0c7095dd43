"""Two jobs on one machine (issue 19): the default metrics port falls back to a free one; the embedded
cluster never becomes what `address: auto` finds; samples/s is a recent rate; a cluster without room
for workers.min fails fast."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from controller.actuators.local import preserved_file
from elastic.config import MetricsConfig, parse_job_spec
from elastic.metrics import MetricsError
from elastic.progress import SampleRate
from elastic.run_metrics import start_exporter_or_free_port
from elastic.trainer import ElasticTrainer
from elastic_app.wiring import make_trainer


def _occupy(port: int) -> socket.socket | None:
    """Binds ``port`` on 127.0.0.1 (None when someone else already holds it: taken either way)."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        return sock
    except OSError:
        sock.close()
        return None


def test_the_default_metrics_port_falls_back_to_a_free_one():
    default = MetricsConfig()
    holder = _occupy(default.port)
    try:
        exporter = start_exporter_or_free_port(CollectorRegistry(), default)
        try:
            assert exporter.port not in (0, default.port)
            assert exporter.url.endswith(f":{exporter.port}/metrics") or f":{exporter.port}" in exporter.url
        finally:
            exporter.close()
        with pytest.raises(MetricsError, match="already in use"):  # a port the user chose is not replaced
            start_exporter_or_free_port(CollectorRegistry(), MetricsConfig(port=default.port))
    finally:
        if holder is not None:
            holder.close()


def test_the_address_file_is_put_back(tmp_path):
    path = tmp_path / "ray_current_cluster"
    with preserved_file(path):  # absent before: removed after
        path.write_text("127.0.0.1:7777")
    assert not path.exists()
    path.write_text("10.0.0.5:6379")  # someone's `ray start`
    with preserved_file(path):
        path.write_text("127.0.0.1:7777")
    assert path.read_text() == "10.0.0.5:6379"
    with preserved_file(path):
        path.unlink()  # what Cluster.shutdown() does
    assert path.read_text() == "10.0.0.5:6379"


def test_auto_finds_only_a_recorded_cluster(tmp_path):
    """Ray's own `auto` falls back to any GCS process on the machine -- another job's embedded cluster."""
    from controller.backends import BackendError, resolve_address

    recorded = tmp_path / "ray_current_cluster"
    with pytest.raises(BackendError, match="auto found no Ray cluster started with `ray start`"):
        resolve_address("auto", environ={}, address_file=recorded)
    recorded.write_text("10.0.0.5:6379\n")
    assert resolve_address("auto", environ={}, address_file=recorded) == "10.0.0.5:6379"
    assert resolve_address(None, environ={"RAY_ADDRESS": "10.0.0.9:6379"}, address_file=recorded) == "10.0.0.9:6379"
    assert resolve_address("10.0.0.7:6379", environ={"RAY_ADDRESS": "x"}, address_file=recorded) == "10.0.0.7:6379"


def test_samples_per_second_is_recent_not_since_start():
    """After a resume the restored sample count made the rate 147,191 samples/s."""
    rate = SampleRate()
    assert rate.recent(1000.0, 5_000_000) is None  # resumed at 5M samples: no rate yet
    assert rate.recent(1001.0, 5_000_100) == pytest.approx(100.0)
    for t in range(2, 40):  # slows to 10 samples/s: the window follows within RATE_WINDOW_S
        rate.recent(1000.0 + t, 5_000_100 + 10 * (t - 1))
    assert rate.recent(1040.0, 5_000_100 + 10 * 39) == pytest.approx(10.0, rel=0.01)


class _Actuator:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity

    def capacity_workers(self) -> int:
        return self.capacity


class _Backend:
    def __init__(self, capacity: int) -> None:
        self.actuator = _Actuator(capacity)

    def worker_actor_options(self):
        return {"num_cpus": 1.0}

    def startable_workers(self, minimum: int, initial: int) -> int:
        from controller.backends import startable_workers

        return startable_workers(self, minimum, initial)


def _trainer(tmp_path: Path, capacity: int) -> ElasticTrainer:
    spec = parse_job_spec({"name": "cap", "task": "examples.digits:DigitsTask", "batch_size_per_worker": 8,
                           "total_progress": 10, "optimizer": {"name": "sgd", "lr": 0.1},
                           "workers": {"min": 2, "max": 5, "initial": 5}, "run_dir": str(tmp_path)})
    trainer = make_trainer(spec, show_progress=False)
    trainer.backend = _Backend(capacity)
    return trainer


def test_start_uses_the_room_there_is_and_fails_fast_below_min(tmp_path, caplog):
    from controller.backends import BackendError

    trainer = _trainer(tmp_path, capacity=3)
    with caplog.at_level("WARNING"):
        assert trainer._startable_workers() == 3
    assert trainer.target_workers() == 3 and "not workers.initial=5" in caplog.text
    assert _trainer(tmp_path, capacity=9)._startable_workers() == 5
    with pytest.raises(BackendError, match="room for 1 worker.*fewer than workers.min=2"):
        _trainer(tmp_path, capacity=1)._startable_workers()


def test_unknown_room_starts_as_asked(tmp_path):
    from controller.actuators.base import ActuationError

    trainer = _trainer(tmp_path, capacity=0)

    def broken():
        raise ActuationError("kuberay: API unreachable")

    trainer.backend.actuator.capacity_workers = broken
    assert trainer._startable_workers() == 5


class _SlowGroup:
    """Workers that never get placed (the cluster's room is taken)."""

    pending = {"w0": object(), "w1": object()}

    def poll_ready(self):
        return []

    def wait_ready(self, count, timeout_s):
        import time

        time.sleep(min(timeout_s, 0.02))
        return []


def test_the_startup_wait_says_why_and_hears_a_stop(tmp_path, caplog, monkeypatch):
    """Issue 19: workers.initial above capacity waited 300 s in silence and ignored Ctrl-C."""
    import threading
    import time

    import elastic.startup as startup

    monkeypatch.setattr(startup, "STARTUP_NOTICE_S", 0.05)
    trainer = _trainer(tmp_path, capacity=5)
    trainer.group = _SlowGroup()
    threading.Timer(0.3, trainer.request_stop).start()
    started = time.monotonic()
    with caplog.at_level("WARNING"):
        assert startup.wait_ready_or_stop(trainer.group, 2, trainer._stop) == []
    assert time.monotonic() - started < 5
    assert caplog.text.count("2 of 2 worker(s) not started after") == 1
