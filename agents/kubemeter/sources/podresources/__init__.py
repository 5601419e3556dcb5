"""Device ownership from the kubelet PodResources API: which pod holds which GPU, and since when."""

from kubemeter.sources.podresources.client import (
    DeviceAssignment,
    PodResourcesClient,
    PodResourcesUnavailableError,
)
from kubemeter.sources.podresources.devices import DeviceRef, parse_device_id
from kubemeter.sources.podresources.ownership import DeviceOwnership, OwnershipInterval

__all__ = [
    "DeviceAssignment",
    "DeviceOwnership",
    "DeviceRef",
    "OwnershipInterval",
    "PodResourcesClient",
    "PodResourcesUnavailableError",
    "parse_device_id",
]
