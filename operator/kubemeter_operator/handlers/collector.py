"""Collector handlers: changes and a periodic resync reconcile the namespace; deletion follows
``spec.buffer.onDelete`` and removes the cluster-scoped binding that garbage collection cannot."""

from __future__ import annotations

from typing import Any

import kopf
from kubemeter.api.collector import BufferDeletePolicy, CollectorSpec
from pydantic import ValidationError

from kubemeter_operator import runtime
from kubemeter_operator.builders.common import CollectorRef
from kubemeter_operator.builders.gateway import pvc_retention_policy
from kubemeter_operator.handlers.common import index_entry, request_reconcile
from kubemeter_operator.kube import object_path
from kubemeter_operator.reconcile import now_utc
from kubemeter_operator.resolve import ObjectView
from kubemeter_operator.resources import ConditionStatus
from kubemeter_operator.status import ConditionValue, merge_conditions


def collector_index(namespace: str | None, body: Any, **_: Any) -> dict[str, ObjectView]:
    return index_entry(namespace, body)


async def collector_event(namespace: str | None, **kwargs: Any) -> None:
    await request_reconcile(namespace, **kwargs)


async def collector_resync(namespace: str | None, **kwargs: Any) -> None:
    state = runtime.current()
    state.remember_indexes(kwargs)
    if namespace:
        state.queue.request(namespace, refresh=True)


def collector_deleted(body: Any, namespace: str | None, name: str, uid: str, logger: Any, **_: Any) -> None:
    """Runs in a thread (sync handler). Raises TemporaryError while a Drain is still in progress."""
    state = runtime.current()
    namespace = str(namespace)
    ref = CollectorRef(namespace=namespace, name=name, uid=uid)
    try:
        spec: CollectorSpec | None = CollectorSpec.model_validate(dict(body.get("spec") or {}))
    except ValidationError:
        spec = None  # an unreadable spec keeps the volumes: never delete data on a guess
    policy = spec.buffer.on_delete if spec else BufferDeletePolicy.RETAIN
    statefulset = object_path("apps/v1", "StatefulSet", namespace, ref.gateway_name)
    if spec is not None and state.api.get(statefulset) is not None:
        # The policy may have changed since the last apply; it decides whether the PVCs go.
        state.api.request(
            "PATCH",
            statefulset,
            body={"spec": {"persistentVolumeClaimRetentionPolicy": pvc_retention_policy(spec)}},
            content_type="application/merge-patch+json",
        )
    if policy is BufferDeletePolicy.DRAIN:
        # Stop the agents first: on SIGTERM they flush their spools into the gateway.
        state.api.delete("apps/v1", "DaemonSet", namespace, ref.agent_name)
        _wait_for_drain(state, ref, body, logger)
    state.api.delete(
        "rbac.authorization.k8s.io/v1", "ClusterRoleBinding", None, ref.agent_cluster_binding_name
    )
    state.api.forget(f"/api/v1/namespaces/{namespace}/")
    state.api.forget(f"/apis/apps/v1/namespaces/{namespace}/")
    logger.info("Collector %s/%s released (buffer.onDelete=%s)", namespace, name, policy.value)


def _wait_for_drain(state: runtime.Runtime, ref: CollectorRef, body: Any, logger: Any) -> None:
    statefulset = state.api.get(object_path("apps/v1", "StatefulSet", ref.namespace, ref.gateway_name))
    if statefulset is None:
        return  # no gateway, nothing buffered
    replicas = int((statefulset.get("spec") or {}).get("replicas") or 0)
    reports = state.reconciler._read_gateway_reports(ref.namespace, ref.name)
    buffered = sum(report.buffered_events for report in reports)
    if len(reports) >= replicas and buffered == 0:
        return
    left = (
        f"{buffered} events left"
        if len(reports) >= replicas
        else f"{replicas - len(reports)} gateway(s) unreachable"
    )
    message = (
        f"waiting for the gateway buffer to drain ({left}); to delete now and keep the volumes, "
        "set spec.buffer.onDelete: Retain"
    )
    previous = dict(body.get("status") or {})
    conditions = merge_conditions(
        previous.get("conditions") or [],
        {"Ready": ConditionValue(ConditionStatus.FALSE, "Draining", message)},
        int(body.get("metadata", {}).get("generation") or 0),
        now_utc(),
    )
    kept = [c for c in previous.get("conditions") or [] if c.get("type") != "Ready"]
    state.api.patch_status("Collector", ref.namespace, ref.name, {"conditions": conditions + kept})
    logger.info(message)
    raise kopf.TemporaryError(message, delay=min(state.settings.resync_seconds, 10.0))
