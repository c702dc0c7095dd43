"""AdaScale SGD (Johnson et al., ICML 2020): a learning rate that follows the batch size.

``AdaScale`` wraps a torch optimizer. Each step averages ``S`` scale-1 gradients (one per
micro-batch per rank); from those it estimates the gradient variance and squared norm, turns them
into the gain ratio ``r_t`` and applies ``r_t * base_lr * lr_schedule(floor(tau_t))``. Progress
``tau`` advances by ``r_t`` per step and is counted in scale-1 iterations, so a schedule written in
tau holds at every scale and across resizes.

A complete loop, on every rank (plain DDP, gradient accumulation, or both)::

    model = torch.nn.parallel.DistributedDataParallel(net)        # or just `net` in one process
    opt = AdaScale(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9),
                   accumulation_steps=2, lr_schedule=Step(total_progress=3000))
    while opt.progress < 3000:
        for i, micro in enumerate(micro_batches):                  # `accumulation_steps` of them
            ctx = model.no_sync() if i < 1 else contextlib.nullcontext()
            with ctx:
                (loss_fn(model, micro) / 2).backward()
        opt.step()
        opt.zero_grad()

Symbols (PAPER.md), next to the variables that hold them:

- ``S``  -> ``scale``: batches averaged per step, ``world_size * accumulation_steps`` by default.
- ``g_i`` -> one micro-batch gradient, seen by a tensor hook before it is accumulated into ``.grad``.
- ``g_bar`` -> ``.grad`` at ``step()``: the average of the ``S`` gradients after DDP's all-reduce.
- ``sigma^2`` -> ``grad_variance``: trace of the covariance of one scale-1 gradient.
- ``mu^2`` -> ``grad_sqnorm``: squared norm of the true gradient.
- ``r_t`` -> ``gain`` = (sigma^2 + mu^2) / (sigma^2 / S + mu^2), in [1, S].
- ``tau`` -> ``progress`` = sum of r_t.

Conventions chosen here:

- The estimates are of scale-1 quantities, so ``set_scale`` keeps them as they are (no rescaling
  of the moving averages, unlike fairscale); the next gain is computed at the new S.
- Smoothing: weight ``w = max(1/n, 1 - theta)`` for the n-th estimate, i.e. a plain mean for the
  first ``1/(1-theta)`` steps, then an exponential moving average with factor ``theta``.
- Adam and AdamW get the square-root gain for their learning rate (tau still advances by r_t),
  as AdaScale's linear rule is derived for SGD.
- Non-finite gradients skip the step on every rank (the check is part of the one all-reduce),
  leave the estimates, tau and the inner optimizer untouched, and are counted in ``skipped_steps``.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.distributed as dist

LrSchedule = Callable[[float], float]

#: sigma^2 is clipped from below so that r stays finite and inside [1, S].
MIN_VARIANCE = 1e-6

_SQRT_GAIN_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW)


class AdaScaleError(RuntimeError):
    """AdaScale was used in a way it cannot serve (one-line message)."""


class AdaScale:
    """Wrap ``optimizer`` so that its learning rate follows the AdaScale gain.

    Args:
        optimizer: the inner torch optimizer; its ``lr`` per param group is the scale-1 base lr.
        scale: S. ``None`` follows ``world_size * accumulation_steps`` at every step.
        accumulation_steps: backward passes per step on each rank, each of ``loss / accumulation_steps``.
        smoothing: theta of the moving average; ``None`` means ``max(1 - S/1000, 0)``.
        lr_schedule: ``tau -> multiplier`` of the base lr, called with ``floor(tau)``.
        process_group: the torch.distributed group; ``None`` means the default group when one is
            initialised (so a re-formed default group is picked up), else a single process.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        scale: float | None = None,
        accumulation_steps: int = 1,
        smoothing: float | None = None,
        lr_schedule: LrSchedule | None = None,
        process_group: Any = None,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise AdaScaleError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not isinstance(accumulation_steps, int) or accumulation_steps < 1:
            raise AdaScaleError(f"accumulation_steps: must be an integer >= 1, got {accumulation_steps!r}")
        if scale is not None and not scale >= 1:
            raise AdaScaleError(f"scale: must be >= 1, got {scale!r}")
        if smoothing is not None and not 0.0 <= smoothing < 1.0:
            raise AdaScaleError(f"smoothing: must be in [0, 1), got {smoothing!r}")
        self.optimizer = optimizer
        self.accumulation_steps = accumulation_steps
        self.smoothing = smoothing
        self.lr_schedule = lr_schedule
        self.process_group = process_group
        self._fixed_scale = None if scale is None else float(scale)
        self._base_lrs = [float(g["lr"]) for g in optimizer.param_groups]
        self._sqrt_gain = isinstance(optimizer, _SQRT_GAIN_OPTIMIZERS)

        # Running state (all of it is in state_dict).
        self._progress = 0.0  # tau
        self._gain = 1.0  # r_t of the last step
        self._sigma2 = 0.0  # smoothed sigma^2
        self._mu2 = 0.0  # smoothed mu^2
        self._num_estimates = 0  # n: estimates folded into the averages
        self._steps = 0
        self._skipped_steps = 0
        self._last_scale = self._fixed_scale or float(self._num_grads_per_step())

        # Per-step accumulators, filled by the gradient hooks.
        self._params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        self._hook_calls = [0] * len(self._params)
        self._micro_norms: list[torch.Tensor] = []  # ||g_i / accumulation_steps|| per tensor and pass (local)
        self._collect: bool | None = None  # whether this step's hooks collect norms (num_grads > 1)
        self._handles = [p.register_hook(self._make_hook(i)) for i, p in enumerate(self._params)]

    # ----------------------------------------------------------------- public read-only state
    @property
    def gain(self) -> float:
        """r_t of the last completed step (1.0 before the first)."""
        return self._gain

    @property
    def scale(self) -> float:
        """S: scale-1 batches averaged per step."""
        return self._fixed_scale if self._fixed_scale is not None else float(self._num_grads_per_step())

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
        return self._sigma2

    @property
    def grad_sqnorm(self) -> float:
        """Smoothed estimate of mu^2, the squared norm of the full gradient."""
        return self._mu2

    @property
    def num_estimates(self) -> int:
        """How many steps' statistics the smoothed estimates hold (0: nothing measured yet)."""
        return self._num_estimates

    @property
    def steps(self) -> int:
        return self._steps

    @property
    def skipped_steps(self) -> int:
        return self._skipped_steps

    @property
    def learning_rate(self) -> float:
        """Effective learning rate of the first param group at the last step."""
        return float(self.optimizer.param_groups[0]["lr"])

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def gain_at(self, scale: float) -> float:
        """The gain the current estimates predict at another scale S' (used by the controller)."""
        return gain_ratio(self._sigma2, self._mu2, scale) if self._num_estimates else 1.0

    # ----------------------------------------------------------------------------- control
    def set_scale(self, scale: float, accumulation_steps: int | None = None) -> None:
        """Use S = ``scale`` from the next step on (call at a resize). Estimates are kept.

        ``accumulation_steps`` changes the backward passes per step too, for jobs that trade
        workers for accumulation.
        """
        if not scale >= 1:
            raise AdaScaleError(f"scale: must be >= 1, got {scale!r}")
        if accumulation_steps is not None:
            if not isinstance(accumulation_steps, int) or accumulation_steps < 1:
                raise AdaScaleError(f"accumulation_steps: must be an integer >= 1, got {accumulation_steps!r}")
            self.accumulation_steps = accumulation_steps
        self._fixed_scale = float(scale)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients and forget a half-accumulated step (also after an abandoned step)."""
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self._reset_accumulators()

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def step(self, closure: None = None) -> bool:
        """Apply one AdaScale step. Returns False when the step was skipped (non-finite gradients)."""
        if closure is not None:
            raise AdaScaleError("step(closure): closures are not supported; run the backward passes first")
        backward_passes = max(self._hook_calls, default=0)
        if backward_passes == 0:
            raise AdaScaleError("step() called before any backward pass; call loss.backward() first")
        if backward_passes != self.accumulation_steps:
            raise AdaScaleError(
                f"accumulation_steps={self.accumulation_steps} but {backward_passes} backward passes ran "
                "since the last step; run exactly accumulation_steps backward passes per step"
            )
        world_size = self._world_size()
        num_grads = world_size * self.accumulation_steps
        scale = self.scale
        micro_sqnorm_sum, mean_sqnorm = self._reduced_statistics(world_size)
        self._reset_accumulators()

        if not (math.isfinite(micro_sqnorm_sum) and math.isfinite(mean_sqnorm)):
            self._skipped_steps += 1
            return False

        if num_grads > 1:
            # Unbiased estimators from the num_grads scale-1 gradients of this step (PAPER.md):
            # sigma2_hat = (sum_i ||g_i||^2 - S ||g_bar||^2) / (S - 1);  mu2_hat = ||g_bar||^2 - sigma2_hat / S
            sigma2_hat = (micro_sqnorm_sum - num_grads * mean_sqnorm) / (num_grads - 1)
            mu2_hat = mean_sqnorm - sigma2_hat / num_grads
            self._fold_estimate(sigma2_hat, mu2_hat, scale)
        self._gain = 1.0 if scale == 1 else self.gain_at(scale)
        self._last_scale = scale

        lr_factor = math.sqrt(self._gain) if self._sqrt_gain else self._gain
        schedule = self.lr_schedule(math.floor(self._progress)) if self.lr_schedule else 1.0
        for group, base_lr in zip(self.optimizer.param_groups, self._base_lrs):
            group["lr"] = lr_factor * base_lr * schedule
        self.optimizer.step()
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
                "grad_variance": self._sigma2,
                "grad_sqnorm": self._mu2,
                "num_estimates": self._num_estimates,
                "steps": self._steps,
                "skipped_steps": self._skipped_steps,
                "base_lrs": list(self._base_lrs),
                "accumulation_steps": self.accumulation_steps,
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            ada = state["adascale"]
            inner = state["optimizer"]
        except (KeyError, TypeError) as exc:
            raise AdaScaleError(f"load_state_dict: not an AdaScale state (missing {exc})") from None
        if len(ada["base_lrs"]) != len(self.optimizer.param_groups):
            raise AdaScaleError(
                f"load_state_dict: state has {len(ada['base_lrs'])} param groups, optimizer has "
                f"{len(self.optimizer.param_groups)}"
            )
        self.optimizer.load_state_dict(inner)
        self._progress = float(ada["progress"])
        self._gain = float(ada["gain"])
        self._fixed_scale = None if ada["fixed_scale"] is None else float(ada["fixed_scale"])
        self._last_scale = float(ada["last_scale"])
        self._sigma2 = float(ada["grad_variance"])
        self._mu2 = float(ada["grad_sqnorm"])
        self._num_estimates = int(ada["num_estimates"])
        self._steps = int(ada["steps"])
        self._skipped_steps = int(ada["skipped_steps"])
        self._base_lrs = [float(x) for x in ada["base_lrs"]]
        self._reset_accumulators()

    # ---------------------------------------------------------------------------- internals
    def _make_hook(self, index: int) -> Callable[[torch.Tensor], None]:
        # A tensor hook on a leaf runs before the gradient is accumulated into .grad, so it sees
        # this backward pass's gradient alone (g_i / accumulation_steps). Under DDP it also runs
        # before the reducer's all-reduce, which is registered on the AccumulateGrad node and
        # only fires after accumulation: the local, un-averaged micro-batch gradient is what we read.
        def hook(grad: torch.Tensor) -> None:
            self._hook_calls[index] += 1
            if self._collect is None:  # decided once per step, at its first hook
                self._collect = self._num_grads_per_step() > 1
            if not self._collect:
                return  # one gradient per step: nothing to estimate (NaNs are still caught in g_bar)
            # One norm per call, nothing else: squaring and summing happen once per step, in step().
            self._micro_norms.append(torch.linalg.vector_norm(grad.detach(), dtype=torch.float32))

        return hook

    def _reduced_statistics(self, world_size: int) -> tuple[float, float]:
        """(sum_i ||g_i||^2 over all S gradients, ||g_bar||^2): one all-reduce, one host sync."""
        grads = [p.grad.detach() for p in self._params if p.grad is not None]
        if not grads:
            raise AdaScaleError("step(): no parameter has a gradient; did the loss depend on the model?")
        device = grads[0].device
        mean_sq = _stacked(torch._foreach_norm(grads), device).square().sum()
        micro = _stacked(self._micro_norms, device).square().sum() if self._micro_norms \
            else torch.zeros((), device=device)
        # The hooks saw g_i / accumulation_steps: undo that scaling.
        stats = torch.stack([micro * float(self.accumulation_steps**2), mean_sq])
        if world_size > 1:
            # Every rank holds the same g_bar after DDP; averaging its norm anyway keeps the gain
            # bit-identical on every rank, and the NaN check rides on the same all-reduce.
            dist.all_reduce(stats, group=self._group())
            stats[1] = stats[1] / world_size
        micro_sum, mean_sqnorm = stats.tolist()
        return float(micro_sum), float(mean_sqnorm)

    def _fold_estimate(self, sigma2_hat: float, mu2_hat: float, scale: float) -> None:
        theta = self.smoothing if self.smoothing is not None else max(1.0 - scale / 1000.0, 0.0)
        self._num_estimates += 1
        weight = max(1.0 / self._num_estimates, 1.0 - theta)
        self._sigma2 += weight * (sigma2_hat - self._sigma2)
        self._mu2 += weight * (mu2_hat - self._mu2)

    def _reset_accumulators(self) -> None:
        self._hook_calls = [0] * len(self._params)
        self._micro_norms = []
        self._collect = None

    def _group(self) -> Any:
        return self.process_group if self.process_group is not None else dist.group.WORLD

    def _world_size(self) -> int:
        if self.process_group is not None:
            return dist.get_world_size(self.process_group)
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size()
        return 1

    def _num_grads_per_step(self) -> int:
        return self._world_size() * self.accumulation_steps


def _stacked(norms: list[torch.Tensor] | tuple[torch.Tensor, ...], device: torch.device) -> torch.Tensor:
    """Stack scalar norms as float32 on ``device``, converting only the ones that need it."""
    return torch.stack([n if n.device == device and n.dtype == torch.float32 else n.to(device, torch.float32)
                        for n in norms])


def gain_ratio(grad_variance: float, grad_sqnorm: float, scale: float) -> float:
    """r = (sigma^2 + mu^2) / (sigma^2 / S + mu^2), with sigma^2 >= 1e-6 and mu^2 >= 0, in [1, S]."""
    sigma2 = max(grad_variance, MIN_VARIANCE)
    mu2 = max(grad_sqnorm, 0.0)
    return min(max((sigma2 + mu2) / (sigma2 / scale + mu2), 1.0), float(scale))
