"""The one place the operator talks to the Kubernetes API (besides kopf's own watching).

Children are written with server-side apply. Each carries the hash of what was applied; between
resyncs an equal remembered hash means no request at all (no update storms). A resync forgets the
hashes and applies every child again: the API server writes nothing where nothing differs (the
resourceVersion stays still), and reverts an edit of the operator's fields where something does."""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from kubemeter_operator.builders.common import APPLIED_HASH_ANNOTATION, FIELD_MANAGER, Manifest, content_hash
from kubemeter_operator.metrics import CHILD_WRITES

# (apiVersion, kind) -> (path prefix, plural, namespaced)
RESOURCE_PATHS: dict[tuple[str, str], tuple[str, str, bool]] = {
    ("v1", "ServiceAccount"): ("/api/v1", "serviceaccounts", True),
    ("v1", "ConfigMap"): ("/api/v1", "configmaps", True),
    ("v1", "Service"): ("/api/v1", "services", True),
    ("v1", "Secret"): ("/api/v1", "secrets", True),
    ("v1", "Pod"): ("/api/v1", "pods", True),
    ("v1", "PersistentVolumeClaim"): ("/api/v1", "persistentvolumeclaims", True),
    ("apps/v1", "DaemonSet"): ("/apis/apps/v1", "daemonsets", True),
    ("apps/v1", "StatefulSet"): ("/apis/apps/v1", "statefulsets", True),
    ("policy/v1", "PodDisruptionBudget"): ("/apis/policy/v1", "poddisruptionbudgets", True),
    ("rbac.authorization.k8s.io/v1", "Role"): ("/apis/rbac.authorization.k8s.io/v1", "roles", True),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): (
        "/apis/rbac.authorization.k8s.io/v1",
        "rolebindings",
        True,
    ),
    ("rbac.authorization.k8s.io/v1", "ClusterRole"): (
        "/apis/rbac.authorization.k8s.io/v1",
        "clusterroles",
        False,
    ),
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"): (
        "/apis/rbac.authorization.k8s.io/v1",
        "clusterrolebindings",
        False,
    ),
    ("kubemeter.io/v1alpha1", "Meter"): ("/apis/kubemeter.io/v1alpha1", "meters", True),
    ("kubemeter.io/v1alpha1", "Collector"): ("/apis/kubemeter.io/v1alpha1", "collectors", True),
    ("kubemeter.io/v1alpha1", "Pipeline"): ("/apis/kubemeter.io/v1alpha1", "pipelines", True),
}


def object_path(api_version: str, kind: str, namespace: str | None, name: str | None = None) -> str:
    prefix, plural, namespaced = RESOURCE_PATHS[(api_version, kind)]
    path = f"{prefix}/namespaces/{namespace}/{plural}" if namespaced else f"{prefix}/{plural}"
    return f"{path}/{name}" if name else path


def _version(obj: Any) -> str | None:
    return ((obj or {}).get("metadata") or {}).get("resourceVersion")


def with_hash(manifest: Manifest) -> tuple[Manifest, str]:
    """The manifest stamped with the hash of its own content."""
    digest = content_hash(manifest)
    stamped = json.loads(json.dumps(manifest))
    stamped["metadata"].setdefault("annotations", {})[APPLIED_HASH_ANNOTATION] = digest
    return stamped, digest


class KubeApi:
    def __init__(
        self, api_client: client.ApiClient | None = None, request_timeout_seconds: float = 10.0
    ) -> None:
        if api_client is None:
            try:
                config.load_incluster_config()  # type: ignore[no-untyped-call]
            except config.ConfigException:
                config.load_kube_config()  # type: ignore[no-untyped-call]
            api_client = client.ApiClient()
        self._api: Any = api_client  # call_api's stub lacks the keywords used below
        self._timeout = request_timeout_seconds
        self._applied: dict[str, str] = {}  # object path -> hash known to be stored
        self._lock = threading.Lock()

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = "application/json",
        query: Mapping[str, str] | None = None,
    ) -> Any:
        method, url, headers, body, _ = self._api.param_serialize(
            method=method,
            resource_path=path,
            query_params=list((query or {}).items()),
            header_params={"Content-Type": content_type, "Accept": "application/json"},
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self._api.call_api(
            method, url, header_params=headers, body=body, _request_timeout=self._timeout
        )
        data = response.read()
        if not 200 <= response.status < 300:
            text = data.decode(errors="replace") if isinstance(data, bytes) else str(data)
            raise ApiException(status=response.status, reason=response.reason, body=text)
        return json.loads(data) if data else None

    def get(self, path: str) -> Any | None:
        try:
            return self.request("GET", path)
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def forget(self, prefix: str = "") -> None:
        """Drop remembered hashes (all, or those under ``prefix``) so the next apply re-reads."""
        with self._lock:
            for path in [path for path in self._applied if path.startswith(prefix)]:
                del self._applied[path]

    def apply(self, manifest: Manifest) -> bool:
        """Server-side apply ``manifest`` unless the stored object has that content. True if written."""
        meta = manifest["metadata"]
        path = object_path(manifest["apiVersion"], manifest["kind"], meta.get("namespace"), meta["name"])
        stamped, digest = with_hash(manifest)
        with self._lock:
            if self._applied.get(path) == digest:
                return False
        current = self.get(path)
        stored = ((current or {}).get("metadata", {}).get("annotations") or {}).get(APPLIED_HASH_ANNOTATION)
        answer = self.request(
            "PATCH",
            path,
            body=json.dumps(stamped),
            content_type="application/apply-patch+yaml",
            query={"fieldManager": FIELD_MANAGER, "force": "true"},
        )
        # A matching hash says what was last applied, not what is stored now: an edit (kubectl edit,
        # another controller) leaves the annotation as it was. So the apply is sent anyway; the API
        # server writes nothing when nothing differs (the resourceVersion stays), else the edit of
        # the fields the operator owns is reverted.
        written = stored != digest or _version(answer) != _version(current)
        if written:
            CHILD_WRITES.labels(kind=manifest["kind"]).inc()
        with self._lock:
            self._applied[path] = digest
        return written

    def create_if_absent(self, manifest: Manifest) -> bool:
        """POST ``manifest`` unless an object of its name exists (never overwritten). True if created."""
        meta = manifest["metadata"]
        path = object_path(manifest["apiVersion"], manifest["kind"], meta.get("namespace"))
        try:
            self.request("POST", path, body=manifest, query={"fieldManager": FIELD_MANAGER})
        except ApiException as error:
            if error.status == 409:
                return False
            raise
        CHILD_WRITES.labels(kind=manifest["kind"]).inc()
        return True

    def delete(self, api_version: str, kind: str, namespace: str | None, name: str) -> bool:
        path = object_path(api_version, kind, namespace, name)
        self.forget(path)
        try:
            self.request("DELETE", path, body={"propagationPolicy": "Background"})
        except ApiException as error:
            if error.status == 404:
                return False
            raise
        return True

    def patch_status(self, kind: str, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        path = object_path("kubemeter.io/v1alpha1", kind, namespace, name) + "/status"
        self.request(
            "PATCH", path, body={"status": dict(status)}, content_type="application/merge-patch+json"
        )

    def secret_keys(self, namespace: str, name: str) -> frozenset[str] | None:
        """The keys of a Secret (never its values), or None when it does not exist."""
        secret = self.get(object_path("v1", "Secret", namespace, name))
        if secret is None:
            return None
        return frozenset((secret.get("data") or {}).keys()) | frozenset(
            (secret.get("stringData") or {}).keys()
        )

    def list(self, api_version: str, kind: str, namespace: str | None, label_selector: str = "") -> list[Any]:
        query = {"labelSelector": label_selector} if label_selector else {}
        result = self.request("GET", object_path(api_version, kind, namespace), query=query)
        return list((result or {}).get("items") or [])
