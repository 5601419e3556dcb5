"""The pure Kubernetes rules: when a pod holds its resources, and how much it holds.

Input is the pod as the API server returns it (a JSON dict). docs/metering.md states these rules for
people; the unit tests in tests/unit/metering/test_pods.py pin them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, Literal

from kubemeter.metering.intervals import Interval
from kubemeter.metering.quantities import parse_quantity_milli

Pod = Mapping[str, Any]
Basis = Literal["requests", "limits"]
TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})


_FRACTION = re.compile(r"\.(\d{1,9})")


def parse_time_ms(text: str) -> int:
    """RFC 3339 (``2024-05-01T10:00:07Z``, optionally with up to nanosecond fractions) → epoch ms."""
    text = _FRACTION.sub(lambda match: "." + match.group(1)[:6].ljust(6, "0"), text, count=1)
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        raise ValueError(f"timestamp {text!r} has no timezone; the API server always sends UTC with Z")
    return int(moment.timestamp()) * 1000 + moment.microsecond // 1000


def _all_container_statuses(pod: Pod) -> list[Mapping[str, Any]]:
    status = pod.get("status") or {}
    return [
        *(status.get("initContainerStatuses") or []),
        *(status.get("containerStatuses") or []),
        *(status.get("ephemeralContainerStatuses") or []),
    ]


def _finished_at_ms(statuses: Iterable[Mapping[str, Any]]) -> list[int]:
    finished: list[int] = []
    for container_status in statuses:
        terminated = (container_status.get("state") or {}).get("terminated") or {}
        if terminated.get("finishedAt"):
            finished.append(parse_time_ms(terminated["finishedAt"]))
    return finished


def bound_at_ms(pod: Pod) -> int:
    """When the pod was bound to its node: from then on the node's capacity is reserved for it."""
    for condition in (pod.get("status") or {}).get("conditions") or []:
        if (
            condition.get("type") == "PodScheduled"
            and condition.get("status") == "True"
            and condition.get("lastTransitionTime")
        ):
            return parse_time_ms(condition["lastTransitionTime"])
    # No PodScheduled condition: the pod was created with spec.nodeName set, so bound at creation.
    return parse_time_ms(pod["metadata"]["creationTimestamp"])


def deletion_requested_ms(pod: Pod) -> int | None:
    """When deletion was asked for, as this version of the pod object records it.

    ``deletionTimestamp`` is the deadline (request + grace). A later delete with a shorter grace (the
    kubelet's final grace-0 delete) re-stamps it to that call's time, so callers keep the earliest
    value they have seen (:class:`kubemeter.sources.informer.CachedObject` does).
    """
    metadata = pod.get("metadata") or {}
    deletion = metadata.get("deletionTimestamp")
    if not deletion:
        return None
    grace_s = int(metadata.get("deletionGracePeriodSeconds") or 0)
    return parse_time_ms(deletion) - grace_s * 1000


def released_at_ms(pod: Pod, requested_ms: int | None = None) -> int | None:
    """When the pod gave its resources back, or None while it still holds them.

    ``requested_ms`` is the earliest deletion request known for the pod (see
    :func:`deletion_requested_ms`); without it, this object's own is used.
    """
    status = pod.get("status") or {}
    statuses = _all_container_statuses(pod)
    app_statuses = status.get("containerStatuses") or []
    finished = _finished_at_ms(statuses)
    own_request_ms = deletion_requested_ms(pod)
    if own_request_ms is not None and requested_ms is not None:
        own_request_ms = min(requested_ms, own_request_ms)
    if status.get("phase") in TERMINAL_PHASES:
        if finished:
            ended_ms = max(finished)
        else:
            transitions = [
                parse_time_ms(condition["lastTransitionTime"])
                for condition in status.get("conditions") or []
                if condition.get("lastTransitionTime")
            ]
            ended_ms = max(transitions) if transitions else bound_at_ms(pod)
        # Killed at the end of a deletion's grace period (a real kubelet then sets Failed): the
        # resources were given back at the request, as while it was still terminating.
        return ended_ms if own_request_ms is None else min(ended_ms, own_request_ms)
    if own_request_ms is not None:
        request_ms = own_request_ms
        all_app_terminated = bool(app_statuses) and all(
            ((s.get("state") or {}).get("terminated") or {}).get("finishedAt") for s in app_statuses
        )
        if all_app_terminated and finished:
            # Exited before the request: bill to the exit. Exited during the grace period: the owner
            # gave the resources back at the request, and a window that closed while the pod was
            # still terminating has already billed up to it (so every window stays final).
            return min(max(finished), request_ms)
        return request_ms
    return None


def billable_interval(pod: Pod, requested_ms: int | None = None) -> Interval:
    start_ms = bound_at_ms(pod)
    end_ms = released_at_ms(pod, requested_ms)
    if end_ms is not None:
        end_ms = max(end_ms, start_ms)
    return Interval(start_ms, end_ms)


def _container_amount_milli(container: Mapping[str, Any], resource: str, basis: Basis) -> int:
    resources = container.get("resources") or {}
    chosen = (resources.get(basis) or {}).get(resource)
    if chosen is None and basis == "limits":
        # No limit means "unbounded": bill what the scheduler reserved, the request.
        chosen = (resources.get("requests") or {}).get(resource)
    if chosen is None and basis == "requests":
        # The API server defaults a missing request to the limit; old objects may predate that.
        chosen = (resources.get("limits") or {}).get(resource)
    return 0 if chosen is None else parse_quantity_milli(chosen)


def effective_quantity_milli(pod: Pod, resource: str, basis: Basis = "requests") -> int:
    """The pod's effective request (or limit) of ``resource``, as the scheduler computes it.

    max(the largest init-container step, the sum of app containers) where restartable (sidecar)
    init containers keep running and add to every later step, plus pod-level resources when set,
    plus ``spec.overhead``.
    """
    spec = pod.get("spec") or {}
    overhead_milli = 0
    if resource in (spec.get("overhead") or {}):
        overhead_milli = parse_quantity_milli(spec["overhead"][resource])
    pod_level = (spec.get("resources") or {}).get(basis) or {}
    if resource in pod_level:
        return parse_quantity_milli(pod_level[resource]) + overhead_milli
    app_sum_milli = sum(_container_amount_milli(c, resource, basis) for c in spec.get("containers") or [])
    sidecars_milli = 0
    init_peak_milli = 0
    for init in spec.get("initContainers") or []:
        amount_milli = _container_amount_milli(init, resource, basis)
        if init.get("restartPolicy") == "Always":
            sidecars_milli += amount_milli
            init_peak_milli = max(init_peak_milli, sidecars_milli)
        else:
            init_peak_milli = max(init_peak_milli, sidecars_milli + amount_milli)
    return max(init_peak_milli, app_sum_milli + sidecars_milli) + overhead_milli
