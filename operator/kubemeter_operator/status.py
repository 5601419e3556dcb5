"""Status per Kubernetes API conventions, computed (pure) from what the operator concluded.

Conditions keep their ``lastTransitionTime`` while their status stays the same, so an unchanged
situation yields an identical status and no write."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kubemeter.api.rendered import AgentFaultReport, GatewayStatusReport

from kubemeter_operator.resolve import Problem
from kubemeter_operator.resources import ConditionStatus

READY = "Ready"
DEGRADED = "Degraded"
MAX_MESSAGE_CHARS = 2000
MAX_SOURCE_FAULTS = 20  # listed in the status; the Degraded message says how many there are in all


@dataclass(frozen=True)
class ConditionValue:
    status: ConditionStatus
    reason: str
    message: str


@dataclass(frozen=True)
class EventNote:
    """An Event to post: ``type`` is Normal or Warning."""

    type: str
    reason: str
    message: str


def format_time(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_conditions(
    previous: Sequence[Mapping[str, Any]],
    values: Mapping[str, ConditionValue],
    generation: int,
    now: datetime,
) -> list[dict[str, Any]]:
    old = {condition.get("type"): condition for condition in previous}
    merged: list[dict[str, Any]] = []
    for condition_type, value in values.items():
        before = old.get(condition_type) or {}
        changed = before.get("status") != value.status.value
        merged.append(
            {
                "type": condition_type,
                "status": value.status.value,
                "reason": value.reason,
                "message": value.message[:MAX_MESSAGE_CHARS],
                "lastTransitionTime": format_time(now) if changed else before.get("lastTransitionTime"),
                "observedGeneration": generation,
            }
        )
    return merged


def degraded_value(problems: Sequence[Problem]) -> ConditionValue:
    if not problems:
        return ConditionValue(ConditionStatus.FALSE, "AsExpected", "")
    return ConditionValue(ConditionStatus.TRUE, problems[0].reason, "; ".join(p.message for p in problems))


def condition(status: Mapping[str, Any], condition_type: str) -> Mapping[str, Any]:
    for item in status.get("conditions") or []:
        if item.get("type") == condition_type:
            return dict(item)
    return {}


def transition_events(old_status: Mapping[str, Any], new_status: Mapping[str, Any]) -> list[EventNote]:
    """A Warning when a problem appears or changes, a Normal when it clears; nothing otherwise."""
    before, after = condition(old_status, DEGRADED), condition(new_status, DEGRADED)
    if after.get("status") == "True" and (
        before.get("status") != "True" or before.get("message") != after.get("message")
    ):
        return [EventNote("Warning", str(after.get("reason")), str(after.get("message")))]
    if before.get("status") == "True" and after.get("status") != "True":
        return [EventNote("Normal", "Recovered", "the problems reported earlier are fixed")]
    return []


def collector_ready(
    problems: Sequence[Problem], replicas: int, agents: Mapping[str, int], gateway: Mapping[str, int]
) -> ConditionValue:
    blocking = [p for p in problems if p.reason != "InvalidBinding"]  # other Meters still run
    if blocking:
        return ConditionValue(ConditionStatus.FALSE, blocking[0].reason, blocking[0].message)
    if agents.get("desired", 0) == 0:
        return ConditionValue(
            ConditionStatus.FALSE,
            "NoMatchingNodes",
            "no node runs an agent yet; check spec.nodeSelector and spec.tolerations against node labels "
            "and taints",
        )
    if agents.get("ready", 0) < agents.get("desired", 0):
        return ConditionValue(
            ConditionStatus.FALSE,
            "AgentsNotReady",
            f"{agents.get('ready', 0)} of {agents['desired']} agents ready",
        )
    if gateway.get("ready", 0) < replicas:
        return ConditionValue(
            ConditionStatus.FALSE,
            "GatewayNotReady",
            f"{gateway.get('ready', 0)} of {replicas} gateways ready",
        )
    return ConditionValue(
        ConditionStatus.TRUE, "Ready", f"{agents['ready']} agents and {replicas} gateways ready"
    )


def latest_agent_reports(reports: Sequence[GatewayStatusReport]) -> list[AgentFaultReport]:
    """Each node's newest fault report over the gateway replicas (an agent's posts may land on any)."""
    latest: dict[str, AgentFaultReport] = {}
    for gateway in reports:
        for report in gateway.agent_reports:
            kept = latest.get(report.node)
            if kept is None or report.sent_at > kept.sent_at:
                latest[report.node] = report
    return list(latest.values())


def source_faults(reports: Sequence[AgentFaultReport]) -> list[dict[str, str]]:
    """Every meter whose source is behind on some node, with the reason, sorted."""
    faults = [
        {"meter": meter, "node": report.node, "reason": reason}
        for report in reports
        for meter, reason in report.source_faults.items()
    ]
    return sorted(faults, key=lambda fault: (fault["meter"], fault["node"]))


def known_source_faults(reports: Sequence[GatewayStatusReport], replicas: int) -> list[dict[str, str]] | None:
    """The source faults the gateways know, or None while they may not know them all: a replica
    did not answer (it may hold the only report of a fault) or started too recently to have heard
    from every faulted agent."""
    if not reports or len(reports) < replicas or not all(r.agent_reports_complete for r in reports):
        return None
    return source_faults(latest_agent_reports(reports))


def source_fault_problem(faults: Sequence[Mapping[str, str]]) -> Problem:
    """One Degraded reason for all source faults: the meters run on, their windows are flagged."""
    shown = "; ".join(f'Meter "{f["meter"]}" on node {f["node"]}: {f["reason"]}' for f in faults[:3])
    more = f" (and {len(faults) - 3} more, see status.sourceFaults)" if len(faults) > 3 else ""
    return Problem(
        "SourceFault",
        f"{len(faults)} source fault(s); those meters' windows are flagged incomplete until it clears: "
        f"{shown}{more}",
    )


def collector_status(
    previous: Mapping[str, Any],
    generation: int,
    problems: Sequence[Problem],
    replicas: int,
    meter_count: int,
    agents: Mapping[str, int],
    gateway: Mapping[str, int],
    reports: Sequence[GatewayStatusReport] | None,
    now: datetime,
) -> dict[str, Any]:
    """``reports``: the gateways' /status bodies, or None when none answered (keep what is known);
    they carry the agents' source faults too. A source fault degrades the Collector but does not
    make it unready: the other meters run on."""
    known = known_source_faults(reports or [], replicas)
    faults = known if known is not None else list(previous.get("sourceFaults") or [])
    degraded = list(problems) + ([source_fault_problem(faults)] if faults else [])
    # A gateway that paused delivery (credentials or ACLs refused) needs a person: Degraded.
    paused = [report.paused_reason for report in reports or [] if report.paused_reason]
    if paused:
        degraded.append(Problem("DeliveryPaused", f"delivery to the output is paused: {paused[0]}"))
    values = {
        READY: collector_ready(problems, replicas, agents, gateway),
        DEGRADED: degraded_value(degraded),
    }
    status: dict[str, Any] = {
        "observedGeneration": generation,
        "conditions": merge_conditions(previous.get("conditions") or [], values, generation, now),
        "agents": {"desired": agents.get("desired", 0), "ready": agents.get("ready", 0)},
        "gateway": {"desired": replicas, "ready": gateway.get("ready", 0)},
        "meters": meter_count,
        "sourceFaults": faults[:MAX_SOURCE_FAULTS],
    }
    if reports:
        status["buffer"] = {
            "events": sum(report.buffered_events for report in reports),
            "bytes": sum(report.buffered_bytes for report in reports),
            "oldestEventAgeSeconds": max(report.oldest_event_age_seconds for report in reports),
        }
        status["deliveredEvents"] = sum(report.delivered_events for report in reports)
        status["deadLetteredEvents"] = sum(report.dead_lettered_events for report in reports)
        errors = [report.paused_reason or report.last_delivery_error for report in reports]
        status["lastDeliveryError"] = next((error for error in errors if error), None)
    else:
        for key in ("buffer", "deliveredEvents", "deadLetteredEvents", "lastDeliveryError"):
            if previous.get(key) is not None:
                status[key] = previous[key]
    return status


def meter_status(
    previous: Mapping[str, Any],
    generation: int,
    problems: Sequence[Problem],
    source: str | None,
    collectors: Sequence[str],
    now: datetime,
) -> dict[str, Any]:
    if problems:
        ready = ConditionValue(ConditionStatus.FALSE, problems[0].reason, problems[0].message)
    elif collectors:
        ready = ConditionValue(ConditionStatus.TRUE, "Bound", f"run by Collector {', '.join(collectors)}")
    else:
        ready = ConditionValue(
            ConditionStatus.FALSE,
            "NotBound",
            "no Pipeline binds this Meter; list it in a Pipeline's spec.meters or match its meterSelector",
        )
    values = {READY: ready, DEGRADED: degraded_value(problems)}
    status: dict[str, Any] = {
        "observedGeneration": generation,
        "conditions": merge_conditions(previous.get("conditions") or [], values, generation, now),
        "collectors": list(collectors),
    }
    if source:
        status["source"] = source
    return status


def pipeline_status(
    previous: Mapping[str, Any],
    generation: int,
    problems: Sequence[Problem],
    collector: str,
    meters: Sequence[str],
    now: datetime,
) -> dict[str, Any]:
    if problems:
        ready = ConditionValue(ConditionStatus.FALSE, problems[0].reason, problems[0].message)
    else:
        ready = ConditionValue(
            ConditionStatus.TRUE, "Bound", f"binds {len(meters)} Meter(s) to Collector {collector}"
        )
    values = {READY: ready, DEGRADED: degraded_value(problems)}
    return {
        "observedGeneration": generation,
        "conditions": merge_conditions(previous.get("conditions") or [], values, generation, now),
        "meters": list(meters),
        "meterCount": len(meters),
    }


def status_changed(current: Mapping[str, Any], desired: Mapping[str, Any]) -> bool:
    """True when writing ``desired`` would change what is stored (keys we do not own are ignored)."""
    return any(current.get(key) != value for key, value in desired.items()) or any(
        key not in desired and current.get(key) is not None
        for key in ("buffer", "deliveredEvents", "deadLetteredEvents", "lastDeliveryError", "source")
    )
