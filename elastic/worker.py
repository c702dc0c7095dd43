"""The worker: one Ray actor per GPU (or CPU slot) that owns a model replica and runs steps.

The driver tells each worker which samples to use (its shard of the sampler's plan) and when to
join a new process group; a worker never decides anything about the group on its own.

Out-of-band control: the group runs each worker with a second Ray concurrency group
(:data:`CONTROL_GROUP`) whose calls (``ping``, ``abort_collectives``) are served on their own
thread while ``train_steps`` is blocked in a collective. ``abort_collectives`` shuts down this
rank's gloo connections (:mod:`elastic.gloo_abort` says why that, and not ``ProcessGroup.abort()``),
so the blocked collective raises at once, and every peer blocked on this rank raises in turn.
Around the step: :mod:`elastic.optimizer` builds the optimizer and AdaScale, :mod:`elastic.precision`
applies ``training.precision``.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
import threading
import time
from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist

from elastic.allocator import retain_freed_memory
from elastic.config import JobSpec, parse_job_spec
from elastic.data import InputPipeline, LoaderSettings, derive_seed, keys_checksum, resolve_num_workers, seed_everything
from elastic.gloo_abort import GlooEndpoints, tcp_listeners
from elastic.optimizer import build_adascale, build_adascale_and_scheduler, build_optimizer
from elastic.precision import Precision
from elastic.sampler import unpack_keys
from elastic.task import TaskError, WorkerContext, load_task, set_context

__all__ = ["COLLECTIVE_TIMEOUT_S", "CONTROL_GROUP", "ElasticWorker", "build_adascale", "build_optimizer"]

logger = logging.getLogger(__name__)

#: A collective that waits longer than this on a silent peer fails instead of hanging forever
#: (a last resort: the driver aborts the collectives of a broken group long before, see the module doc).
COLLECTIVE_TIMEOUT_S = 60.0
#: The Ray concurrency group of the out-of-band calls (one thread beside the training thread).
CONTROL_GROUP = "control"


def _loss_and_metrics(out: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """A task's ``loss`` returns the loss, or ``(loss, {name: scalar})``."""
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping):
        return out[0], dict(out[1])
    return out, {}


def _mean_metrics(per_micro_batch: list[dict[str, Any]]) -> dict[str, float]:
    names = {k for m in per_micro_batch for k in m}
    return {k: float(sum(float(m[k]) for m in per_micro_batch if k in m) / sum(1 for m in per_micro_batch if k in m))
            for k in sorted(names)}


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
        _normal_priority()
        if self.spec.cluster.retain_heap:  # before the DataLoader forks its workers, which inherit it
            not_set = retain_freed_memory()
            if not_set is not None:
                logger.info("cluster.retain_heap: the heap is left as it is (%s)", not_set)
        self.device = torch.device("cuda", 0) if self.spec.cluster.use_gpu and torch.cuda.is_available() else torch.device("cpu")
        self.rank = -1
        self.world_size = 0
        self.steps_done = 0
        self._set_context()
        # Every replica builds the same initial model from the seed (DDP also broadcasts rank 0's).
        torch.manual_seed(self.spec.seed)
        self.task = load_task(self.spec.task, self.spec.task_args)
        self.dataset = self.task.train_dataset()
        if not (hasattr(self.dataset, "__getitem__") and hasattr(self.dataset, "__len__")):
            raise TaskError(f"train_dataset() returned a {type(self.dataset).__name__}: the sampler needs a "
                            "map-style dataset (__getitem__ and __len__); iterable datasets are not supported")
        self.model = self.task.build_model().to(self.device)
        self.precision = Precision(self.spec.training.precision, self.device)
        self.opt, self.lr_scheduler = build_adascale_and_scheduler(self.spec, self.model, self.task, self.precision.scaler)
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        self.ddp: torch.nn.Module = self.model
        self.pipeline = self._build_pipeline()
        self._store: Any = None
        self._gloo: GlooEndpoints | None = None  # this rank's gloo addresses, for abort_collectives
        self._abort_lock = threading.Lock()
        self._generation = -1

    def _build_pipeline(self) -> InputPipeline:
        d = self.spec.data
        settings = LoaderSettings(
            num_workers=resolve_num_workers(d.num_workers, self.spec.cluster.num_cpus_per_worker),
            prefetch_factor=d.prefetch_factor,
            pin_memory=d.pin_memory and self.device.type == "cuda",
            persistent_workers=d.persistent_workers,
            multiprocessing_context=d.multiprocessing_context,
        )
        collate = getattr(self.task, "collate", None)
        return InputPipeline(self.dataset, self.spec.seed, settings, collate if callable(collate) else None)

    def _set_context(self) -> None:
        set_context(WorkerContext(self.rank, self.world_size, self.steps_done, self.spec.seed, str(self.device)))

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
            "loader_workers": self.pipeline.settings.num_workers,
            "prefetch_batches": self.pipeline.settings.prefetch_batches,
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
             generation: int = 0, sync_init: bool = True) -> dict[str, Any]:
        """Leave the old group, form the new one, take ``state`` if given, set AdaScale's scale.
        ``generation`` numbers the driver's groups, so that a late abort meant for an older group
        leaves this one alone (see :meth:`abort_collectives`). ``sync_init=False`` (the same on every
        rank): the replicas are already identical, so DDP skips its broadcast of rank 0's model."""
        started = time.perf_counter()
        self.leave()
        store = self._store if rank == 0 else dist.TCPStore(
            host, port, is_master=False, timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        sockets_before = tcp_listeners()
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        if backend == "gloo" and world_size > 1:
            gloo = GlooEndpoints.exchange(store, rank, world_size, sockets_before)
            with self._abort_lock:
                self._gloo, self._generation = gloo, generation
        self._store = None
        if state is not None:
            self.load_state(state)
        # Unless the driver knows the replicas identical, DDP broadcasts rank 0's parameters and buffers
        # while it is built.
        self.ddp = torch.nn.parallel.DistributedDataParallel(self.model, init_sync=sync_init) if world_size > 1 else self.model
        if world_size > 1:  # AdaScale's statistics ride on DDP's gradient all-reduce
            self.opt.attach_ddp(self.ddp)
        self.rank, self.world_size = rank, world_size
        self._set_context()
        if self.spec.adascale.enabled:
            self.opt.set_scale(world_size * self.spec.accumulation_steps)
        return {"worker_id": self.worker_id, "steps_done": self.steps_done, "join_s": time.perf_counter() - started}

    def leave(self) -> None:
        self.ddp = self.model  # the DDP wrapper goes before its process group does
        self.opt.detach_ddp()
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
        # The random streams need no state here: each step's draws derive from (seed, rank, step) and
        # each sample's from (seed, epoch, index), both restored by the step count and the sampler.
        state = {
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": _to_cpu(self.opt.state_dict()),
            "steps_done": self.steps_done,
        }
        if self.lr_scheduler is not None:
            state["lr_scheduler"] = self.lr_scheduler.state_dict()
        if self.precision.scaler is not None:
            state["precision"] = self.precision.state_dict()
        return state

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(_to_device(state["optimizer"], self.device))
        self.steps_done = int(state["steps_done"])
        if self.lr_scheduler is not None and "lr_scheduler" in state:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if "precision" in state:
            self.precision.load_state_dict(state["precision"])
        self.opt.zero_grad()
        self._set_context()

    def steps_completed(self) -> int:
        return self.steps_done

    # ------------------------------------------------------------------------ training
    def train_step(self, micro_batches: list[list[Sequence[int]]]) -> dict[str, Any]:
        """One optimizer step over this rank's micro-batches (each a list of ``(epoch, index)`` sample
        keys, already submitted to the input pipeline or loaded now). Never raises: failures are reported."""
        started = time.perf_counter()
        data_wait_s = 0.0
        try:
            # This step's own draws (dropout, noise in the loss) differ across ranks and steps and
            # are the same whenever rank r runs step t, whatever happened before (resizes, resumes).
            seed_everything(derive_seed(self.spec.seed, "step", self.rank, self.steps_done))
            losses, metrics = [], []
            accumulation = len(micro_batches)
            for i, keys in enumerate(micro_batches):
                waited = time.perf_counter()
                batch = _to_device(self.pipeline.next_batch(keys), self.device)
                data_wait_s += time.perf_counter() - waited
                last = i == accumulation - 1
                sync = contextlib.nullcontext() if last or self.ddp is self.model else self.ddp.no_sync()
                with sync:
                    with self.precision.autocast():
                        loss, step_metrics = _loss_and_metrics(self.task.loss(self.ddp, batch))
                    self.precision.backward(loss / accumulation)
                losses.append(loss.detach().float())
                metrics.append(step_metrics)
            applied, grad_norm = self.precision.apply(self.opt, self._params, self.spec.training.max_grad_norm)
            self.opt.zero_grad()
            if applied and self.lr_scheduler is not None:
                self.lr_scheduler.step()
            loss_mean = float(torch.stack(losses).mean())
            task_metrics = _mean_metrics(metrics)
        except Exception as exc:  # noqa: BLE001 - the driver decides: peer lost, or a task bug
            self.opt.zero_grad()
            return {"ok": False, "worker_id": self.worker_id, "steps_done": self.steps_done,
                    "error": _error_line(exc),
                    "communication": _is_communication_error(exc)}
        self.steps_done += 1
        self._set_context()
        if grad_norm is not None:
            task_metrics["grad_norm"] = grad_norm
        return {
            "ok": True,
            "worker_id": self.worker_id,
            "rank": self.rank,
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
            "metrics": task_metrics,
            "samples_crc": keys_checksum(k for mb in micro_batches for k in mb),
            "data_wait_s": data_wait_s,
            "compute_s": time.perf_counter() - started,
        }

    def train_steps(self, steps: list[list[list[int]]], lookahead: list[list[list[int]]] = ()) -> list[dict[str, Any]]:
        """Several optimizer steps in one call (each entry is one step's micro-batches, each micro-batch
        its sample keys packed by :func:`elastic.sampler.pack_keys`), in order.

        ``lookahead``: the micro-batches of the steps expected to follow this call; the input
        pipeline starts loading them now, and drops them if the next call wants others.
        Stops at the first step that fails, whose report ends the list: the reports before it
        are of completed steps, so the driver knows exactly how far this rank got."""
        steps = [[unpack_keys(mb) for mb in step] for step in steps]
        self.pipeline.submit([mb for step in steps for mb in step]
                             + [unpack_keys(mb) for step in lookahead for mb in step])
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

    def pipeline_stats(self) -> dict[str, int]:
        """Micro-batches the input pipeline loaded ahead and then discarded (the plan changed)."""
        return {"discarded_batches": self.pipeline.discarded_batches,
                "loader_workers": self.pipeline.settings.num_workers}

    def ping(self) -> float:
        """Heartbeat (served in CONTROL_GROUP, so it answers while a step runs): the wall time."""
        return time.time()


def _normal_priority() -> None:
    """Run the training step (and the DataLoader processes forked from it) at niceness 0.

    Ray starts worker processes at niceness 15 (its ``worker_niceness``) to keep the raylet
    responsive; for a training worker that is the job's main work, and on a node shared with other
    processes it cost the input-pipeline benchmark a quarter of its throughput against a plain
    loop at niceness 0. Raising the priority back needs CAP_SYS_NICE (or RLIMIT_NICE); without it
    the worker keeps Ray's niceness (set ``RAY_worker_niceness=0`` where the nodes start instead)."""
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) > 0:
            os.setpriority(os.PRIO_PROCESS, 0, 0)
    except (OSError, AttributeError) as exc:
        logger.debug("worker keeps its niceness: %s", exc)


def _error_line(exc: BaseException) -> str:
    """One line: the exception; for one re-raised from a DataLoader process, the original's last line."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if lines and lines[0].startswith("Caught ") and "DataLoader worker" in lines[0] and len(lines) > 1:
        return f"{lines[-1]} (in a DataLoader worker process)"
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


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
