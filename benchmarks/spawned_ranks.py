"""The processes of a plain baseline: W ``torch.multiprocessing`` ranks started once and driven
block by block from the driver (``benchmarks.group_overhead``'s DDP loop, ``benchmarks.input_pipeline``'s
DataLoader loop).

Each rank runs ``target(rank, world, port, *args, commands, results)``: it puts ``("ready", rank)``
on ``results`` once built, then serves the commands put on its own queue until ``("stop",)``; rank 0
answers each other command with one message on ``results``. ``port`` is free for a gloo rendezvous."""

from __future__ import annotations

import socket
from typing import Any, Callable, Sequence

from benchmarks.ray_common import BenchmarkError, result_from_ranks


class SpawnedRanks:
    def __init__(self, target: Callable[..., None], world: int, args: Sequence[Any], what: str,
                 ready_timeout_s: float) -> None:
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.what, self.timeout_s = what, ready_timeout_s
        self.results = ctx.Queue()
        self.commands = [ctx.Queue() for _ in range(world)]
        port = free_port()
        # Not daemonic: a rank's DataLoader may start worker processes of its own (close() ends them).
        self.procs = [ctx.Process(target=target, args=(r, world, port, *args, self.commands[r], self.results))
                      for r in range(world)]
        for p in self.procs:
            p.start()
        try:
            for _ in range(world):
                msg = self.get()
                if msg[0] != "ready":
                    raise BenchmarkError(f"a {what} rank sent {msg[0]!r} instead of 'ready'")
        except BaseException:
            self.close()
            raise

    def get(self) -> Any:
        return result_from_ranks(self.results, self.procs, self.timeout_s, self.what)

    def command(self, *message: Any) -> Any:
        """Send ``message`` to every rank; rank 0's answer."""
        for q in self.commands:
            q.put(message)
        return self.get()

    def close(self) -> None:
        for q in self.commands:
            q.put(("stop",))
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


def serve_commands(rank: int, commands: Any, results: Any, run: Callable[[int], Any]) -> None:
    """A rank's side: say it is ready, then run each ``("run", n)`` block with ``run(n)`` until
    ``("stop",)``; rank 0 sends what ``run`` returns."""
    results.put(("ready", rank))
    while True:
        command = commands.get()
        if command[0] == "stop":
            return
        answer = run(command[1])
        if rank == 0:
            results.put(answer)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
