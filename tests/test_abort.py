"""The out-of-band abort of gloo collectives (elastic.gloo_abort.GlooEndpoints), in plain torch processes.

Four ranks form a gloo group; rank 3 goes silent without exiting (as a SIGSTOPped or partitioned
worker would), so ranks 0-2 block in an all-reduce that only the collective timeout would end. An
abort thread in each of them shuts the group's connections: every blocked all-reduce must raise
within seconds, and the three can form a new group and all-reduce correctly in the same processes.
"""

from __future__ import annotations

import datetime
import os
import socket
import threading
import time

import pytest

#: The collective timeout of the test's group: far above what the abort must achieve.
TIMEOUT_S = 60.0
ABORT_AFTER_S = 0.5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, ports: tuple[int, int], queue) -> None:
    import torch
    import torch.distributed as dist

    from elastic.gloo_abort import GlooEndpoints, tcp_listeners

    timeout = datetime.timedelta(seconds=TIMEOUT_S)
    store = dist.TCPStore("127.0.0.1", ports[0], world, is_master=rank == 0, timeout=timeout)
    before = tcp_listeners()
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
    endpoints = GlooEndpoints.exchange(store, rank, world, before)
    dist.all_reduce(torch.ones(4))  # the group works
    queue.put(("ready", rank, endpoints is not None))
    if rank == world - 1:
        time.sleep(3 * TIMEOUT_S)  # silent but alive: its peers wait on it
        os._exit(0)
    shut = []
    threading.Timer(ABORT_AFTER_S, lambda: shut.append(endpoints.shut_down())).start()
    started = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1000))
        outcome = "completed"
    except Exception as exc:  # noqa: BLE001 - the point of the test
        outcome = type(exc).__name__
    blocked_s = time.monotonic() - started
    dist.destroy_process_group()
    # The survivors form a new group in the same processes.
    store2 = dist.TCPStore("127.0.0.1", ports[1], world - 1, is_master=rank == 0, timeout=timeout)
    dist.init_process_group("gloo", store=store2, rank=rank, world_size=world - 1, timeout=timeout)
    t = torch.full((3,), float(rank + 1))
    dist.all_reduce(t)
    queue.put(("done", rank, outcome, blocked_s, shut[0] if shut else -1, t.tolist()))
    dist.destroy_process_group()
    os._exit(0)


def test_abort_wakes_every_rank_blocked_on_a_silent_peer():
    import torch.multiprocessing as mp

    world = 4
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    ports = (_free_port(), _free_port())
    procs = [ctx.Process(target=_rank, args=(r, world, ports, queue), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    try:
        ready = [queue.get(timeout=120) for _ in range(world)]
        assert all(msg[0] == "ready" and msg[2] for msg in ready), ready
        done = sorted((queue.get(timeout=TIMEOUT_S / 2) for _ in range(world - 1)), key=lambda m: m[1])
    finally:
        for p in procs:
            p.kill()
    for _, rank, outcome, blocked_s, shut, reduced in done:
        assert outcome != "completed", f"rank {rank}: the all-reduce cannot complete without rank 3"
        # Woken by the abort (after ABORT_AFTER_S), not by the 60 s collective timeout.
        assert ABORT_AFTER_S * 0.5 < blocked_s < 10.0, (rank, blocked_s)
        assert shut >= 1, f"rank {rank} shut no connection"
        assert reduced == pytest.approx([6.0] * 3)  # 1 + 2 + 3 in the re-formed group
