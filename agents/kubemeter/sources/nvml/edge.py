"""The one place that calls NVML. pynvml blocks (ctypes into libnvidia-ml), so every call runs on a
single worker thread, and the rest of the agent only ever sees immutable readings.

NVML semantics this edge relies on (facts in docs/sources.md):

- ``nvmlDeviceGetProcessUtilization(handle, lastSeenTimeStamp)`` returns only processes with
  non-zero utilization in samples newer than the cursor, and raises ``NVML_ERROR_NOT_FOUND`` when
  there are none — an idle GPU, not a fault. The cursor is kept per device so no sample is counted
  twice.
- ``nvmlDeviceGetTotalEnergyConsumption`` is millijoules since the driver was loaded: a driver
  reload resets it (and invalidates handles, so NVML is initialised again).
- MIG instances have their own memory and processes but no utilization rates, and share the
  parent GPU's energy counter.
- PIDs are host PIDs; they are mapped to pods in the same pass (PIDs are reused).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pynvml

from kubemeter.sources.nvml.cgroups import PidToPod

log = logging.getLogger(__name__)

# Errors after which the handles are stale: the driver went away or was reloaded.
_REINITIALIZE = frozenset(
    {
        pynvml.NVML_ERROR_UNINITIALIZED,
        pynvml.NVML_ERROR_DRIVER_NOT_LOADED,
        pynvml.NVML_ERROR_GPU_IS_LOST,
        pynvml.NVML_ERROR_RESET_REQUIRED,
    }
)
# Errors that mean "this node has no usable NVML", as opposed to one device misbehaving.
_NO_NVML = frozenset(
    {
        pynvml.NVML_ERROR_LIBRARY_NOT_FOUND,
        pynvml.NVML_ERROR_DRIVER_NOT_LOADED,
        pynvml.NVML_ERROR_NO_PERMISSION,
        pynvml.NVML_ERROR_FUNCTION_NOT_FOUND,
    }
)


class NvmlUnavailableError(Exception):
    """NVML cannot be used on this node at all; the message says what to fix."""


@dataclass(frozen=True)
class ProcessMemory:
    pid: int
    pod_uid: str | None
    used_memory_bytes: int | None  # None where NVML reports NVML_VALUE_NOT_AVAILABLE


@dataclass(frozen=True)
class ProcessSample:
    """One ``nvmlProcessUtilizationSample_t``: SM utilization of one process in one sample period."""

    pid: int
    pod_uid: str | None
    timestamp_us: int
    sm_util_percent: int


@dataclass(frozen=True)
class DeviceReading:
    """One device (a whole GPU or one MIG instance) at one moment."""

    uuid: str
    name: str
    parent_uuid: str | None  # the physical GPU of a MIG instance
    memory_total_bytes: int
    memory_used_bytes: int
    utilization_percent: int | None  # None on MIG instances (NVML does not support it there)
    energy_mj: int | None  # of the physical GPU; None before Volta
    power_mw: int | None
    processes: tuple[ProcessMemory, ...]
    # Samples newer than the previous pass; None where NVML cannot give per-process samples (MIG).
    process_samples: tuple[ProcessSample, ...] | None


@dataclass(frozen=True)
class NvmlSnapshot:
    read_at_ms: int
    devices: dict[str, DeviceReading]
    # Devices whose reading failed this pass, with the reason; the others are still good.
    device_errors: dict[str, str]
    # Physical GPUs that have MIG enabled (their utilization is not readable per instance).
    mig_parents: frozenset[str]


def _code(error: pynvml.NVMLError) -> int:
    return int(getattr(error, "value", -1))


def _optional(call: Callable[[], Any]) -> Any:
    """A reading some GPUs do not support (pre-Volta energy, MIG utilization) is None, not an error."""
    try:
        return call()
    except pynvml.NVMLError as error:
        if _code(error) in (pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_NOT_FOUND):
            return None
        raise


class NvmlEdge:
    """Reads every device in one pass on one worker thread."""

    def __init__(
        self,
        proc_root: Path = Path("/proc"),
        clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ) -> None:
        self._proc_root = proc_root
        self._clock_ms = clock_ms
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nvml")
        self._initialized = False
        self._cursor_us: dict[str, int] = {}
        # Last known UUID per index, to name a GPU that faults before it can say who it is.
        self._uuid_by_index: dict[int, str] = {}

    async def snapshot(self) -> NvmlSnapshot:
        """Raises :class:`NvmlUnavailableError` when NVML cannot be used on this node."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._snapshot)

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._shutdown)
        self._executor.shutdown(wait=True)

    # ---- below here: the worker thread only -------------------------------------------------------
    def _shutdown(self) -> None:
        if self._initialized:
            self._initialized = False
            try:
                pynvml.nvmlShutdown()
            except pynvml.NVMLError as error:
                log.debug("nvmlShutdown: %s", error)

    def _initialize(self) -> None:
        if self._initialized:
            return
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as error:
            raise NvmlUnavailableError(
                f"NVML could not be initialised ({error}). On a GPU node, run the agent with the "
                "NVIDIA container runtime and NVIDIA_VISIBLE_DEVICES=all (or privileged) so "
                "libnvidia-ml.so and /dev/nvidia* are visible; nodes without GPUs need no agent NVML."
            ) from error
        self._initialized = True
        # A new driver instance restarts its sample buffers: old cursors would hide new samples.
        self._cursor_us.clear()

    def _snapshot(self) -> NvmlSnapshot:
        self._initialize()
        try:
            try:
                return self._read_all()
            except pynvml.NVMLError as error:
                if _code(error) not in _REINITIALIZE:
                    raise
                # The driver was reloaded (or a GPU reset): new handles, then one more try.
                log.info("NVML handles went stale (%s); initialising NVML again", error)
                self._shutdown()
                self._initialize()
                return self._read_all()
        except pynvml.NVMLError as error:
            if _code(error) in _REINITIALIZE:
                self._shutdown()
            if _code(error) in _NO_NVML:
                raise NvmlUnavailableError(
                    f"NVML stopped answering ({error}); is the driver loaded?"
                ) from error
            raise NvmlUnavailableError(f"NVML failed to list devices: {error}") from error

    def _read_all(self) -> NvmlSnapshot:
        pids = PidToPod(self._proc_root)
        read_at_ms = self._clock_ms()
        devices: dict[str, DeviceReading] = {}
        errors: dict[str, str] = {}
        mig_parents: set[str] = set()
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            try:
                uuid = str(pynvml.nvmlDeviceGetUUID(handle))
                self._uuid_by_index[index] = uuid
            except pynvml.NVMLError as error:
                if _code(error) in _REINITIALIZE:
                    raise
                uuid = self._uuid_by_index.get(index, f"index {index}")
                errors[uuid] = f"NVML error on {uuid}: {error}"
                continue
            try:
                energy_mj = _optional(partial(pynvml.nvmlDeviceGetTotalEnergyConsumption, handle))
                mig_mode = _optional(partial(pynvml.nvmlDeviceGetMigMode, handle))
                if mig_mode is not None and mig_mode[0] == pynvml.NVML_DEVICE_MIG_ENABLE:
                    mig_parents.add(uuid)
                    for mig_handle in self._mig_handles(handle):
                        reading = self._read_device(mig_handle, pids, parent_uuid=uuid, energy_mj=energy_mj)
                        devices[reading.uuid] = reading
                else:
                    devices[uuid] = self._read_device(handle, pids, parent_uuid=None, energy_mj=energy_mj)
            except pynvml.NVMLError as error:
                if _code(error) in _REINITIALIZE:
                    raise
                # One bad device (for example an XID-faulted GPU) must not hide the others.
                errors[uuid] = f"NVML error on {uuid}: {error}"
        return NvmlSnapshot(read_at_ms, devices, errors, frozenset(mig_parents))

    def _mig_handles(self, handle: Any) -> list[Any]:
        handles = []
        for index in range(pynvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
            try:
                handles.append(pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, index))
            except pynvml.NVMLError as error:
                # Unpopulated slots answer NOT_FOUND (or INVALID_ARGUMENT on some drivers).
                if _code(error) not in (pynvml.NVML_ERROR_NOT_FOUND, pynvml.NVML_ERROR_INVALID_ARGUMENT):
                    raise
        return handles

    def _read_device(
        self, handle: Any, pids: PidToPod, parent_uuid: str | None, energy_mj: int | None
    ) -> DeviceReading:
        uuid = str(pynvml.nvmlDeviceGetUUID(handle))
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        utilization = None
        if parent_uuid is None:
            rates = _optional(lambda: pynvml.nvmlDeviceGetUtilizationRates(handle))
            utilization = None if rates is None else int(rates.gpu)
        processes = tuple(
            ProcessMemory(int(p.pid), pids.pod_uid(int(p.pid)), _memory_or_none(p.usedGpuMemory))
            for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
        )
        samples = None if parent_uuid is not None else self._process_samples(uuid, handle, pids)
        return DeviceReading(
            uuid=uuid,
            name=str(pynvml.nvmlDeviceGetName(handle)),
            parent_uuid=parent_uuid,
            memory_total_bytes=int(memory.total),
            memory_used_bytes=int(memory.used),
            utilization_percent=utilization,
            energy_mj=None if energy_mj is None else int(energy_mj),
            power_mw=_optional(lambda: int(pynvml.nvmlDeviceGetPowerUsage(handle))),
            processes=processes,
            process_samples=samples,
        )

    def _process_samples(self, uuid: str, handle: Any, pids: PidToPod) -> tuple[ProcessSample, ...] | None:
        cursor_us = self._cursor_us.get(uuid, 0)
        try:
            raw = pynvml.nvmlDeviceGetProcessUtilization(handle, cursor_us)
        except pynvml.NVMLError as error:
            # NOT_FOUND: no process was busy since the cursor. pynvml also raises NVMLError(SUCCESS)
            # when the first (sizing) call finds zero samples: the same thing.
            if _code(error) in (pynvml.NVML_ERROR_NOT_FOUND, pynvml.NVML_SUCCESS):
                return ()
            if _code(error) == pynvml.NVML_ERROR_NOT_SUPPORTED:
                return None
            raise
        samples = tuple(
            ProcessSample(int(s.pid), pids.pod_uid(int(s.pid)), int(s.timeStamp), int(s.smUtil))
            for s in raw
            if int(s.timeStamp) > cursor_us
        )
        if samples:
            self._cursor_us[uuid] = max(s.timestamp_us for s in samples)
        return samples


def _memory_or_none(value: Any) -> int | None:
    # pynvml turns NVML_VALUE_NOT_AVAILABLE into None (always the case under Windows WDDM).
    return None if value is None else int(value)
