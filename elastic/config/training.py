"""Job-spec sections of the optimizer step: optimizer, LR schedule, AdaScale, input pipeline,
precision and clipping, evaluation."""

from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import BeforeValidator, Field, model_validator

from elastic.config.fields import AutoOrZeroInt, Bool, Float, Int, Problems, Section, two_numbers


class OptimizerConfig(Section):
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
        BeforeValidator(two_numbers),
    ] = None
    """Adam's (beta1, beta2), each in [0, 1); adam / adamw only; default torch's (0.9, 0.999)."""

    @model_validator(mode="after")
    def _options_match_optimizer(self) -> OptimizerConfig:
        problems = Problems("OptimizerConfig")
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


class LRScheduleConfig(Section):
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
        problems = Problems("LRScheduleConfig")
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


class AdaScaleConfig(Section):
    """AdaScale SGD (gain-ratio learning-rate adaptation)."""

    enabled: Bool = True
    """Adapt the learning rate to the batch size; false = plain optimizer at the base lr (progress
    then counts plain steps)."""


class DataConfig(Section):
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


class TrainingConfig(Section):
    """Controls of the optimizer step."""

    max_grad_norm: Optional[Float] = Field(default=None, gt=0)
    """Clip the total gradient norm to this value before each update (torch's clip_grad_norm_);
    AdaScale's statistics are taken from the unclipped gradients. Default: no clipping."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """``fp32``; ``bf16`` (autocast of forward and loss to bfloat16); ``fp16`` (autocast to float16
    with a dynamic GradScaler; overflowing steps are skipped and counted)."""


class EvaluationConfig(Section):
    """The task's evaluate(model) during training (always once at the end)."""

    every_progress: Optional[Float] = Field(default=None, gt=0)
    """Evaluate on rank 0 each time progress tau passes a multiple of this (at the first call
    boundary after it); its metrics go to the progress line, the metrics log, ``elastic report``
    and Prometheus (elastic_eval_metric). Default: only at the end."""

