"""The pure Dynamic Resource Allocation rules (``resource.k8s.io/v1``): which devices a pod holds
through its ResourceClaims, and what the node's ResourceSlices say about each device.

Input is the objects as the API server returns them (JSON dicts).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# What the NVIDIA DRA driver (gpu.nvidia.com) publishes: productName on GPUs and MIG devices,
# profile (for example 1g.10gb) and parentUUID on MIG devices, type "gpu" or "mig".
MODEL_ATTRIBUTE = "productName"
MIG_PROFILE_ATTRIBUTE = "profile"
TYPE_ATTRIBUTE = "type"


@dataclass(frozen=True, order=True)
class DeviceRef:
    """A device as a claim's allocation result names it: ``driver/pool/device``."""

    driver: str
    pool: str
    device: str

    @property
    def part(self) -> str:
        return f"{self.driver}/{self.pool}/{self.device}"


@dataclass(frozen=True)
class ClaimAllocation:
    """What the agent keeps of a ResourceClaim: its devices and the pods it is reserved for."""

    namespace: str
    name: str
    uid: str
    devices: tuple[DeviceRef, ...]
    reserved_for: frozenset[str] = field(default_factory=frozenset)  # pod uids

    def to_json(self) -> list[Any]:
        return [
            self.namespace,
            self.name,
            self.uid,
            [[d.driver, d.pool, d.device] for d in self.devices],
            sorted(self.reserved_for),
        ]

    @classmethod
    def from_json(cls, data: list[Any]) -> ClaimAllocation:
        namespace, name, uid, devices, reserved_for = data
        return cls(namespace, name, uid, tuple(DeviceRef(*d) for d in devices), frozenset(reserved_for))


def pod_claim_names(pod: Mapping[str, Any]) -> list[str] | None:
    """Names of the ResourceClaims a pod uses, or None while one is not known yet (a claim from a
    ResourceClaimTemplate is named in ``status.resourceClaimStatuses`` once the controller made it).

    ``spec.resourceClaims[].resourceClaimName`` names a claim directly (possibly shared with other
    pods); ``resourceClaimTemplateName`` gets a claim generated for this pod.
    """
    spec_claims = (pod.get("spec") or {}).get("resourceClaims") or []
    generated = {
        entry.get("name"): entry.get("resourceClaimName")
        for entry in (pod.get("status") or {}).get("resourceClaimStatuses") or []
    }
    names: list[str] = []
    for entry in spec_claims:
        if entry.get("resourceClaimName"):
            names.append(str(entry["resourceClaimName"]))
        elif entry.get("resourceClaimTemplateName"):
            if entry.get("name") not in generated:
                return None
            if generated[entry.get("name")]:  # null: the template needed no claim
                names.append(str(generated[entry.get("name")]))
    return names


def claim_allocation(claim: Mapping[str, Any]) -> ClaimAllocation | None:
    """The claim's allocated devices and reservations, None while it is not allocated.

    Results with ``adminAccess: true`` are left out: admin access (monitoring) does not take the
    device from anyone, so it is not billed.
    """
    metadata = claim.get("metadata") or {}
    status = claim.get("status") or {}
    allocation = status.get("allocation")
    if not allocation:
        return None
    devices = tuple(
        sorted(
            DeviceRef(str(result["driver"]), str(result["pool"]), str(result["device"]))
            for result in (allocation.get("devices") or {}).get("results") or []
            if not result.get("adminAccess")
        )
    )
    reserved = frozenset(
        str(entry["uid"])
        for entry in status.get("reservedFor") or []
        if entry.get("resource") == "pods" and not entry.get("apiGroup") and entry.get("uid")
    )
    return ClaimAllocation(
        str(metadata.get("namespace", "")),
        str(metadata.get("name", "")),
        str(metadata.get("uid", "")),
        devices,
        reserved,
    )


def _attribute_value(attribute: Mapping[str, Any]) -> Any:
    for kind in ("string", "int", "bool", "version"):
        if kind in attribute:
            return attribute[kind]
    return None


def _qualified(driver: str, entries: Mapping[str, Any], value: Any) -> dict[str, dict[str, Any]]:
    """``{domain: {name: value}}`` as DeviceClass CEL sees them: an unqualified name belongs to the
    driver's own domain."""
    by_domain: dict[str, dict[str, Any]] = {}
    for key, entry in entries.items():
        domain, _, name = key.rpartition("/")
        by_domain.setdefault(domain or driver, {})[name] = value(entry)
    return by_domain


@dataclass(frozen=True)
class PublishedDevice:
    """A device of one of the node's ResourceSlices."""

    ref: DeviceRef
    attributes: Mapping[str, Mapping[str, Any]]  # domain -> name -> value
    capacity: Mapping[str, Mapping[str, Any]]  # domain -> name -> quantity text

    def cel_view(self) -> dict[str, Any]:
        """The ``device`` variable of a DeviceClass selector: driver, attributes, capacity."""
        return {
            "driver": self.ref.driver,
            "attributes": {domain: dict(values) for domain, values in self.attributes.items()},
            "capacity": {domain: dict(values) for domain, values in self.capacity.items()},
        }

    def own(self, name: str) -> Any:
        return (self.attributes.get(self.ref.driver) or {}).get(name)

    def dimensions(self) -> dict[str, str]:
        """Event data for the device: driver, pool, device, and model / MIG profile when published."""
        found = {"driver": self.ref.driver, "pool": self.ref.pool, "device": self.ref.device}
        for key, attribute in (("gpu_model", MODEL_ATTRIBUTE), ("mig_profile", MIG_PROFILE_ATTRIBUTE)):
            value = self.own(attribute)
            if value is not None:
                found[key] = str(value)
        return found


def published_devices(resource_slice: Mapping[str, Any]) -> list[PublishedDevice]:
    """The devices of a ResourceSlice (``resource.k8s.io/v1``: devices carry attributes directly)."""
    spec = resource_slice.get("spec") or {}
    driver = str(spec.get("driver", ""))
    pool = str((spec.get("pool") or {}).get("name", ""))
    devices = []
    for device in spec.get("devices") or []:
        attributes = _qualified(driver, device.get("attributes") or {}, _attribute_value)
        capacity = _qualified(driver, device.get("capacity") or {}, lambda entry: str(entry.get("value")))
        devices.append(
            PublishedDevice(DeviceRef(driver, pool, str(device.get("name", ""))), attributes, capacity)
        )
    return devices


def slice_devices_current(slices: Sequence[Mapping[str, Any]]) -> dict[DeviceRef, PublishedDevice]:
    """Devices of the newest generation of each pool (a pool being republished can have slices of
    two generations for a moment; the older ones are outdated)."""
    newest: dict[tuple[str, str], int] = {}
    for resource_slice in slices:
        spec = resource_slice.get("spec") or {}
        key = (str(spec.get("driver", "")), str((spec.get("pool") or {}).get("name", "")))
        newest[key] = max(newest.get(key, 0), int((spec.get("pool") or {}).get("generation") or 0))
    found: dict[DeviceRef, PublishedDevice] = {}
    for resource_slice in slices:
        spec = resource_slice.get("spec") or {}
        key = (str(spec.get("driver", "")), str((spec.get("pool") or {}).get("name", "")))
        if int((spec.get("pool") or {}).get("generation") or 0) < newest[key]:
            continue
        for device in published_devices(resource_slice):
            found[device.ref] = device
    return found
