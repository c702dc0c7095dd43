"""The worker: one Ray actor per GPU (or CPU slot) that owns a model replica and runs steps.

The driver tells each worker which samples to use (its shard of the sampler's plan) and when to
join a new process group; a worker never decides anything about the group on its own.

Out-of-band control: the group runs each worker with a second Ray concurrency group
(:data:`CONTROL_GROUP`) whose calls (``ping``, ``abort_collectives``) are served on their own
thread while ``train_steps`` is blocked in a collective. Gloo in torch 2.13 has no working abort
(``ProcessGroup.abort()`` returns at once and the blocked collective stays blocked, measured), and a
survivor that is not next to a dead rank in gloo's ring waits for the collective timeout. What does
wake it is its connections closing, as when a peer process exits: ``abort_collectives`` shuts down
this rank's gloo connections (those to and from the group's listeners, found by address), so the
blocked collective raises at once, and every peer blocked on this rank raises in turn.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
import threading
import time
from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch.utils.data import default_collate

from elastic.adascale import AdaScale
from elastic.config import JobSpec, parse_job_spec
from elastic.schedules import make_schedule
from elastic.task import load_task

logger = logging.getLogger(__name__)

#: A collective that waits longer than this on a silent peer fails instead of hanging forever
#: (a last resort: the driver aborts the collectives of a broken group long before, see the module doc).
COLLECTIVE_TIMEOUT_S = 60.0
#: The Ray concurrency group of the out-of-band calls (one thread beside the training thread).
CONTROL_GROUP = "control"


def build_optimizer(spec: JobSpec, params) -> torch.optim.Optimizer:
    o = spec.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    betas = o.betas or (0.9, 0.999)
    cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
    return cls(params, lr=o.lr, betas=betas, weight_decay=o.weight_decay)


def build_adascale(spec: JobSpec, model: torch.nn.Module) -> AdaScale:
    """AdaScale around the configured optimizer; with adascale disabled, S is pinned to 1 (gain 1)."""
    s = spec.lr_schedule
    schedule = make_schedule(s.kind, spec.total_progress, s.milestones, s.gamma, s.warmup_fraction)
    scale = None if spec.adascale.enabled else 1
    return AdaScale(build_optimizer(spec, model.parameters()), scale=scale,
                    accumulation_steps=spec.accumulation_steps, lr_schedule=schedule)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ElasticWorker:
    """A model replica. Methods are called by :class:`elastic.group.WorkerGroup` through Ray."""

    def __init__(self, spec: JobSpec | Mapping[str, Any], worker_id: str) -> None:
        self.spec = spec if isinstance(spec, JobSpec) else parse_job_spec(spec)
        self.worker_id = worker_id
        torch.set_num_threads(max(1, int(self.spec.cluster.num_cpus_per_worker)))
        torch.manual_seed(self.spec.seed)
        self.task = load_task(self.spec.task, self.spec.task_args)
        self.dataset = self.task.train_dataset()
        self.device = torch.device("cuda", 0) if self.spec.cluster.use_gpu and torch.cuda.is_available() else torch.device("cpu")
        self.model = self.task.build_model().to(self.device)
        self.opt = build_adascale(self.spec, self.model)
        self.ddp: torch.nn.Module = self.model
        self.rank = -1
        self.world_size = 0
        self.steps_done = 0
        self._store: Any = None
        self._gloo: _GlooEndpoints | None = None  # this rank's gloo addresses, for abort_collectives
        self._abort_lock = threading.Lock()
        self._generation = -1

    # ------------------------------------------------------------------------ identity
    def info(self) -> dict[str, Any]:
        import ray

        return {
            "worker_id": self.worker_id,
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "hostname": socket.gethostname(),
            "ip": ray.util.get_node_ip_address(),
            "dataset_len": len(self.dataset),
            "device": str(self.device),
        }

    # ------------------------------------------------------------------------ group membership
    def open_rendezvous(self) -> tuple[str, int]:
        """As rank 0 of the next group: host its TCP store now, so the others connect at once."""
        import ray

        host = ray.util.get_node_ip_address()
        port = _free_port(host)
        self._store = dist.TCPStore(host, port, is_master=True, wait_for_workers=False,
                                    timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        return host, port

    def join(self, rank: int, world_size: int, host: str, port: int, state: Mapping[str, Any] | None = None,
             generation: int = 0) -> dict[str, Any]:
        """Leave the old group, form the new one, take ``state`` if given, set AdaScale's scale.
        ``generation`` numbers the driver's groups, so that a late abort meant for an older group
        leaves this one alone (see :meth:`abort_collectives`)."""
        started = time.perf_counter()
        self.leave()
        store = self._store if rank == 0 else dist.TCPStore(
            host, port, is_master=False, timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        sockets_before = _tcp_listeners()
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        if backend == "gloo" and world_size > 1:
            gloo = _GlooEndpoints.exchange(store, rank, world_size, sockets_before)
            with self._abort_lock:
                self._gloo, self._generation = gloo, generation
        self._store = None
        if state is not None:
            self.load_state(state)
        # DDP broadcasts rank 0's parameters and buffers while it is built: one more guarantee
        # that every replica starts the new group identical.
        self.ddp = torch.nn.parallel.DistributedDataParallel(self.model) if world_size > 1 else self.model
        if world_size > 1:  # AdaScale's statistics ride on DDP's gradient all-reduce
            self.opt.attach_ddp(self.ddp)
        self.rank, self.world_size = rank, world_size
        if self.spec.adascale.enabled:
            self.opt.set_scale(world_size * self.spec.accumulation_steps)
        return {"worker_id": self.worker_id, "steps_done": self.steps_done, "join_s": time.perf_counter() - started}

    def leave(self) -> None:
        self.ddp = self.model  # the DDP wrapper goes before its process group does
        with self._abort_lock:
            self._gloo = None
        if dist.is_initialized():
            dist.destroy_process_group()
        self.rank, self.world_size = -1, 0

    # ------------------------------------------------------------------------ out of band (CONTROL_GROUP)
    def abort_collectives(self, generation: int | None = None) -> dict[str, Any]:
        """Make every collective of the current group fail now, here and on the peers blocked on
        this rank (see the module docstring). Safe at any time: with no group, or after the call
        that used it returned, it shuts connections that the next ``join`` discards anyway; with
        ``generation``, only if the current group is that one."""
        with self._abort_lock:
            current = generation is None or generation == self._generation
            shut = self._gloo.shut_down() if self._gloo is not None and current else 0
        return {"worker_id": self.worker_id, "connections_shut": shut, "time_s": time.time()}

    # ------------------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        """Everything a new replica needs to continue exactly: model, optimizer + AdaScale, step count."""
        return {
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": _to_cpu(self.opt.state_dict()),
            "steps_done": self.steps_done,
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(_to_device(state["optimizer"], self.device))
        self.steps_done = int(state["steps_done"])
        self.opt.zero_grad()

    def steps_completed(self) -> int:
        return self.steps_done

    # ------------------------------------------------------------------------ training
    def train_step(self, micro_batches: list[list[int]]) -> dict[str, Any]:
        """One optimizer step over this rank's micro-batches. Never raises: failures are reported."""
        started = time.perf_counter()
        try:
            losses = []
            for i, indices in enumerate(micro_batches):
                batch = _to_device(default_collate([self.dataset[j] for j in indices]), self.device)
                last = i == len(micro_batches) - 1
                sync = contextlib.nullcontext() if last or self.ddp is self.model else self.ddp.no_sync()
                with sync:
                    loss = self.task.loss(self.ddp, batch)
                    (loss / len(micro_batches)).backward()
                losses.append(loss.detach())
            applied = self.opt.step()
            self.opt.zero_grad()
            loss_mean = float(torch.stack(losses).mean())
        except Exception as exc:  # noqa: BLE001 - the driver decides: peer lost, or a task bug
            self.opt.zero_grad()
            return {"ok": False, "worker_id": self.worker_id, "steps_done": self.steps_done,
                    "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                    "communication": _is_communication_error(exc)}
        self.steps_done += 1
        return {
            "ok": True,
            "worker_id": self.worker_id,
            "steps_done": self.steps_done,
            "skipped": not applied,
            "loss": loss_mean,
            "gain": self.opt.gain,
            "scale": self.opt.scale,
            "efficiency": self.opt.efficiency,
            "progress": self.opt.progress,
            "learning_rate": self.opt.learning_rate,
            "grad_variance": self.opt.grad_variance,
            "grad_sqnorm": self.opt.grad_sqnorm,
            "num_estimates": self.opt.num_estimates,
            "compute_s": time.perf_counter() - started,
        }

    def train_steps(self, steps: list[list[list[int]]]) -> list[dict[str, Any]]:
        """Several optimizer steps in one call (each entry is one step's micro-batches), in order.

        Stops at the first step that fails, whose report ends the list: the reports before it
        are of completed steps, so the driver knows exactly how far this rank got."""
        reports = []
        for micro_batches in steps:
            reports.append(self.train_step(micro_batches))
            if not reports[-1]["ok"]:
                # When the failure is the group's, a peer may still be blocked on this rank (it is
                # not next to the dead rank in gloo's ring): close this rank's connections so that
                # it raises now rather than at COLLECTIVE_TIMEOUT_S. The driver re-forms the group.
                reports[-1]["failed_at_s"] = time.time()
                if reports[-1].get("communication"):
                    self.abort_collectives()
                break
        return reports

    def evaluate(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.task.evaluate(self.model).items()}

    def ping(self) -> float:
        """Heartbeat (served in CONTROL_GROUP, so it answers while a step runs): the wall time."""
        return time.time()


def _tcp_listeners() -> set[tuple[str, int]]:
    """Addresses of this process's listening TCP sockets."""
    return {local for local, _, listening, _ in _tcp_sockets() if listening}


def _tcp_sockets():
    """(local address, peer address or None, listening, fd) of this process's TCP sockets; reads
    each through a duplicate descriptor, so nothing of the original changes."""
    for name in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            sock = socket.socket(fileno=os.dup(int(name)))
        except (OSError, ValueError):
            continue  # closed meanwhile, or not a socket Python can wrap
        try:
            if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
                continue
            listening = bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
            peer = None if listening else _address(sock.getpeername())
            yield _address(sock.getsockname()), peer, listening, int(name)
        except OSError:
            continue  # not connected (any more)
        finally:
            sock.close()


def _address(sockaddr) -> tuple[str, int]:
    host = sockaddr[0]
    return (host[7:] if host.startswith("::ffff:") else host), int(sockaddr[1])


_ANY_HOST = ("0.0.0.0", "::")


class _GlooEndpoints:
    """Where this rank's gloo connections are. Gloo's TCP transport gives every rank one listener
    and connects each pair of ranks through one of the two listeners, so a connection belongs to
    the group when one end of it is a listener of the group's ranks."""

    def __init__(self, own: tuple[str, int], peers: set[tuple[str, int]]) -> None:
        self.own, self.peers = own, peers

    def owns(self, local: tuple[str, int], peer: tuple[str, int]) -> bool:
        """Whether a connection (local, peer) is one of the group's: accepted on this rank's
        listener, or made to a peer's (a listener bound to every interface matches by port)."""
        if local[1] == self.own[1] and self.own[0] in (local[0], *_ANY_HOST):
            return True
        return any(peer[1] == port and host in (peer[0], *_ANY_HOST) for host, port in self.peers)

    @classmethod
    def exchange(cls, store: Any, rank: int, world_size: int,
                 listeners_before: set[tuple[str, int]]) -> _GlooEndpoints | None:
        """Find the listener that ``init_process_group`` opened and swap addresses through the
        group's store (a few small store calls); None when it cannot be told apart."""
        new = _tcp_listeners() - listeners_before
        if len(new) != 1:
            logger.warning("abort path unavailable for this group: %d new listening sockets", len(new))
            return None
        own = next(iter(new))
        store.set(f"elastic/gloo_listener/{rank}", f"{own[0]} {own[1]}")
        peers = set()
        for r in range(world_size):
            if r != rank:
                host, port = store.get(f"elastic/gloo_listener/{r}").decode().split()
                peers.add((host, int(port)))
        return cls(own, peers)

    def shut_down(self) -> int:
        """shutdown(2) both directions of every gloo connection; returns how many. The listener
        itself stays (gloo's accept loop treats a shut listener as fatal)."""
        shut = 0
        for local, peer, listening, fd in list(_tcp_sockets()):
            if listening or peer is None or not self.owns(local, peer):
                continue
            try:
                sock = socket.socket(fileno=os.dup(fd))
            except OSError:
                continue
            try:
                sock.shutdown(socket.SHUT_RDWR)
                shut += 1
            except OSError:
                pass  # already closed by the peer
            finally:
                sock.close()
        return shut


def _is_communication_error(exc: BaseException) -> bool:
    dist_errors = tuple(getattr(dist, n) for n in ("DistError", "DistBackendError", "DistNetworkError") if hasattr(dist, n))
    text = str(exc).lower()
    return isinstance(exc, dist_errors) or any(w in text for w in ("gloo", "nccl", "connection", "timed out", "peer"))


def _to_cpu(obj: Any) -> Any:
    return _map_tensors(obj, lambda t: t.detach().cpu())


def _to_device(obj: Any, device: torch.device) -> Any:
    return _map_tensors(obj, lambda t: t.to(device)) if device.type != "cpu" else obj


def _map_tensors(obj: Any, fn) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj
