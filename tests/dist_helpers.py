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


def run_steps(model, opt, ddp_model, micro_for_rank, steps: int, accumulation: int, nan_at_step: int | None = None,
              no_sync: bool = True, zero_grad=None):
    """Runs `steps` AdaScale steps; returns [(gain, progress, sigma2, mu2, skipped)] per step.

    ``no_sync=False`` lets DDP all-reduce after every backward pass instead of the last one only;
    ``zero_grad`` replaces ``opt.zero_grad`` after each step."""
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
                (loss / accumulation).backward()
        took = opt.step()
        (zero_grad or opt.zero_grad)()
        history.append((opt.gain, opt.progress, opt.grad_variance, opt.grad_sqnorm, not took))
    return history


def zero_grad_for(zero: str, model: torch.nn.Module, opt) -> Any:
    """The call that ends a step in run_steps (see ddp_worker's ``zero``)."""
    return {"adascale": opt.zero_grad, "model": model.zero_grad, "none": lambda: None}[zero]


def ddp_worker(rank: int, world_size: int, accumulation: int, steps: int, nan_rank: int | None,
               nan_step: int | None, out_dir: str, attach: bool = False, no_sync: bool = True,
               piggyback_max: int | None = None, flat_max: int | None = None, zero: str = "adascale") -> None:
    """One DDP rank. ``attach``: the statistics ride on DDP's all-reduce (AdaScale.attach_ddp);
    ``piggyback_max`` overrides adascale.PIGGYBACK_MAX_NUMEL (0: the separate one-float path),
    ``flat_max`` adascale.FLAT_MAX_NUMEL (0: DDP's comm hook instead of AdaScale's own reduce);
    ``zero``: what runs after each step, ``adascale`` (opt.zero_grad), ``model`` (model.zero_grad:
    None gradients) or ``none`` (gradients carry over into the next step)."""
    from elastic import adascale

    if piggyback_max is not None:
        adascale.PIGGYBACK_MAX_NUMEL = piggyback_max
    if flat_max is not None:
        adascale.FLAT_MAX_NUMEL = flat_max
    torch.set_num_threads(1)
    init_gloo(rank, world_size, out_dir)
    try:  # in a function of its own: the models are gone before the group is
        _ddp_run(rank, world_size, accumulation, steps, nan_rank, nan_step, out_dir, attach, no_sync, zero)
    finally:
        destroy_process_group()
    exit_spawned_rank()


def _ddp_run(rank: int, world_size: int, accumulation: int, steps: int, nan_rank: int | None,
             nan_step: int | None, out_dir: str, attach: bool, no_sync: bool, zero: str = "adascale") -> None:
    from elastic.adascale import AdaScale

    model = make_model()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = AdaScale(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), accumulation_steps=accumulation)
    if attach:
        opt.attach_ddp(ddp)
    total = world_size * accumulation

    def mine(step):
        allb = micro_batches(step, total)
        return allb[rank * accumulation:(rank + 1) * accumulation]

    opt.zero_grad()  # a clean start, whatever ends each step
    hist = run_steps(model, opt, ddp, mine, steps, accumulation, nan_at_step=nan_step if rank == nan_rank else None,
                     no_sync=no_sync, zero_grad=zero_grad_for(zero, model, opt))
    torch.save({"history": hist, "params": [p.detach().clone() for p in model.parameters()],
                "tensor_hooks": len(opt._handles), "ddp_sync": ddp.require_backward_grad_sync},
               os.path.join(out_dir, f"rank{rank}.pt"))


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


def head_switch_worker(rank: int, world_size: int, out_dir: str, zero: str) -> None:
    """Per rank, AdaScale attached to DDP (flat sync): step 0 reaches head_b only, on every rank,
    then ``zero`` (see ddp_worker), then step 1 reaches every parameter. Saves which of head_a's
    gradients the inner optimizer got as None at each step, and head_a's weights."""
    torch.set_num_threads(1)
    init_gloo(rank, world_size, out_dir)
    try:
        _head_switch_run(rank, world_size, out_dir, zero)
    finally:
        destroy_process_group()
    exit_spawned_rank()


def _head_switch_run(rank: int, world_size: int, out_dir: str, zero: str) -> None:
    from elastic.adascale import AdaScale

    model = TwoHeads(spare=False)
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    opt = AdaScale(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2))
    opt.attach_ddp(ddp)
    opt.zero_grad()
    none_at_step, zero_grad = [], zero_grad_for(zero, model, opt)
    for step, use_a in enumerate((False, None)):
        x, y = micro_batches(step, world_size)[rank]
        torch.nn.functional.mse_loss(ddp(x, use_a=use_a), y).backward()
        opt.step()
        none_at_step.append([p.grad is None for p in model.head_a.parameters()])
        zero_grad()
    torch.save({"none": none_at_step, "head_a": [p.detach().clone() for p in model.head_a.parameters()]},
               os.path.join(out_dir, f"rank{rank}.pt"))
