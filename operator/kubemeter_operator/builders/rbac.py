"""ServiceAccounts and least-privilege RBAC for a Collector's agents and gateway.

Each rule is a request the component makes; docs/install.md explains each, and
tests/integration/agent/test_agent_rbac.py runs both components on tokens of exactly these.

- The agent lists and watches pods (``fieldSelector=spec.nodeName=<its node>``) and namespaces,
  gets its Node, and reads ``/stats/summary`` from its kubelet, which authorises that request with a
  SubjectAccessReview for ``get nodes/stats`` (``nodes/proxy`` would also open exec, logs and every
  other kubelet API, so it is not granted). For dra and idle meters it lists and watches its node's
  ResourceSlices and gets, by name, the ResourceClaims its pods use. RBAC cannot scope a list to a
  field selector or a Node to "the agent's own", so these are cluster-wide; the agent holds no
  cluster-wide cache because it asks for its node only. It writes nothing to the API.
- The gateway talks to no Kubernetes API: its ServiceAccount has no binding and no token mounted.
"""

from __future__ import annotations

from typing import Any

from kubemeter.api.common import API_GROUP

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
        # informers: one LIST, then WATCH from its resourceVersion; never a GET of one object
        {"apiGroups": [""], "resources": ["pods", "namespaces"], "verbs": ["list", "watch"]},
        # its own Node: labels for dimensions, the kubelet's address and port
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]},
        # checked by the kubelet, not the API server: GET /stats/summary on the node's own port
        {"apiGroups": [""], "resources": ["nodes/stats"], "verbs": ["get"]},
        # dra and idle meters: the node's ResourceSlices (fieldSelector=spec.nodeName=<node>), and
        # each claim its pods use, read by name as the kubelet reads it; never a claim list
        {"apiGroups": ["resource.k8s.io"], "resources": ["resourceslices"], "verbs": ["list", "watch"]},
        {"apiGroups": ["resource.k8s.io"], "resources": ["resourceclaims"], "verbs": ["get"]},
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


def operator_namespaced_rules() -> list[dict[str, Any]]:
    """What the operator does inside the namespaces it watches (the chart's ``<release>-operator-
    namespaced`` ClusterRole): bound by a RoleBinding in each of ``operator.watchNamespaces``, or
    cluster-wide when that list is empty."""
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
        {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
        {
            "apiGroups": [""],
            "resources": ["serviceaccounts", "configmaps", "services"],
            "verbs": ["get", "create", "patch", "delete"],
        },
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "create"]},
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
    ]


def operator_cluster_scoped_rules() -> list[dict[str, Any]]:
    """What the operator needs across the cluster in any mode (the chart's ``<release>-operator``
    ClusterRole): peering, CRD discovery, the shared agent ClusterRole and each Collector's binding
    to it. It holds the agent's permissions too, because RBAC lets a subject write a role only with
    rights it has."""
    return [
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
        {"apiGroups": [""], "resources": ["pods", "namespaces"], "verbs": ["list", "watch"]},
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["nodes/stats"], "verbs": ["get"]},
        {"apiGroups": ["resource.k8s.io"], "resources": ["resourceslices"], "verbs": ["list", "watch"]},
        {"apiGroups": ["resource.k8s.io"], "resources": ["resourceclaims"], "verbs": ["get"]},
        {
            "apiGroups": ["rbac.authorization.k8s.io"],
            "resources": ["clusterrolebindings"],
            "verbs": ["get", "create", "patch", "delete"],
        },
        # kubemeter-agent only, by name; create cannot be named (the escalation check bounds it).
        {
            "apiGroups": ["rbac.authorization.k8s.io"],
            "resources": ["clusterroles"],
            "resourceNames": [AGENT_CLUSTER_ROLE],
            "verbs": ["get", "patch", "bind"],
        },
        {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["clusterroles"], "verbs": ["create"]},
    ]


def operator_cluster_role_rules() -> list[dict[str, Any]]:
    """Everything the operator may do when it watches every namespace."""
    return operator_cluster_scoped_rules() + operator_namespaced_rules()
