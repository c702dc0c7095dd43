"""Multi-process helpers for the torch.distributed tests (importable by spawned children)."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
import torch.distributed as dist

from elastic.distributed import destroy_process_group, exit_spawned_rank


def init_gloo(rank: int, world_size: int, out_dir: str) -> None:
    """Rendezvous through a file in the test's own folder: no TCP port to pick, so none that another
    process can take between picking it and binding it."""
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'store')}", rank=rank,
                            world_size=world_size)


def micro_batches(step: int, count: int, dim: int = 6, batch: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same deterministic micro-batches for every process layout (step-major, then index)."""
    out = []
    for i in range(count):
        g = torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + i)
        x = torch.randn(batch, dim, generator=g)
        y = x @ torch.linspace(-1, 1, dim) + 0.5 * torch.randn(batch, generator=g)
        out.append((x, y))
    return out


def make_model(dim: int = 6) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(dim, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def make_large_model(dim: int = 6) -> torch.nn.Module:
    """About 270k parameters (above 2^18): several DDP buckets at ``bucket_cap_mb=0.25``."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(dim, 1024), torch.nn.Tanh(), torch.nn.Linear(1024, 256),
                               torch.nn.Tanh(), torch.nn.Linear(256, 1))


def run_steps(model, opt, ddp_model, micro_for_rank, steps: int, accumulation: int, nan_at_step: int | None = None,
              no_sync: bool = True, zero_grad=None, clip: float | None = None, scaler=None):
    """Runs `steps` AdaScale steps; returns [(gain, progress, sigma2, mu2, skipped)] per step.

    ``no_sync=False`` lets DDP all-reduce after every backward pass instead of the last one only;
    ``zero_grad`` replaces ``opt.zero_grad`` after each step; ``clip`` clips the gradient norm between
    the last backward pass and the step; ``scaler`` runs the loop of a torch.amp.GradScaler."""
    history = []
    for step in range(steps):
        micro = micro_for_rank(step)
        for i, (x, y) in enumerate(micro):
            last = i == len(micro) - 1
            skip_sync = no_sync and hasattr(ddp_model, "no_sync") and not last
            ctx = ddp_model.no_sync() if skip_sync else contextlib.nullcontext()
            with ctx:
                out = ddp_model(x).squeeze(-1)
                loss = torch.nn.functional.mse_loss(out, y)
                if nan_at_step == step and i == 0:
                    loss = loss * float("nan")
                loss = loss / accumulation
                (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(opt)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if scaler:
            skipped_before = opt.skipped_steps
            scaler.step(opt)
            scaler.update()
            (zero_grad or opt.zero_grad)()
            took = opt.skipped_steps == skipped_before
        else:
            took = opt.step()
            (zero_grad or opt.zero_grad)()
        history.append((opt.gain, opt.progress, opt.grad_variance, opt.grad_sqnorm, not took))
    return history


def zero_grad_for(zero: str, model: torch.nn.Module, opt) -> Any:
    """The call that ends a step in run_steps: ``adascale`` (opt.zero_grad), ``model``
    (model.zero_grad: None gradients) or ``none`` (gradients carry over into the next step)."""
    return {"adascale": opt.zero_grad, "model": model.zero_grad, "none": lambda: None}[zero]


def ddp_worker(rank: int, world_size: int, out_dir: str, options: dict[str, Any]) -> None:
    """One DDP rank of run_ddp_steps; saves its history and parameters to ``rank{rank}.pt``."""
    torch.set_num_threads(1)
    init_gloo(rank, world_size, out_dir)
    try:  # in a function of its own: the models are gone before the group is
        _ddp_run(rank, world_size, out_dir, **options)
    finally:
        destroy_process_group()
    exit_spawned_rank()


def _ddp_run(rank: int, world_size: int, out_dir: str, accumulation: int = 1, steps: int = 4, large: bool = False,
             nan_rank: int | None = None, nan_step: int | None = None, no_sync: bool = True, zero: str = "adascale",
             clip: float | None = None, scaler: bool = False) -> None:
    from elastic.adascale import AdaScale

    model = make_large_model() if large else make_model()
    ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.25 if large else 25)
    grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 14) if scaler else None
    opt = AdaScale(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), accumulation_steps=accumulation,
                   grad_scaler=grad_scaler)
    opt.attach_ddp(ddp)
    total = world_size * accumulation

    def mine(step):
        return micro_batches(step, total)[rank * accumulation:(rank + 1) * accumulation]

    opt.zero_grad()  # a clean start, whatever ends each step
    hist = run_steps(model, opt, ddp, mine, steps, accumulation, nan_at_step=nan_step if rank == nan_rank else None,
                     no_sync=no_sync, zero_grad=zero_grad_for(zero, model, opt), clip=clip, scaler=grad_scaler)
    torch.save({"history": hist, "params": [p.detach().clone() for p in model.parameters()]}, os.path.join(out_dir, f"rank{rank}.pt"))


class TwoHeads(torch.nn.Module):
    """``shared`` always; ``head_a`` only on rank 0's batches; ``spare`` never reaches the loss."""

    def __init__(self, dim: int = 6, spare: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.shared = torch.nn.Linear(dim, 8)
        self.head_a = torch.nn.Linear(8, 1)
        self.head_b = torch.nn.Linear(8, 1)
        if spare:
            self.spare = torch.nn.Linear(8, 1)

    def forward(self, x: torch.Tensor, use_a: bool | None) -> torch.Tensor:
        """``use_a`` None: both heads."""
        h = torch.tanh(self.shared(x))
        if use_a is None:
            return (self.head_a(h) + self.head_b(h)).squeeze(-1)
        return (self.head_a(h) if use_a else self.head_b(h)).squeeze(-1)


def _grads(model: torch.nn.Module) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]


def unused_params_worker(rank: int, world_size: int, out_dir: str) -> None:
    """Per rank: the gradients the inner optimizer saw, for bare DDP (find_unused_parameters) and
    for AdaScale attached to DDP, over the same two accumulation steps of two micro-batches."""
    torch.set_num_threads(1)
    init_gloo(rank, world_size, out_dir)
    try:
        _unused_params_run(rank, world_size, out_dir)
    finally:
        destroy_process_group()
    exit_spawned_rank()


def _unused_params_run(rank: int, world_size: int, out_dir: str) -> None:
    from elastic.adascale import AdaScale

    seen = {}
    for arm in ("bare", "adascale"):
        model = TwoHeads()
        ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2)
        opt = sgd
        if arm == "adascale":
            opt = AdaScale(sgd, scale=1.0, accumulation_steps=2)  # scale 1: the same lr as bare
            opt.attach_ddp(ddp)
        grads, before = [], []
        for step in range(2):
            micro = micro_batches(step, 2 * world_size)[2 * rank:2 * rank + 2]
            for i, (x, y) in enumerate(micro):
                ctx = ddp.no_sync() if i == 0 else contextlib.nullcontext()
                with ctx:
                    loss = torch.nn.functional.mse_loss(ddp(x, use_a=rank == 0), y)
                    (loss / 2).backward()
            # What code between backward() and step() (clipping, logging) sees: averaged gradients.
            before.append(_grads(model))
            opt.step()  # AdaScale hands the inner optimizer its gradients inside step()
            grads.append(_grads(model))
            opt.zero_grad()
        seen[arm] = {"grads": grads, "before_step": before, "params": [p.detach().clone() for p in model.parameters()]}
    torch.save(seen, os.path.join(out_dir, f"rank{rank}.pt"))
