"""User code reaches the workers (issue 19): the runtime_env section, the task's code root shipped by
default, Ray Client addresses refused with the form that works."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from controller.backends import BackendError, check_address, task_code_root, worker_runtime_env
from elastic.config import ConfigError, parse_job_spec

ROOT = Path(__file__).resolve().parents[1]

MYTASK = '''
import torch
from torch import nn


class MyTask:
    """A task that lives beside its job file, not in any installed package."""

    def build_model(self):
        torch.manual_seed(0)
        return nn.Linear(4, 2)

    def train_dataset(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(256, 4, generator=g)
        return torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long())

    def loss(self, model, batch):
        x, y = batch
        return nn.functional.cross_entropy(model(x), y)

    def evaluate(self, model):
        x, y = self.train_dataset().tensors
        return {"accuracy": float((model(x).argmax(1) == y).float().mean())}
'''


def spec(**changes):
    data = {"name": "code", "task": "examples.digits:DigitsTask", "batch_size_per_worker": 8, "total_progress": 10,
            "optimizer": {"name": "sgd", "lr": 0.1}, "run_dir": "/tmp/unused"}
    data.update(changes)
    return parse_job_spec(data)


def test_runtime_env_section_is_rays_and_validated():
    s = spec(runtime_env={"working_dir": ".", "pip": ["rich"], "env_vars": {"A": "1"}, "py_modules": ["pkg"]})
    assert s.runtime_env.working_dir == "." and s.runtime_env.pip == ["rich"]
    with pytest.raises(ConfigError, match="runtime_env.conda"):
        spec(runtime_env={"conda": "env.yaml"})
    assert spec().runtime_env.working_dir is None


def test_code_root_is_where_the_task_is_imported_from(tmp_path, monkeypatch):
    (tmp_path / "mytask.py").write_text(MYTASK)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert task_code_root("mytask:MyTask") == tmp_path.resolve()
    assert task_code_root("examples.digits:DigitsTask") == ROOT  # a package: its parent directory
    assert task_code_root("json:JSONDecoder") is None  # the standard library ships nothing
    assert task_code_root("torch.nn:Linear") is None  # an installed package ships nothing
    assert task_code_root("no_such_module_here:X") is None


def test_local_and_kuberay_put_the_code_root_on_the_workers_path(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/opt/lib")
    env = worker_runtime_env(spec(), tmp_path)
    assert env == {"env_vars": {"PYTHONPATH": f"{tmp_path}{os.pathsep}/opt/lib"}}
    kuberay = spec(cluster={"backend": "kuberay", "namespace": "ml", "raycluster": "rc", "group": "workers"})
    assert worker_runtime_env(kuberay, tmp_path) == env  # every pod runs the job's image


def test_remote_backends_upload_the_code_root_without_environments(tmp_path):
    env = worker_runtime_env(spec(cluster={"backend": "ray", "address": "auto"},
                                  runtime_env={"pip": ["rich"], "excludes": ["data/"]}), tmp_path)
    assert env["working_dir"] == str(tmp_path) and env["pip"] == ["rich"]
    assert {".venv", ".git", "runs", "data/"} <= set(env["excludes"])


def test_code_shipped_by_the_user_wins(tmp_path):
    env = worker_runtime_env(spec(cluster={"backend": "ray", "address": "auto"},
                                  runtime_env={"py_modules": ["/src/pkg"], "env_vars": {"X": "1"}}), tmp_path)
    assert "working_dir" not in env and env["py_modules"] == ["/src/pkg"] and env["env_vars"] == {"X": "1"}
    assert worker_runtime_env(spec(), None) == {}  # an installed task: nothing to ship


def test_ray_client_addresses_are_refused_with_the_form_that_works():
    for ok in (None, "auto", "10.0.0.1:6379"):
        check_address(ok)
    with pytest.raises(BackendError) as refused:
        check_address("ray://head:10001")
    message = str(refused.value)
    assert "\n" not in message and "Ray Client" in message and "address: auto" in message
    assert "ray job submit" in message


def _elastic_script() -> str:
    script = Path(sys.executable).parent / "elastic"
    if not script.exists():
        pytest.skip("the elastic console script is not installed in this environment")
    return str(script)


def test_ray_client_address_fails_fast_on_the_cli(tmp_path):
    (tmp_path / "job.yaml").write_text(
        "name: client\ntask: examples.digits:DigitsTask\nbatch_size_per_worker: 8\ntotal_progress: 10\n"
        "optimizer: {name: sgd, lr: 0.1}\ncluster: {backend: ray, address: 'ray://127.0.0.1:1'}\n")
    for command in ("run", "validate"):
        out = subprocess.run([sys.executable, "-m", "elastic_app.cli", command, str(tmp_path / "job.yaml")], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and out.stderr.count("error:") == 1 and "Ray Client" in out.stderr, out.stderr


@pytest.mark.ray
def test_a_task_beside_its_job_file_just_works(tmp_path):
    """`elastic run job.yaml` beside mytask.py, no PYTHONPATH: preflight and the workers import it."""
    (tmp_path / "mytask.py").write_text(MYTASK)
    (tmp_path / "job.yaml").write_text(
        "name: mytask\ntask: mytask:MyTask\nbatch_size_per_worker: 16\ntotal_progress: 30\n"
        "optimizer: {name: sgd, lr: 0.1}\nworkers: {min: 1, max: 1}\nmetrics: {enabled: false}\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "COLUMNS": "400"})
    started = time.monotonic()
    out = subprocess.run([_elastic_script(), "run", "job.yaml", "--quiet"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "mytask finished" in out.stdout and "accuracy" in out.stdout
    print(f"task beside the job file: finished in {time.monotonic() - started:.1f} s")
