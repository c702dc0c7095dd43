"""The job spec: YAML (or a dict from the Kubernetes operator) -> validated, frozen config objects.

Parsed once, at the edge (STYLE.md rule 3). Every section is a small frozen pydantic model whose
fields carry their meaning in a docstring; unknown keys are refused with a did-you-mean. Errors come
back as one line each, field path first, with the allowed values and what was given::

    workers.min: must be <= workers.max (got min=5, max=2)
    optimzer: unknown key; did you mean 'optimizer'?
    scaling.steps[1].workers: must be within workers.min..workers.max = 1..4 (got 8)

Public functions: :func:`load_job_spec` (file -> JobSpec, raises :class:`ConfigError`),
:func:`parse_job_spec` (dict -> JobSpec), :func:`validate_job_spec` (every error, never raises),
:func:`parse_overrides` (``["workers.max=8"]`` -> ``{"workers.max": 8}`` for the CLI).

The task named by ``task`` is not imported here; the trainer does that.
"""

from __future__ import annotations

import copy
import difflib
import re
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, Strict, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

__all__ = [
    "AdaScaleConfig",
    "CheckpointConfig",
    "ClusterConfig",
    "ConfigError",
    "DataConfig",
    "EvaluationConfig",
    "FailureConfig",
    "JobSpec",
    "LRScheduleConfig",
    "MetricsConfig",
    "OptimizerConfig",
    "ScalingConfig",
    "ScalingStep",
    "TrainingConfig",
    "WorkersConfig",
    "load_job_spec",
    "parse_job_spec",
    "parse_overrides",
    "validate_job_spec",
]


class ConfigError(ValueError):
    """An invalid job spec. ``str()`` is one line; ``errors`` holds every problem, one line each."""

    def __init__(self, errors: list[str] | str) -> None:
        self.errors: list[str] = [errors] if isinstance(errors, str) else list(errors)
        first = self.errors[0] if self.errors else "invalid job spec"
        more = len(self.errors) - 1
        suffix = f" (and {more} more error{'s' if more > 1 else ''}; `elastic validate` lists them all)" if more else ""
        super().__init__(first + suffix)


# -- field types ------------------------------------------------------------------------------


def _error(message: str) -> PydanticCustomError:
    """An error whose message is used verbatim (it already says what was given)."""
    return PydanticCustomError("elastic", "{message}", {"message": message})


def _reject_bool(value: Any) -> Any:
    # YAML `true` would otherwise pass as 1 / 1.0; a bool where a number belongs is always a typo.
    if isinstance(value, bool):
        raise _error(f"must be a number, not a boolean (got {value})")
    return value


def _pair(value: Any) -> Any:
    if value is not None and (not isinstance(value, (list, tuple)) or len(value) != 2):
        raise _error(f"must be a list of two numbers [beta1, beta2] (got {_short_repr(value)})")
    return value


Int = Annotated[int, Strict()]
"""A whole number; refuses strings, floats and booleans."""
Float = Annotated[float, BeforeValidator(_reject_bool)]
"""A finite number; ints are accepted, and numeric strings such as YAML 1.1's ``1e-3``."""
Bool = Annotated[bool, Strict()]


def _auto_or_positive_int(value: Any) -> Any:
    if value == "auto" and isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _error(f"must be 'auto' or an int >= 1 (got {_short_repr(value)})")
    return value


AutoOrInt = Annotated[Union[Literal["auto"], int], BeforeValidator(_auto_or_positive_int)]
"""``"auto"`` or a whole number >= 1."""


def _auto_or_natural_int(value: Any) -> Any:
    if value == "auto" and isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _error(f"must be 'auto' or an int >= 0 (got {_short_repr(value)})")
    return value


AutoOrZeroInt = Annotated[Union[Literal["auto"], int], BeforeValidator(_auto_or_natural_int)]
"""``"auto"`` or a whole number >= 0."""

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_IMPORT_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def _check_name(name: str) -> str:
    if len(name) > 63 or not _DNS_LABEL.match(name):
        raise _error(
            "must be a DNS-1123 label: lowercase letters, digits and '-', starting and ending "
            f"with a letter or digit, at most 63 characters (got {name!r})"
        )
    return name


def _check_task(task: str) -> str:
    if not _IMPORT_PATH.match(task):
        raise _error(f"must be an import path 'package.module:ClassName' (got {task!r})")
    return task


class _Problems:
    """Cross-field problems of one model, raised together so that validate lists them all."""

    def __init__(self, title: str) -> None:
        self._title = title
        self._details: list[InitErrorDetails] = []

    def add(self, loc: tuple[str | int, ...], message: str, value: Any = None) -> None:
        self._details.append(InitErrorDetails(type=_error(message), loc=loc, input=value))

    def raise_if_any(self) -> None:
        if self._details:
            raise ValidationError.from_exception_data(self._title, self._details)


class _Section(BaseModel):
    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        allow_inf_nan=False,
        use_attribute_docstrings=True,
    )


# -- sections ---------------------------------------------------------------------------------


class OptimizerConfig(_Section):
    """The base optimizer that AdaScale wraps."""

    name: Literal["sgd", "adam", "adamw", "task"]
    """torch.optim class: ``sgd``, ``adam`` or ``adamw`` (AdaScale applies the square-root gain to Adam);
    ``task``: the task's ``build_optimizer(model)`` builds it (any torch.optim optimizer, parameter
    groups, optionally a torch LR scheduler), and AdaScale wraps it."""
    lr: Optional[Float] = Field(default=None, gt=0)
    """Base learning rate at scale 1 (one worker's batch); AdaScale multiplies it by the gain.
    Required unless name=task (whose optimizer carries its own)."""
    momentum: Float = Field(default=0.0, ge=0, lt=1)
    """SGD momentum in [0, 1); sgd only."""
    weight_decay: Float = Field(default=0.0, ge=0)
    """L2 penalty (decoupled for adamw)."""
    betas: Annotated[
        Optional[tuple[Annotated[Float, Field(ge=0, lt=1)], Annotated[Float, Field(ge=0, lt=1)]]],
        BeforeValidator(_pair),
    ] = None
    """Adam's (beta1, beta2), each in [0, 1); adam / adamw only; default torch's (0.9, 0.999)."""

    @model_validator(mode="after")
    def _options_match_optimizer(self) -> OptimizerConfig:
        problems = _Problems("OptimizerConfig")
        if self.name == "task":
            for key in sorted(self.model_fields_set - {"name"}):
                problems.add((key,), "not used by name=task (the task's build_optimizer sets it)", getattr(self, key))
            problems.raise_if_any()
            return self
        if self.lr is None:
            problems.add(("lr",), "required field is missing", None)
        if self.name == "sgd" and self.betas is not None:
            problems.add(("betas",), "only used by name=adam or adamw (got name=sgd)", self.betas)
        if self.name != "sgd" and self.momentum != 0.0:
            problems.add(("momentum",), f"only used by name=sgd; {self.name} uses betas (got {self.momentum})", self.momentum)
        problems.raise_if_any()
        return self


class LRScheduleConfig(_Section):
    """Learning-rate multiplier as a function of progress tau (scale-invariant iterations)."""

    kind: Literal["constant", "step", "cosine", "exponential"] = "constant"
    """``constant``; ``step`` (x gamma at each milestone); ``cosine`` (to 0 at total_progress);
    ``exponential`` (reaches gamma at total_progress)."""
    milestones: tuple[Float, ...] = (0.5, 0.75)
    """Fractions of total_progress, each in (0, 1), strictly increasing; kind=step only."""
    gamma: Float = Field(default=0.1, gt=0, le=1)
    """Decay factor in (0, 1]: per milestone (step) or reached at the end (exponential)."""
    warmup_fraction: Float = Field(default=0.0, ge=0, lt=1)
    """Linear warm-up over this fraction of total_progress, in [0, 1); 0 = none."""

    @model_validator(mode="after")
    def _check(self) -> LRScheduleConfig:
        problems = _Problems("LRScheduleConfig")
        given = self.model_fields_set
        if "milestones" in given and self.kind != "step":
            problems.add(("milestones",), f"only used by kind=step (got kind={self.kind})", list(self.milestones))
        if "gamma" in given and self.kind not in ("step", "exponential"):
            problems.add(("gamma",), f"only used by kind=step or exponential (got kind={self.kind})", self.gamma)
        for i, m in enumerate(self.milestones):
            if not 0 < m < 1:
                problems.add(("milestones", i), f"must be a fraction of total_progress in (0, 1) (got {m})", m)
        if any(b <= a for a, b in zip(self.milestones, self.milestones[1:])):
            problems.add(("milestones",), f"must be strictly increasing (got {list(self.milestones)})", list(self.milestones))
        problems.raise_if_any()
        return self


class AdaScaleConfig(_Section):
    """AdaScale SGD (gain-ratio learning-rate adaptation)."""

    enabled: Bool = True
    """Adapt the learning rate to the batch size; false = plain optimizer at the base lr (progress
    then counts plain steps)."""


class WorkersConfig(_Section):
    """Bounds on the number of data-parallel workers."""

    min: Int = Field(default=1, ge=1)
    """Fewest workers the job runs with (>= 1)."""
    max: Int = Field(default=1, ge=1)
    """Most workers the job may use (>= min)."""
    initial: Int = Field(default=1, ge=1)
    """Workers at start, in [min, max]; defaults to min."""
    steps_per_call: AutoOrInt = "auto"
    """Steps each worker runs per call from the driver. ``auto``: as many as take about
    0.5 s at the measured step time (at most 128; 1 until steps at the current size were timed),
    which spreads the fixed cost of a Ray call over many short steps. A resize, a stop request or
    a checkpoint waits for the running call; a failure loses at most the step it hit. 1: a call per step."""

    @model_validator(mode="before")
    @classmethod
    def _initial_defaults_to_min(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "initial" not in data:
            low = data.get("min", 1)
            if isinstance(low, int) and not isinstance(low, bool) and low >= 1:
                return {**data, "initial": low}
        return data

    @model_validator(mode="after")
    def _check(self) -> WorkersConfig:
        problems = _Problems("WorkersConfig")
        if self.min > self.max:
            problems.add(("min",), f"must be <= workers.max (got min={self.min}, max={self.max})", self.min)
        elif not self.min <= self.initial <= self.max:
            problems.add(
                ("initial",),
                f"must be within workers.min..workers.max = {self.min}..{self.max} (got {self.initial})",
                self.initial,
            )
        problems.raise_if_any()
        return self


class ScalingStep(_Section):
    """One resize of the ``schedule`` policy: at a progress (tau) or a wall-clock time, go to N workers."""

    at_progress: Optional[Float] = Field(default=None, ge=0)
    """Resize when progress tau reaches this value (scale-1 iterations, < total_progress)."""
    at_time_s: Optional[Float] = Field(default=None, ge=0)
    """Resize this many seconds after training starts."""
    workers: Int
    """Target number of workers, in [workers.min, workers.max]."""

    @model_validator(mode="after")
    def _exactly_one_trigger(self) -> ScalingStep:
        if (self.at_progress is None) == (self.at_time_s is None):
            problems = _Problems("ScalingStep")
            got = "neither" if self.at_progress is None else "both"
            problems.add((), f"give exactly one of at_progress or at_time_s (got {got})", None)
            problems.raise_if_any()
        return self


class ScalingConfig(_Section):
    """How the controller picks the number of workers."""

    policy: Literal["schedule", "available", "goodput", "fixed"] = "fixed"
    """``fixed`` (stay at workers.initial); ``schedule`` (follow steps); ``available`` (use the
    capacity there is); ``goodput`` (maximise throughput x statistical efficiency)."""
    steps: tuple[ScalingStep, ...] = ()
    """Resizes for policy=schedule, in order (at_progress and at_time_s each increasing)."""
    interval_s: Float = Field(default=2.0, gt=0)
    """Controller period: seconds between observe -> decide -> act rounds."""
    cooldown_s: Float = Field(default=30.0, ge=0)
    """goodput: seconds after a resize before the policy resizes again by choice (bounds still apply)."""
    min_efficiency: Float = Field(default=0.5, gt=0, le=1)
    """goodput: never scale to where predicted statistical efficiency r(S)/S falls below this, in (0, 1]."""
    hysteresis: Float = Field(default=0.05, ge=0, lt=1)
    """goodput: resize only if predicted goodput improves by more than this fraction, in [0, 1)."""
    late_workers: Literal["wait", "continue"] = "wait"
    """schedule: when a step's trigger is reached before its new workers are ready, ``wait`` for them
    (up to late_wait_s, counted as the resize's pause) or ``continue`` at the old size (said once)
    and grow when they are ready."""
    late_wait_s: Float = Field(default=120.0, ge=0)
    """schedule, late_workers=wait: the longest wait at a trigger before going on without them."""

    @model_validator(mode="after")
    def _check(self) -> ScalingConfig:
        problems = _Problems("ScalingConfig")
        if self.policy == "schedule" and not self.steps:
            problems.add(("steps",), "policy=schedule needs at least one step ({at_progress | at_time_s, workers})", [])
        if self.policy != "schedule" and self.steps:
            problems.add(("steps",), f"only used by policy=schedule (got policy={self.policy})", None)
        for trigger in ("at_progress", "at_time_s"):
            previous: float | None = None
            for i, step in enumerate(self.steps):
                value = getattr(step, trigger)
                if value is None:
                    continue
                if previous is not None and value <= previous:
                    problems.add(("steps", i, trigger), f"must be increasing along steps (got {value} after {previous})", value)
                previous = value
        problems.raise_if_any()
        return self


class ClusterConfig(_Section):
    """Where the workers run and which actuator adds or removes capacity."""

    backend: Literal["local", "ray", "kuberay"] = "local"
    """``local`` (Ray nodes started on this machine); ``ray`` (an existing Ray cluster, scaled via the
    Ray autoscaler); ``kuberay`` (a KubeRay RayCluster whose worker group replicas are patched)."""
    address: Optional[str] = None
    """Ray address (``ray://host:10001`` or ``auto``); required for backend=ray."""
    namespace: Optional[str] = None
    """Kubernetes namespace of the RayCluster; required for backend=kuberay."""
    raycluster: Optional[str] = None
    """Name of the RayCluster resource; required for backend=kuberay."""
    group: Optional[str] = None
    """Worker group (workerGroupSpecs[].groupName) to resize; required for backend=kuberay."""
    num_cpus_per_worker: Float = Field(default=1.0, gt=0)
    """CPUs reserved for each worker actor."""
    use_gpu: Bool = False
    """Give each worker one GPU (nccl); false = CPU workers (gloo)."""

    @model_validator(mode="after")
    def _check(self) -> ClusterConfig:
        problems = _Problems("ClusterConfig")
        needed = {"ray": ("address",), "kuberay": ("namespace", "raycluster", "group")}
        # A KubeRay job's driver also connects to its Ray head: address is allowed there (default auto).
        allowed = {"address": ("ray", "kuberay")}
        for backend, fields in needed.items():
            for name in fields:
                value = getattr(self, name)
                users = allowed.get(name, (backend,))
                if self.backend == backend and not value:
                    problems.add((name,), f"required for backend={backend}", value)
                elif self.backend not in users and value is not None:
                    problems.add((name,), f"only used by backend={' or '.join(users)} (got backend={self.backend})", value)
        problems.raise_if_any()
        return self


class CheckpointConfig(_Section):
    """Durable checkpoints for resuming after a full restart."""

    dir: str = Field(default="checkpoints", min_length=1)
    """Directory of the checkpoints; in a job spec the default is ``<run_dir>/checkpoints``."""
    every_steps: Int = Field(default=100, ge=1)
    """Write a checkpoint every this many optimizer steps (>= 1)."""
    keep_last: Int = Field(default=3, ge=1)
    """Keep this many newest checkpoints; older ones are deleted (>= 1)."""


class MetricsConfig(_Section):
    """Prometheus exporter and the run's metrics log."""

    enabled: Bool = True
    """Serve Prometheus metrics over HTTP."""
    addr: str = Field(default="127.0.0.1", min_length=1)
    """Address the exporter binds (``0.0.0.0`` to be scraped from other hosts)."""
    port: Int = Field(default=9464, ge=0, le=65535)
    """Exporter port, 0..65535; 0 picks a free port."""
    log: Bool = True
    """Also write a JSONL metrics log in the run directory (read by ``elastic report``)."""


class FailureConfig(_Section):
    """Tolerance for failed steps and missing workers."""

    max_consecutive_skipped_steps: Int = Field(default=10, ge=1)
    """Stop the job after this many steps in a row are skipped (non-finite gradients, failures)."""
    wait_for_workers_s: Float = Field(default=60.0, ge=0)
    """After losing workers below workers.min, wait this long for capacity before failing."""


class RuntimeEnvConfig(_Section):
    """Ray's ``runtime_env`` for the job's workers: how the task's code and packages reach them.

    Left empty, the directory the task module is imported from reaches the workers: on ``local`` and
    ``kuberay`` through ``PYTHONPATH`` (one machine, one image), on ``ray`` as an uploaded
    ``working_dir`` (nodes may be other machines); an installed task package is not shipped."""

    working_dir: Optional[str] = None
    """Directory uploaded to every worker and made its working directory (Ray's ``working_dir``)."""
    py_modules: list[str] = Field(default_factory=list)
    """Local package directories or wheel/zip paths uploaded and importable on the workers."""
    pip: list[str] = Field(default_factory=list)
    """Requirements installed into a per-job virtualenv on every node (needs the package index)."""
    env_vars: dict[str, str] = Field(default_factory=dict)
    """Environment variables of the worker processes."""
    excludes: list[str] = Field(default_factory=list)
    """gitignore-style patterns left out of ``working_dir`` and ``py_modules`` uploads."""


class DataConfig(_Section):
    """The worker's input pipeline: a torch DataLoader over its shard of the sampler's plan."""

    num_workers: AutoOrZeroInt = "auto"
    """DataLoader worker processes per elastic worker; 0 loads in the training process. ``auto``:
    the worker's CPUs (cluster.num_cpus_per_worker) less one, at least 1 and at most 4 (0 on a
    one-core machine)."""
    prefetch_factor: Int = Field(default=2, ge=1)
    """Micro-batches each loader worker prepares ahead (>= 1); with num_workers > 0 only."""
    pin_memory: Bool = True
    """Page-locked host batches for faster copies to the GPU (ignored on CPU workers)."""
    persistent_workers: Bool = True
    """Keep the loader's processes for the whole job (false: start them again after every
    change of plan, e.g. a resize)."""
    multiprocessing_context: Optional[Literal["fork", "spawn", "forkserver"]] = None
    """How loader workers start; default the platform's (fork on Linux). ``spawn`` needs a
    picklable dataset."""


class TrainingConfig(_Section):
    """Controls of the optimizer step."""

    max_grad_norm: Optional[Float] = Field(default=None, gt=0)
    """Clip the total gradient norm to this value before each update (torch's clip_grad_norm_);
    AdaScale's statistics are taken from the unclipped gradients. Default: no clipping."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """``fp32``; ``bf16`` (autocast of forward and loss to bfloat16); ``fp16`` (autocast to float16
    with a dynamic GradScaler; overflowing steps are skipped and counted)."""


class EvaluationConfig(_Section):
    """The task's evaluate(model) during training (always once at the end)."""

    every_progress: Optional[Float] = Field(default=None, gt=0)
    """Evaluate on rank 0 each time progress tau passes a multiple of this (at the first call
    boundary after it); its metrics go to the progress line, the metrics log, ``elastic report``
    and Prometheus (elastic_eval_metric). Default: only at the end."""


class JobSpec(_Section):
    """A whole training job. Build it with :func:`load_job_spec` or :func:`parse_job_spec`."""

    name: Annotated[str, AfterValidator(_check_name)]
    """Job name, a DNS-1123 label (lowercase letters, digits, '-'; at most 63 characters)."""
    task: Annotated[str, AfterValidator(_check_task)]
    """Import path of the Task class, ``package.module:ClassName``."""
    task_args: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of the Task constructor."""
    batch_size_per_worker: Int = Field(ge=1)
    """Samples per micro-batch on one worker; scale 1 = one worker's batch."""
    accumulation_steps: Int = Field(default=1, ge=1)
    """Micro-batches (backward passes) per worker per step; global batch = workers x batch x steps."""
    total_progress: Float = Field(gt=0)
    """Progress tau at which training stops, in scale-1 iterations."""
    seed: Int = 0
    """Seeds the model initialisation, the data order and every derived random stream: each
    sample's loading from (seed, epoch, index), each rank's step from (seed, rank, step)."""
    optimizer: OptimizerConfig
    """Base optimizer."""
    lr_schedule: LRScheduleConfig = Field(default_factory=LRScheduleConfig)
    """Learning-rate schedule in tau."""
    adascale: AdaScaleConfig = Field(default_factory=AdaScaleConfig)
    """AdaScale on/off."""
    workers: WorkersConfig = Field(default_factory=WorkersConfig)
    """Worker bounds."""
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    """Scaling policy and controller settings."""
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    """Cluster backend."""
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    """Checkpoints."""
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    """Metrics exporter and log."""
    run_dir: str = Field(default="", min_length=1)
    """Directory for the run's logs, metrics and report; default ``runs/<name>``."""
    failure: FailureConfig = Field(default_factory=FailureConfig)
    """Failure handling."""
    runtime_env: RuntimeEnvConfig = Field(default_factory=RuntimeEnvConfig)
    """Ray runtime_env of the workers (code, packages, environment variables)."""
    data: DataConfig = Field(default_factory=DataConfig)
    """Input pipeline (DataLoader settings)."""
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    """Gradient clipping and numeric precision."""
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    """Evaluation during training."""

    @model_validator(mode="before")
    @classmethod
    def _directories_default_to_run_dir(cls, data: Any) -> Any:
        # Defaults that depend on other fields are filled in before validation (the models are
        # frozen); when the fields they depend on are invalid, those fields' errors are reported.
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        if data.get("run_dir") is None and isinstance(data.get("name"), str):
            data["run_dir"] = f"runs/{data['name']}"
        checkpoint = data.get("checkpoint", {})
        if isinstance(checkpoint, Mapping) and checkpoint.get("dir") is None and isinstance(data.get("run_dir"), str):
            data["checkpoint"] = {**checkpoint, "dir": str(Path(data["run_dir"]) / "checkpoints")}
        return data

    @model_validator(mode="after")
    def _check_across_sections(self) -> JobSpec:
        problems = _Problems("JobSpec")
        low, high = self.workers.min, self.workers.max
        for i, step in enumerate(self.scaling.steps):
            if not low <= step.workers <= high:
                problems.add(
                    ("scaling", "steps", i, "workers"),
                    f"must be within workers.min..workers.max = {low}..{high} (got {step.workers})",
                    step.workers,
                )
            if step.at_progress is not None and step.at_progress >= self.total_progress:
                problems.add(
                    ("scaling", "steps", i, "at_progress"),
                    f"must be < total_progress = {self.total_progress:g} (got {step.at_progress:g})",
                    step.at_progress,
                )
        problems.raise_if_any()
        return self

    def global_batch_size(self, workers: int) -> int:
        """Samples per optimizer step at ``workers`` workers: workers x batch_size_per_worker x accumulation_steps."""
        return workers * self.batch_size_per_worker * self.accumulation_steps


# -- error formatting -------------------------------------------------------------------------


def _format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "<job spec>"


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The section model found at ``loc`` under JobSpec (list indices skipped), if any."""
    model: type[BaseModel] = JobSpec
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        inner = _find_model(field.annotation) if field is not None else None
        if inner is None:
            return None
        model = inner
    return model


def _find_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _find_model(arg)
        if found is not None:
            return found
    return None


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _format_error(error: Mapping[str, Any]) -> str:
    loc = tuple(error["loc"])
    kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    path = _format_loc(loc)
    if kind == "extra_forbidden":
        model = _model_at(loc[:-1])
        allowed = sorted(model.model_fields) if model is not None else []
        guess = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.6)
        if guess:
            return f"{path}: unknown key; did you mean {guess[0]!r}?"
        return f"{path}: unknown key; allowed keys: {', '.join(allowed)}"
    if kind == "missing":
        return f"{path}: required field is missing"
    if kind == "elastic":
        return f"{path}: {ctx['message']}"
    if kind in _BOUNDS:
        bound = next(iter(ctx.values()))
        message = f"must be {_BOUNDS[kind]} {bound:g}" if isinstance(bound, (int, float)) else f"must be {_BOUNDS[kind]} {bound}"
    elif kind in ("model_type", "dict_type", "model_attributes_type"):
        message = "must be a mapping of keys to values"
    elif kind in ("tuple_type", "list_type"):
        message = "must be a list"
    elif kind == "string_too_short":
        message = "must not be empty" if ctx.get("min_length") == 1 else f"must have at least {ctx.get('min_length')} characters"
    elif kind == "finite_number":
        message = "must be a finite number"
    else:
        message = str(error["msg"]).replace("Input should be", "must be")
    return f"{path}: {message} (got {_short_repr(value)})"


def _errors_of(exc: ValidationError) -> list[str]:
    lines: list[str] = []
    for error in exc.errors(include_url=False):
        line = " ".join(_format_error(error).split())  # one line whatever the input contained
        if line not in lines:
            lines.append(line)
    return lines


# -- loading ----------------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a job spec file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = exc.problem or exc.context or "parse error"
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None


def _check_mapping(data: Any, source: str) -> dict[str, Any]:
    if data is None:
        raise ConfigError(f"{source}: the job spec is empty")
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: the job spec must be a mapping of keys to values (got {type(data).__name__})")
    return dict(data)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["workers.max=8", "optimizer.lr=0.05"]`` -> ``{"workers.max": 8, "optimizer.lr": 0.05}``.

    Values are read as YAML scalars/flow collections (``8`` is an int, ``[1, 2]`` a list).
    """
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. workers.max=8")
        try:
            overrides[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: value is not valid YAML") from None
    return overrides


def _apply_overrides(data: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge ``overrides`` (dotted keys or nested dicts) into a copy of ``data``."""
    merged = copy.deepcopy(data)
    for key, value in overrides.items():
        parts = str(key).split(".")
        target = merged
        for depth, part in enumerate(parts[:-1]):
            child = target.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {key!r}: {'.'.join(parts[: depth + 1])} is not a mapping")
            target = child
        leaf = parts[-1]
        if isinstance(value, Mapping) and isinstance(target.get(leaf), dict):
            target[leaf] = _apply_overrides(target[leaf], value)
        else:
            target[leaf] = copy.deepcopy(value)
    return merged


def _validate(data: Mapping[str, Any]) -> JobSpec:
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_errors_of(exc)) from None


def parse_job_spec(data: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> JobSpec:
    """Validate a job spec given as a dict (e.g. an ElasticJob's ``spec.job``).

    Raises:
        ConfigError: one line (the first problem); ``.errors`` lists them all.
    """
    spec = _check_mapping(data, "<job spec>")
    return _validate(_apply_overrides(spec, overrides) if overrides else spec)


def load_job_spec(path: str | Path, overrides: Mapping[str, Any] | None = None) -> JobSpec:
    """Read and validate a YAML job spec; ``overrides`` (``{"workers.max": 8}``) win over the file.

    Raises:
        ConfigError: one line naming the field path and the allowed values; ``.errors`` lists all.
    """
    path = Path(path)
    spec = _check_mapping(_read_yaml(path), str(path))
    return _validate(_apply_overrides(spec, overrides) if overrides else spec)


def validate_job_spec(path: str | Path | Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> list[str]:
    """Every problem of a job spec (a YAML path, or a dict), one line each, field path first; [] if valid."""
    try:
        if isinstance(path, Mapping):
            parse_job_spec(path, overrides)
        else:
            load_job_spec(path, overrides)
    except ConfigError as exc:
        return exc.errors
    return []
