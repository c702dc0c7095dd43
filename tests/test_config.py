"""Job spec: the DESIGN.md example parses; malformed specs give one-line errors naming the field."""

from __future__ import annotations

import copy
import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from elastic.config import (
    ConfigError,
    JobSpec,
    WorkersConfig,
    load_job_spec,
    parse_job_spec,
    parse_overrides,
    validate_job_spec,
)

# Verbatim from DESIGN.md ("Job spec (YAML) and CLI"), comments included.
DESIGN_EXAMPLE = """\
name: digits-quickstart
task: examples.digits:DigitsTask        # import path of a Task; task_args passed to it
task_args: {}
batch_size_per_worker: 32               # scale 1 = one worker's batch
accumulation_steps: 1
total_progress: 3000                    # tau at which training stops (scale-1 iterations)
optimizer: {name: sgd, lr: 0.1, momentum: 0.9, weight_decay: 5.0e-4}
lr_schedule: {kind: step, milestones: [0.5, 0.75], gamma: 0.1}   # milestones as fractions of total_progress
adascale: {enabled: true}
workers: {min: 1, max: 4, initial: 1}
scaling: {policy: schedule, steps: [{at_progress: 600, workers: 4}, {at_progress: 1800, workers: 2}]}
cluster: {backend: local}               # local | ray (address) | kuberay (namespace, raycluster, group)
checkpoint: {dir: runs/digits-quickstart/checkpoints, every_steps: 100}
metrics: {addr: 127.0.0.1, port: 9464}
"""

MINIMAL = {
    "name": "tiny",
    "task": "examples.digits:DigitsTask",
    "batch_size_per_worker": 8,
    "total_progress": 100,
    "optimizer": {"name": "sgd", "lr": 0.1},
}


def write(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def with_changes(**changes) -> dict:
    spec = copy.deepcopy(MINIMAL)
    for key, value in changes.items():
        spec[key] = value
    return spec


# -- valid specs ------------------------------------------------------------------------------


def test_design_example_parses_unchanged(tmp_path):
    spec = load_job_spec(write(tmp_path, DESIGN_EXAMPLE))
    assert spec.name == "digits-quickstart"
    assert spec.task == "examples.digits:DigitsTask"
    assert spec.batch_size_per_worker == 32 and spec.total_progress == 3000.0
    assert (spec.optimizer.name, spec.optimizer.lr, spec.optimizer.momentum) == ("sgd", 0.1, 0.9)
    assert spec.optimizer.weight_decay == pytest.approx(5e-4)
    assert spec.lr_schedule.milestones == (0.5, 0.75) and spec.lr_schedule.gamma == 0.1
    assert (spec.workers.min, spec.workers.max, spec.workers.initial) == (1, 4, 1)
    assert [(s.at_progress, s.workers) for s in spec.scaling.steps] == [(600.0, 4), (1800.0, 2)]
    assert spec.cluster.backend == "local"
    assert spec.checkpoint.dir == "runs/digits-quickstart/checkpoints"
    assert (spec.metrics.addr, spec.metrics.port) == ("127.0.0.1", 9464)
    assert spec.global_batch_size(4) == 128


def test_defaults_of_a_minimal_spec():
    spec = parse_job_spec(MINIMAL)
    assert spec.accumulation_steps == 1 and spec.seed == 0 and spec.task_args == {}
    assert spec.lr_schedule.kind == "constant" and spec.adascale.enabled
    assert (spec.workers.min, spec.workers.max, spec.workers.initial) == (1, 1, 1)
    assert spec.scaling.policy == "fixed" and spec.scaling.interval_s == 2.0
    assert spec.cluster.backend == "local" and spec.cluster.num_cpus_per_worker == 1 and not spec.cluster.use_gpu
    assert spec.run_dir == "runs/tiny"
    assert (spec.checkpoint.dir, spec.checkpoint.every_steps, spec.checkpoint.keep_last) == ("runs/tiny/checkpoints", 100, 3)
    assert spec.metrics.enabled and spec.metrics.addr == "127.0.0.1" and spec.metrics.log
    assert spec.failure.max_consecutive_skipped_steps == 10 and spec.failure.wait_for_workers_s == 60


def test_initial_workers_default_to_min_and_checkpoint_dir_follows_run_dir():
    spec = parse_job_spec(with_changes(workers={"min": 2, "max": 6}, run_dir="/data/run7"))
    assert spec.workers.initial == 2
    assert spec.checkpoint.dir == "/data/run7/checkpoints"


def test_full_featured_spec_parses():
    spec = parse_job_spec(
        with_changes(
            optimizer={"name": "adamw", "lr": "1e-3", "betas": [0.9, 0.95], "weight_decay": 0.01},
            lr_schedule={"kind": "cosine", "warmup_fraction": 0.05},
            workers={"min": 1, "max": 8, "initial": 2},
            scaling={"policy": "schedule", "steps": [{"at_time_s": 30, "workers": 4}, {"at_progress": 50, "workers": 8}]},
            cluster={"backend": "kuberay", "namespace": "ml", "raycluster": "rc", "group": "workers", "use_gpu": True},
        )
    )
    assert spec.optimizer.lr == pytest.approx(1e-3)  # YAML 1.1 reads 1e-3 as a string
    assert spec.optimizer.betas == (0.9, 0.95)
    assert spec.scaling.steps[0].at_time_s == 30 and spec.scaling.steps[0].at_progress is None
    assert spec.cluster.group == "workers"


def test_spec_is_frozen():
    spec = parse_job_spec(MINIMAL)
    with pytest.raises(ValidationError):
        spec.batch_size_per_worker = 64  # type: ignore[misc]
    with pytest.raises(ValidationError):
        spec.workers.max = 9  # type: ignore[misc]


def test_sections_validate_on_their_own():
    with pytest.raises(ValidationError):
        WorkersConfig(min=3, max=2)
    assert WorkersConfig(min=2, max=3).initial == 2


def test_field_docstrings_become_schema_descriptions():
    schema = JobSpec.model_json_schema()
    assert "DNS-1123" in schema["properties"]["name"]["description"]
    assert "0 picks a free port" in schema["$defs"]["MetricsConfig"]["properties"]["port"]["description"]


# -- malformed specs: one line each, field path first -------------------------------------------

MALFORMED = [
    ({"optimzer": {"name": "sgd", "lr": 0.1}}, "optimzer: unknown key; did you mean 'optimizer'?"),
    ({"workers": {"min": 5, "max": 2}}, "workers.min: must be <= workers.max (got min=5, max=2)"),
    ({"workers": {"min": 1, "max": 4, "initial": 6}}, "workers.initial: must be within workers.min..workers.max = 1..4 (got 6)"),
    ({"workers": {"min": 0, "max": 2}}, "workers.min: must be >= 1 (got 0)"),
    ({"workers": {"min": 1, "max": 4, "inital": 2}}, "workers.inital: unknown key; did you mean 'initial'?"),
    ({"workers": 4}, "workers: must be a mapping of keys to values (got 4)"),
    ({"batch_size_per_worker": 0}, "batch_size_per_worker: must be >= 1 (got 0)"),
    ({"batch_size_per_worker": "32"}, "batch_size_per_worker: must be a valid integer (got '32')"),
    ({"batch_size_per_worker": 2.5}, "batch_size_per_worker: must be a valid integer (got 2.5)"),
    ({"accumulation_steps": -1}, "accumulation_steps: must be >= 1 (got -1)"),
    ({"total_progress": 0}, "total_progress: must be > 0 (got 0)"),
    ({"total_progress": -5.5}, "total_progress: must be > 0 (got -5.5)"),
    ({"total_progress": True}, "total_progress: must be a number, not a boolean (got True)"),
    ({"name": "Digits_Run"}, "name: must be a DNS-1123 label: lowercase letters, digits and '-', starting and ending with a letter or digit, at most 63 characters (got 'Digits_Run')"),
    ({"task": "examples.digits.DigitsTask"}, "task: must be an import path 'package.module:ClassName' (got 'examples.digits.DigitsTask')"),
    ({"optimizer": {"name": "rmsprop", "lr": 0.1}}, "optimizer.name: must be 'sgd', 'adam', 'adamw' or 'task' (got 'rmsprop')"),
    ({"optimizer": {"name": "sgd", "lr": 0}}, "optimizer.lr: must be > 0 (got 0)"),
    ({"optimizer": {"name": "sgd", "lr": 0.1, "momentum": 1.0}}, "optimizer.momentum: must be < 1 (got 1.0)"),
    ({"optimizer": {"name": "sgd", "lr": 0.1, "betas": [0.9, 0.99]}}, "optimizer.betas: only used by name=adam or adamw (got name=sgd)"),
    ({"optimizer": {"name": "adam", "lr": 0.1, "betas": [0.9]}}, "optimizer.betas: must be a list of two numbers [beta1, beta2] (got [0.9])"),
    ({"optimizer": {"name": "sgd"}}, "optimizer.lr: required field is missing"),
    ({"lr_schedule": {"kind": "step", "milestones": [0.75, 0.5]}}, "lr_schedule.milestones: must be strictly increasing (got [0.75, 0.5])"),
    ({"lr_schedule": {"kind": "step", "milestones": [0.5, 1.5]}}, "lr_schedule.milestones[1]: must be a fraction of total_progress in (0, 1) (got 1.5)"),
    ({"lr_schedule": {"kind": "linear"}}, "lr_schedule.kind: must be 'constant', 'step', 'cosine' or 'exponential' (got 'linear')"),
    ({"lr_schedule": {"kind": "step", "gamma": 0}}, "lr_schedule.gamma: must be > 0 (got 0)"),
    ({"lr_schedule": {"kind": "cosine", "milestones": [0.5]}}, "lr_schedule.milestones: only used by kind=step (got kind=cosine)"),
    ({"scaling": {"policy": "schedule", "steps": [{"at_progress": 10, "workers": 8}]}}, "scaling.steps[0].workers: must be within workers.min..workers.max = 1..1 (got 8)"),
    ({"scaling": {"policy": "schedule", "steps": [{"workers": 1}]}}, "scaling.steps[0]: give exactly one of at_progress or at_time_s (got neither)"),
    ({"scaling": {"policy": "schedule", "steps": [{"at_progress": 100, "workers": 1}]}}, "scaling.steps[0].at_progress: must be < total_progress = 100 (got 100)"),
    ({"scaling": {"policy": "schedule"}}, "scaling.steps: policy=schedule needs at least one step ({at_progress | at_time_s, workers})"),
    ({"scaling": {"policy": "fastest"}}, "scaling.policy: must be 'schedule', 'available', 'goodput' or 'fixed' (got 'fastest')"),
    ({"scaling": {"policy": "goodput", "min_efficiency": 0}}, "scaling.min_efficiency: must be > 0 (got 0)"),
    ({"scaling": {"interval_s": -1}}, "scaling.interval_s: must be > 0 (got -1)"),
    ({"cluster": {"backend": "ray"}}, "cluster.address: required for backend=ray"),
    ({"cluster": {"backend": "kubernetes"}}, "cluster.backend: must be 'local', 'ray' or 'kuberay' (got 'kubernetes')"),
    ({"cluster": {"backend": "local", "address": "ray://head:10001"}}, "cluster.address: only used by backend=ray or kuberay (got backend=local)"),
    ({"checkpoint": {"every_steps": 0}}, "checkpoint.every_steps: must be >= 1 (got 0)"),
    ({"checkpoint": {"keep_last": 0}}, "checkpoint.keep_last: must be >= 1 (got 0)"),
    ({"metrics": {"port": 70000}}, "metrics.port: must be <= 65535 (got 70000)"),
    ({"metrics": {"enabled": "yes please"}}, "metrics.enabled: must be a valid boolean (got 'yes please')"),
    ({"failure": {"wait_for_workers_s": -1}}, "failure.wait_for_workers_s: must be >= 0 (got -1)"),
    ({"seed": "abc"}, "seed: must be a valid integer (got 'abc')"),
    ({"task_args": [1, 2]}, "task_args: must be a mapping of keys to values (got [1, 2])"),
    ({"run_dir": ""}, "run_dir: must not be empty (got '')"),
    ({"frobnicate": 1}, "frobnicate: unknown key; allowed keys: accumulation_steps, adascale, batch_size_per_worker, checkpoint, cluster, data, evaluation, failure, lr_schedule, metrics, name, optimizer, run_dir, runtime_env, scaling, seed, task, task_args, total_progress, training, workers"),
]


@pytest.mark.parametrize(("changes", "message"), MALFORMED, ids=[m.split(":")[0] for _, m in MALFORMED])
def test_malformed_spec_gives_one_line_error(changes, message):
    with pytest.raises(ConfigError) as info:
        parse_job_spec(with_changes(**changes))
    assert str(info.value) == message
    assert "\n" not in str(info.value)
    assert info.value.errors == [message]


def test_missing_required_fields_are_named():
    assert validate_job_spec({"name": "x"}) == [
        "task: required field is missing",
        "batch_size_per_worker: required field is missing",
        "total_progress: required field is missing",
        "optimizer: required field is missing",
    ]


def test_validate_lists_every_error_at_once(tmp_path):
    path = write(
        tmp_path,
        """\
        name: Bad_Name
        task: examples.digits:DigitsTask
        batch_size_per_worker: 0
        total_progress: -1
        optimzer: {name: sgd, lr: 0.1}
        workers: {min: 5, max: 2}
        lr_schedule: {kind: step, milestones: [0.8, 0.5]}
        cluster: {backend: kuberay, namespace: ml}
        """,
    )
    errors = validate_job_spec(path)
    assert errors == [
        "name: must be a DNS-1123 label: lowercase letters, digits and '-', starting and ending with a letter or digit, at most 63 characters (got 'Bad_Name')",
        "batch_size_per_worker: must be >= 1 (got 0)",
        "total_progress: must be > 0 (got -1)",
        "optimizer: required field is missing",
        "lr_schedule.milestones: must be strictly increasing (got [0.8, 0.5])",
        "workers.min: must be <= workers.max (got min=5, max=2)",
        "cluster.raycluster: required for backend=kuberay",
        "cluster.group: required for backend=kuberay",
        "optimzer: unknown key; did you mean 'optimizer'?",
    ]
    with pytest.raises(ConfigError) as info:
        load_job_spec(path)
    assert str(info.value) == errors[0] + " (and 8 more errors; `elastic validate` lists them all)"
    assert info.value.errors == errors


def test_validate_returns_empty_list_for_a_valid_spec(tmp_path):
    assert validate_job_spec(write(tmp_path, DESIGN_EXAMPLE)) == []
    assert validate_job_spec(MINIMAL) == []


def test_step_errors_across_several_steps_are_all_listed():
    errors = validate_job_spec(
        with_changes(
            workers={"min": 1, "max": 4},
            scaling={
                "policy": "schedule",
                "steps": [
                    {"at_progress": 50, "workers": 4},
                    {"at_progress": 40, "workers": 9},
                    {"at_progress": 60, "at_time_s": 5, "workers": 2},
                    {"at_progress": 70, "wrokers": 2},
                ],
            },
        )
    )
    assert errors == [
        "scaling.steps[2]: give exactly one of at_progress or at_time_s (got both)",
        "scaling.steps[3].workers: required field is missing",
        "scaling.steps[3].wrokers: unknown key; did you mean 'workers'?",
    ]
    errors = validate_job_spec(
        with_changes(
            workers={"min": 1, "max": 4},
            scaling={"policy": "schedule", "steps": [{"at_progress": 50, "workers": 4}, {"at_progress": 40, "workers": 9}]},
        )
    )
    assert errors == ["scaling.steps[1].at_progress: must be increasing along steps (got 40.0 after 50.0)"]
    errors = validate_job_spec(
        with_changes(
            workers={"min": 2, "max": 4},
            scaling={"policy": "schedule", "steps": [{"at_progress": 50, "workers": 1}, {"at_progress": 150, "workers": 9}]},
        )
    )
    assert errors == [
        "scaling.steps[0].workers: must be within workers.min..workers.max = 2..4 (got 1)",
        "scaling.steps[1].workers: must be within workers.min..workers.max = 2..4 (got 9)",
        "scaling.steps[1].at_progress: must be < total_progress = 100 (got 150)",
    ]


# -- file-level errors ----------------------------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"nope.yaml: no such file$"):
        load_job_spec(path)
    assert validate_job_spec(path) == [f"{path}: no such file"]


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load_job_spec(tmp_path)


def test_not_yaml(tmp_path):
    path = write(tmp_path, "name: x\nworkers: {min: 1, max: 2\ntask: y\n")
    with pytest.raises(ConfigError) as info:
        load_job_spec(path)
    assert str(info.value).startswith(f"{path}: not valid YAML (line 3, column ")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- a\n- b\n", "the job spec must be a mapping of keys to values (got list)"),
        ("just a string\n", "the job spec must be a mapping of keys to values (got str)"),
        ("", "the job spec is empty"),
        ("# only a comment\n", "the job spec is empty"),
    ],
)
def test_not_a_mapping(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_job_spec(path)
    assert str(info.value) == f"{path}: {message}"


def test_duplicate_keys_are_refused(tmp_path):
    path = write(tmp_path, "name: a\nworkers:\n  min: 1\n  min: 2\n")
    with pytest.raises(ConfigError) as info:
        load_job_spec(path)
    assert str(info.value) == f"{path}: not valid YAML (line 4, column 3): duplicate key 'min'"


def test_python_tags_are_not_executed(tmp_path):
    path = write(tmp_path, "name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_job_spec(path)


def test_parse_job_spec_rejects_non_mappings():
    with pytest.raises(ConfigError, match=r"^<job spec>: the job spec must be a mapping of keys to values \(got list\)$"):
        parse_job_spec([1, 2])  # type: ignore[arg-type]


# -- overrides --------------------------------------------------------------------------------------


def test_overrides_win_over_the_file(tmp_path):
    path = write(tmp_path, DESIGN_EXAMPLE)
    spec = load_job_spec(path, {"workers.max": 8, "optimizer": {"lr": 0.05}, "metrics.port": 0})
    assert spec.workers.max == 8 and spec.optimizer.lr == 0.05 and spec.optimizer.momentum == 0.9
    assert spec.metrics.port == 0 and spec.metrics.addr == "127.0.0.1"
    assert load_job_spec(path).workers.max == 4  # the file is untouched


def test_bad_override_is_reported_like_a_bad_file(tmp_path):
    path = write(tmp_path, DESIGN_EXAMPLE)
    assert validate_job_spec(path, {"workers.min": 6}) == [
        "workers.min: must be <= workers.max (got min=6, max=4)"
    ]
    assert validate_job_spec(path, {"workers.mx": 6}) == ["workers.mx: unknown key; did you mean 'max'?"]
    with pytest.raises(ConfigError, match=r"override 'name.x': name is not a mapping"):
        load_job_spec(path, {"name.x": 1})


def test_parse_overrides_reads_yaml_values():
    assert parse_overrides(["workers.max=8", "optimizer.lr=1.0e-3", "adascale.enabled=false", "name=a=b", "x="]) == {
        "workers.max": 8,
        "optimizer.lr": 1e-3,
        "adascale.enabled": False,
        "name": "a=b",
        "x": "",
    }
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_overrides(["workers.max"])
