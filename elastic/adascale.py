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

Cost (``benchmarks/overhead.py`` measures it): while S = 1 no hook is registered and a step adds
one fused non-finite check. With S > 1, a gradient hook per parameter tensor per backward pass:

- one process, a small model (``FLAT_MAX_NUMEL``): every ``.grad`` is a view of one flat buffer
  (zeroed in one op, ``||g_bar||^2`` in one op), and the hook on each tensor is a list's own
  ``append``, which autograd calls without running any Python: it keeps each pass's gradient, and
  ``step()`` norms them all at once (one packed copy, one dot);
- otherwise small gradients are only kept (a reference) and normed all together once per step;
  large ones are normed in the hook, where the memory traffic of the norm dwarfs the call;
- under DDP, ``attach_ddp(model)`` makes a step add no collective at all. A small model keeps the
  flat buffer there too and AdaScale all-reduces it itself, with this rank's statistics appended,
  when the step's last backward pass ends (where DDP's reducer would; the reducer stays idle).
  A larger one folds the local sum of squared norms into DDP's own all-reduce of its last
  gradient bucket (a DDP communication hook). Without ``attach_ddp``, ``step()`` runs one
  all-reduce of two floats.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, Callable

import torch
import torch.distributed as dist

LrSchedule = Callable[[float], float]

#: sigma^2 is clipped from below so that r stays finite and inside [1, S].
MIN_VARIANCE = 1e-6

_SQRT_GAIN_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW)

#: Gradients with at most this many elements are normed together at the end of the step (one op
#: for all of them) instead of one op each in the hook; above it the norm's memory traffic dominates.
SMALL_GRAD_NUMEL = 1 << 15

#: A model with at most this many gradient elements (one dtype, one device) accumulating keeps its
#: gradients as views of one flat buffer, and every backward pass's gradients until ``step()`` or
#: ``zero_grad()`` (``accumulation_steps`` gradient-sized tensors: at most 1 MiB each in float32;
#: backward passes run without either in between keep adding to them).
FLAT_MAX_NUMEL = 1 << 18

#: The passes' gradients of a small model are copied into one temporary and normed in one op as
#: long as that temporary has at most this many elements (8 MiB in float32); beyond, one norm each.
PASSES_FLATTEN_NUMEL = 1 << 21

#: A last DDP bucket up to this many elements carries the statistics inside its own all-reduce
#: (one copy of the bucket); a larger one gets a second, asynchronous all-reduce of one float.
PIGGYBACK_MAX_NUMEL = 1 << 18


#: Hook kinds that keep every .grad as a view of the flat buffer (one process / attached DDP).
_FLAT_KINDS = ("flat", "flat-sync")


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
        self._micro_norms: list[torch.Tensor] = []  # ||g_i / acc|| per tensor and pass (local); "flat": squared, per pass
        self._held: list[torch.Tensor] = []  # small g_i / accumulation_steps, normed together later
        self._delivered: list[torch.Tensor] = []  # micro sums already averaged over ranks by DDP's hook
        self._bucket_sq: list[torch.Tensor] = []  # "buckets" mode: ||local bucket||^2 per bucket, this pass
        self._bucket_mean_sq: list[torch.Tensor] = []  # "buckets" mode: ||averaged bucket||^2 per bucket
        self._ddp_group: Any = None  # set by attach_ddp
        self._ddp_world_size = 1
        self._ddp_covers_params = False  # the attached DDP model holds exactly this optimizer's params
        self._ddp_model: Callable[[], Any] | None = None  # weak reference to the attached DDP model
        self._ddp_flat_ok = False  # the attached model can leave its gradient all-reduce to us
        self._flat_sync = False  # armed: DDP's reducer is idle; the flat buffer is all-reduced by us
        # How this step gathers its statistics, decided at its first hook: "off" (one gradient per
        # step: nothing to estimate), "hooks" (tensor hooks norm every micro-batch gradient) or
        # "buckets" (DDP, one backward pass per step: each bucket's local gradients are normed in
        # one op inside the comm hook, and the averaged ones after the all-reduce).
        self._mode: str | None = None
        self._step_world_size = 0  # world size read at this step's first hook (0: not yet)
        # "flat" mode (a small model accumulating, in one process or under an attached DDP model):
        # every .grad is a view of _flat, and each parameter's list in _passes collects the gradient
        # of every backward pass (a hook that is a list's own append: no Python runs per call).
        self._small = _is_small(self._params)  # fits FLAT_MAX_NUMEL in one dtype on one device
        self._passes: list[list[torch.Tensor]] = [[] for _ in self._params]  # the same lists for life
        self._flat: torch.Tensor | None = None  # the gradients, flattened (allocated at first use)
        self._flat_full: torch.Tensor | None = None  # _flat, then the statistics' tail (see _flat_install)
        self._flat_tail: torch.Tensor | None = None
        self._flat_tail_host: Any = None  # on CPU, a NumPy view of the tail: read without a dispatch
        self._flat_views: list[torch.Tensor] = []  # .grad of each parameter while installed
        self._flat_absent = False  # zero_grad(set_to_none=True) zeroed the views: they stand for None
        # zero_grad zeroed the buffer, and nothing since has written to it but this step's passes.
        # Set by zero_grad after arming; cleared by arming (which is where adopting happens), by a
        # .grad found replaced at the all-reduce, and once a step has used the buffer.
        self._flat_clean = False
        self._pass_task = -1  # autograd graph task of the backward pass seen last (flat sync)
        self._flat_passes = 0  # backward passes seen this step (flat sync)
        self._flat_reduced = False  # attached DDP: this step's tail was all-reduced
        self._flat_unmeasured = False  # a .grad was not what the step's passes add up to: no estimate
        self._finite_buffers: dict[torch.device, tuple[torch.Tensor, torch.Tensor, Any]] = {}
        # Tensor hooks only while a step averages several gradients (S > 1); re-armed when it does.
        # Kind: "flat" (list appends, one process), "flat-sync" (attached DDP, small model) or
        # "tensor" (the per-gradient norms of _make_hook); None while no hook is registered.
        self._handles: list[Any] = []
        self._hook_kind: str | None = None
        self._hooks_wanted = True  # False after remove_hooks()
        self._armed_buckets = False  # this step is measured in the DDP comm hook alone ("buckets")
        self._bucket_passes = 0  # last buckets the comm hook saw this step (synced backward passes)
        self._step_unmeasured = False  # this step's statistics could not be trusted: no estimate folded
        self._rest_world = 0  # armed with nothing, for this world size (0: something is armed)
        self._rest_accumulation = accumulation_steps  # ... and these backward passes per step
        self._arm_hooks()

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
        self._arm_hooks()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients and forget a half-accumulated step (also after an abandoned step).

        A small model accumulating keeps its gradients as views of one buffer, which this zeroes
        in one op; the inner optimizer still sees ``None`` for a parameter that no backward pass
        reached when ``set_to_none`` (see ``FLAT_MAX_NUMEL``)."""
        zeroed = bool(self._flat_views) and all(p.grad is v or p.grad is None
                                                for p, v in zip(self._params, self._flat_views))
        if zeroed:
            self._flat_full.zero_()  # the gradients and the statistics' tail
            self._flat_absent = set_to_none
        else:
            self.optimizer.zero_grad(set_to_none=set_to_none)
        self._forget_and_rearm()
        # Arming adopts nothing here (every .grad was a view or None), so the buffer is still zero.
        self._flat_clean = zeroed

    def attach_ddp(self, model: torch.nn.Module) -> None:
        """Carry the statistics inside ``model``'s gradient all-reduce: a step adds no collective.

        ``model`` is the ``DistributedDataParallel`` wrapper around the parameters this optimizer
        updates. DDP takes one comm hook per model, so this fails on a model that already has one.

        - A small model (``FLAT_MAX_NUMEL``; no ``static_graph``, no DDP mixed precision), which DDP
          reduces as one bucket anyway: AdaScale does the gradient all-reduce itself when the
          step's last backward pass ends, where DDP's reducer would, so code between
          ``backward()`` and ``step()`` sees averaged gradients. The gradients are views of one
          flat buffer with the statistics appended, and one all-reduce averages both, as DDP
          would (divide, then sum). DDP's reducer stays idle
          (``require_backward_grad_sync`` is False, as inside ``no_sync``); buffers are still
          broadcast at the first forward of each step. ``remove_hooks()`` hands the all-reduce
          back to DDP.
        - Otherwise a DDP comm hook: the local sum of squared micro-batch norms rides along with
          the last gradient bucket.
        """
        if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
            raise AdaScaleError(f"attach_ddp: expected a DistributedDataParallel model, got {type(model).__name__}")
        try:
            model.register_comm_hook(None, self._comm_hook)
        except (RuntimeError, ValueError) as exc:  # e.g. the model already has a comm hook
            raise AdaScaleError(f"attach_ddp: {str(exc).splitlines()[0]}") from None
        self._ddp_group = model.process_group
        self._ddp_world_size = dist.get_world_size(model.process_group)  # fixed for the group's life
        self._ddp_covers_params = {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in self._params}
        self._set_ddp_sync(True)  # a model attached before gets its own all-reduce back
        self._ddp_model = weakref.ref(model)
        self._ddp_flat_ok = (self._small and self._ddp_covers_params and not getattr(model, "static_graph", False)
                             and getattr(model, "mixed_precision", None) is None)
        self._arm_hooks()

    def remove_hooks(self) -> None:
        """Stop measuring: later steps apply the gain of the estimates so far."""
        self._hooks_wanted = False
        self._arm_hooks()

    def _forget_and_rearm(self, world_size: int = 0) -> None:
        """Forget the step's accumulators and arm the hooks for the next step (``world_size``: read
        just now by the caller). Resting (nothing armed: S = 1, or after remove_hooks) in the world
        and with the accumulation it was armed for, only the comm hook's pass count can have moved,
        and that is all this resets. Right after the backward passes, with cold caches, the full
        reset and re-arm took 11.4 us of a digits b32 S = 1 step() in the training loop (1.2 us
        resting); alone in a hot loop, under 2 us."""
        if (self._rest_world and (world_size or self._world_size()) == self._rest_world
                and self.accumulation_steps == self._rest_accumulation):  # (also set by hand)
            self._bucket_passes = 0
            return
        self._reset_accumulators()
        self._arm_hooks()

    def _arm_hooks(self) -> None:
        """Tensor hooks for the next step when it averages several gradients in a way only they can
        see. None when S = 1 (the autograd-to-Python call per tensor would be the whole cost) and none
        when an attached DDP model with one backward pass per step shows every bucket to the comm
        hook. The world size is read here, after a step, at zero_grad and at set_scale/attach_ddp; a
        step whose world grew unseen gets no estimate of its own."""
        self._flat_clean = False  # set_scale, attach_ddp, ... mid-step: the buffer may hold passes
        world_size = self._world_size()
        several = self._hooks_wanted and world_size * self.accumulation_steps > 1
        ddp_current = self._ddp_group is not None and self._ddp_covers_params and self._ddp_world_size == world_size
        self._flat_sync = several and ddp_current and self._ddp_flat_ok
        self._armed_buckets = several and ddp_current and self.accumulation_steps == 1 and not self._flat_sync
        # One process, a small model, and no attached DDP model whose comm hook wants the norms.
        flat_local = (several and world_size == 1 and self._small
                      and (self._ddp_group is None or self._ddp_world_size != 1))
        if not several or self._armed_buckets:
            kind = None
        else:
            kind = "flat-sync" if self._flat_sync else "flat" if flat_local else "tensor"
        self._set_hooks(kind)
        self._set_ddp_sync(not self._flat_sync)
        self._rest_world = world_size if kind is None and not self._armed_buckets else 0
        self._rest_accumulation = self.accumulation_steps

    def _attached_model(self) -> Any:
        """The DDP model given to attach_ddp, while it is alive (None otherwise)."""
        return self._ddp_model() if self._ddp_model is not None else None

    def _set_ddp_sync(self, on: bool) -> None:
        """Let the attached DDP model all-reduce its gradients (on) or leave it to us (off)."""
        model = self._attached_model()
        if model is not None and model.require_backward_grad_sync != on:
            model.require_backward_grad_sync = on

    def _set_hooks(self, kind: str | None) -> None:
        if kind == self._hook_kind:
            if kind in _FLAT_KINDS:
                self._flat_install()  # adopt a .grad the caller replaced since (cheap when none was)
            return
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._hook_kind in _FLAT_KINDS and kind not in _FLAT_KINDS:
            self._flat_uninstall()
        self._hook_kind = kind
        if kind == "flat":
            # The list's own append: autograd calls it with each pass's gradient, no Python frame.
            self._handles = [p.register_hook(passes.append) for p, passes in zip(self._params, self._passes)]
        elif kind == "flat-sync":
            self._handles = [p.register_hook(self._make_sync_hook(i)) for i, p in enumerate(self._params)]
        elif kind == "tensor":
            self._handles = [p.register_hook(self._make_hook(i)) for i, p in enumerate(self._params)]
        if kind in _FLAT_KINDS:
            self._flat_install()

    def step(self, closure: None = None) -> bool:
        """Apply one AdaScale step. Returns False when the step was skipped (non-finite gradients)."""
        if closure is not None:
            raise AdaScaleError("step(closure): closures are not supported; run the backward passes first")
        if self._rest_world:
            # Nothing was armed for this step (S = 1, or after remove_hooks()): nothing to measure,
            # only the non-finite check. Kept short: it is every step of a one-worker job, where each
            # line of Python runs on caches the backward pass has just evicted.
            world_size = self._world_size()
            finite = self._grads_finite()
            self._forget_and_rearm(world_size)
            if not finite:
                self._skipped_steps += 1
                return False
            scale = self._fixed_scale if self._fixed_scale is not None else float(world_size * self.accumulation_steps)
            return self._apply(scale)
        hooked = bool(self._handles)
        if hooked or self._armed_buckets:
            if self._hook_kind in _FLAT_KINDS:
                backward_passes = max(map(len, self._passes))
                self._mode = "flat"
                self._step_world_size = self._ddp_world_size if self._flat_sync else self._world_size()
            elif hooked:
                backward_passes = max(self._hook_calls, default=0)
            else:  # counted by the comm hook; a pass under no_sync is not seen (nor allowed: one per step)
                backward_passes = self._bucket_passes
                self._mode, self._step_world_size = "buckets", self._ddp_world_size
            if backward_passes == 0:
                raise AdaScaleError("step() called before any backward pass (or with every pass under DDP's "
                                    "no_sync); call loss.backward() first")
            if backward_passes != self.accumulation_steps:
                raise AdaScaleError(
                    f"accumulation_steps={self.accumulation_steps} but {backward_passes} backward passes ran "
                    "since the last step; run exactly accumulation_steps backward passes per step"
                )
        world_size = self._step_world_size or self._world_size()
        num_grads = world_size * self.accumulation_steps
        scale = self._fixed_scale if self._fixed_scale is not None else float(num_grads)
        measured = hooked or self._armed_buckets
        self._step_unmeasured = False
        if measured:
            micro_sqnorm_sum, mean_sqnorm = self._reduced_statistics(world_size)
        else:  # armed, but no parameter to hook: only the non-finite check (which names the problem)
            micro_sqnorm_sum, mean_sqnorm = (0.0, 0.0) if self._grads_finite() else (math.nan, math.nan)
            num_grads = 1
        if hooked:
            self._reset_accumulators()
        else:  # re-read the world size (no tensor hook did at this step's start)
            self._forget_and_rearm(world_size)

        if not (math.isfinite(micro_sqnorm_sum) and math.isfinite(mean_sqnorm)):
            self._skipped_steps += 1
            return False

        if num_grads > 1 and not self._step_unmeasured:
            # Unbiased estimators from the num_grads scale-1 gradients of this step (PAPER.md):
            # sigma2_hat = (sum_i ||g_i||^2 - S ||g_bar||^2) / (S - 1);  mu2_hat = ||g_bar||^2 - sigma2_hat / S
            sigma2_hat = (micro_sqnorm_sum - num_grads * mean_sqnorm) / (num_grads - 1)
            mu2_hat = mean_sqnorm - sigma2_hat / num_grads
            self._fold_estimate(sigma2_hat, mu2_hat, scale)
        return self._apply(scale)

    def _apply(self, scale: float) -> bool:
        """The update at scale S: r_t from the estimates, lr = r_t * base_lr * schedule(floor(tau)), tau += r_t."""
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
            if self._mode is None:  # decided once per step, at its first hook
                self._mode = self._collection_mode()
            if self._mode != "hooks":
                return
            if grad.numel() <= SMALL_GRAD_NUMEL:
                # Keep it; it is normed with all the others in one op. Holding this very tensor
                # (not a detached alias, which AccumulateGrad cannot see) makes AccumulateGrad copy
                # it into .grad instead of adopting it, so later passes, which add into .grad in
                # place, never write to it.
                self._held.append(grad)
            else:
                # One norm per call, nothing else: squaring and summing happen once per step.
                self._micro_norms.append(torch.linalg.vector_norm(grad.detach(), dtype=torch.float32))

        return hook

    def _make_sync_hook(self, index: int) -> Callable[[torch.Tensor], None]:
        """Flat sync (attached DDP, small model): keep each pass's gradient, as in one process, and
        all-reduce the buffer when the step's last backward pass ends."""
        passes = self._passes[index]

        def hook(grad: torch.Tensor) -> None:
            passes.append(grad)
            task = torch._C._current_graph_task_id()  # passes run one after another
            if task != self._pass_task:
                self._pass_task = task
                self._flat_passes += 1
                if self._flat_passes == self.accumulation_steps:
                    # Where DDP's reducer would have: code between backward() and step() (clipping,
                    # logging) sees averaged gradients.
                    torch.autograd.Variable._execution_engine.queue_callback(self._flat_all_reduce)

        return hook

    def _collection_mode(self) -> str:
        self._step_world_size = self._world_size()  # read once per step (a Python call into c10d)
        if self._step_world_size * self.accumulation_steps <= 1:
            return "off"  # nothing to estimate (NaNs are still caught in g_bar)
        if self._ddp_group is not None and self._ddp_covers_params and self.accumulation_steps == 1:
            return "buckets"
        return "hooks"

    def _finite_check_buffers(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """The fused check's flag (kept at zero between checks) and unit scale on ``device``, and on
        CPU a view of the flag's memory, which reads it without an op dispatch."""
        buffers = self._finite_buffers.get(device)
        if buffers is None:
            found = torch.zeros(1, dtype=torch.float32, device=device)
            # memoryview: indexing it gives a Python float with no NumPy scalar in between.
            host = memoryview(found.numpy()).cast("B").cast("f") if found.device.type == "cpu" else None
            buffers = (found, torch.ones(1, dtype=torch.float32, device=device), host)
            self._finite_buffers[device] = buffers
        return buffers

    # ------------------------------------------------------------------------- "flat" mode
    def _flat_all_reduce(self) -> None:
        """End of the step's last backward pass (attached DDP, small model): one all-reduce averages
        the buffer and, in its tail, this rank's sum of squared pass norms and its parameters without
        a gradient."""
        no_grad = self._flat_collect()
        clean = self._flat_clean  # zero_grad zeroed the whole buffer, the tail's flags included
        if clean and self.accumulation_steps == 1:
            # One pass into a zeroed buffer: the buffer is that pass's gradient, in the order the
            # packed copy would have, so its dot is the same sum without the copy.
            torch.dot(self._flat, self._flat, out=self._flat_stat)
        else:
            self._passes_sqnorm()
        self._flat_clean = False  # it holds this step's gradients now
        if any(no_grad):  # None afterwards unless another rank has a gradient there
            self._flat_unreached.copy_(torch.tensor(no_grad, dtype=self._flat_unreached.dtype))
        elif not clean:  # the last all-reduce may have left other ranks' flags here
            self._flat_unreached.zero_()
        if self._ddp_world_size > 1:
            self._flat_full.div_(self._ddp_world_size)  # as DDP averages: divide, then sum
            _all_reduce_now(self._flat_full, self._ddp_group)
        torch.dot(self._flat, self._flat, out=self._flat_mean)
        self._flat_reduced = True  # the tail is read at step()
        model = self._attached_model()
        if model is not None:  # DDP broadcasts buffers at the next forward, as after its own sync
            # A plain bool: object.__setattr__ skips Module.__setattr__'s checks (~15 us a step).
            object.__setattr__(model, "require_forward_param_sync", True)

    def _flat_install(self) -> None:
        """Make each parameter's gradient a view of the flat buffer, from before the step's first
        pass on, so that every pass accumulates into it. A parameter without one keeps None."""
        if self._flat is None:
            p0 = self._params[0]
            numel = sum(p.numel() for p in self._params)
            # The tail carries this rank's statistics through the all-reduce (attached DDP): the
            # sum of squared pass norms, a flag per parameter without a gradient, and a last slot
            # for ||g_bar||^2, written after the all-reduce. Preset views keep it to few ops a step.
            full = self._flat_full = torch.zeros(numel + len(self._params) + 2, dtype=p0.dtype, device=p0.device)
            self._flat, self._flat_tail = full[:numel], full[numel:]
            self._flat_tail_host = self._flat_tail.numpy() if full.device.type == "cpu" else None
            self._flat_stat, self._flat_unreached, self._flat_mean = full[numel], full[numel + 1:-1], full[-1]
            offsets = [0]
            for p in self._params:
                offsets.append(offsets[-1] + p.numel())
            self._flat_views = [self._flat[a:b].view_as(p) for p, a, b in zip(self._params, offsets, offsets[1:])]
            self._flat_absent = False
        for p, v in zip(self._params, self._flat_views):
            if p.grad is not None and p.grad is not v:
                v.copy_(p.grad)
                p.grad = v

    def _flat_uninstall(self) -> None:
        """Hand each parameter a .grad of its own again (steps gather their statistics otherwise now)."""
        for p, v, passes in zip(self._params, self._flat_views, self._passes):
            if p.grad is v:
                p.grad = None if self._flat_absent and not passes else v.clone()

    def _flat_collect(self) -> list[bool]:
        """Make the buffer hold g_bar: copy each .grad that is not its view into the view and install
        the view (zeros for None). Returns, per parameter, whether it has no gradient this step:
        None, or a view that zero_grad(set_to_none=True) zeroed and no pass reached.

        A .grad that is not its view is trusted only if it holds exactly its passes' sum, as one
        accumulated from None does (``model.zero_grad()`` between steps); anything else replaced
        mid-step does not fit the passes, and the step folds no estimate."""
        found = [p.grad for p in self._params]
        views, absent = self._flat_views, self._flat_absent
        if all(g is v for g, v in zip(found, views)):  # as usual: every pass went into the buffer
            return [absent and not passes for passes in self._passes]
        self._flat_clean = False
        for p, v, g, passes in zip(self._params, views, found, self._passes):
            if g is v:
                continue
            if g is None:
                v.zero_()
                self._flat_unmeasured |= bool(passes)  # a pass's gradient was dropped
            else:
                total = torch.zeros_like(g)
                for grad in passes:  # in the order autograd accumulated them
                    total.add_(grad)
                if not torch.allclose(g, total):
                    self._flat_unmeasured = True
                v.copy_(g)
            p.grad = v
        return [g is None or (absent and g is v and not passes) for g, v, passes in zip(found, views, self._passes)]

    def _passes_sqnorm(self) -> None:
        """sum over this step's passes and parameters of ||gradient||^2, into the tail's stat slot:
        the passes' gradients are read once, in one copy and one dot while that copy stays small."""
        held = [g for passes in self._passes for g in passes]
        if not held:
            self._flat_stat.zero_()
        elif len(held) * self._flat.numel() <= PASSES_FLATTEN_NUMEL * len(self._passes):  # ~ passes x numel
            packed = torch._utils._flatten_dense_tensors(held)
            torch.dot(packed, packed, out=self._flat_stat)
        else:  # many passes of a model near FLAT_MAX_NUMEL: no big temporary
            norms = torch.stack(torch._foreach_norm(held))
            torch.dot(norms, norms, out=self._flat_stat)

    def _flat_tail_values(self) -> list[float]:
        host = self._flat_tail_host
        return host.tolist() if host is not None else self._flat_tail.tolist()

    def _flat_statistics(self) -> tuple[float, float]:
        """(sum_i ||g_i / acc||^2 over all ranks, ||g_bar||^2): the passes' gradients normed at once,
        one dot and one host sync (with attached DDP, of what the all-reduce at the end of the last
        pass left)."""
        reduced, self._flat_reduced = self._flat_reduced, False
        self._flat_clean = False
        if reduced:
            values = self._flat_tail_values()
            world_size = self._ddp_world_size
            micro_sum, mean_sqnorm = world_size * values[0], values[-1]
            # Each flag was divided by the world size and summed: 1 where no rank has a gradient.
            no_grad = [v > 1.0 - 0.5 / world_size for v in values[1:-1]]
        else:  # one process
            no_grad = self._flat_collect()
            if self._step_world_size != 1:  # the world grew unseen: these are one rank's passes
                self._flat_unmeasured = True
            self._passes_sqnorm()
            torch.dot(self._flat, self._flat, out=self._flat_mean)
            values = self._flat_tail_values()  # the one host sync
            micro_sum, mean_sqnorm = values[0], values[-1]
        self._step_unmeasured = self._flat_unmeasured
        # A parameter without a gradient gets None, as the inner optimizer would see without us.
        if any(no_grad):
            for p, none in zip(self._params, no_grad):
                if none:
                    p.grad = None
        self._flat_absent = False
        return micro_sum, mean_sqnorm

    def _grads_finite(self) -> bool:
        """One gradient per step: only the non-finite check, fused into one op for a small model."""
        grads = [p.grad for p in self._params if p.grad is not None]
        if not grads:
            raise AdaScaleError("step() called before any backward pass (no parameter has a gradient); "
                                "call loss.backward() first")
        if self._small:
            found, one, found_host = self._finite_check_buffers(grads[0].device)
            try:
                # Multiplies by 1.0 (exact) and flags any inf/NaN: one fused op on CPU and CUDA.
                torch._amp_foreach_non_finite_check_and_unscale_(grads, found, one)
                finite = (found_host[0] if found_host is not None else found.item()) == 0.0
            except (RuntimeError, AttributeError):  # a dtype or build without the fused kernel
                found.zero_()
            else:
                if not finite:
                    found.zero_()  # ready for the next check
                return finite
        return all(math.isfinite(v) for v in _stacked(torch._foreach_norm(grads), grads[0].device).tolist())

    def _take_local_norms(self) -> list[torch.Tensor]:
        """The micro-batch norms gathered since the last call (the held small gradients normed now)."""
        norms = self._micro_norms
        if self._held:
            by_kind: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
            for g in self._held:
                by_kind.setdefault((g.device, g.dtype), []).append(g)
            with torch.no_grad():
                for group in by_kind.values():
                    norms.extend(torch._foreach_norm(group))
        self._micro_norms, self._held = [], []
        return norms

    def _comm_hook(self, _state, bucket):  # no annotations: DDP compares them with its own objects
        """DDP comm hook: average the bucket as DDP does; the last bucket also carries our statistics.

        ``bucket`` is a ``dist.GradBucket``; returns a ``Future`` of the averaged bucket (for the
        last bucket, one element longer: DDP reads each gradient's slice and ignores the tail)."""
        group = self._ddp_group
        world_size = self._ddp_world_size
        buffer = bucket.buffer()
        mode = self._mode or ("buckets" if self._armed_buckets else None)
        if bucket.is_last():
            self._bucket_passes += 1
        local: torch.Tensor | None = None
        if mode == "buckets":
            self._bucket_sq.append(_sqnorm(buffer))  # this rank's gradient: one of the S samples
            if bucket.is_last():
                local = torch.stack(self._bucket_sq).sum() if len(self._bucket_sq) > 1 else self._bucket_sq[0]
                self._bucket_sq = []
        elif mode == "hooks" and bucket.is_last():
            norms = self._take_local_norms()
            if norms:
                local = _sum_of_squares(norms, buffer.device)
        numel = buffer.numel()
        mean_sq = self._bucket_mean_sq if mode == "buckets" else None

        def averaged(out: torch.Tensor) -> torch.Tensor:
            if mean_sq is not None:  # ||g_bar||^2 of this bucket's parameters
                mean_sq.append(_sqnorm(out[:numel]))
            return out

        if local is None:
            buffer.div_(world_size)
            return _all_reduce(buffer, group).then(lambda fut: averaged(fut.value()[0]))
        local = local.reshape(1)
        if numel <= PIGGYBACK_MAX_NUMEL and buffer.dtype == torch.float32:
            packed = torch.cat([buffer, local]).div_(world_size)

            def unpack(fut: torch.futures.Future) -> torch.Tensor:
                out = fut.value()[0]
                self._delivered.append(out[numel])
                return averaged(out)

            return _all_reduce(packed, group).then(unpack)
        # A large (or low-precision) bucket: a second all-reduce of one float, queued right behind it.
        buffer.div_(world_size)
        local = local.to(torch.float32).div_(world_size)
        both = torch.futures.collect_all([_all_reduce(buffer, group), _all_reduce(local, group)])

        def done(fut: torch.futures.Future) -> torch.Tensor:
            grads, stat = (f.value()[0] for f in fut.value())
            self._delivered.append(stat[0])
            return averaged(grads)

        return both.then(done)

    def _reduced_statistics(self, world_size: int) -> tuple[float, float]:
        """(sum_i ||g_i||^2 over all S gradients, ||g_bar||^2): at most one all-reduce, one host sync."""
        acc2 = float(self.accumulation_steps**2)  # the hooks saw g_i / accumulation_steps
        if self._mode == "flat":
            micro_sum, mean_sqnorm = self._flat_statistics()
            return micro_sum * acc2, mean_sqnorm
        if self._mode == "off":  # one gradient: nothing to estimate, only the non-finite check
            return (0.0, 0.0) if self._grads_finite() else (math.nan, math.nan)
        if self._mode == "buckets":
            # Everything came with DDP's all-reduce: the local sums (averaged over ranks) and the
            # squared norms of the averaged buckets.
            if not self._delivered or not self._bucket_mean_sq:
                raise AdaScaleError("step(): DDP did not all-reduce the gradients of this step "
                                    "(was the backward pass run under no_sync?)")
            values = torch.stack([*self._delivered, *self._bucket_mean_sq]).tolist()
            split = len(self._delivered)
            return self._ddp_world_size * sum(values[:split]) * acc2, sum(values[split:])
        grads = [p.grad.detach() for p in self._params if p.grad is not None]
        if not grads:
            raise AdaScaleError("step(): no parameter has a gradient; did the loss depend on the model?")
        device = grads[0].device
        mean_norms = list(torch._foreach_norm(grads))
        local = self._take_local_norms()  # norms no comm hook has carried across ranks yet
        delivered = self._delivered  # local sums averaged over ranks by the comm hook
        if world_size > 1 and local:
            # No comm hook carried them: one all-reduce of [micro sum, ||g_bar||^2]. Every rank holds
            # the same g_bar after DDP; averaging its norm anyway keeps the gain bit-identical on
            # every rank, and the NaN check rides on the same all-reduce.
            micro = _sum_of_squares(local, device)
            if delivered:  # already averaged over ranks: summed over ranks below, they count once
                micro = micro + _stacked(delivered, device).sum()
            stats = torch.stack([micro, _sum_of_squares(mean_norms, device)])
            dist.all_reduce(stats, group=self._group())
            micro_sum, mean_sqnorm = stats.tolist()
            return float(micro_sum) * acc2, float(mean_sqnorm) / world_size
        # One process, or every micro norm already summed across ranks by the comm hook (g_bar is
        # the all-reduced average, identical on every rank): one stack and one host sync.
        values = _stacked([*local, *delivered, *mean_norms], device).tolist()
        split = len(local) + len(delivered)
        delivered_sum = self._ddp_world_size * sum(values[len(local):split])  # averaged over DDP's group
        micro_sum = sum(v * v for v in values[:len(local)]) + delivered_sum
        mean_sqnorm = sum(v * v for v in values[split:])
        return micro_sum * acc2, mean_sqnorm

    def _fold_estimate(self, sigma2_hat: float, mu2_hat: float, scale: float) -> None:
        theta = self.smoothing if self.smoothing is not None else max(1.0 - scale / 1000.0, 0.0)
        self._num_estimates += 1
        weight = max(1.0 / self._num_estimates, 1.0 - theta)
        self._sigma2 += weight * (sigma2_hat - self._sigma2)
        self._mu2 += weight * (mu2_hat - self._mu2)

    def _reset_accumulators(self) -> None:
        self._hook_calls = [0] * len(self._params)
        for passes in self._passes:  # cleared, not replaced: the "flat" hooks are their appends
            passes.clear()
        self._micro_norms = []
        self._held = []
        self._delivered = []
        self._bucket_sq = []
        self._bucket_mean_sq = []
        self._mode = None
        self._step_world_size = 0
        self._pass_task = -1
        self._bucket_passes = 0
        self._flat_passes = 0
        self._flat_reduced = False
        self._flat_unmeasured = False

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


def _is_small(params: list[torch.Tensor]) -> bool:
    """Dense floating-point parameters of one dtype on one device, FLAT_MAX_NUMEL elements at most."""
    if not params:
        return False
    p0 = params[0]
    return (p0.dtype in (torch.float32, torch.float64) and sum(p.numel() for p in params) <= FLAT_MAX_NUMEL
            and all(p.dtype == p0.dtype and p.device == p0.device and p.layout == torch.strided for p in params))


def _stacked(norms: list[torch.Tensor] | tuple[torch.Tensor, ...], device: torch.device) -> torch.Tensor:
    """Stack scalar norms as float32 on ``device`` (one op when they already agree, as they do)."""
    try:
        return torch.stack(list(norms)).to(device, torch.float32)
    except RuntimeError:  # tensors on several devices (a model split across them)
        return torch.stack([n.to(device, torch.float32) for n in norms])


def _sum_of_squares(norms: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """sum_k norms[k]^2 as a float32 scalar on ``device``."""
    stacked = _stacked(norms, device)
    return torch.dot(stacked, stacked)


def _all_reduce_work(tensor: torch.Tensor, group: Any) -> Any:
    """Start an in-place sum over ``group``; returns the c10d work object.

    Calls the process group directly: ``dist.all_reduce``'s Python checks cost about as much as
    the enqueue itself (~80 us each, measured in a comm hook on the digits CNN)."""
    try:
        return group.allreduce([tensor])
    except (AttributeError, TypeError):  # a group object without the method: the public call
        return dist.all_reduce(tensor, group=group, async_op=True)


def _all_reduce(tensor: torch.Tensor, group: Any) -> torch.futures.Future:
    """Asynchronous in-place sum over ``group``; the future's value is ``[tensor]``."""
    return _all_reduce_work(tensor, group).get_future()


def _all_reduce_now(tensor: torch.Tensor, group: Any) -> None:
    """In-place sum over ``group``, waited for on the work object (which lets go of the GIL; a
    wait on its future measured slower in the DDP benchmark)."""
    _all_reduce_work(tensor, group).wait()


def _sqnorm(flat: torch.Tensor) -> torch.Tensor:
    """||flat||^2 of a 1-D tensor, in one op (float32 or wider; low precision is widened first)."""
    if flat.dtype in (torch.float32, torch.float64):
        return torch.dot(flat, flat)
    return torch.linalg.vector_norm(flat, dtype=torch.float32).square()


def gain_ratio(grad_variance: float, grad_sqnorm: float, scale: float) -> float:
    """r = (sigma^2 + mu^2) / (sigma^2 / S + mu^2), with sigma^2 >= 1e-6 and mu^2 >= 0, in [1, S]."""
    sigma2 = max(grad_variance, MIN_VARIANCE)
    mu2 = max(grad_sqnorm, 0.0)
    return min(max((sigma2 + mu2) / (sigma2 / scale + mu2), 1.0), float(scale))
