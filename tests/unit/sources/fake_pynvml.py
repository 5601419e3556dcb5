"""A fake NVML at the ``pynvml`` boundary: the module-level functions the edge calls, with NVML's
own semantics (errors are real ``pynvml.NVMLError`` subclasses chosen by code).

- ``nvmlDeviceGetProcessUtilization(handle, lastSeen)`` returns samples newer than ``lastSeen`` and
  raises ``NVML_ERROR_NOT_FOUND`` when there are none (an idle GPU).
- ``nvmlDeviceGetTotalEnergyConsumption`` counts mJ since the driver was loaded; ``reload_driver``
  zeroes it and invalidates every handle (calls on old handles raise ``NVML_ERROR_UNINITIALIZED``).
- MIG instances: memory and processes, ``NOT_SUPPORTED`` for utilization, the parent's energy.
- ``driver_loaded=False``: ``nvmlInit`` raises ``NVML_ERROR_LIBRARY_NOT_FOUND``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pynvml
import pytest


def nvml_error(code: int) -> pynvml.NVMLError:
    return pynvml.NVMLError(code)


@dataclass
class FakeGpu:
    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    memory_total_bytes: int = 80 * 2**30
    memory_used_bytes: int = 0
    utilization_percent: int = 0
    energy_mj: int | None = 0  # None: pre-Volta, NOT_SUPPORTED
    power_mw: int = 70_000
    processes: list[tuple[int, int | None]] = field(default_factory=list)  # (pid, used bytes)
    samples: list[tuple[int, int, int]] = field(default_factory=list)  # (pid, timestamp µs, sm %)
    mig: list[FakeGpu] | None = None  # MIG instances when MIG mode is enabled
    broken: bool = False  # every call answers NVML_ERROR_UNKNOWN (an XID-faulted GPU)


@dataclass(frozen=True)
class Handle:
    gpu: FakeGpu
    generation: int
    parent: FakeGpu | None = None


class FakeNvml:
    def __init__(self, gpus: list[FakeGpu]) -> None:
        self.gpus = gpus
        self.driver_loaded = True
        self.generation = 0
        self.initialized = False
        self.init_calls = 0

    # ---- what a test does ------------------------------------------------------------------------
    def reload_driver(self) -> None:
        self.generation += 1
        self.initialized = False
        for gpu in self.gpus:
            if gpu.energy_mj is not None:
                gpu.energy_mj = 0
            gpu.samples.clear()

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
        for name in dir(self):
            if name.startswith("nvml"):
                monkeypatch.setattr(pynvml, name, getattr(self, name))
        return self

    # ---- pynvml ----------------------------------------------------------------------------------
    def _check(self, handle: Handle | None = None, identity: bool = False) -> None:
        if not self.initialized:
            raise nvml_error(pynvml.NVML_ERROR_UNINITIALIZED)
        if handle is not None:
            if handle.generation != self.generation:
                raise nvml_error(pynvml.NVML_ERROR_UNINITIALIZED)
            # A faulted GPU still answers who it is; everything else fails.
            if identity:
                return
            if handle.gpu.broken or (handle.parent is not None and handle.parent.broken):
                raise nvml_error(pynvml.NVML_ERROR_UNKNOWN)

    def nvmlInit(self) -> None:
        self.init_calls += 1
        if not self.driver_loaded:
            raise nvml_error(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
        self.initialized = True

    def nvmlShutdown(self) -> None:
        self._check()
        self.initialized = False

    def nvmlDeviceGetCount(self) -> int:
        self._check()
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Handle:
        self._check()
        if not 0 <= index < len(self.gpus):
            raise nvml_error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return Handle(self.gpus[index], self.generation)

    def nvmlDeviceGetUUID(self, handle: Handle) -> str:
        self._check(handle, identity=True)
        return handle.gpu.uuid

    def nvmlDeviceGetName(self, handle: Handle) -> str:
        self._check(handle)
        return handle.gpu.name

    def nvmlDeviceGetMigMode(self, handle: Handle) -> list[int]:
        self._check(handle)
        if handle.gpu.mig is None:
            raise nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return [pynvml.NVML_DEVICE_MIG_ENABLE, pynvml.NVML_DEVICE_MIG_ENABLE]

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: Handle) -> int:
        self._check(handle)
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: Handle, index: int) -> Handle:
        self._check(handle)
        instances = handle.gpu.mig or []
        if index >= len(instances):
            raise nvml_error(pynvml.NVML_ERROR_NOT_FOUND)
        return Handle(instances[index], self.generation, parent=handle.gpu)

    def nvmlDeviceGetMemoryInfo(self, handle: Handle) -> Any:
        self._check(handle)
        gpu = handle.gpu
        return SimpleNamespace(
            total=gpu.memory_total_bytes,
            used=gpu.memory_used_bytes,
            free=gpu.memory_total_bytes - gpu.memory_used_bytes,
        )

    def nvmlDeviceGetUtilizationRates(self, handle: Handle) -> Any:
        self._check(handle)
        if handle.parent is not None or handle.gpu.mig is not None:
            raise nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return SimpleNamespace(gpu=handle.gpu.utilization_percent, memory=0)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: Handle) -> int:
        self._check(handle)
        gpu = handle.parent or handle.gpu
        if gpu.energy_mj is None:
            raise nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return gpu.energy_mj

    def nvmlDeviceGetPowerUsage(self, handle: Handle) -> int:
        self._check(handle)
        return (handle.parent or handle.gpu).power_mw

    def nvmlDeviceGetComputeRunningProcesses(self, handle: Handle) -> list[Any]:
        self._check(handle)
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in handle.gpu.processes]

    def nvmlDeviceGetProcessUtilization(self, handle: Handle, last_seen_us: int) -> list[Any]:
        self._check(handle)
        if handle.parent is not None:
            raise nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        newer = [s for s in handle.gpu.samples if s[1] > last_seen_us]
        if not newer:
            raise nvml_error(pynvml.NVML_ERROR_NOT_FOUND)
        return [
            SimpleNamespace(pid=pid, timeStamp=ts, smUtil=sm, memUtil=0, encUtil=0, decUtil=0)
            for pid, ts, sm in newer
        ]
