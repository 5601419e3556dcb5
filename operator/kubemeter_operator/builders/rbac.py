"""ServiceAccounts and least-privilege RBAC. Agents read pods, namespaces and node stats cluster-wide
(scoped to their node by field selectors, which RBAC cannot express); the gateway reads nothing."""

from __future__ import annotations

from typing import Any

from kubemeter.config import API_GROUP

from kubemeter_operator.builders.common import (
    MANAGED_BY,
    CollectorRef,
    Manifest,
    metadata,
)

AGENT_CLUSTER_ROLE = "kubemeter-agent"
RBAC_API = "rbac.authorization.k8s.io/v1"


def agent_cluster_role_rules() -> list[dict[str, Any]]:
    return [
        {"apiGroups": [""], "resources": ["pods", "namespaces"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]},
        # kubelet stats/summary through the API server's node proxy
        {"apiGroups": [""], "resources": ["nodes/proxy", "nodes/stats"], "verbs": ["get"]},
    ]


def get_agent_cluster_role() -> Manifest:
    """Shared by every Collector's agents; installed once (by the chart or the operator), never owned."""
    return {
        "apiVersion": RBAC_API,
        "kind": "ClusterRole",
        "metadata": {
            "name": AGENT_CLUSTER_ROLE,
            "labels": {"app.kubernetes.io/part-of": "kubemeter", "app.kubernetes.io/managed-by": MANAGED_BY},
        },
        "rules": agent_cluster_role_rules(),
    }


def get_service_account(collector: CollectorRef, name: str, component: str, automount: bool) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": metadata(collector, name, component),
        "automountServiceAccountToken": automount,
    }


def get_agent_service_account(collector: CollectorRef) -> Manifest:
    return get_service_account(collector, collector.agent_name, "agent", automount=True)


def get_gateway_service_account(collector: CollectorRef) -> Manifest:
    # The gateway talks to no Kubernetes API: it gets no token at all.
    return get_service_account(collector, collector.gateway_name, "gateway", automount=False)


def get_agent_cluster_role_binding(collector: CollectorRef) -> Manifest:
    return {
        "apiVersion": RBAC_API,
        "kind": "ClusterRoleBinding",
        "metadata": metadata(collector, collector.agent_cluster_binding_name, "agent", namespaced=False),
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": AGENT_CLUSTER_ROLE,
        },
        "subjects": [
            {"kind": "ServiceAccount", "name": collector.agent_name, "namespace": collector.namespace}
        ],
    }


def get_agent_role(collector: CollectorRef) -> Manifest:
    """Agents report node-level problems (no NVML, kubelet unreachable) as Events in the Collector's
    namespace; that is all they may write."""
    return {
        "apiVersion": RBAC_API,
        "kind": "Role",
        "metadata": metadata(collector, collector.agent_name, "agent"),
        "rules": [
            {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]}
        ],
    }


def get_agent_role_binding(collector: CollectorRef) -> Manifest:
    return {
        "apiVersion": RBAC_API,
        "kind": "RoleBinding",
        "metadata": metadata(collector, collector.agent_name, "agent"),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": collector.agent_name},
        "subjects": [
            {"kind": "ServiceAccount", "name": collector.agent_name, "namespace": collector.namespace}
        ],
    }


def operator_cluster_role_rules() -> list[dict[str, Any]]:
    """What the operator itself needs (the chart's ClusterRole). It holds the agent's permissions too,
    because RBAC only lets a subject grant what it has (or what it may ``bind``)."""
    return [
        {
            "apiGroups": [API_GROUP],
            "resources": ["meters", "collectors", "pipelines"],
            "verbs": ["get", "list", "watch", "patch"],
        },
        {
            "apiGroups": [API_GROUP],
            "resources": ["meters/status", "collectors/status", "pipelines/status"],
            "verbs": ["get", "patch"],
        },
        {"apiGroups": [API_GROUP], "resources": ["collectors/finalizers"], "verbs": ["update"]},
        {
            "apiGroups": ["kopf.dev"],
            "resources": ["clusterkopfpeerings"],
            "verbs": ["get", "list", "watch", "patch"],
        },
        {
            "apiGroups": ["apiextensions.k8s.io"],
            "resources": ["customresourcedefinitions"],
            "verbs": ["get", "list", "watch"],
        },
        {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
        {
            "apiGroups": [""],
            "resources": ["serviceaccounts", "configmaps", "services"],
            "verbs": ["get", "create", "patch", "delete"],
        },
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["nodes/proxy", "nodes/stats"], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["persistentvolumeclaims"], "verbs": ["get", "list"]},
        {
            "apiGroups": ["apps"],
            "resources": ["daemonsets", "statefulsets"],
            "verbs": ["get", "list", "watch", "create", "patch", "delete"],
        },
        {
            "apiGroups": ["policy"],
            "resources": ["poddisruptionbudgets"],
            "verbs": ["get", "create", "patch", "delete"],
        },
        {
            "apiGroups": ["rbac.authorization.k8s.io"],
            "resources": ["roles", "rolebindings", "clusterrolebindings"],
            "verbs": ["get", "create", "patch", "delete"],
        },
        {
            "apiGroups": ["rbac.authorization.k8s.io"],
            "resources": ["clusterroles"],
            "verbs": ["get", "create", "patch"],
        },
        {
            "apiGroups": ["rbac.authorization.k8s.io"],
            "resources": ["clusterroles"],
            "resourceNames": [AGENT_CLUSTER_ROLE],
            "verbs": ["bind"],
        },
    ]
