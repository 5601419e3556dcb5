"""Ownership intervals per device, from successive PodResources snapshots (pure, no I/O).

PodResources is a snapshot API: a holding first seen at a poll starts then, and one missing from a
later poll ends at that poll — unless the pod watch said earlier when the pod released its
resources (:meth:`DeviceOwnership.release`), which is exact.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import astuple, dataclass, replace
from typing import Any

from kubemeter.sources.podresources.client import DeviceAssignment
from kubemeter.sources.podresources.devices import is_gpu_resource, parse_device_id

# (namespace, pod name) → pod UID, from the node's pod watch; None when the pod is not known (yet).
PodUidResolver = Callable[[str, str], str | None]


@dataclass(frozen=True, order=True)
class Holder:
    pod_uid: str
    namespace: str
    pod: str
    container: str
    resource_name: str
    device_id: str  # as the device plugin reported it, e.g. GPU-…::2

    @property
    def shared(self) -> bool:
        return parse_device_id(self.device_id).shared


@dataclass(frozen=True)
class OwnershipInterval:
    """``holder`` held ``device`` (a GPU or MIG UUID) over ``[start_ms, end_ms)``; open while held."""

    device: str
    holder: Holder
    start_ms: int
    end_ms: int | None = None

    def overlap_ms(self, start_ms: int, end_ms: int) -> int:
        own_end_ms = end_ms if self.end_ms is None else min(self.end_ms, end_ms)
        return max(0, own_end_ms - max(self.start_ms, start_ms))


class DeviceOwnership:
    """Which pod held which device when, kept as closed and open intervals."""

    def __init__(self) -> None:
        self._open: dict[tuple[str, Holder], OwnershipInterval] = {}
        self._closed: list[OwnershipInterval] = []

    def observe(
        self, at_ms: int, assignments: Iterable[DeviceAssignment], resolve_uid: PodUidResolver
    ) -> list[DeviceAssignment]:
        """Apply one ``List`` snapshot taken at ``at_ms``. Returns the GPU assignments whose pod the
        watch does not know yet; they are retried on the next snapshot, not guessed."""
        current: set[tuple[str, Holder]] = set()
        unresolved: list[DeviceAssignment] = []
        for assignment in assignments:
            if not is_gpu_resource(assignment.resource_name):
                continue
            uid = resolve_uid(assignment.namespace, assignment.pod)
            if uid is None:
                unresolved.append(assignment)
                continue
            holder = Holder(
                uid,
                assignment.namespace,
                assignment.pod,
                assignment.container,
                assignment.resource_name,
                assignment.device_id,
            )
            current.add((parse_device_id(assignment.device_id).device, holder))
        for key in sorted(set(self._open) - current):
            self._close(key, at_ms)
        for key in sorted(current - set(self._open)):
            self._open[key] = OwnershipInterval(key[0], key[1], at_ms)
        return unresolved

    def release(self, pod_uid: str, at_ms: int) -> None:
        """The pod watch saw the pod give its resources back at ``at_ms``: close its holdings there."""
        for key in sorted(k for k in self._open if k[1].pod_uid == pod_uid):
            self._close(key, max(at_ms, self._open[key].start_ms))
        # A holding already closed by a later poll is trimmed back to the exact release time.
        self._closed = [
            replace(i, end_ms=max(i.start_ms, at_ms))
            if i.holder.pod_uid == pod_uid and i.end_ms is not None and i.end_ms > at_ms
            else i
            for i in self._closed
        ]

    def _close(self, key: tuple[str, Holder], at_ms: int) -> None:
        interval = self._open.pop(key)
        self._closed.append(replace(interval, end_ms=at_ms))

    def intervals(self, device: str | None = None) -> list[OwnershipInterval]:
        """All intervals (closed first, by start), optionally of one device."""
        every = sorted([*self._closed, *self._open.values()], key=lambda i: (i.start_ms, i.device, i.holder))
        return [i for i in every if device is None or i.device == device]

    def holders_during(self, device: str, start_ms: int, end_ms: int) -> list[tuple[Holder, int]]:
        """Who held ``device`` during ``[start_ms, end_ms)`` and for how many milliseconds each."""
        held: dict[Holder, int] = {}
        for interval in self.intervals(device):
            overlap = interval.overlap_ms(start_ms, end_ms)
            if overlap > 0:
                held[interval.holder] = held.get(interval.holder, 0) + overlap
        return sorted(held.items())

    def devices(self) -> list[str]:
        return sorted({i.device for i in self.intervals()})

    def to_json(self) -> list[list[Any]]:
        """Every interval, open ones included, to save with the meter's cursor."""
        return [
            [i.device, *astuple(i.holder), i.start_ms, i.end_ms]
            for i in [*self._closed, *self._open.values()]
        ]

    def restore(self, saved: list[list[Any]]) -> None:
        """Holdings as they were saved: one still open at a restart is still held until a poll
        without it, so the step across the restart is attributed like any other."""
        self._open, self._closed = {}, []
        for device, *holder_fields, start_ms, end_ms in saved:
            interval = OwnershipInterval(str(device), Holder(*map(str, holder_fields)), start_ms, end_ms)
            if end_ms is None:
                self._open[(interval.device, interval.holder)] = interval
            else:
                self._closed.append(interval)

    def forget_before(self, before_ms: int) -> None:
        """Drop closed intervals that ended before ``before_ms`` (already metered), bounding memory."""
        self._closed = [i for i in self._closed if i.end_ms is None or i.end_ms > before_ms]
