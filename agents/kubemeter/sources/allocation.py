"""Allocation: what each pod on this node holds, integrated exactly from its own timestamps.

The pod watch (``spec.nodeName=<node>``) keeps the pod objects; this source only applies the rules of
:mod:`kubemeter.metering.pods` to them. A window's value is ``effective quantity * overlap of the
billable interval with the window``, in milli-units * milliseconds, reported in unit-seconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from kubemeter.metering.intervals import Interval, overlap_ms
from kubemeter.metering.pods import Basis, billable_interval, effective_quantity_milli
from kubemeter.metering.usage_basis import larger_of_request_and_usage
from kubemeter.metering.windows import Window
from kubemeter.sources.base import PodRecord, Reading
from kubemeter.sources.informer import Informer, now_ms
from kubemeter.sources.kubelet import KubeletUsageSource

# Pod state older than this at a window's close is a fault worth reporting (settle + barrier time).
BEHIND_AFTER_MS = 30_000
# While the pod watch is down (API server unreachable) windows wait this long for it: once it is
# back, the resumed watch brings every change made meanwhile, so waiting bills exactly where closing
# "as last seen" could only guess (and flag). Past this the windows close flagged.
HOLD_WHILE_BEHIND_MS = 15 * 60_000


def held_interval(record: PodRecord) -> tuple[Interval, str | None]:
    """The billable interval, and why it is uncertain when the pod vanished unobserved."""
    interval = billable_interval(record.object, record.deletion_requested_ms)
    if record.deleted_at_ms is None or interval.end_ms is not None:
        return interval, None
    if record.vanished:
        # Deleted while the watch (or the agent) was down: bill what was observed, flag the rest.
        end_ms = max(interval.start_ms, record.deleted_at_ms)
        return Interval(interval.start_ms, end_ms), (
            f"pod vanished while the pod watch was down; held at least until {end_ms} ms, "
            "its release time is unknown"
        )
    return Interval(interval.start_ms, max(interval.start_ms, record.deleted_at_ms)), None


class AllocationSource:
    hold_limit_ms: int | None = HOLD_WHILE_BEHIND_MS

    def __init__(self, pods: Informer, resource: str, basis: Basis) -> None:
        self.pods = pods
        self.resource = resource
        self.basis = basis

    async def run(self) -> None:
        # The pod watch is shared by every meter and run by the agent; nothing of our own to observe.
        await asyncio.Event().wait()

    def observed_through_ms(self) -> int:
        # Not "now" while the watch is up: a healthy watch can lag; only a barrier proves it caught up.
        return self.pods.consistent_through_ms

    def fault(self) -> str | None:
        if not self.pods.healthy:
            return f"pod watch down: {self.pods.last_error}"
        if now_ms() - self.pods.consistent_through_ms > BEHIND_AFTER_MS:
            return "pod list barrier not reached: the API server is slow or the watch is stuck"
        return None

    def readings(self, window: Window, pods: Mapping[str, PodRecord]) -> list[Reading]:
        observed_ms = self.observed_through_ms()
        readings: list[Reading] = []
        for uid, record in pods.items():
            quantity_milli = effective_quantity_milli(record.object, self.resource, self.basis)
            if quantity_milli == 0:
                continue
            interval, uncertain = held_interval(record)
            held_ms = overlap_ms(interval, window)
            if held_ms == 0:
                continue
            reason = None
            if uncertain is not None and interval.end_ms is not None and interval.end_ms < window.end_ms:
                reason = uncertain
            elif window.end_ms > observed_ms and not interval.ends_by(observed_ms):
                reason = (
                    f"pod state known only through {observed_ms} ms ({self.fault()}); pod state as last seen"
                )
            value = Decimal(quantity_milli * held_ms).scaleb(-6)
            readings.append(Reading(uid, value, complete=reason is None, incomplete_reason=reason))
        return readings

    def committed(self, window: Window) -> None:
        return None

    def snapshot(self) -> dict[str, Any]:
        return {}

    def restore(self, state: Mapping[str, Any]) -> None:
        return None


class MaxRequestUsageSource:
    """``basis: maxRequestUsage`` (cpu or memory): per pod and window, the larger of the request held
    (:class:`AllocationSource`'s value with ``requests``) and the kubelet-measured usage
    (:class:`kubemeter.sources.kubelet.KubeletUsageSource`: the CPU counter's increase, or the working
    set integrated over the window). Both are unit-seconds, so the comparison is exact."""

    def __init__(self, requested: AllocationSource, used: KubeletUsageSource) -> None:
        self.requested = requested
        self.used = used
        self.hold_limit_ms = used.hold_limit_ms

    async def run(self) -> None:
        await asyncio.gather(self.requested.run(), self.used.run())

    def observed_through_ms(self) -> int:
        return min(self.requested.observed_through_ms(), self.used.observed_through_ms())

    def fault(self) -> str | None:
        return self.requested.fault() or self.used.fault()

    def readings(self, window: Window, pods: Mapping[str, PodRecord]) -> list[Reading]:
        requested = {r.pod_uid: r for r in self.requested.readings(window, pods)}
        used = {r.pod_uid: r for r in self.used.readings(window, pods)}
        readings: list[Reading] = []
        for uid, record in pods.items():
            interval, _ = held_interval(record)
            held_ms = overlap_ms(interval, window)
            if held_ms == 0 and uid not in used:
                continue
            request = requested.get(uid)
            usage = used.get(uid)
            problems = [
                r.incomplete_reason for r in (request, usage) if r is not None and r.incomplete_reason
            ]
            if usage is None and held_ms:
                problems.append("no kubelet usage for the pod in this window")
            billed = larger_of_request_and_usage(
                request.value if request else Decimal(0),
                usage.value if usage else None,
                "; ".join(problems) or None,
            )
            readings.append(
                Reading(
                    uid,
                    billed.value,
                    complete=billed.complete,
                    incomplete_reason=billed.incomplete_reason,
                    dimensions={"billed_on": billed.basis},
                )
            )
        return readings

    def committed(self, window: Window) -> None:
        self.used.committed(window)

    def snapshot(self) -> dict[str, Any]:
        return self.used.snapshot()

    def restore(self, state: Mapping[str, Any]) -> None:
        self.used.restore(state)
