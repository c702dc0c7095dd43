"""Cluster backends for the trainer: where the Ray driver connects and which actuator it gets.

- ``local``: a multi-node Ray cluster started on this machine (controller.actuators.local).
- ``ray``: an existing Ray cluster at ``cluster.address``, scaled through the Ray autoscaler.
- ``kuberay``: the Ray cluster of a KubeRay RayCluster; capacity via JSON Patch of its worker group.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
import sysconfig
import threading
from pathlib import Path
from typing import Any

from elastic.config import JobSpec


logger = logging.getLogger(__name__)


class BackendError(RuntimeError):
    """The cluster could not be reached or started (one-line message)."""


#: Seconds to wait for a TCP connection to a Ray address before calling it unreachable.
CONNECT_TIMEOUT_S = 3.0


def host_port(address: str) -> tuple[str, int] | None:
    """``host:port``, ``ray://host:port`` or ``[v6]:port`` -> (host, port); None for ``auto`` and the like."""
    rest = address.strip()
    scheme, sep, after = rest.partition("://")
    if sep:
        if scheme != "ray":
            return None
        rest = after
    rest = rest.split("/", 1)[0]
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Fails fast when a ``host:port`` Ray address does not accept TCP connections.

    Raises:
        BackendError: ``cluster.address: cannot reach HOST:PORT (reason)``.
    """
    target = host_port(address)
    if target is None:
        return
    host, port = target
    if not 0 < port < 65536:
        raise BackendError(f"cluster.address: port must be in 1..65535 (got {address!r})")
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except socket.timeout:
        raise BackendError(f"cluster.address: cannot reach {host}:{port} (no answer within {timeout_s:g} s)") from None
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise BackendError(f"cluster.address: cannot reach {host}:{port} ({reason})") from None


#: Left out of an automatic working_dir upload: environments, VCS data, run outputs and caches.
DEFAULT_EXCLUDES = (".git", ".venv", "venv", "env", "__pycache__", "*.pyc", "runs", ".pytest_cache",
                    "node_modules", "*.pt", "*.ckpt")


def check_address(address: str | None) -> None:
    """Refuses Ray Client addresses (``ray://``) with the reason and the forms that work.

    Raises:
        BackendError: ``cluster.address`` is a ``ray://`` address.
    """
    if address and address.strip().lower().startswith("ray://"):
        raise BackendError(
            f"cluster.address: {address!r} is a Ray Client address, which elastic does not support (Ray "
            "documents Ray Client as unsuited to ML training, and the trainer's driver must run on the "
            "cluster); run the driver on a cluster node with cluster.address: auto or HEAD:6379, e.g. "
            "ray job submit --address http://HEAD:8265 --working-dir . -- elastic run job.yaml")


def resolve_address(address: str | None, environ: dict[str, str] | None = None,
                    address_file: Path | None = None) -> str:
    """``auto`` -> the cluster that ``ray start`` on this machine recorded (``RAY_ADDRESS`` first, as
    set for a Ray Jobs entrypoint, then Ray's ``ray_current_cluster`` file).

    Ray's own ``auto`` falls back to any GCS process it finds on the machine, which may be another
    job's embedded cluster; this one does not (the embedded clusters never leave their address in the
    file, see controller.actuators.local.preserved_file).

    Raises:
        BackendError: ``auto`` and no cluster recorded.
    """
    if address and address.strip() != "auto":
        return address.strip()
    environ = os.environ if environ is None else environ
    if environ.get("RAY_ADDRESS"):
        return environ["RAY_ADDRESS"]
    if address_file is None:
        from controller.actuators.local import ray_address_file

        address_file = ray_address_file()
    try:
        recorded = Path(address_file).read_text().strip()
    except OSError:
        recorded = ""
    if not recorded:
        raise BackendError(f"cluster.address: auto found no Ray cluster started with `ray start` on this machine "
                           f"(RAY_ADDRESS is unset and {address_file} is missing); give the head's address, "
                           "e.g. cluster.address: HEAD:6379")
    return recorded


def task_code_root(task: str) -> Path | None:
    """The directory the task's top-level module is imported from, or None when it is an installed
    package (site-packages, the standard library) or cannot be found: what must reach the workers."""
    top = task.split(":", 1)[0].split(".", 1)[0]
    try:
        found = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if found is None:
        return None
    if found.submodule_search_locations:  # a package: its parent directory is the import root
        location = Path(list(found.submodule_search_locations)[0]).parent
    elif found.origin and found.origin not in ("built-in", "frozen"):
        location = Path(found.origin).parent
    else:
        return None
    installed = {sysconfig.get_paths()[key] for key in ("purelib", "platlib", "stdlib", "platstdlib")}
    location = location.resolve()
    if any(location == Path(p).resolve() or Path(p).resolve() in location.parents for p in installed):
        return None
    return location


def worker_runtime_env(spec: JobSpec, code_root: Path | None) -> dict[str, Any]:
    """Ray's ``runtime_env`` for the job: ``runtime_env`` from the spec, plus the task's code root when
    the spec ships no code itself (no ``working_dir``, no ``py_modules``).

    On ``local`` the workers share this machine's file system, and on ``kuberay`` every pod runs the
    job's image, so the code root goes on their ``PYTHONPATH``; on ``ray`` it is uploaded as the
    ``working_dir`` (nodes may be other machines with other files), leaving out
    :data:`DEFAULT_EXCLUDES` and the spec's ``excludes``.
    """
    r = spec.runtime_env
    env: dict[str, Any] = {}
    if r.working_dir:
        env["working_dir"] = r.working_dir
    if r.py_modules:
        env["py_modules"] = list(r.py_modules)
    if r.pip:
        env["pip"] = list(r.pip)
    env_vars = dict(r.env_vars)
    ships_code = bool(r.working_dir or r.py_modules)
    if code_root is not None and not ships_code:
        if spec.cluster.backend in ("local", "kuberay"):  # one machine / one image: the same paths
            paths = [str(code_root), *filter(None, env_vars.get("PYTHONPATH", os.environ.get("PYTHONPATH", "")).split(os.pathsep))]
            env_vars["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        else:
            env["working_dir"] = str(code_root)
    if "working_dir" in env or "py_modules" in env:
        env["excludes"] = [*DEFAULT_EXCLUDES, *r.excludes]
    if env_vars:
        env["env_vars"] = env_vars
    return env


def startable_workers(backend: Any, minimum: int, initial: int) -> int:
    """How many of ``initial`` workers the cluster has room for now; BackendError below ``minimum``.
    When the actuator cannot tell, ``initial`` (the controller retries later)."""
    from controller.actuators.base import ActuationError

    try:
        capacity = backend.actuator.capacity_workers()
    except ActuationError as exc:
        logger.warning("starting workers.initial=%d without knowing the cluster's room: %s", initial, exc)
        return initial
    if capacity < minimum:
        raise BackendError(f"cluster: room for {capacity} worker(s) of {backend.worker_actor_options()}, "
                           f"fewer than workers.min={minimum}; free or add capacity, or lower workers.min")
    return min(capacity, initial)


class LocalBackend:
    needs_main_thread = True

    def __init__(self, spec: JobSpec) -> None:
        from controller.actuators.local import LocalActuator, LocalRayCluster

        self.cluster = LocalRayCluster(spec.cluster.num_cpus_per_worker, max_workers=spec.workers.max,
                                       gpus_per_worker=1 if spec.cluster.use_gpu else 0,
                                       runtime_env=worker_runtime_env(spec, task_code_root(spec.task)))
        self.actuator = LocalActuator(self.cluster)

    def start(self, initial_workers: int) -> None:
        self.cluster.start(initial_workers)

    def serve(self, done: threading.Event) -> None:
        self.cluster.executor.serve(done)

    def startable_workers(self, minimum: int, initial: int) -> int:
        return startable_workers(self, minimum, initial)

    def worker_actor_options(self) -> dict[str, Any]:
        return self.cluster.worker_actor_options()

    @staticmethod
    def release_id(member: Any) -> str:
        return member.node_id

    def shutdown(self) -> None:
        self.cluster.shutdown()


class RayBackend:
    """An existing cluster (``cluster.backend: ray`` or ``kuberay``)."""

    needs_main_thread = False

    def __init__(self, spec: JobSpec) -> None:
        self.spec = spec
        c = spec.cluster
        resources = {"CPU": c.num_cpus_per_worker, **({"GPU": 1} if c.use_gpu else {})}
        if c.backend == "kuberay":
            from controller.actuators.kuberay import KubeRayActuator

            self.actuator: Any = KubeRayActuator(c.namespace, c.raycluster, c.group)
        else:
            from controller.actuators.ray_autoscaler import RayAutoscalerActuator

            self.actuator = RayAutoscalerActuator(resources, max_workers=spec.workers.max)
        self.runtime_env = worker_runtime_env(spec, task_code_root(spec.task))

    def start(self, initial_workers: int) -> None:
        import signal

        import ray

        from controller.actuators.local import kept_signal_handlers, local_ray_environment

        local_ray_environment(loopback=False)
        address = resolve_address(self.spec.cluster.address)
        check_address(address)
        check_reachable(address)  # ray.init may retry an unreachable address for a long time
        try:
            # ray.init installs a SIGTERM handler that exits at once; the trainer's stops at a step boundary.
            with kept_signal_handlers(signal.SIGTERM, signal.SIGINT):
                ray.init(address=address, logging_level="WARNING", runtime_env=self.runtime_env or None)
        except Exception as exc:  # noqa: BLE001 - ray raises several types for an unreachable cluster
            raise BackendError(f"cluster.address: cannot connect to Ray at {address!r}: "
                               f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None

    def serve(self, done: threading.Event) -> None:  # pragma: no cover - not used (no main-thread work)
        done.wait()

    def startable_workers(self, minimum: int, initial: int) -> int:
        return startable_workers(self, minimum, initial)

    def worker_actor_options(self) -> dict[str, Any]:
        c = self.spec.cluster
        options: dict[str, Any] = {"num_cpus": c.num_cpus_per_worker, "num_gpus": 1 if c.use_gpu else 0}
        if c.backend == "kuberay":
            from controller.actuators.base import WORKER_RESOURCE

            # Each worker pod offers one (rayStartParams.resources): one rank per pod.
            options["resources"] = {WORKER_RESOURCE: 1}
        return options

    def release_id(self, member: Any) -> str:
        # KubeRay deletes pods by name; a pod's hostname is its name.
        return member.hostname if self.spec.cluster.backend == "kuberay" else member.node_id

    def shutdown(self) -> None:
        import ray

        close = getattr(self.actuator, "close", None)
        if close is not None and ray.is_initialized():
            try:
                close()  # e.g. withdraw the autoscaler resource request: it outlives the job otherwise
            except Exception as exc:  # noqa: BLE001 - shutting down anyway
                logger.warning("%s", exc)
        ray.shutdown()


def make_backend(spec: JobSpec) -> LocalBackend | RayBackend:
    return LocalBackend(spec) if spec.cluster.backend == "local" else RayBackend(spec)
