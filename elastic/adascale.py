"""AdaScale SGD (Johnson et al., ICML 2020): a learning rate that follows the batch size.

``AdaScale`` wraps a torch optimizer. Each step averages ``S`` scale-1 gradients (one per
micro-batch per rank); from them it estimates the gradient variance and squared norm, turns them
into the gain ratio ``r_t`` and applies ``r_t * lr * lr_schedule(floor(tau_t))``, where ``lr`` is
each param group's own learning rate. Progress ``tau`` advances by ``r_t`` per step and is counted
in scale-1 iterations, so a schedule written in tau holds at every scale and across resizes.

A complete loop, on every rank (one process, plain DDP, gradient accumulation, or both)::

    net = Net()
    model = DistributedDataParallel(net)          # or just `net` in one process
    opt = AdaScale(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9),
                   accumulation_steps=2, lr_schedule=Step(total_progress=3000))
    opt.attach_ddp(model)                         # under DDP, right after building it
    while opt.progress < 3000:
        for i, micro in enumerate(micro_batches):                 # `accumulation_steps` of them
            with model.no_sync() if i < 1 else contextlib.nullcontext():
                (loss_fn(model, micro) / 2).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)     # optional: does not touch the statistics
        opt.step()
        opt.zero_grad()

With fp16 and a ``torch.amp.GradScaler``, pass it as ``AdaScale(..., grad_scaler=scaler)`` and
use the scaler as usual (``scaler.scale(loss).backward()``, ``scaler.unscale_(opt)``,
``scaler.step(opt)``, ``scaler.update()``, then ``opt.zero_grad()``). The hooks see loss-scaled
gradients; AdaScale divides the step's statistics by ``scaler.get_scale()`` squared, the scale the
backward passes used (``update()`` runs after the step). A step the scaler skips (inf/NaN found)
never reaches ``AdaScale.step``; ``opt.zero_grad()`` counts it in ``skipped_steps``. DDP all-reduces
the gradients before the scaler looks, so every rank skips the same steps.

Symbols (PAPER.md), next to what holds them:

- ``S`` -> ``scale``: scale-1 batches averaged per step, ``world_size * accumulation_steps`` by default.
- ``g_i`` -> one micro-batch gradient: the gradient a backward pass delivers to a parameter before it
  is added to ``.grad`` (a tensor hook). ``n = world_size * accumulation_steps`` of them per step.
- ``g_bar`` -> the step's averaged gradient at the moment it is complete: after the last backward
  pass's accumulation into ``.grad`` in one process (a post-accumulate hook), or when DDP's
  all-reduce of each bucket returns (a DDP communication hook). User code between ``backward()`` and
  ``step()`` (clipping, unscaling, ``model.zero_grad()``) runs later and cannot change it.
- ``sigma^2`` -> ``grad_variance``; ``mu^2`` -> ``grad_sqnorm`` (smoothed, ``elastic.estimators``).
- ``r_t`` -> ``gain`` = (sigma^2 + mu^2) / (sigma^2 / S + mu^2), in [1, S]; ``tau`` -> ``progress``.

One statistics path (:mod:`elastic.adascale_stats`; docs/design.md, "AdaScale: one statistics
path"): hooks norm each micro-batch gradient and the averaged one, and ``step()`` gets the pair
``[sum_i ||g_i||^2, ||g_bar||^2]`` after one all-reduce across DDP's group and one host sync, so
every rank computes the same gain from the same two numbers.

Conventions:

- The estimates are of scale-1 quantities, so ``set_scale`` keeps them (no rescaling of the moving
  averages, unlike fairscale); the next gain is computed at the new S.
- Each param group's ``lr`` is the base learning rate: AdaScale multiplies it for the inner step and
  restores it afterwards, so a torch LR scheduler on the inner optimizer composes with the gain.
- Adam and AdamW get the square-root gain for their learning rate (tau still advances by r_t), as
  AdaScale's linear rule is derived for SGD.
- Non-finite statistics skip the step on every rank, leave the estimates, tau and the inner optimizer
  untouched, and are counted in ``skipped_steps``.
- The hooks see every backward pass through the wrapped parameters: run ``accumulation_steps`` of
  them per step (``step()`` raises on another count) and none outside training steps.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from elastic.adascale_stats import AdaScaleError, StepStatistics, check_accumulation
from elastic.estimators import MIN_VARIANCE, SmoothedEstimates, default_smoothing, gain_ratio, step_estimates

__all__ = ["AdaScale", "AdaScaleError", "MIN_VARIANCE", "gain_ratio"]

LrSchedule = Callable[[float], float]

_SQRT_GAIN_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW)


class AdaScale:
    """Wrap ``optimizer`` so that its learning rate follows the AdaScale gain.

    Args:
        optimizer: the inner torch optimizer; each param group's ``lr`` is its scale-1 base lr.
        scale: S. ``None`` follows ``world_size * accumulation_steps``.
        accumulation_steps: backward passes per step on each rank, each of ``loss / accumulation_steps``.
        smoothing: theta of the moving average; ``None`` means ``max(1 - S/1000, 0)``.
        lr_schedule: ``tau -> multiplier`` of the base lr, called with ``floor(tau)``.
        process_group: the group whose size tells a single process from a distributed job when no
            DDP model is attached; ``None`` means the default group, if one is initialised.
        grad_scaler: the ``torch.amp.GradScaler`` whose loss scale the backward passes carry.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        scale: float | None = None,
        accumulation_steps: int = 1,
        smoothing: float | None = None,
        lr_schedule: LrSchedule | None = None,
        process_group: Any = None,
        grad_scaler: Any = None,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise AdaScaleError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        check_accumulation(accumulation_steps)
        if scale is not None and not scale >= 1:
            raise AdaScaleError(f"scale: must be >= 1, got {scale!r}")
        if smoothing is not None and not 0.0 <= smoothing < 1.0:
            raise AdaScaleError(f"smoothing: must be in [0, 1), got {smoothing!r}")
        if grad_scaler is not None and not callable(getattr(grad_scaler, "get_scale", None)):
            raise AdaScaleError(f"grad_scaler: expected a torch.amp.GradScaler, got {type(grad_scaler).__name__}")
        self.optimizer = optimizer
        self._stats = StepStatistics(accumulation_steps)  # before accumulation_steps, which it holds
        self.accumulation_steps = accumulation_steps
        self.smoothing = smoothing
        self.lr_schedule = lr_schedule
        self.process_group = process_group
        self.grad_scaler = grad_scaler
        self._fixed_scale = None if scale is None else float(scale)
        self._sqrt_gain = isinstance(optimizer, _SQRT_GAIN_OPTIMIZERS)

        # Running state (all of it is in state_dict).
        self._estimates = SmoothedEstimates()
        self._progress = 0.0  # tau
        self._gain = 1.0  # r_t of the last step
        self._last_scale = self._fixed_scale or float(accumulation_steps)
        self._last_lr = float(optimizer.param_groups[0]["lr"])
        self._steps = 0
        self._skipped_steps = 0

        for group in optimizer.param_groups:
            self._stats.watch(group["params"])

    @property
    def accumulation_steps(self) -> int:
        """Backward passes per step on each rank."""
        return self._stats.accumulation_steps

    @accumulation_steps.setter
    def accumulation_steps(self, value: int) -> None:
        self._stats.accumulation_steps = value

    # ----------------------------------------------------------------- public read-only state
    @property
    def gain(self) -> float:
        """r_t of the last completed step (1.0 before the first)."""
        return self._gain

    @property
    def scale(self) -> float:
        """S: scale-1 batches averaged per step."""
        if self._fixed_scale is not None:
            return self._fixed_scale
        return float(self._stats.ddp_world_size * self.accumulation_steps)

    @property
    def progress(self) -> float:
        """tau: scale-invariant iterations so far (sum of the gains)."""
        return self._progress

    @property
    def efficiency(self) -> float:
        """Statistical efficiency of the last step, gain / scale, in [1/S, 1]."""
        return self._gain / self._last_scale

    @property
    def grad_variance(self) -> float:
        """Smoothed estimate of sigma^2, the variance (trace) of one scale-1 batch gradient."""
        return self._estimates.sigma2

    @property
    def grad_sqnorm(self) -> float:
        """Smoothed estimate of mu^2, the squared norm of the full gradient."""
        return self._estimates.mu2

    @property
    def num_estimates(self) -> int:
        """How many steps' statistics the smoothed estimates hold (0: nothing measured yet)."""
        return self._estimates.count

    @property
    def steps(self) -> int:
        return self._steps

    @property
    def skipped_steps(self) -> int:
        return self._skipped_steps

    @property
    def learning_rate(self) -> float:
        """Effective learning rate of the first param group at the last step (gain and schedule applied)."""
        return self._last_lr

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def gain_at(self, scale: float) -> float:
        """The gain the current estimates predict at another scale S' (used by the controller)."""
        return self._estimates.gain_at(scale)

    # ----------------------------------------------------------------------------- control
    def set_scale(self, scale: float, accumulation_steps: int | None = None) -> None:
        """Use S = ``scale`` from the next step on (call at a resize). Estimates are kept.

        ``accumulation_steps`` changes the backward passes per step too, for jobs that trade
        workers for accumulation."""
        if not scale >= 1:
            raise AdaScaleError(f"scale: must be >= 1, got {scale!r}")
        if accumulation_steps is not None:
            check_accumulation(accumulation_steps)
            self.accumulation_steps = accumulation_steps
        self._fixed_scale = float(scale)
        self._stats.forget_step()

    def add_param_group(self, group: dict[str, Any]) -> None:
        """Add a param group to the inner optimizer and measure its gradients from the next pass on."""
        self.optimizer.add_param_group(group)
        self._stats.watch(self.optimizer.param_groups[-1]["params"])

    def attach_ddp(self, model: torch.nn.Module) -> None:
        """Take ||g_bar||^2 from ``model``'s gradient all-reduce (required when world size > 1).

        ``model`` is the ``DistributedDataParallel`` wrapper of this optimizer's parameters. The
        communication hook is DDP's default (divide by the world size, all-reduce each bucket)
        plus the norm of the averaged bucket, on this rank's share of the buckets. DDP takes one
        comm hook per model: this fails on a model that already has one. Call it before the first
        backward pass through ``model``."""
        self._stats.attach_ddp(model)

    def detach_ddp(self) -> None:
        """Forget the attached DDP model (the job went back to one process)."""
        self._stats.detach_ddp()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients and forget a step that did not reach ``step()``.

        With a ``grad_scaler``, a step whose backward passes all ran but that the scaler skipped
        (inf/NaN) is counted in ``skipped_steps`` here."""
        if self.grad_scaler is not None and self._stats.passes() == self.accumulation_steps:
            self._skipped_steps += 1
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self._stats.forget_step()

    # ------------------------------------------------------------------------------ the step
    def step(self, closure: None = None) -> bool:
        """Apply one AdaScale step. Returns False when the step was skipped (non-finite gradients)."""
        if closure is not None:
            raise AdaScaleError("step(closure): closures are not supported; run the backward passes first")
        self._check_param_groups()
        world_size = self._stats.world_size(self.process_group)
        passes = self._stats.passes()
        try:
            if passes == 0:
                raise AdaScaleError("step() called before any backward pass through the wrapped parameters; "
                                    "call loss.backward() first")
            if passes != self.accumulation_steps:
                raise AdaScaleError(
                    f"accumulation_steps={self.accumulation_steps} but {passes} backward passes ran since the "
                    "last step; run exactly accumulation_steps backward passes per step (and call opt.zero_grad() "
                    "after a step a GradScaler skipped)")
            micro_sqnorm_sum, mean_sqnorm = self._stats.reduced()
        finally:
            self._stats.forget_step()
        if self.grad_scaler is not None and self.grad_scaler.is_enabled():
            loss_scale_sq = float(self.grad_scaler.get_scale()) ** 2
            micro_sqnorm_sum, mean_sqnorm = micro_sqnorm_sum / loss_scale_sq, mean_sqnorm / loss_scale_sq
        if not (math.isfinite(micro_sqnorm_sum) and math.isfinite(mean_sqnorm)):
            self._skipped_steps += 1
            return False

        num_grads = world_size * self.accumulation_steps
        scale = self._fixed_scale if self._fixed_scale is not None else float(num_grads)
        if num_grads > 1:
            theta = self.smoothing if self.smoothing is not None else default_smoothing(scale)
            self._estimates.fold(*step_estimates(micro_sqnorm_sum, mean_sqnorm, num_grads, scale), theta)
        elif scale != 1:
            raise AdaScaleError(f"scale={scale:g} but a step averages one gradient: nothing to estimate the variance "
                                "from; use accumulation_steps > 1 or more workers")
        self._gain = 1.0 if scale == 1 else self._estimates.gain_at(scale)
        self._last_scale = scale

        # w <- w - r_t * lr * schedule(floor(tau)) * g_bar; the group's own lr is restored afterwards.
        factor = math.sqrt(self._gain) if self._sqrt_gain else self._gain
        if self.lr_schedule is not None:
            factor *= self.lr_schedule(math.floor(self._progress))
        groups = self.optimizer.param_groups
        base_lrs = [group["lr"] for group in groups]
        for group, lr in zip(groups, base_lrs):
            group["lr"] = lr * factor
        try:
            self.optimizer.step()
        finally:
            for group, lr in zip(groups, base_lrs):
                group["lr"] = lr
        self._last_lr = float(base_lrs[0] * factor)
        self._progress += self._gain
        self._steps += 1
        return True

    # ------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "adascale": {
                "progress": self._progress,
                "gain": self._gain,
                "fixed_scale": self._fixed_scale,
                "last_scale": self._last_scale,
                "last_lr": self._last_lr,
                "grad_variance": self._estimates.sigma2,
                "grad_sqnorm": self._estimates.mu2,
                "num_estimates": self._estimates.count,
                "steps": self._steps,
                "skipped_steps": self._skipped_steps,
                "accumulation_steps": self.accumulation_steps,
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            ada = state["adascale"]
            inner = state["optimizer"]
            groups = len(inner["param_groups"])
        except (KeyError, TypeError) as exc:
            raise AdaScaleError(f"load_state_dict: not an AdaScale state (missing {exc})") from None
        if groups != len(self.optimizer.param_groups):
            raise AdaScaleError(f"load_state_dict: state has {groups} param groups, optimizer has "
                                f"{len(self.optimizer.param_groups)}")
        self.optimizer.load_state_dict(inner)
        if "base_lrs" in ada:  # written before the groups' lr was restored after each step
            for group, lr in zip(self.optimizer.param_groups, ada["base_lrs"]):
                group["lr"] = float(lr)
        self._progress = float(ada["progress"])
        self._gain = float(ada["gain"])
        self._fixed_scale = None if ada["fixed_scale"] is None else float(ada["fixed_scale"])
        self._last_scale = float(ada["last_scale"])
        self._last_lr = float(ada.get("last_lr", self.optimizer.param_groups[0]["lr"]))
        self._estimates = SmoothedEstimates(float(ada["grad_variance"]), float(ada["grad_sqnorm"]),
                                            int(ada["num_estimates"]))
        self._steps = int(ada["steps"])
        self._skipped_steps = int(ada["skipped_steps"])
        self.accumulation_steps = int(ada.get("accumulation_steps", self.accumulation_steps))
        self._stats.forget_step()

    def _check_param_groups(self) -> None:
        count = sum(1 for g in self.optimizer.param_groups for p in g["params"] if p.requires_grad)
        if count != self._stats.num_params:
            raise AdaScaleError("the inner optimizer's parameters changed after AdaScale wrapped it; add param "
                                "groups with AdaScale.add_param_group() so that their gradients are measured")

