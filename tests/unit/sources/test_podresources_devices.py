"""Device ids as device plugins write them reduce to the device NVML reads."""

from __future__ import annotations

import pytest
from kubemeter.sources.podresources import DeviceRef, parse_device_id


@pytest.mark.parametrize(
    ("device_id", "expected"),
    [
        ("GPU-58e8f5ea-13cc", DeviceRef("GPU-58e8f5ea-13cc", "GPU-58e8f5ea-13cc", "gpu")),
        ("GPU-58e8f5ea-13cc::3", DeviceRef("GPU-58e8f5ea-13cc::3", "GPU-58e8f5ea-13cc", "gpu", 3)),
        ("MIG-4f1e2d3c", DeviceRef("MIG-4f1e2d3c", "MIG-4f1e2d3c", "mig")),
        ("MIG-4f1e2d3c::1", DeviceRef("MIG-4f1e2d3c::1", "MIG-4f1e2d3c", "mig", 1)),
        (
            "MIG-GPU-5bd3aa01/7/0",
            DeviceRef("MIG-GPU-5bd3aa01/7/0", "MIG-GPU-5bd3aa01/7/0", "mig", parent_gpu="GPU-5bd3aa01"),
        ),
        ("nvidia0/vgpu2", DeviceRef("nvidia0/vgpu2", "nvidia0", "gpu", 2)),
        ("nvidia1/gi3", DeviceRef("nvidia1/gi3", "nvidia1/gi3", "mig")),
        ("nvidia1/gi3/vgpu0", DeviceRef("nvidia1/gi3/vgpu0", "nvidia1/gi3", "mig", 0)),
        ("fpga-0", DeviceRef("fpga-0", "fpga-0", "other")),
    ],
)
def test_device_ids_reduce_to_the_physical_device(device_id: str, expected: DeviceRef) -> None:
    assert parse_device_id(device_id) == expected


def test_only_replicas_are_shared() -> None:
    assert parse_device_id("GPU-a::0").shared
    assert not parse_device_id("GPU-a").shared
