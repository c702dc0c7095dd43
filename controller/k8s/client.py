"""API plumbing of the operator: credentials, and create / read / delete of its children by kind.

Every child kind maps to one :class:`Kind` (where it lives in the API and which client methods
reach it), so the handlers never dispatch on kind strings themselves. Errors come back as :class:`ApiFailure`: ``permanent`` when the API server refused
the object itself (400, 403, 404 on create, 422 invalid), so that the
handler marks the job Failed instead of retrying for ever.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

import kubernetes

__all__ = ["Kind", "KINDS", "ApiFailure", "ChildClient", "load_kube_configuration"]


@dataclass(frozen=True)
class Kind:
    """Where one kind of child lives in the API, and which client methods reach it."""

    group_version: str
    """``v1`` for the core group, else ``group/version``."""
    plural: str
    typed: tuple[str, str] | None = None
    """Built-in kinds: (API class, method suffix), e.g. ("CoreV1Api", "config_map"); None: a custom resource."""

    def _typed(self, api: kubernetes.client.ApiClient, verb: str) -> Callable[..., Any]:
        api_class, suffix = self.typed  # type: ignore[misc]
        return getattr(getattr(kubernetes.client, api_class)(api), f"{verb}_namespaced_{suffix}")

    def create(self, api: kubernetes.client.ApiClient, namespace: str, body: Mapping[str, Any]) -> None:
        if self.typed:
            self._typed(api, "create")(namespace, dict(body))
        else:
            group, version = self.group_version.split("/")
            kubernetes.client.CustomObjectsApi(api).create_namespaced_custom_object(
                group, version, namespace, self.plural, dict(body))

    def read(self, api: kubernetes.client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
        if self.typed:
            return api.sanitize_for_serialization(self._typed(api, "read")(name, namespace))
        group, version = self.group_version.split("/")
        return kubernetes.client.CustomObjectsApi(api).get_namespaced_custom_object(
            group, version, namespace, self.plural, name)

    def delete(self, api: kubernetes.client.ApiClient, namespace: str, name: str) -> None:
        if self.typed:
            self._typed(api, "delete")(name, namespace, propagation_policy="Background")
        else:
            group, version = self.group_version.split("/")
            kubernetes.client.CustomObjectsApi(api).delete_namespaced_custom_object(
                group, version, namespace, self.plural, name, propagation_policy="Background")


KINDS: dict[str, Kind] = {
    "ConfigMap": Kind("v1", "configmaps", ("CoreV1Api", "config_map")),
    "PersistentVolumeClaim": Kind("v1", "persistentvolumeclaims", ("CoreV1Api", "persistent_volume_claim")),
    "NetworkPolicy": Kind("networking.k8s.io/v1", "networkpolicies", ("NetworkingV1Api", "network_policy")),
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

    def create(self, obj: Mapping[str, Any]) -> None:
        """Create a child; one that exists already (an earlier attempt of the handler) is kept."""
        kind, meta = obj["kind"], obj["metadata"]
        try:
            KINDS[kind].create(self.api, meta["namespace"], obj)
        except kubernetes.client.ApiException as exc:
            if exc.status == 409:  # AlreadyExists
                return
            raise ApiFailure(f"create {kind} {meta['name']}: HTTP {exc.status}: {_reason(exc)}", exc.status,
                             permanent=exc.status in (400, 403, 404, 422)) from exc

    def read(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            return KINDS[kind].read(self.api, namespace, name)
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                return None
            raise ApiFailure(f"read {kind} {name}: HTTP {exc.status}: {_reason(exc)}", exc.status, False) from exc

    def delete(self, kind: str, namespace: str, name: str) -> None:
        """Delete a child (its dependents in the background); one that is gone already is fine."""
        try:
            KINDS[kind].delete(self.api, namespace, name)
        except kubernetes.client.ApiException as exc:
            if exc.status != 404:
                raise ApiFailure(f"delete {kind} {name}: HTTP {exc.status}: {_reason(exc)}", exc.status, False) from exc
