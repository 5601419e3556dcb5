"""Idle capacity: per node, window and node state, the node's allocatable minus what its pods hold.

The node is read (``GET /api/v1/nodes/<node>``, as the agent already may) every interval; its life is
kept as segments of constant allocatable and state (:mod:`kubemeter.metering.capacity`). It is there
from its ``creationTimestamp``; a change of allocatable or of ``spec.unschedulable`` (cordon) takes
effect at the read that shows it; a 404 ends it at that read. Pods hold their effective requests
(the scheduler's reservation) over their billable interval, or, for DRA devices, the devices of
their claims; every pod of the node counts, whatever the meter's pod selection.

Readings are node-level: no pod, the subject fixed by the meter (``platform-idle``), the event id
keyed by ``node/<node>`` and the resource (or device group) and state.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from kubemeter.metering.capacity import (
    CORDONED,
    SCHEDULABLE,
    Holding,
    IdleShare,
    NodeSegment,
    held_outside_segments_milli_ms,
    idle_by_state,
    observe,
    removed,
)
from kubemeter.metering.intervals import Interval
from kubemeter.metering.pods import effective_quantity_milli, parse_time_ms
from kubemeter.metering.quantities import parse_quantity_milli
from kubemeter.metering.sharing import DEVICE_MILLI, union_of
from kubemeter.metering.windows import Window
from kubemeter.sources.allocation import held_interval
from kubemeter.sources.base import PodRecord, Reading, SharedPoller
from kubemeter.sources.dra import DeviceFilter
from kubemeter.sources.dra_devices import NodeDevices
from kubemeter.sources.informer import Informer, now_ms
from kubemeter.sources.kube import KubeApi, KubeApiError

if TYPE_CHECKING:
    from kubemeter.agent.meters import World

log = logging.getLogger(__name__)


@dataclass
class NodeState:
    """The node as one read showed it; held from ``start_ms`` until the next state or removal."""

    start_ms: int
    allocatable: dict[str, str]
    cordoned: bool
    labels: dict[str, str]

    def to_json(self) -> list[Any]:
        return [self.start_ms, self.allocatable, self.cordoned, self.labels]


class NodeHistory(SharedPoller):
    """The agent's node over time: shared by every idle meter of the agent."""

    def __init__(
        self,
        api: KubeApi,
        node_name: str,
        poll_interval_s: float,
        on_error: Callable[[str, BaseException], None] = lambda source, error: None,
    ) -> None:
        super().__init__(poll_interval_s, on_error)
        self.api = api
        self.node_name = node_name
        self.uid: str | None = None
        self.states: list[NodeState] = []
        self.removed_ms: int | None = None
        self.observed_ms = 0

    task_name = "node history"
    error_source = "node"

    def describe_failure(self, error: BaseException) -> str:
        return f"reading node {self.node_name} failed: {type(error).__name__}: {error}"

    async def poll(self) -> None:
        asked_ms = now_ms()
        try:
            node = await self.api.get(f"/api/v1/nodes/{self.node_name}")
        except KubeApiError as error:
            if error.status != 404:
                raise
            if self.removed_ms is None and self.states:
                self.removed_ms = asked_ms
            self.observed_ms = max(self.observed_ms, asked_ms)
            self.last_error = None
            return
        self.apply(node, asked_ms)
        self.observed_ms = max(self.observed_ms, asked_ms)
        self.last_error = None

    def apply(self, node: Mapping[str, Any], seen_ms: int) -> None:
        """Fold one read of the node (answered for a request sent at ``seen_ms``) into the history."""
        metadata = node.get("metadata") or {}
        uid = str(metadata.get("uid", ""))
        state = NodeState(
            seen_ms,
            dict((node.get("status") or {}).get("allocatable") or {}),
            bool((node.get("spec") or {}).get("unschedulable")),
            dict(metadata.get("labels") or {}),
        )
        created_ms = (
            parse_time_ms(metadata["creationTimestamp"]) if metadata.get("creationTimestamp") else seen_ms
        )
        if self.uid is None:
            # First seen: there since the API server created it.
            self.uid = uid
            state.start_ms = min(created_ms, seen_ms)
            self.states = [state]
            return
        if uid != self.uid:
            # The name was recreated: nothing allocatable between the old node's end and the new one.
            self.uid = uid
            gap_start_ms = self.removed_ms if self.removed_ms is not None else min(created_ms, seen_ms)
            gap_start_ms = max(gap_start_ms, self.states[-1].start_ms)
            self.states.append(NodeState(gap_start_ms, {}, False, {}))
            self.removed_ms = None
            state.start_ms = max(min(created_ms, seen_ms), gap_start_ms)
            self.states.append(state)
            return
        last = self.states[-1]
        if (last.allocatable, last.cordoned, last.labels) != (
            state.allocatable,
            state.cordoned,
            state.labels,
        ):
            self.states.append(state)

    def segments(self, amount_of: Callable[[NodeState], int]) -> list[NodeSegment]:
        segments: list[NodeSegment] = []
        for state in self.states:
            segments = observe(
                segments, state.start_ms, amount_of(state), CORDONED if state.cordoned else SCHEDULABLE
            )
        if self.removed_ms is not None:
            segments = removed(segments, self.removed_ms)
        return segments

    def labels(self) -> dict[str, str]:
        return self.states[-1].labels if self.states else {}

    def snapshot(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "states": [s.to_json() for s in self.states],
            "removed_ms": self.removed_ms,
            "observed_ms": self.observed_ms,
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        if not state or self.states:
            return
        self.uid = state.get("uid")
        self.states = [NodeState(*s) for s in state.get("states") or []]
        self.removed_ms = state.get("removed_ms")
        self.observed_ms = max(self.observed_ms, int(state.get("observed_ms") or 0))


def shared_node_history(
    world: World, poll_interval_s: float, on_error: Callable[[str, BaseException], None]
) -> NodeHistory:
    found = world.shared.get("node-history")
    if found is None:
        if world.api is None:
            raise ValueError("the agent has no Kubernetes API client for the idle meter; this is a defect")
        found = world.shared["node-history"] = NodeHistory(
            world.api, world.node_name, poll_interval_s, on_error
        )
    assert isinstance(found, NodeHistory)
    return found


def _unit_seconds(milli_ms: int) -> Decimal:
    return Decimal(milli_ms).scaleb(-6)


def _number(value: Decimal) -> int | float:
    return int(value) if value == value.to_integral_value() else float(value)


class IdleSource:
    hold_limit_ms: int | None = None

    def __init__(
        self,
        node: NodeHistory,
        pods: Informer,
        subject: str,
        resource: str | None = None,
        devices: NodeDevices | None = None,
        device_filter: DeviceFilter | None = None,
        model_label: str = "nvidia.com/gpu.product",
    ) -> None:
        if (resource is None) == (devices is None):
            raise ValueError("an idle source counts either a resource or DRA devices")
        self.node = node
        self.pods = pods
        self.subject = subject
        self.resource = resource
        self.devices = devices
        self.filter = device_filter or DeviceFilter(None, None, "idle")
        self.model_label = model_label
        self.node_key = f"node/{node.node_name}"

    async def run(self) -> None:
        if self.devices is None:
            await self.node.run()
        else:
            await asyncio.gather(self.node.run(), self.devices.run())

    def observed_through_ms(self) -> int:
        observed = self.node.observed_ms
        return observed if self.devices is None else min(observed, self.devices.observed_ms)

    def fault(self) -> str | None:
        return self.node.last_error or (self.devices.fault() if self.devices else None)

    def readings(self, window: Window, pods: Mapping[str, PodRecord]) -> list[Reading]:
        if not self.node.states:
            return []
        late = window.end_ms > self.observed_through_ms()
        if self.devices is None:
            return self._resource_readings(window, late)
        return self._device_readings(window, late)

    # ---- node resources -----------------------------------------------------------------------------
    def _resource_readings(self, window: Window, late: bool) -> list[Reading]:
        assert self.resource is not None
        resource = self.resource

        def allocatable_milli(state: NodeState) -> int:
            quantity = state.allocatable.get(resource)
            return 0 if quantity is None else parse_quantity_milli(quantity)

        segments = self.node.segments(allocatable_milli)
        holdings = [
            Holding(held_interval(record)[0], amount)
            for record in self.pods.objects.values()
            if (amount := effective_quantity_milli(record.object, resource, "requests"))
        ]
        dimensions = {"resource": resource}
        model = self.node.labels().get(self.model_label)
        if model and "/" in resource and resource.split("/")[0].startswith("nvidia.com"):
            dimensions["gpu_model"] = model
        outside = held_outside_segments_milli_ms(segments, holdings, window)
        return self._readings(
            window, resource, idle_by_state(segments, holdings, window), dimensions, outside, late
        )

    # ---- DRA devices -----------------------------------------------------------------------------
    def _device_readings(self, window: Window, late: bool) -> list[Reading]:
        assert self.devices is not None
        node_segments = self.node.segments(lambda state: DEVICE_MILLI)
        groups: dict[tuple[str, str, str], list[IdleShare]] = {}
        outside_by_group: dict[tuple[str, str, str], int] = {}
        for ref, presence in self.devices.presence.items():
            published = self.devices.published.get(ref)
            chosen, _doubt = self.filter.matches(ref, published)
            if not chosen:
                continue
            segments = _within(node_segments, presence)
            covered = [Holding(i, DEVICE_MILLI) for i in union_of(list(self.devices.holders(ref).values()))]
            dims = published.dimensions() if published else {"driver": ref.driver}
            key = (ref.driver, dims.get("gpu_model", ""), dims.get("mig_profile", ""))
            groups.setdefault(key, []).extend(idle_by_state(segments, covered, window).values())
            outside_by_group[key] = outside_by_group.get(key, 0) + held_outside_segments_milli_ms(
                segments, covered, window
            )
        readings: list[Reading] = []
        for (driver, model, profile), shares in sorted(groups.items()):
            merged: dict[str, IdleShare] = {}
            for share in shares:
                known = merged.get(share.state)
                merged[share.state] = (
                    share
                    if known is None
                    else IdleShare(
                        share.state,
                        known.capacity_milli_ms + share.capacity_milli_ms,
                        known.held_milli_ms + share.held_milli_ms,
                        known.idle_milli_ms + share.idle_milli_ms,
                    )
                )
            dimensions = {"resource": "dra-devices", "driver": driver}
            if model:
                dimensions["gpu_model"] = model
            if profile:
                dimensions["mig_profile"] = profile
            group = "/".join((driver, model, profile))
            readings.extend(
                self._readings(
                    window, group, merged, dimensions, outside_by_group[(driver, model, profile)], late
                )
            )
        return readings

    def _readings(
        self,
        window: Window,
        group: str,
        shares: Mapping[str, IdleShare],
        dimensions: Mapping[str, str],
        outside_milli_ms: int,
        late: bool,
    ) -> list[Reading]:
        readings = []
        for state, share in sorted(shares.items()):
            reasons = []
            if late:
                reasons.append(f"node known only through {self.observed_through_ms()} ms ({self.fault()})")
            if share.idle_milli_ms < 0:
                reasons.append("the node's pods hold more than it has allocatable (overcommitted)")
            if outside_milli_ms:
                reasons.append(
                    f"pods held {_unit_seconds(outside_milli_ms)} unit-seconds while the node was not there"
                )
            reason = "; ".join(reasons) or None
            readings.append(
                Reading(
                    self.node_key,
                    _unit_seconds(share.idle_milli_ms),
                    part=f"{group}/{state}",
                    complete=reason is None,
                    incomplete_reason=reason,
                    dimensions={
                        **dimensions,
                        "state": state,
                        "capacity": _number(_unit_seconds(share.capacity_milli_ms)),
                        "allocated": _number(_unit_seconds(share.held_milli_ms)),
                    },
                    subject=self.subject,
                )
            )
        return readings

    def committed(self, window: Window) -> None:
        return None

    def snapshot(self) -> dict[str, Any]:
        state: dict[str, Any] = {"node": self.node.snapshot()}
        if self.devices is not None:
            state["devices"] = self.devices.snapshot()
        return state

    def restore(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        self.node.restore(state.get("node") or {})
        if self.devices is not None:
            self.devices.restore(state.get("devices") or {})


def _within(segments: list[NodeSegment], presence: Interval) -> list[NodeSegment]:
    """The node's segments cut to the time a device was published."""
    cut = []
    for segment in segments:
        start_ms = max(segment.start_ms, presence.start_ms)
        ends = [end for end in (segment.end_ms, presence.end_ms) if end is not None]
        end_ms = min(ends) if ends else None
        if end_ms is None or end_ms > start_ms:
            cut.append(NodeSegment(start_ms, end_ms, segment.allocatable_milli, segment.state))
    return cut
