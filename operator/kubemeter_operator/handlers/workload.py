"""DaemonSet and StatefulSet events: agents and gateways becoming ready update the Collector status."""

from __future__ import annotations

from typing import Any

from kubemeter_operator import runtime
from kubemeter_operator.builders.common import COLLECTOR_LABEL
from kubemeter_operator.reconcile import WorkloadCounts


def daemonset_index(
    namespace: str | None, body: Any, labels: Any, **_: Any
) -> dict[str, tuple[str, tuple[int, int]]]:
    counts = WorkloadCounts.from_daemonset(body)
    return {str(namespace): (str(labels.get(COLLECTOR_LABEL, "")), (counts.desired, counts.ready))}


def statefulset_index(
    namespace: str | None, body: Any, labels: Any, **_: Any
) -> dict[str, tuple[str, tuple[int, int]]]:
    counts = WorkloadCounts.from_statefulset(body)
    return {str(namespace): (str(labels.get(COLLECTOR_LABEL, "")), (counts.desired, counts.ready))}


async def workload_event(namespace: str | None, type: str | None, **kwargs: Any) -> None:
    state = runtime.current()
    state.remember_indexes(kwargs)
    if namespace:
        # A deleted child is recreated: forget what we believed was stored.
        state.queue.request(namespace, refresh=type == "DELETED")
