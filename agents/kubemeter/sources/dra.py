"""DRA allocation: the devices of the ResourceClaims reserved for each pod, billed over the pod's
billable interval (the same lifecycle rules as :mod:`kubemeter.sources.allocation`).

A device held by several pods (a shared claim) is split equally among the pods holding it at each
instant (:func:`kubemeter.metering.sharing.split_among_holders`). Values are device-seconds.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from kubemeter.metering.dra import DeviceRef, PublishedDevice
from kubemeter.metering.intervals import overlap_ms
from kubemeter.metering.sharing import split_among_holders
from kubemeter.metering.windows import Window
from kubemeter.pipeline.cel import CelError, Expression
from kubemeter.sources.allocation import held_interval
from kubemeter.sources.base import PodRecord, Reading
from kubemeter.sources.dra_devices import NodeDevices, Unresolved

log = logging.getLogger(__name__)


class DeviceFilter:
    """``driver`` and a DeviceClass-like CEL ``selector`` over a device."""

    def __init__(self, driver: str | None, selector: str | None, where: str) -> None:
        self.driver = driver
        self.selector = Expression(selector, where) if selector else None

    def matches(self, ref: DeviceRef, published: PublishedDevice | None) -> tuple[bool, str | None]:
        """Whether the device counts, and why that is uncertain (the selector could not decide)."""
        if self.driver is not None and ref.driver != self.driver:
            return False, None
        if self.selector is None:
            return True, None
        if published is None:
            return (
                True,
                f"device {ref.part} is not in this node's ResourceSlices; the selector was not applied",
            )
        try:
            result = self.selector.evaluate({"device": published.cel_view()})
        except CelError as error:
            return True, f"{error}; the device is counted"
        if not isinstance(result, bool):
            return True, f"{self.selector.where} gave {result!r}, not a bool; the device is counted"
        return result, None


class DraSource:
    hold_limit_ms: int | None = None

    def __init__(self, devices: NodeDevices, device_filter: DeviceFilter, per_device: bool) -> None:
        self.devices = devices
        self.filter = device_filter
        self.per_device = per_device

    async def run(self) -> None:
        await self.devices.run()

    def observed_through_ms(self) -> int:
        return self.devices.observed_ms

    def fault(self) -> str | None:
        return self.devices.fault()

    def readings(self, window: Window, pods: Mapping[str, PodRecord]) -> list[Reading]:
        observed_ms = self.observed_through_ms()
        readings: list[Reading] = []
        for uid, record in pods.items():
            interval, uncertain = held_interval(record)
            if overlap_ms(interval, window) == 0:
                continue
            claims = self.devices.pod_claims.get(uid)
            spec_claims = (record.object.get("spec") or {}).get("resourceClaims")
            if claims is None:
                if spec_claims:
                    reason = (
                        f"ResourceClaims of the pod not read yet ({self.fault() or 'the agent is behind'})"
                    )
                    readings.append(Reading(uid, Decimal(0), complete=False, incomplete_reason=reason))
                continue
            if isinstance(claims, Unresolved):
                readings.append(Reading(uid, Decimal(0), complete=False, incomplete_reason=claims.reason))
                continue
            reasons: list[str] = []
            if uncertain is not None and interval.end_ms is not None and interval.end_ms < window.end_ms:
                reasons.append(uncertain)
            elif window.end_ms > observed_ms and not interval.ends_by(observed_ms):
                reasons.append(f"ResourceClaims known only through {observed_ms} ms ({self.fault()})")
            per_device: list[tuple[DeviceRef, int, dict[str, str], list[str]]] = []
            for claim in claims:
                foreign = self.devices.foreign_holders(claim)
                for ref in claim.devices:
                    published = self.devices.published.get(ref)
                    chosen, doubt = self.filter.matches(ref, published)
                    if not chosen:
                        continue
                    device_reasons = [doubt] if doubt else []
                    if foreign:
                        device_reasons.append(
                            f"ResourceClaim {claim.namespace}/{claim.name} is also reserved for pods on "
                            "other nodes; it is split among this node's holders only"
                        )
                    amount = split_among_holders(self.devices.holders(ref), window).get(uid, 0)
                    dimensions = (
                        published.dimensions()
                        if published
                        else {"driver": ref.driver, "pool": ref.pool, "device": ref.device}
                    )
                    dimensions["claim"] = claim.name
                    per_device.append((ref, amount, dimensions, device_reasons))
            if self.per_device:
                for ref, amount, dimensions, device_reasons in per_device:
                    readings.append(
                        self._reading(uid, amount, ref.part, dimensions, reasons + device_reasons)
                    )
            elif per_device:
                total = sum(amount for _, amount, _, _ in per_device)
                common = _common(dimensions for _, _, dimensions, _ in per_device)
                common["devices"] = str(len(per_device))
                all_reasons = reasons + [r for *_, device_reasons in per_device for r in device_reasons]
                readings.append(self._reading(uid, total, "", common, all_reasons))
        return readings

    @staticmethod
    def _reading(uid: str, amount: int, part: str, dimensions: dict[str, str], reasons: list[str]) -> Reading:
        reason = "; ".join(dict.fromkeys(reasons)) or None
        return Reading(
            uid,
            Decimal(amount).scaleb(-6),  # milli-device-ms -> device-seconds
            part=part,
            complete=reason is None,
            incomplete_reason=reason,
            dimensions=dimensions,
        )

    def committed(self, window: Window) -> None:
        return None

    def snapshot(self) -> dict[str, Any]:
        return self.devices.snapshot()

    def restore(self, state: Mapping[str, Any]) -> None:
        self.devices.restore(state)


def _common(dimension_sets: Any) -> dict[str, str]:
    """The keys and values every device of a pod shares (driver, model, ...), for a summed reading."""
    sets = [dict(d) for d in dimension_sets]
    first = sets[0]
    return {
        key: value
        for key, value in first.items()
        if key not in ("device", "claim") and all(other.get(key) == value for other in sets[1:])
    }


__all__ = ["DeviceFilter", "DraSource"]
