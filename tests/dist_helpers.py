"""Multi-process helpers for the torch.distributed tests (importable by spawned children)."""

from __future__ import annotations

import contextlib
import os
import socket

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_gloo(rank: int, world_size: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)


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


def ddp_worker(rank: int, world_size: int, port: int, accumulation: int, steps: int, nan_rank: int | None,
               nan_step: int | None, out_dir: str, attach: bool = False, no_sync: bool = True,
               piggyback_max: int | None = None) -> None:
    """One DDP rank. ``attach``: the statistics ride on DDP's all-reduce (AdaScale.attach_ddp);
    ``piggyback_max`` overrides adascale.PIGGYBACK_MAX_NUMEL (0: the separate one-float path)."""
    from elastic import adascale
    from elastic.adascale import AdaScale

    if piggyback_max is not None:
        adascale.PIGGYBACK_MAX_NUMEL = piggyback_max
    torch.set_num_threads(1)
    init_gloo(rank, world_size, port)
    try:
        model = make_model()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = AdaScale(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), accumulation_steps=accumulation)
        if attach:
            opt.attach_ddp(ddp)
        total = world_size * accumulation

        def mine(step):
            allb = micro_batches(step, total)
            return allb[rank * accumulation:(rank + 1) * accumulation]

        hist = run_steps(model, opt, ddp, mine, steps, accumulation, nan_at_step=nan_step if rank == nan_rank else None,
                         no_sync=no_sync)
        torch.save({"history": hist, "params": [p.detach().clone() for p in model.parameters()],
                    "tensor_hooks": len(opt._handles)},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
