"""PodResources over a real gRPC server on a unix socket, built from the same api.proto."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from kubemeter.sources.podresources import (
    DeviceAssignment,
    DeviceOwnership,
    PodResourcesClient,
    PodResourcesUnavailableError,
)
from kubemeter.sources.podresources import api_pb2 as pb
from kubemeter.sources.podresources import api_pb2_grpc as pb_grpc
from kubemeter.sources.podresources.ownership import Holder, OwnershipInterval


def pod(namespace: str, name: str, container: str, resource: str, *device_ids: str) -> pb.PodResources:
    return pb.PodResources(
        name=name,
        namespace=namespace,
        containers=[
            pb.ContainerResources(
                name=container,
                devices=[pb.ContainerDevices(resource_name=resource, device_ids=list(device_ids))],
                cpu_ids=[2, 3],
            )
        ],
    )


class FakeKubelet(pb_grpc.PodResourcesListerServicer):
    """Serves whatever allocations the test sets, like the kubelet's device manager would."""

    def __init__(self) -> None:
        self.pods: list[pb.PodResources] = []
        self.allocatable = [
            pb.ContainerDevices(resource_name="nvidia.com/gpu", device_ids=["GPU-a", "GPU-b"])
        ]

    async def List(self, request: pb.ListPodResourcesRequest, context: object) -> pb.ListPodResourcesResponse:
        return pb.ListPodResourcesResponse(pod_resources=self.pods)

    async def Get(
        self, request: pb.GetPodResourcesRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetPodResourcesResponse:
        for candidate in self.pods:
            if (candidate.namespace, candidate.name) == (request.pod_namespace, request.pod_name):
                return pb.GetPodResourcesResponse(pod_resources=candidate)
        await context.abort(
            grpc.StatusCode.NOT_FOUND, f"pod {request.pod_namespace}/{request.pod_name} not found"
        )
        raise AssertionError("unreachable")

    async def GetAllocatableResources(
        self, request: pb.AllocatableResourcesRequest, context: object
    ) -> pb.AllocatableResourcesResponse:
        return pb.AllocatableResourcesResponse(devices=self.allocatable, cpu_ids=[0, 1, 2, 3])


@pytest.fixture
async def kubelet(tmp_path: Path) -> AsyncIterator[tuple[FakeKubelet, str]]:
    socket_path = str(tmp_path / "kubelet.sock")
    server = grpc.aio.server()
    servicer = FakeKubelet()
    pb_grpc.add_PodResourcesListerServicer_to_server(servicer, server)
    server.add_insecure_port(f"unix://{socket_path}")
    await server.start()
    yield servicer, socket_path
    await server.stop(grace=None)


UIDS = {("team-a", "train-0"): "uid-a", ("team-b", "infer-0"): "uid-b", ("team-c", "other"): "uid-c"}


def resolve(namespace: str, name: str) -> str | None:
    return UIDS.get((namespace, name))


async def test_list_returns_every_device_per_container(kubelet: tuple[FakeKubelet, str]) -> None:
    servicer, socket_path = kubelet
    servicer.pods = [
        pod("team-a", "train-0", "trainer", "nvidia.com/gpu", "GPU-b", "GPU-a"),
        pod("team-b", "infer-0", "server", "nvidia.com/mig-1g.10gb", "MIG-1111"),
    ]
    async with PodResourcesClient(socket_path) as client:
        assert await client.list_assignments() == [
            DeviceAssignment("team-a", "train-0", "trainer", "nvidia.com/gpu", "GPU-a"),
            DeviceAssignment("team-a", "train-0", "trainer", "nvidia.com/gpu", "GPU-b"),
            DeviceAssignment("team-b", "infer-0", "server", "nvidia.com/mig-1g.10gb", "MIG-1111"),
        ]
        assert await client.get_pod("team-b", "infer-0") == [
            DeviceAssignment("team-b", "infer-0", "server", "nvidia.com/mig-1g.10gb", "MIG-1111")
        ]
        assert await client.allocatable_devices() == {"nvidia.com/gpu": ["GPU-a", "GPU-b"]}


async def test_a_device_reassigned_between_pods_gets_two_exact_intervals(
    kubelet: tuple[FakeKubelet, str],
) -> None:
    servicer, socket_path = kubelet
    ownership = DeviceOwnership()
    async with PodResourcesClient(socket_path) as client:
        servicer.pods = [pod("team-a", "train-0", "trainer", "nvidia.com/gpu", "GPU-a")]
        ownership.observe(1_000, await client.list_assignments(), resolve)
        ownership.observe(16_000, await client.list_assignments(), resolve)
        # train-0 finished; the pod watch saw it release at 20 s; infer-0 got the same GPU next poll.
        servicer.pods = [pod("team-b", "infer-0", "server", "nvidia.com/gpu", "GPU-a")]
        ownership.observe(31_000, await client.list_assignments(), resolve)
        ownership.release("uid-a", 20_000)

    trainer = Holder("uid-a", "team-a", "train-0", "trainer", "nvidia.com/gpu", "GPU-a")
    server = Holder("uid-b", "team-b", "infer-0", "server", "nvidia.com/gpu", "GPU-a")
    assert ownership.intervals("GPU-a") == [
        OwnershipInterval("GPU-a", trainer, 1_000, 20_000),
        OwnershipInterval("GPU-a", server, 31_000, None),
    ]
    assert ownership.holders_during("GPU-a", 0, 60_000) == [(trainer, 19_000), (server, 29_000)]


async def test_time_sliced_replicas_are_one_device_held_by_several_pods(
    kubelet: tuple[FakeKubelet, str],
) -> None:
    servicer, socket_path = kubelet
    servicer.pods = [
        pod("team-a", "train-0", "trainer", "nvidia.com/gpu", "GPU-a::0"),
        pod("team-b", "infer-0", "server", "nvidia.com/gpu", "GPU-a::1"),
        pod("team-c", "other", "cpu-only", "example.com/fpga", "fpga-0"),
    ]
    ownership = DeviceOwnership()
    async with PodResourcesClient(socket_path) as client:
        ownership.observe(0, await client.list_assignments(), resolve)
    assert ownership.devices() == ["GPU-a"]
    holders = ownership.holders_during("GPU-a", 0, 10_000)
    assert [(h.pod_uid, h.shared, ms) for h, ms in holders] == [
        ("uid-a", True, 10_000),
        ("uid-b", True, 10_000),
    ]


async def test_a_pod_the_watch_does_not_know_yet_is_retried_not_guessed(
    kubelet: tuple[FakeKubelet, str],
) -> None:
    servicer, socket_path = kubelet
    servicer.pods = [pod("team-z", "new-pod", "c", "nvidia.com/gpu", "GPU-b")]
    ownership = DeviceOwnership()
    async with PodResourcesClient(socket_path) as client:
        unresolved = ownership.observe(0, await client.list_assignments(), resolve)
    assert [a.pod for a in unresolved] == ["new-pod"]
    assert ownership.intervals() == []


async def test_a_missing_socket_raises_an_error_that_says_what_to_mount(tmp_path: Path) -> None:
    async with PodResourcesClient(str(tmp_path / "absent.sock"), timeout_s=1) as client:
        with pytest.raises(PodResourcesUnavailableError, match="/var/lib/kubelet/pod-resources"):
            await client.list_assignments()
