"""Device ids as device plugins report them, reduced to the physical device NVML can read."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

GPU_RESOURCE_NAMES = frozenset({"nvidia.com/gpu", "nvidia.com/gpu.shared"})
MIG_RESOURCE_PREFIX = "nvidia.com/mig-"

DeviceKind = Literal["gpu", "mig", "other"]

_REPLICA = re.compile(r"^(?P<base>.+)::(?P<replica>\d+)$")  # NVIDIA plugin time-slicing / MPS
_GKE_VGPU = re.compile(r"^(?P<base>nvidia\d+(?:/gi\d+)?)/vgpu(?P<replica>\d+)$")  # GKE sharing
_GKE_MIG = re.compile(r"^nvidia\d+/gi\d+$")
_OLD_MIG = re.compile(r"^MIG-(?P<parent>GPU-[0-9a-fA-F-]+)/(?P<gi>\d+)/(?P<ci>\d+)$")  # pre-R470 drivers


@dataclass(frozen=True)
class DeviceRef:
    """One device id from PodResources.

    ``device`` is what usage is read from: a ``GPU-…`` or ``MIG-…`` UUID (or GKE's ``nvidiaN``
    name). ``replica`` is set for time-sliced or MPS shares of that device, which several pods hold at
    once.
    """

    device_id: str
    device: str
    kind: DeviceKind
    replica: int | None = None
    # Old-style MIG ids name the parent GPU and the GPU-instance/compute-instance ids.
    parent_gpu: str | None = None

    @property
    def shared(self) -> bool:
        return self.replica is not None


def parse_device_id(device_id: str) -> DeviceRef:
    """``GPU-…``, ``GPU-…::3``, ``MIG-…``, ``MIG-GPU-…/1/0``, ``nvidia0/vgpu2``, ``nvidia0/gi1``."""
    replica: int | None = None
    base = device_id
    match = _REPLICA.match(device_id) or _GKE_VGPU.match(device_id)
    if match:
        base, replica = match.group("base"), int(match.group("replica"))
    old_mig = _OLD_MIG.match(base)
    if old_mig:
        return DeviceRef(device_id, base, "mig", replica, parent_gpu=old_mig.group("parent"))
    if base.startswith("MIG-") or _GKE_MIG.match(base):
        return DeviceRef(device_id, base, "mig", replica)
    if base.startswith("GPU-") or re.fullmatch(r"nvidia\d+", base):
        return DeviceRef(device_id, base, "gpu", replica)
    return DeviceRef(device_id, base, "other", replica)


def is_gpu_resource(resource_name: str) -> bool:
    """The resources whose devices NVML can read: whole GPUs, shared GPUs and MIG profiles."""
    return resource_name in GPU_RESOURCE_NAMES or resource_name.startswith(MIG_RESOURCE_PREFIX)
