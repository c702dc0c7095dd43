"""API plumbing of the operator: credentials, and create / read / delete of its children by kind.

Every child kind maps to one :class:`Kind` (where it lives in the API); the calls are the same
for all of them, through ``ApiClient.call_api`` on the resource's path, so no code dispatches on
kind strings. Errors come back as :class:`ApiFailure`: ``permanent`` when the API server refused
the object itself (400, 403, 404 on create, 422 invalid), so that the
handler marks the job Failed instead of retrying for ever.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import kubernetes

__all__ = ["Kind", "KINDS", "ApiFailure", "ChildClient", "load_kube_configuration"]


@dataclass(frozen=True)
class Kind:
    group_version: str
    """``v1`` for the core group, else ``group/version``."""
    plural: str

    def path(self, namespace: str, name: str | None = None) -> str:
        root = "/api/v1" if self.group_version == "v1" else f"/apis/{self.group_version}"
        return f"{root}/namespaces/{namespace}/{self.plural}" + (f"/{name}" if name else "")


KINDS: dict[str, Kind] = {
    "ConfigMap": Kind("v1", "configmaps"),
    "PersistentVolumeClaim": Kind("v1", "persistentvolumeclaims"),
    "NetworkPolicy": Kind("networking.k8s.io/v1", "networkpolicies"),
    "RayCluster": Kind("ray.io/v1", "rayclusters"),
    "RayJob": Kind("ray.io/v1", "rayjobs"),
}


class ApiFailure(RuntimeError):
    """A child operation failed; ``permanent`` when retrying cannot help."""

    def __init__(self, message: str, status: int, permanent: bool) -> None:
        super().__init__(message)
        self.status, self.permanent = status, permanent


def load_kube_configuration() -> kubernetes.client.Configuration:
    """In-cluster service account, else ``$KUBECONFIG`` (read now, not at import time) or ~/.kube/config."""
    config = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=config)
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None,
                                           client_configuration=config)
    return config


def _reason(exc: kubernetes.client.ApiException) -> str:
    """The API server's own message (a Status object's ``message``), else the HTTP reason."""
    import json

    try:
        message = json.loads(exc.body or "{}").get("message")
    except (ValueError, AttributeError):
        message = None
    return " ".join(str(message or exc.reason or "").split())


class ChildClient:
    """Create, read and delete the children of ElasticJobs (any kind of :data:`KINDS`)."""

    def __init__(self, api: kubernetes.client.ApiClient) -> None:
        self.api = api

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data, _, _ = self.api.call_api(path, method, body=body, response_type="object", auth_settings=["BearerToken"],
                                       header_params={"Content-Type": "application/json", "Accept": "application/json"},
                                       _return_http_data_only=False)
        return data

    def create(self, obj: Mapping[str, Any]) -> None:
        """Create a child; one that exists already (an earlier attempt of the handler) is kept."""
        kind, meta = obj["kind"], obj["metadata"]
        try:
            self._call("POST", KINDS[kind].path(meta["namespace"]), dict(obj))
        except kubernetes.client.ApiException as exc:
            if exc.status == 409:  # AlreadyExists
                return
            raise ApiFailure(f"create {kind} {meta['name']}: HTTP {exc.status}: {_reason(exc)}", exc.status,
                             permanent=exc.status in (400, 403, 404, 422)) from exc

    def read(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            return self._call("GET", KINDS[kind].path(namespace, name))
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                return None
            raise ApiFailure(f"read {kind} {name}: HTTP {exc.status}: {_reason(exc)}", exc.status, False) from exc

    def delete(self, kind: str, namespace: str, name: str) -> None:
        """Delete a child (its dependents in the background); one that is gone already is fine."""
        try:
            self._call("DELETE", KINDS[kind].path(namespace, name), {"propagationPolicy": "Background"})
        except kubernetes.client.ApiException as exc:
            if exc.status != 404:
                raise ApiFailure(f"delete {kind} {name}: HTTP {exc.status}: {_reason(exc)}", exc.status, False) from exc
