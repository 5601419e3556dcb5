"""Names, labels and owner references shared by every child of a Collector."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from kubemeter.api.common import API_GROUP, API_VERSION

MANAGED_BY = "kubemeter-operator"
COLLECTOR_LABEL = f"{API_GROUP}/collector"
COLLECTOR_NAMESPACE_LABEL = f"{API_GROUP}/collector-namespace"
APPLIED_HASH_ANNOTATION = f"{API_GROUP}/applied-hash"
GATEWAY_CONFIG_HASH_ANNOTATION = f"{API_GROUP}/gateway-config-hash"
FIELD_MANAGER = "kubemeter-operator"

Manifest = dict[str, Any]


@dataclass(frozen=True)
class CollectorRef:
    """The Collector a child belongs to."""

    namespace: str
    name: str
    uid: str

    @property
    def agent_name(self) -> str:
        return f"{self.name}-agent"

    @property
    def gateway_name(self) -> str:
        return f"{self.name}-gateway"

    @property
    def gateway_headless_name(self) -> str:
        return f"{self.name}-gateway-headless"

    @property
    def config_name(self) -> str:
        return f"{self.name}-config"

    @property
    def agent_cluster_binding_name(self) -> str:
        # Cluster-scoped, so the namespace is part of the name; deleted by the operator, not by GC.
        return f"kubemeter-agent-{self.namespace}-{self.name}"


def labels(collector: CollectorRef, component: str) -> dict[str, str]:
    """Labels on every child: the recommended app.kubernetes.io set plus the owning Collector."""
    return {
        "app.kubernetes.io/name": "kubemeter",
        "app.kubernetes.io/instance": collector.name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": "kubemeter",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        COLLECTOR_LABEL: collector.name,
    }


def selector_labels(collector: CollectorRef, component: str) -> dict[str, str]:
    """The immutable subset used in selectors: never add to it, or existing workloads cannot update."""
    return {
        "app.kubernetes.io/name": "kubemeter",
        "app.kubernetes.io/instance": collector.name,
        "app.kubernetes.io/component": component,
    }


def owner_references(collector: CollectorRef) -> list[dict[str, Any]]:
    return [
        {
            "apiVersion": f"{API_GROUP}/{API_VERSION}",
            "kind": "Collector",
            "name": collector.name,
            "uid": collector.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]


def metadata(collector: CollectorRef, name: str, component: str, namespaced: bool = True) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": labels(collector, component)}
    if namespaced:
        meta["namespace"] = collector.namespace
        meta["ownerReferences"] = owner_references(collector)
    else:
        meta["labels"][COLLECTOR_NAMESPACE_LABEL] = collector.namespace
    return meta


def content_hash(value: Any) -> str:
    """A stable short hash of JSON-able content."""
    encoded = json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(encoded).hexdigest()[:16]
