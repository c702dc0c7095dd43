"""kmock (an in-memory Kubernetes API emulator over real HTTP) for synchronous tests.

kmock's own pytest fixture lives in the test's event loop, which a blocking client (the official
``kubernetes`` client, kopf's ``KopfRunner`` thread) would stall. Here the emulator runs in its
own thread and event loop; tests talk to it over HTTP like to an API server and inspect what it
received (``KubeEmulator.requests``) and stores (``KubeEmulator.object``).

What kmock does not do (ENVIRONMENT.md): no resourceVersion/uid/creationTimestamp, merge patches
replace lists, no controllers (nothing creates pods or garbage-collects owned objects), watches
never end on their own, ``GET /version/`` is registered here by hand, namespaces cannot be listed,
nothing is validated (``refuse_creates`` stands in for an API server refusing an object).
Two of those are patched over here because kopf depends on them: discovery must show namespaces
(kopf waits for them even with --all-namespaces), objects created with only a generateName (kopf's
events) get a name, and ElasticJobs get a resourceVersion that grows
on every write (kopf tells stale watch events from fresh ones by it; with a constant one it re-runs
its create handler on stale events). Objects for kopf must be created with a resourceVersion.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

kmock = pytest.importorskip("kmock", reason="kmock (test extra) is not installed")
kubernetes = pytest.importorskip("kubernetes")

# Every resource the operator touches, with what kopf's discovery needs to know.
RESOURCES = {
    "elastic.dev/v1alpha1/elasticjobs": dict(kind="ElasticJob", singular="elasticjob", namespaced=True,
                                             subresources={"status"},
                                             verbs={"get", "list", "watch", "patch", "create", "delete"}),
    "ray.io/v1/rayclusters": dict(kind="RayCluster", singular="raycluster", namespaced=True, subresources={"status"},
                                  verbs={"get", "list", "watch", "patch", "create", "delete"}),
    "ray.io/v1/rayjobs": dict(kind="RayJob", singular="rayjob", namespaced=True, subresources={"status"},
                              verbs={"get", "list", "watch", "patch", "create", "delete"}),
    "v1/persistentvolumeclaims": dict(kind="PersistentVolumeClaim", singular="persistentvolumeclaim",
                                      namespaced=True, verbs={"get", "list", "create", "delete"}),
    "networking.k8s.io/v1/networkpolicies": dict(kind="NetworkPolicy", singular="networkpolicy", namespaced=True,
                                                 verbs={"get", "list", "create", "delete"}),
    "v1/configmaps": dict(kind="ConfigMap", singular="configmap", namespaced=True,
                          verbs={"get", "list", "create", "delete"}),
    "v1/pods": dict(kind="Pod", singular="pod", namespaced=True, verbs={"get", "list", "create", "delete"}),
    "v1/events": dict(kind="Event", singular="event", namespaced=True, verbs={"create", "list"}),
    # kopf waits until discovery shows namespaces, even with --all-namespaces (then it never lists them).
    "v1/namespaces": dict(kind="Namespace", singular="namespace", namespaced=False, verbs={"get", "list", "watch"}),
}

VERSION_INFO = {"major": "1", "minor": "33", "gitVersion": "v1.33.0-kmock", "gitCommit": "", "gitTreeState": "",
                "buildDate": "", "goVersion": "", "compiler": "", "platform": ""}


_VERSIONED = "elastic.dev/v1alpha1/elasticjobs"
_versions = itertools.count(100)


def _bump_resource_version(request: Any) -> None:
    """Make this write set a new resourceVersion (after any JSON Patch ``test`` on the old one)."""
    version = str(next(_versions))
    if isinstance(request.data, dict):
        request.data.setdefault("metadata", {})["resourceVersion"] = version
    elif isinstance(request.data, list):
        request.data.append({"op": "replace", "path": "/metadata/resourceVersion", "value": version})


def _versioned_emulator() -> Any:
    import jsonpatch

    class VersionedEmulator(kmock.KubernetesEmulator):
        async def _handle(self, request: Any) -> Any:
            writes = (kmock.action.CREATE, kmock.action.UPDATE)
            meta = request.data.get("metadata") if isinstance(request.data, dict) else None
            if request.action == kmock.action.CREATE and meta and meta.get("generateName") and not meta.get("name"):
                meta["name"] = f"{meta['generateName']}{next(_versions)}"  # kmock ignores generateName
            if request.resource is not None and request.resource == _VERSIONED and request.action in writes:
                _bump_resource_version(request)
            refusal = next((answer for resource, answer in self.refusals.items()
                            if request.resource is not None and request.resource == resource
                            and request.action == kmock.action.CREATE), None)
            if refusal is not None:  # what an API server's validation would answer (kmock validates nothing)
                raise kmock.KubernetesError(status=refusal[0], reason="Invalid", message=refusal[1])
            return await super()._handle(request)

        async def _render_error(self, exc: Exception) -> Any:
            # A failed JSON Patch "test" is 422 Unprocessable Entity on a real API server (kmock: 500);
            # kopf and the KubeRay actuator both treat 422 as "changed concurrently, retry later".
            if isinstance(exc, (jsonpatch.JsonPatchTestFailed, jsonpatch.JsonPatchConflict)):
                exc = kmock.KubernetesError(status=422, reason="Invalid", message=str(exc))
            return await super()._render_error(exc)

    emulator = VersionedEmulator()
    emulator.refusals = {}
    return emulator


class KubeEmulator:
    """A kmock KubernetesEmulator served from a background thread (use as a context manager)."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kmock", daemon=True)
        self.handler: Any = None
        self._server: Any = None

    def _run(self, coro: Any, timeout_s: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    def __enter__(self) -> KubeEmulator:
        self._thread.start()

        async def start() -> None:
            self.handler = _versioned_emulator()
            await self.handler.__aenter__()
            self._server = kmock.Server(self.handler)
            await self._server.__aenter__()
            # The official client asks GET /version/ (with the slash); kmock serves /version only.
            self.handler["get /version/"] << VERSION_INFO
            for key, info in RESOURCES.items():
                self.handler.resources[key] = kmock.ResourceInfo(**info)

        self._run(start())
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            await self._server.__aexit__(None, None, None)
            await self.handler.__aexit__(None, None, None)

        try:
            self._run(stop())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)

    @property
    def url(self) -> str:
        return str(self._server.url).rstrip("/")

    def api_client(self) -> Any:
        return kubernetes.client.ApiClient(kubernetes.client.Configuration(host=self.url))

    def write_kubeconfig(self, path: Path) -> Path:
        path.write_text(
            "apiVersion: v1\nkind: Config\n"
            f"clusters: [{{name: kmock, cluster: {{server: '{self.url}'}}}}]\n"
            "users: [{name: test, user: {token: kmock-token}}]\n"
            "contexts: [{name: kmock, context: {cluster: kmock, user: test, namespace: default}}]\n"
            "current-context: kmock\n")
        return path

    def refuse_creates(self, resource: str, status: int, message: str) -> None:
        """Answer every create of ``resource`` (e.g. ``ray.io/v1/rayclusters``) with HTTP ``status``."""
        self.handler.refusals[resource] = (status, message)

    def requests(self, method: str | None = None, path_prefix: str = "") -> list[Any]:
        """Requests received so far, optionally filtered by HTTP method and path prefix."""
        return [r for r in list(self.handler)
                if (method is None or r.method.value.upper() == method.upper())
                and r.url.path.startswith(path_prefix)]

    def object(self, resource: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The stored object (a plain dict), or None when absent or deleted."""
        key = (kmock.resource(resource), namespace, name)
        if key not in self.handler.objects or self.handler.objects[key].deleted:
            return None
        return dict(self.handler.objects[key].raw)

    def objects(self, resource: str) -> list[dict[str, Any]]:
        """All live objects of a resource, in any namespace."""
        return [dict(obj.raw) for key, obj in list(self.handler.objects.items())
                if key[0] == resource and not obj.deleted]


@pytest.fixture()
def kube(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[KubeEmulator]:
    """A running emulator; $KUBECONFIG points at it (for the operator's login)."""
    with KubeEmulator() as emulator:
        monkeypatch.setenv("KUBECONFIG", str(emulator.write_kubeconfig(tmp_path / "kubeconfig")))
        yield emulator
