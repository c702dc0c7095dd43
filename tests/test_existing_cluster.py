"""Honest capacity on an existing Ray cluster (issue 19), against a real 3-CPU cluster without an
autoscaler: a start that cannot reach workers.min fails fast with exit 2; one that asks for more than
there is starts with what fits, says why once, and withdraws its resource request at the end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.ray]

ROOT = Path(__file__).resolve().parents[1]

# A head node with 3 CPUs, no autoscaler; the shared ray_current_cluster file is left as it was.
CLUSTER = """
import sys
from controller.actuators.local import local_ray_environment, preserved_file, ray_address_file
local_ray_environment(loopback=False)  # as the ray backend's driver does
from ray.cluster_utils import Cluster
with preserved_file(ray_address_file()):
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "include_dashboard": False})
print(cluster.address, flush=True)
sys.stdin.read()
with preserved_file(ray_address_file()):
    cluster.shutdown()
"""


@pytest.fixture(scope="module")
def three_cpu_cluster():
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen([sys.executable, "-c", CLUSTER], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        address = proc.stdout.readline().strip()
        assert address, "the test cluster did not start"
        yield address
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _run(tmp_path: Path, address: str, workers: dict, **changes) -> subprocess.CompletedProcess:
    spec = yaml.safe_load((ROOT / "examples/quickstart.yaml").read_text())
    spec.update({"name": "capacity", "total_progress": 60, "run_dir": str(tmp_path / "run"), "workers": workers,
                 "scaling": {"policy": "available", "interval_s": 0.5},
                 "cluster": {"backend": "ray", "address": address},
                 "checkpoint": {"every_steps": 1000}, "metrics": {"enabled": False}})
    spec.update(changes)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "COLUMNS": "400"}
    return subprocess.run([sys.executable, "-m", "elastic_app.cli", "run", str(tmp_path / "job.yaml"), "--quiet"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)


def test_a_start_below_workers_min_fails_fast(tmp_path, three_cpu_cluster):
    started = time.monotonic()
    out = _run(tmp_path, three_cpu_cluster, {"min": 4, "max": 5, "initial": 4})
    elapsed = time.monotonic() - started
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "room for 3 worker(s)" in errors[0] and "workers.min=4" in errors[0]
    assert elapsed < 90, f"took {elapsed:.0f} s"


def test_more_than_fits_starts_with_what_fits_and_clears_its_request(tmp_path, three_cpu_cluster):
    out = _run(tmp_path, three_cpu_cluster, {"min": 1, "max": 5, "initial": 5})
    assert out.returncode == 0, out.stderr[-3000:]
    log = (tmp_path / "run" / "train.log").read_text()
    assert "starting 3 worker(s), not workers.initial=5" in log
    assert log.count("room for 3 worker(s), not workers.max=5") == 1
    assert "3 CPU on 1 live node(s) and no autoscaler" in log
    decisions = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
                 if '"kind":"decision"' in line]
    assert all(d.get("desired", 0) <= 3 for d in decisions), decisions  # no phantom grow decisions
    assert "ray_autoscaler: resource request cleared" in log or "requested" not in log

    import ray
    from ray._private.ray_constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.experimental.internal_kv import _internal_kv_get

    ray.init(address=three_cpu_cluster, logging_level="ERROR")
    try:
        request = _internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)
    finally:
        ray.shutdown()
    assert request in (None, b"[]"), request  # nothing left asking the autoscaler for nodes
