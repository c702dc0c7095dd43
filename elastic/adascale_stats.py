"""The statistics of one AdaScale step: ``[sum_i ||g_i||^2, ||g_bar||^2]``, gathered by hooks.

One path for every layout (one process, accumulation, DDP, both; docs/design.md, "AdaScale: one
statistics path"): a tensor hook on each parameter norms each pass's gradient ``g_i`` before it is
added to ``.grad``; ``g_bar``'s norm comes from a post-accumulate hook in one process, or from DDP's
communication hook (DDP's default all-reduce plus the norm of the averaged bucket, each rank
norming its own share of the buckets). Every norm stays a float64 tensor on the gradient's device
until :meth:`StepStatistics.reduced` stacks the pair, all-reduces it once across DDP's group and
reads it with one host sync. :class:`elastic.adascale.AdaScale` turns the pair into the gain.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any, Callable

import torch
import torch.distributed as dist


class AdaScaleError(RuntimeError):
    """AdaScale was used in a way it cannot serve (one-line message)."""


def check_accumulation(accumulation_steps: Any) -> None:
    if not isinstance(accumulation_steps, int) or isinstance(accumulation_steps, bool) or accumulation_steps < 1:
        raise AdaScaleError(f"accumulation_steps: must be an integer >= 1, got {accumulation_steps!r}")


class StepStatistics:
    """The hooks on the wrapped parameters and, when attached, on the DDP model, with what they
    measured since the last :meth:`forget_step`."""

    def __init__(self, accumulation_steps: int) -> None:
        self.accumulation_steps = accumulation_steps

        # DDP, when attached: the group its all-reduce runs in, and this rank's place in it.
        self._ddp: Callable[[], Any] | None = None  # weak reference to the DDP model
        self._ddp_group: Any = None
        self.ddp_world_size = 1
        self._ddp_rank = 0

        # Per-step statistics, filled by the hooks, emptied by forget_step().
        self._params: list[torch.Tensor] = []
        self._handles: list[Any] = []
        self._passes: list[int] = []  # backward passes that reached parameter i this step
        self._micro_sq: list[torch.Tensor] = []  # ||g_i / accumulation_steps||^2, per parameter and pass
        self._mean_sq: list[torch.Tensor | None] = []  # one process: ||.grad||^2 of each parameter after its last pass
        self._bucket_sq: dict[int, torch.Tensor] = {}  # DDP: ||averaged bucket||^2, this rank's share
        self._buckets_reduced = 0  # DDP buckets all-reduced this step (all ranks' shares)

    @property
    def num_params(self) -> int:
        """Parameters watched (those that require a gradient)."""
        return len(self._params)

    def passes(self) -> int:
        """Backward passes through the wrapped parameters since the last step."""
        return max(self._passes, default=0)

    def attach_ddp(self, model: torch.nn.Module) -> None:
        group = getattr(model, "process_group", None)
        if not isinstance(model, torch.nn.parallel.DistributedDataParallel) or group is None:
            raise AdaScaleError(f"attach_ddp: expected a DistributedDataParallel model, got {type(model).__name__}")
        try:
            model.register_comm_hook(None, self._comm_hook)
        except RuntimeError as exc:
            raise AdaScaleError(f"attach_ddp: DDP refused the communication hook ({_first_line(exc)})") from None
        self._ddp = weakref.ref(model)
        self._ddp_group = group
        self.ddp_world_size = dist.get_world_size(group)
        self._ddp_rank = dist.get_rank(group)
        self.forget_step()

    def detach_ddp(self) -> None:
        self._ddp, self._ddp_group, self.ddp_world_size, self._ddp_rank = None, None, 1, 0
        self.forget_step()

    def world_size(self, process_group: Any) -> int:
        """Ranks averaging gradients this step: the attached DDP group's, else 1 (or an error)."""
        if self._ddp is not None:
            if self._ddp() is None:  # the DDP wrapper was dropped: back to one process
                self.detach_ddp()
            else:
                return self.ddp_world_size
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1:
            raise AdaScaleError("step(): torch.distributed has world size > 1 but no DDP model is attached; "
                                "call opt.attach_ddp(ddp_model) after building DistributedDataParallel")
        return 1

    def reduced(self) -> tuple[float, float]:
        """(sum_i ||g_i||^2 over the step's n gradients, ||g_bar||^2): one all-reduce, one host sync."""
        if not self._micro_sq:
            raise AdaScaleError("step(): no parameter has a gradient; did the loss depend on the model?")
        device = self._micro_sq[0].device
        # The hooks saw g_i / accumulation_steps (the loss of each pass is divided by it).
        micro = _sum(self._micro_sq, device) * float(self.accumulation_steps ** 2)
        if self._ddp is None:  # one process: g_bar's norms came from the post-accumulate hooks
            return tuple(torch.stack([micro, _sum(self._mean_sq, device)]).tolist())
        if self._buckets_reduced == 0:  # DDP's reducer ran no all-reduce through the comm hook
            raise AdaScaleError("step(): DDP did not all-reduce this step's gradients (was every backward pass "
                                "under no_sync, or the model not the attached one?)")
        # Each rank normed its own share of the averaged buckets, so the sum over ranks is ||g_bar||^2;
        # the all-reduce leaves the identical pair on every rank, hence the identical gain.
        stats = torch.stack([micro, _sum([self._bucket_sq[k] for k in sorted(self._bucket_sq)], device)])
        dist.all_reduce(stats, group=self._ddp_group)
        return tuple(stats.tolist())

    def forget_step(self) -> None:
        self._passes = [0] * len(self._params)
        self._micro_sq = []
        self._mean_sq = [None] * len(self._params)
        self._bucket_sq = {}
        self._buckets_reduced = 0

    # ---------------------------------------------------------------------------- the hooks
    def watch(self, params: list[torch.Tensor]) -> None:
        for param in params:
            if not param.requires_grad:
                continue
            index = len(self._params)
            self._params.append(param)
            self._passes.append(0)
            self._mean_sq.append(None)
            self._handles.append(param.register_hook(functools.partial(self._on_micro_grad, index)))
            self._handles.append(param.register_post_accumulate_grad_hook(functools.partial(self._on_accumulated, index)))

    def _on_micro_grad(self, index: int, grad: torch.Tensor) -> None:
        # A tensor hook runs before the gradient is added to .grad, so it sees this pass's gradient
        # alone; under DDP it also runs before the reducer (hooked after accumulation) reads it.
        self._passes[index] += 1
        self._micro_sq.append(_sqnorm(grad))

    def _on_accumulated(self, index: int, param: torch.Tensor) -> None:
        # In one process .grad holds g_bar once the step's last pass has been added: overwritten at
        # every pass, the last value is the complete one even for a parameter the last pass missed.
        # Under DDP .grad is still local here; g_bar comes from the comm hook instead.
        if self._ddp is None and self.accumulation_steps > 1:  # one gradient per step: nothing to estimate
            self._mean_sq[index] = _sqnorm(param.grad)

    def _comm_hook(self, _state, bucket):  # no annotations: DDP compares them with its own objects
        group, world_size = self._ddp_group, self.ddp_world_size
        index = bucket.index()
        future = dist.all_reduce(bucket.buffer().div_(world_size), group=group, async_op=True).get_future()

        def measured(fut: torch.futures.Future) -> torch.Tensor:
            averaged = fut.value()[0]
            self._buckets_reduced += 1
            if index % world_size == self._ddp_rank:  # this rank's share of ||g_bar||^2
                self._bucket_sq[index] = _sqnorm(averaged)
            return averaged

        return future.then(measured)


#: Squared norms are summed in float32 over rows of this many elements, the rows in float64: the
#: accuracy of a float64 norm (relative error ~1e-9 on 11M elements, against ~1e-5 for one float32
#: norm) at a third of its cost. The variance is a difference of two close sums, so it needs it.
_ROW = 1024


def _sqnorm(t: torch.Tensor) -> torch.Tensor:
    """||t||^2 as a float64 0-dim tensor on t's device (no host sync)."""
    flat = t.detach().reshape(-1)
    rows = flat.numel() // _ROW
    tail = flat[rows * _ROW:]
    total = torch.linalg.vector_norm(tail, dtype=torch.float32).double().square()
    if rows:
        total = total + torch.linalg.vector_norm(flat[:rows * _ROW].view(rows, _ROW), dim=1,
                                                 dtype=torch.float32).double().square().sum()
    return total


def _sum(values: list[torch.Tensor | None], device: torch.device) -> torch.Tensor:
    """The sum of float64 0-dim tensors, on ``device`` (zero for an empty list)."""
    present = [v for v in values if v is not None]
    if not present:
        return torch.zeros((), dtype=torch.float64, device=device)
    return torch.stack(present).to(device).sum()



def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
