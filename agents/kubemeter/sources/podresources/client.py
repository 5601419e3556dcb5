"""An asyncio client for the kubelet PodResources API on its node-local unix socket."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc

from kubemeter.sources.podresources.generated import api_pb2, api_pb2_grpc

DEFAULT_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"


class PodResourcesUnavailableError(Exception):
    """The kubelet's PodResources socket did not answer; the message says what to check."""


@dataclass(frozen=True, order=True)
class DeviceAssignment:
    """One device held by one container. PodResources names pods, it never gives their UID."""

    namespace: str
    pod: str
    container: str
    resource_name: str
    device_id: str


def _assignments(pod: Any) -> list[DeviceAssignment]:
    return [
        DeviceAssignment(pod.namespace, pod.name, container.name, devices.resource_name, device_id)
        for container in pod.containers
        for devices in container.devices
        for device_id in devices.device_ids
    ]


class PodResourcesClient:
    """``List``, ``Get`` and ``GetAllocatableResources`` as flat device assignments.

    The channel dials the socket path on every reconnect, so a kubelet restart (which recreates the
    socket) heals by itself — which is why the DaemonSet mounts the socket's *directory*.
    """

    def __init__(self, socket_path: str = DEFAULT_SOCKET, timeout_s: float = 10.0) -> None:
        self._socket_path = socket_path
        self._timeout_s = timeout_s
        self._channel = grpc.aio.insecure_channel(f"unix://{socket_path}")
        self._stub = api_pb2_grpc.PodResourcesListerStub(self._channel)

    async def __aenter__(self) -> PodResourcesClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    def _unavailable(self, call: str, error: grpc.aio.AioRpcError) -> PodResourcesUnavailableError:
        return PodResourcesUnavailableError(
            f"PodResources {call} on unix://{self._socket_path} failed: {error.code().name}: "
            f"{error.details()}. Check that the agent mounts the host directory "
            "/var/lib/kubelet/pod-resources and runs with permission to open the socket."
        )

    async def list_assignments(self) -> list[DeviceAssignment]:
        """Every device held on this node, per container, sorted."""
        try:
            response = await self._stub.List(api_pb2.ListPodResourcesRequest(), timeout=self._timeout_s)
        except grpc.aio.AioRpcError as error:
            raise self._unavailable("List", error) from error
        return sorted(a for pod in response.pod_resources for a in _assignments(pod))

    async def get_pod(self, namespace: str, name: str) -> list[DeviceAssignment]:
        """The devices of one pod (``Get``; beta and on by default since Kubernetes 1.34)."""
        request = api_pb2.GetPodResourcesRequest(pod_name=name, pod_namespace=namespace)
        try:
            response = await self._stub.Get(request, timeout=self._timeout_s)
        except grpc.aio.AioRpcError as error:
            raise self._unavailable("Get", error) from error
        return sorted(_assignments(response.pod_resources))

    async def allocatable_devices(self) -> dict[str, list[str]]:
        """Healthy devices the device manager knows, by resource name (the node's capacity)."""
        try:
            response = await self._stub.GetAllocatableResources(
                api_pb2.AllocatableResourcesRequest(), timeout=self._timeout_s
            )
        except grpc.aio.AioRpcError as error:
            raise self._unavailable("GetAllocatableResources", error) from error
        devices: dict[str, list[str]] = {}
        for container_devices in response.devices:
            devices.setdefault(container_devices.resource_name, []).extend(container_devices.device_ids)
        return {name: sorted(ids) for name, ids in sorted(devices.items())}
