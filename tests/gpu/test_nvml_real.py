"""NVML for real: the same edge and meter the agent runs, against the GPUs of this machine."""

from __future__ import annotations

import asyncio
import ctypes
import os
import time
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal

import pytest
from kubemeter.metering.windows import Window
from kubemeter.sources.nvml import NvmlEdge, NvmlSnapshot, NvmlSource, NvmlUnavailableError
from kubemeter.sources.podresources import DeviceAssignment

pytestmark = pytest.mark.gpu
DAY_MS = 86_400_000  # one window for the whole test, so it never straddles a boundary


@pytest.fixture
async def edge() -> AsyncIterator[NvmlEdge]:
    nvml = NvmlEdge()
    yield nvml
    await nvml.close()


async def first_snapshot(edge: NvmlEdge) -> NvmlSnapshot:
    try:
        snapshot = await edge.snapshot()
    except NvmlUnavailableError as error:
        pytest.fail(f"the GPU suite needs an NVIDIA GPU and driver: {error}")
    if not snapshot.devices:
        pytest.fail("NVML initialised but lists no GPU; run `make test-gpu` on a machine with an NVIDIA GPU")
    return snapshot


@pytest.fixture
def cuda_context() -> Iterator[None]:
    """A CUDA context holding 256 MiB, so this process is a compute process NVML must list."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError as error:
        pytest.fail(f"libcuda.so.1 (the driver's CUDA library) is not loadable: {error}")
    device, context, pointer = ctypes.c_int(), ctypes.c_void_p(), ctypes.c_uint64()
    assert cuda.cuInit(0) == 0
    assert cuda.cuDeviceGet(ctypes.byref(device), 0) == 0
    assert cuda.cuCtxCreate_v2(ctypes.byref(context), 0, device) == 0
    assert cuda.cuMemAlloc_v2(ctypes.byref(pointer), ctypes.c_size_t(256 * 2**20)) == 0
    yield
    cuda.cuMemFree_v2(pointer)
    cuda.cuCtxDestroy_v2(context)


async def test_devices_are_enumerated_with_their_uuids(edge: NvmlEdge) -> None:
    snapshot = await first_snapshot(edge)
    for uuid, reading in snapshot.devices.items():
        assert uuid.startswith(("GPU-", "MIG-")), uuid
        assert reading.memory_total_bytes > 0
        assert 0 <= reading.memory_used_bytes <= reading.memory_total_bytes
    assert snapshot.device_errors == {}


async def test_the_energy_counter_only_goes_up(edge: NvmlEdge) -> None:
    before = await first_snapshot(edge)
    await asyncio.sleep(1.5)
    after = await edge.snapshot()
    for uuid, reading in before.devices.items():
        assert reading.energy_mj is not None, f"{uuid} has no energy counter (needs Volta or newer)"
        later = after.devices[uuid].energy_mj
        assert later is not None and later >= reading.energy_mj, (uuid, reading.energy_mj, later)
        assert reading.power_mw is not None and reading.power_mw > 0


async def test_utilization_is_a_percentage_on_whole_gpus(edge: NvmlEdge) -> None:
    snapshot = await first_snapshot(edge)
    for uuid, reading in snapshot.devices.items():
        if reading.parent_uuid is None:
            assert reading.utilization_percent is not None and 0 <= reading.utilization_percent <= 100, uuid
            assert reading.process_samples is not None  # () when idle: NOT_FOUND is not an error


async def test_a_process_holding_gpu_memory_is_listed(edge: NvmlEdge, cuda_context: None) -> None:
    deadline = time.monotonic() + 10
    while True:
        snapshot = await first_snapshot(edge)
        processes = [p for reading in snapshot.devices.values() for p in reading.processes]
        if processes or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert processes, "NVML lists no compute process while this test holds a CUDA context"
    if any(p.pid == os.getpid() for p in processes):  # host PID namespace: this very process
        mine = next(p for p in processes if p.pid == os.getpid())
        assert mine.used_memory_bytes is None or mine.used_memory_bytes >= 256 * 2**20
        assert mine.pod_uid is None  # not in a pod


class OnePod:
    """PodResources says a pod holds the first GPU (no kubelet on a test machine)."""

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id

    async def list_assignments(self) -> list[DeviceAssignment]:
        return [DeviceAssignment("ml", "train-0", "main", "nvidia.com/gpu", self.device_id)]


async def test_the_energy_meter_bills_the_holder_of_a_real_gpu(edge: NvmlEdge) -> None:
    snapshot = await first_snapshot(edge)
    uuid = sorted(snapshot.devices)[0]
    start_ms = time.time_ns() // 1_000_000
    source = NvmlSource(
        "energy",
        3_600_000,
        500,
        0,
        edge,
        OnePod(uuid),
        lambda namespace, name: "uid-0",  # type: ignore[arg-type]
    )
    for _ in range(5):
        await source.poll()
        await asyncio.sleep(0.5)
    end_ms = source.observed_through_ms()
    day_start_ms = start_ms - start_ms % DAY_MS
    (reading,) = source.readings(Window(day_start_ms, day_start_ms + DAY_MS), {})
    assert reading.part == uuid and reading.pod_uid == "uid-0"
    assert reading.value > Decimal(0), f"no energy in {end_ms - start_ms} ms on {uuid}"
