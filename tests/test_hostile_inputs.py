"""Hostile input: malformed job specs and environments end in one line and exit code 2, never a traceback.

Every CLI case runs ``python -m elastic_app.cli run JOB`` (or ``validate`` / ``report``) in a fresh
subprocess, as a user would. The subprocesses start in parallel in one module-scoped fixture (each
needs a few seconds of imports on this machine); every case is then checked in its own test:

- exit code 2;
- stderr is exactly one line, it starts with ``error:`` and names the field or cause;
- no ``Traceback`` on stdout or stderr.

The ElasticJob cases are not CLI cases: the mutated sample must be rejected by the CRD's
openAPIV3Schema (jsonschema) or by its CEL rules (as transcribed in tests/test_k8s_manifests.py).

``ELASTIC_HOSTILE_TABLE=path.md`` writes the table of cases and their messages (for the README).
"""

from __future__ import annotations

import concurrent.futures
import copy
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CASE_TIMEOUT_S = 60
PARALLEL = 3

#: A valid job that would finish in seconds; every case breaks one thing of it.
BASE: dict[str, Any] = {
    "name": "hostile",
    "task": "tests.hostile_tasks:GoodTask",
    "batch_size_per_worker": 8,
    "total_progress": 20,
    "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
    "workers": {"min": 1, "max": 2, "initial": 1},
    "scaling": {"policy": "fixed"},
    "cluster": {"backend": "local"},
    "checkpoint": {"every_steps": 10},
    "metrics": {"enabled": False},
    "run_dir": "{tmp}/run",
}

DROP = object()  # remove the key
BROKEN_MODULE = "hostile_broken_import"  # written into the case directory; raises at import


@dataclass(frozen=True)
class Case:
    """One hostile input and the text its error line must contain.

    ``changes`` maps dotted paths of BASE to new values (DROP removes the key); ``text`` replaces the
    whole file; ``job`` names the job path instead. Strings may hold ``{tmp}`` (the case's directory),
    ``{busy_port}`` (a port a socket listens on) and ``{closed_port}`` (a port nothing listens on).
    """

    id: str
    expect: str
    changes: dict[str, Any] = field(default_factory=dict)
    text: str | None = None
    job: str | None = None
    command: str = "run"
    args: tuple[str, ...] = ()
    what: str = ""  # the hostile input, in words (for the table)


CASES: list[Case] = [
    # -- wrong types
    Case("batch-size-string", "batch_size_per_worker: must be a valid integer",
         {"batch_size_per_worker": "32"}, what='batch_size_per_worker: "32"'),
    Case("batch-size-bool", "batch_size_per_worker: must be a valid integer",
         {"batch_size_per_worker": True}, what="batch_size_per_worker: true"),
    Case("workers-list", "workers: must be a mapping", {"workers": [1, 4]}, what="workers: [1, 4]"),
    Case("lr-string", "optimizer.lr:", {"optimizer.lr": "fast"}, what='optimizer.lr: "fast"'),
    Case("name-not-dns", "name: must be a DNS-1123 label", {"name": "My_Job"}, what="name: My_Job"),
    # -- unknown keys
    Case("unknown-top-level-key", "lr_shedule: unknown key; did you mean 'lr_schedule'?",
         {"lr_shedule": {"kind": "constant"}}, what="lr_shedule: {...} (typo)"),
    Case("unknown-nested-key", "optimizer.momentom: unknown key; did you mean 'momentum'?",
         {"optimizer.momentom": 0.9}, what="optimizer.momentom: 0.9 (typo)"),
    # -- ranges and cross-field rules
    Case("min-above-max", "workers.min: must be <= workers.max (got min=3, max=2)",
         {"workers": {"min": 3, "max": 2, "initial": 2}}, what="workers: {min: 3, max: 2}"),
    Case("initial-outside-range", "workers.initial: must be within workers.min..workers.max = 1..2 (got 5)",
         {"workers.initial": 5}, what="workers.initial: 5 with max 2"),
    Case("batch-size-zero", "batch_size_per_worker: must be >= 1", {"batch_size_per_worker": 0},
         what="batch_size_per_worker: 0"),
    Case("workers-min-zero", "workers.min: must be >= 1", {"workers.min": 0}, what="workers.min: 0"),
    Case("accumulation-negative", "accumulation_steps: must be >= 1", {"accumulation_steps": -1},
         what="accumulation_steps: -1"),
    Case("total-progress-zero", "total_progress: must be > 0", {"total_progress": 0}, what="total_progress: 0"),
    Case("total-progress-negative", "total_progress: must be > 0", {"total_progress": -5},
         what="total_progress: -5"),
    Case("lr-zero", "optimizer.lr: must be > 0", {"optimizer.lr": 0}, what="optimizer.lr: 0"),
    Case("lr-negative", "optimizer.lr: must be > 0", {"optimizer.lr": -0.1}, what="optimizer.lr: -0.1"),
    Case("milestones-not-increasing", "lr_schedule.milestones: must be strictly increasing",
         {"lr_schedule": {"kind": "step", "milestones": [0.75, 0.5]}}, what="lr_schedule.milestones: [0.75, 0.5]"),
    Case("schedule-step-outside-range", "scaling.steps[0].workers: must be within workers.min..workers.max = 1..2",
         {"scaling": {"policy": "schedule", "steps": [{"at_progress": 5, "workers": 8}]}},
         what="scaling.steps: [{at_progress: 5, workers: 8}] with max 2"),
    Case("policy-unknown", "scaling.policy: must be 'schedule', 'available', 'goodput' or 'fixed'",
         {"scaling.policy": "fastest"}, what="scaling.policy: fastest"),
    Case("backend-unknown", "cluster.backend: must be 'local', 'ray' or 'kuberay'",
         {"cluster.backend": "slurm"}, what="cluster.backend: slurm"),
    Case("ray-backend-without-address", "cluster.address: required for backend=ray",
         {"cluster.backend": "ray"}, what="cluster.backend: ray, no address"),
    # -- missing fields, broken files
    Case("missing-task", "task: required field is missing", {"task": DROP}, what="no task"),
    Case("missing-optimizer", "optimizer: required field is missing", {"optimizer": DROP}, what="no optimizer"),
    Case("yaml-not-a-mapping", "the job spec must be a mapping of keys to values (got list)",
         text="- name: hostile\n- task: x\n", what="the YAML is a list"),
    Case("yaml-syntax-error", "not valid YAML (line 3", text="name: hostile\nworkers: {min: 1\nseed: 0\n",
         what="an unclosed flow mapping"),
    Case("missing-file", "no-such-job.yaml: no such file", job="{tmp}/no-such-job.yaml", what="the job file does not exist"),
    Case("job-is-a-directory", "is a directory, not a job spec file", job="{tmp}", what="the job path is a directory"),
    Case("empty-file", "the job spec is empty", text="", what="an empty file"),
    Case("duplicate-keys", "duplicate key 'seed'", text="name: hostile\nseed: 0\nseed: 1\n", what="seed given twice"),
    # -- the task
    Case("task-without-colon", "task: must be an import path 'package.module:ClassName'",
         {"task": "tests.hostile_tasks.GoodTask"}, what="task: tests.hostile_tasks.GoodTask"),
    Case("task-module-missing", "task: cannot import module 'no_such_package.tasks': ModuleNotFoundError",
         {"task": "no_such_package.tasks:Task"}, what="task module does not exist"),
    Case("task-module-raises", f"task: cannot import module '{BROKEN_MODULE}': ZeroDivisionError",
         {"task": f"{BROKEN_MODULE}:Task"}, what="task module raises at import"),
    Case("task-class-missing", "task: module 'tests.hostile_tasks' has no attribute 'MissingTask'",
         {"task": "tests.hostile_tasks:MissingTask"}, what="task class does not exist"),
    Case("task-constructor-raises", "tests.hostile_tasks:ConstructorRaisesTask(**task_args) raised FileNotFoundError",
         {"task": "tests.hostile_tasks:ConstructorRaisesTask"}, what="the task's constructor raises"),
    Case("task-args-unknown", "raised TypeError", {"task_args": {"num_sample": 64}},
         what="task_args: {num_sample: 64} (no such argument)"),
    Case("task-not-a-task", "lacks the method(s) loss, evaluate", {"task": "tests.hostile_tasks:NoLossTask"},
         what="the class lacks loss() and evaluate()"),
    Case("train-dataset-raises", "DatasetRaisesTask.train_dataset() raised RuntimeError: dataset shard 3 is corrupt",
         {"task": "tests.hostile_tasks:DatasetRaisesTask"}, what="train_dataset() raises"),
    Case("dataset-not-map-style", "train_dataset() must return a map-style dataset with len()",
         {"task": "tests.hostile_tasks:IterableDatasetTask"}, what="train_dataset() is an IterableDataset"),
    Case("dataset-smaller-than-batch", "dataset has 10 samples, smaller than one global batch of 16 at workers.max=2",
         {"task": "tests.hostile_tasks:TenSamplesTask"}, what="10 samples, global batch 2 x 8"),
    # -- the environment
    Case("metrics-port-in-use", "metrics.port: {busy_port} is already in use on 127.0.0.1",
         {"metrics": {"enabled": True, "port": "{busy_port}"}}, what="metrics.port already bound"),
    Case("metrics-addr-not-local", "metrics.addr: cannot bind 192.0.2.1",
         {"metrics": {"enabled": True, "addr": "192.0.2.1", "port": 0}}, what="metrics.addr: 192.0.2.1 (not this host)"),
    Case("checkpoint-dir-unwritable", "checkpoint.dir: cannot write to {tmp}/a-file/checkpoints",
         {"checkpoint.dir": "{tmp}/a-file/checkpoints"}, what="checkpoint.dir under a regular file"),
    Case("run-dir-unwritable", "run_dir: cannot write to {tmp}/a-file/run", {"run_dir": "{tmp}/a-file/run"},
         what="run_dir under a regular file"),
    Case("cluster-address-unreachable", "cluster.address: cannot reach 127.0.0.1:{closed_port} (Connection refused)",
         args=("--cluster-address", "127.0.0.1:{closed_port}"), what="--cluster-address 127.0.0.1:CLOSED"),
    Case("ray-client-address", "is a Ray Client address, which elastic does not support",
         {"cluster": {"backend": "ray", "address": "ray://127.0.0.1:{closed_port}"}},
         what="cluster.address: ray://127.0.0.1:CLOSED (refused before connecting)"),
    # -- the command line
    Case("set-without-equals", "override 'workers.max': expected KEY=VALUE", args=("--set", "workers.max"),
         what="--set workers.max"),
    Case("set-invalid-value", "workers.max: must be >= 1", args=("--set", "workers.max=0"), what="--set workers.max=0"),
    Case("set-into-a-scalar", "override 'name.first': name is not a mapping", args=("--set", "name.first=x"),
         what="--set name.first=x"),
    Case("validate-bad-set", "override 'seed=[1': value is not valid YAML", command="validate",
         args=("--set", "seed=[1"), what="validate --set seed=[1"),
    Case("report-missing-run-dir", "does not exist", command="report", job="{tmp}/no-such-run",
         what="report on a missing run dir"),
]

#: A spec with five independent errors: `elastic validate` must list them all.
FIVE_ERRORS = {
    "batch_size_per_worker": 0,
    "workers": {"min": 3, "max": 2, "initial": 2},
    "optimizer.lr": -1,
    "seeed": 1,
    "scaling.policy": "fastest",
}
FIVE_ERROR_FIELDS = ["batch_size_per_worker:", "workers.min:", "optimizer.lr:", "seeed:", "scaling.policy:"]


# ------------------------------------------------------------------ building and running the cases


def _fill(value: Any, env: dict[str, str]) -> Any:
    """Replaces {tmp}, {busy_port}, {closed_port} in strings (a whole-string port becomes an int)."""
    if isinstance(value, str):
        text = value.format(**env)
        return int(text) if value in ("{busy_port}", "{closed_port}") else text
    if isinstance(value, dict):
        return {k: _fill(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, env) for v in value]
    return value


def _spec(changes: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    spec = _fill(copy.deepcopy(BASE), env)
    for path, value in changes.items():
        *parents, leaf = path.split(".")
        node = spec
        for key in parents:
            node = node.setdefault(key, {})
        if value is DROP:
            node.pop(leaf, None)
        else:
            node[leaf] = _fill(value, env)
    return spec


def _command(case: Case, case_dir: Path, env: dict[str, str]) -> list[str]:
    case_dir.mkdir(parents=True, exist_ok=True)
    (case_dir / "a-file").write_text("a regular file, not a directory\n")
    if case.job is not None:
        job = _fill(case.job, env)
    else:
        job = str(case_dir / "job.yaml")
        text = case.text if case.text is not None else yaml.safe_dump(_spec(case.changes, env), sort_keys=False)
        Path(job).write_text(text)
    return [sys.executable, "-m", "elastic_app.cli", case.command, job, *(_fill(a, env) for a in case.args)]


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str
    elapsed_s: float


def _run(argv: list[str], extra_path: Path) -> Result:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(extra_path)]),
           "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "COLUMNS": "200"}
    started = time.monotonic()
    process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=CASE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the whole group: a cluster it started, if any
        stdout, stderr = process.communicate()
        stderr += f"\n[killed after {CASE_TIMEOUT_S} s]"
    return Result(process.returncode, stdout, stderr, time.monotonic() - started)


@pytest.fixture(scope="module")
def ports():
    """A port a socket listens on (busy) and one nothing listens on (closed)."""
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    yield busy.getsockname()[1], closed
    busy.close()


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory, ports) -> dict[str, tuple[Result, dict[str, str]]]:
    """Runs every CLI case (and the validate cases) in parallel subprocesses; id -> (result, env)."""
    root = tmp_path_factory.mktemp("hostile")
    (root / f"{BROKEN_MODULE}.py").write_text("import torch\n\nRATE = 1 / 0\n\n\nclass Task:\n    pass\n")
    busy, closed = ports
    jobs: dict[str, tuple[list[str], dict[str, str]]] = {}
    for case in [*CASES, *_EXTRA]:
        case_dir = root / case.id
        env = {"tmp": str(case_dir), "busy_port": str(busy), "closed_port": str(closed)}
        jobs[case.id] = (_command(case, case_dir, env), env)
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(PARALLEL) as pool:
        futures = {cid: pool.submit(_run, argv, root) for cid, (argv, _) in jobs.items()}
        results = {cid: (f.result(), jobs[cid][1]) for cid, f in futures.items()}
    print(f"\n{len(results)} CLI subprocesses in {time.monotonic() - started:.1f} s "
          f"({PARALLEL} at a time; slowest {max(r.elapsed_s for r, _ in results.values()):.1f} s)")
    _write_table(results)
    return results


_EXTRA = [
    Case("validate-five-errors", "", FIVE_ERRORS, command="validate"),
    Case("validate-spec-and-task-errors", "", {"batch_size_per_worker": 0, "task": "no_such_package.tasks:Task"},
         command="validate"),
    Case("validate-valid", "", command="validate"),
    Case("validate-quickstart", "", job=str(ROOT / "examples" / "quickstart.yaml"), command="validate"),
]


def _write_table(results: dict[str, tuple[Result, dict[str, str]]]) -> None:
    out = os.environ.get("ELASTIC_HOSTILE_TABLE")
    if not out:
        return
    lines = ["| hostile input | command | exit | message (stderr) |", "|---|---|---|---|"]
    for case in CASES:
        result, env = results[case.id]
        message = " / ".join(line for line in result.stderr.splitlines() if line.startswith("error:"))
        message = message.replace(env["tmp"], "$TMP").replace(env["busy_port"], "PORT").replace(env["closed_port"], "PORT")
        lines.append(f"| {case.what or case.id} | {case.command} | {result.returncode} | `{message}` |")
    Path(out).write_text("\n".join(lines) + "\n")


def _no_traceback(result: Result) -> None:
    assert "Traceback" not in result.stdout and "Traceback" not in result.stderr, result.stderr[-3000:]


# ------------------------------------------------------------------ the checks


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input_gives_one_line_and_exit_2(case, cli_results):
    result, env = cli_results[case.id]
    _no_traceback(result)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    if case.command == "validate":  # validate ends with its count: "JOB: 1 error(s)"
        assert lines and lines[-1].endswith(": 1 error(s)"), result.stderr[-3000:]
        lines = lines[:-1]
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("error: "), lines
    assert case.expect.format(**env) in lines[0], lines[0]


def test_cases_are_many_and_distinct():
    assert len(CASES) >= 25
    assert len({c.id for c in CASES}) == len(CASES)


def test_validate_lists_all_five_errors(cli_results):
    result, _ = cli_results["validate-five-errors"]
    _no_traceback(result)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 5, result.stderr
    for name in FIVE_ERROR_FIELDS:
        assert sum(line.startswith(f"error: {name}") for line in errors) == 1, (name, errors)
    assert "5 error(s)" in result.stderr


def test_validate_checks_the_task_even_when_the_spec_has_other_errors(cli_results):
    result, _ = cli_results["validate-spec-and-task-errors"]
    _no_traceback(result)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2, result.stderr
    assert errors[0].startswith("error: batch_size_per_worker: must be >= 1")
    assert errors[1].startswith("error: task: cannot import module 'no_such_package.tasks'")


@pytest.mark.parametrize("case_id", ["validate-valid", "validate-quickstart"])
def test_valid_spec_validates(case_id, cli_results):
    result, _ = cli_results[case_id]
    _no_traceback(result)
    assert result.returncode == 0, result.stderr
    assert ": OK (" in result.stdout and result.stderr.strip() == ""


# ------------------------------------------------------------------ an ElasticJob the CRD rejects


K8S_CASES = {
    # id: (dotted path in the sample ElasticJob, new value or KeyError to delete, expected schema error)
    "elasticjob-min-above-max": ("spec.workers.min", 5, "CEL: self.min <= self.max"),
    "elasticjob-missing-image": ("spec.image", KeyError, "'image' is a required property"),
    "elasticjob-workers-zero": ("spec.workers.max", 0, "less than the minimum of 1"),
}


@pytest.mark.parametrize("case_id", list(K8S_CASES))
def test_elasticjob_rejected_by_the_crd(case_id):
    pytest.importorskip("jsonschema")
    pytest.importorskip("kubernetes_validate")
    from tests.test_k8s_manifests import _bad, schema_errors

    path, value, expected = K8S_CASES[case_id]
    assert schema_errors(_bad("spec.workers.min", 1)) == []  # the unmodified sample passes
    errors = schema_errors(_bad(path, value))
    assert any(expected in e for e in errors), errors


# ------------------------------------------------------------------ the pieces, in process (fast)


def test_preflight_in_process():
    from elastic_app.cli import preflight
    from elastic.config import parse_job_spec
    from elastic.task import TaskError

    spec = {k: v for k, v in BASE.items() if k != "run_dir"}
    preflight(parse_job_spec(spec))  # 256 samples >= 2 x 8
    with pytest.raises(TaskError, match=r"dataset has 256 samples, smaller than one global batch of 320 at workers.max=4"):
        preflight(parse_job_spec(spec, {"workers.max": 4, "batch_size_per_worker": 16, "accumulation_steps": 5}))
    with pytest.raises(TaskError, match=r"DatasetRaisesTask.train_dataset\(\) raised RuntimeError"):
        preflight(parse_job_spec(spec, {"task": "tests.hostile_tasks:DatasetRaisesTask"}))
    with pytest.raises(TaskError, match=r"no attribute 'NOT_A_CLASS_'"):
        preflight(parse_job_spec(spec, {"task": "tests.hostile_tasks:NOT_A_CLASS_"}))
    with pytest.raises(TaskError, match=r"NOT_A_CLASS\(\*\*task_args\) raised TypeError"):
        preflight(parse_job_spec(spec, {"task": "tests.hostile_tasks:NOT_A_CLASS"}))


@pytest.mark.parametrize("address, expected", [
    ("127.0.0.1:6379", ("127.0.0.1", 6379)),
    ("ray://head.example:10001", ("head.example", 10001)),
    ("[::1]:6379", ("::1", 6379)),
    ("auto", None),
    ("local", None),
    ("http://head:8265", None),
    ("head:port", None),
])
def test_host_port(address, expected):
    from controller.backends import host_port

    assert host_port(address) == expected


def test_check_reachable(ports):
    from controller.backends import BackendError, check_reachable

    busy, closed = ports
    check_reachable(f"127.0.0.1:{busy}")  # something listens: no error
    check_reachable("auto")  # not host:port: left to ray.init
    started = time.monotonic()
    with pytest.raises(BackendError, match=rf"^cluster.address: cannot reach 127.0.0.1:{closed} \("):
        check_reachable(f"ray://127.0.0.1:{closed}")
    assert time.monotonic() - started < 3.5
    with pytest.raises(BackendError, match=r"port must be in 1..65535"):
        check_reachable("127.0.0.1:70000")
