"""NVML meters: GPU busy-seconds, GPU memory byte-seconds and energy joules per pod and device.

Each pass reads PodResources (who holds which device) and then NVML (what each device did), and
attributes every step between two readings to the holders of the device during that step:

- an **exclusively held** GPU or MIG instance gives its holder the whole device value (exact);
- a **shared** GPU (time-slicing or MPS replicas) is split by the per-process SM-utilization samples
  of each holder's processes (busy time, energy) or by each holder's own process memory (memory) —
  an approximation, and the event says so (``attribution: process-share``);
- a **MIG** instance has no NVML utilization (its readings are flagged incomplete) and shares its
  parent's energy counter, split over the parent's instances by their memory size.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from kubemeter.metering.counters import CounterSample, counter_delta, spread
from kubemeter.metering.gauges import GaugeSample, integrate_gauge
from kubemeter.metering.windows import Window
from kubemeter.sources.base import PodRecord, Progress, Reading, WindowLedger, poll_with_backoff
from kubemeter.sources.informer import Backoff, now_ms
from kubemeter.sources.nvml.edge import DeviceReading, NvmlEdge, NvmlSnapshot, NvmlUnavailableError
from kubemeter.sources.podresources import DeviceOwnership, PodResourcesClient, PodResourcesUnavailableError
from kubemeter.sources.podresources.ownership import Holder, PodUidResolver

log = logging.getLogger(__name__)

NvmlMetric = Literal["utilization", "memoryUsed", "energy"]
Attribution = Literal["exclusive", "process-share", "mig-slice-share"]

# Accumulated integers → the meter's unit: percent·ms → GPU-seconds, byte·ms → byte-seconds, mJ → J.
_SCALE = {"utilization": -5, "memoryUsed": -3, "energy": -3}
UNITS = {"utilization": "GPU-seconds", "memoryUsed": "byte-seconds", "energy": "joules"}


@dataclass
class DeviceState:
    """The previous reading of one device, the left end of the next step."""

    time_ms: int
    gauge: int | None  # utilization percent or memory bytes
    energy_mj: int | None
    process_memory_bytes: dict[str, int] = field(default_factory=dict)  # pod uid → bytes


def resolver_from_pods(pods: Callable[[], Mapping[str, PodRecord]]) -> PodUidResolver:
    """(namespace, name) → uid from the agent's pod cache, preferring the live pod of that name."""

    def resolve(namespace: str, name: str) -> str | None:
        found: str | None = None
        for uid, record in pods().items():
            metadata = record.object.get("metadata") or {}
            if metadata.get("namespace") == namespace and metadata.get("name") == name:
                if record.deleted_at_ms is None:
                    return uid
                found = uid
        return found

    return resolve


UsageKey = tuple[str, str]  # (pod uid, device uuid)


class NvmlSource(Progress):
    def __init__(
        self,
        metric: NvmlMetric,
        window_ms: int,
        interval_ms: int,
        not_before_ms: int,
        edge: NvmlEdge,
        pod_resources: PodResourcesClient,
        resolve_uid: PodUidResolver,
        clock_ms: Callable[[], int] = now_ms,
        on_error: Callable[[str, BaseException], None] = lambda source, error: None,
    ) -> None:
        self.metric = metric
        self.window_ms = window_ms
        self.interval_ms = interval_ms
        self.max_step_ms = interval_ms * 5 // 2
        self.edge = edge
        self.pod_resources = pod_resources
        self.resolve_uid = resolve_uid
        self.clock_ms = clock_ms
        self.on_error = on_error
        self.ownership = DeviceOwnership()
        self.devices: dict[str, DeviceState] = {}
        self.models: dict[str, str] = {}  # device uuid → NVML's name for it, for the event
        self.usage: WindowLedger[UsageKey] = WindowLedger(not_before_ms)
        # How each (pod, device) pair was attributed: ``exclusive`` is exact, the others are shares.
        self.attribution: dict[UsageKey, Attribution] = {}
        self._fault_logged = False

    # ---- observing ------------------------------------------------------------------------------
    async def run(self) -> None:
        try:
            await poll_with_backoff(
                self.poll,
                self.interval_ms / 1000,
                Backoff(initial_s=self.interval_ms / 2000, max_s=max(60.0, self.interval_ms / 1000)),
                (PodResourcesUnavailableError, NvmlUnavailableError),
                lambda error: self._fault("nvml source", error),
            )
        finally:
            await self.close()

    async def close(self) -> None:
        await self.pod_resources.close()
        await self.edge.close()

    async def poll(self) -> None:
        """One pass: ownership, then NVML. Faults are recorded, not raised past :meth:`run`."""
        at_ms = self.clock_ms()
        try:
            assignments = await self.pod_resources.list_assignments()
        except PodResourcesUnavailableError as error:
            self._fault("podresources", error)
            raise
        unresolved = self.ownership.observe(at_ms, assignments, self.resolve_uid)
        if unresolved:
            log.info("PodResources lists pods the pod watch does not know yet: %s", unresolved)
        if not self.ownership.intervals() and not self.devices:
            # No GPU is held on this node: nothing to read, so a node without a driver is fine.
            self.last_error = None
            self._fault_logged = False
            self.observed_ms = max(self.observed_ms, at_ms)
            return
        try:
            snapshot = await self.edge.snapshot()
        except NvmlUnavailableError as error:
            self._fault("nvml", error)
            raise
        self.last_error = None
        self._fault_logged = False
        self.ingest(snapshot)

    def _fault(self, part: str, error: Exception) -> None:
        self.last_error = f"{part} unavailable: {error}"
        self.on_error(part, error)
        if not self._fault_logged:
            # Logged once per outage: a node without a driver must not flood the log every pass.
            log.warning("%s; retrying with backoff", self.last_error)
            self._fault_logged = True

    def ingest(self, snapshot: NvmlSnapshot) -> None:
        """Fold one NVML pass into the per-window amounts (pure apart from ``self``)."""
        now = snapshot.read_at_ms
        mig_memory: dict[str, int] = {}
        for reading in snapshot.devices.values():
            if reading.parent_uuid is not None:
                mig_memory[reading.parent_uuid] = (
                    mig_memory.get(reading.parent_uuid, 0) + reading.memory_total_bytes
                )
        for uuid, reading in sorted(snapshot.devices.items()):
            previous = self.devices.get(uuid)
            self.devices[uuid] = self._state(reading, now)
            self.models[uuid] = reading.name
            if previous is None or now <= previous.time_ms:
                continue
            self._attribute_step(uuid, reading, previous, now, mig_memory)
        for uuid, reason in snapshot.device_errors.items():
            for holder, _ in self.ownership.holders_during(uuid, self.observed_ms, now):
                key = self._usage(holder, uuid, "exclusive")
                self.usage.flag(key, self._windows(self.observed_ms, now), reason)
        self.observed_ms = max(self.observed_ms, now)

    def _state(self, reading: DeviceReading, now: int) -> DeviceState:
        gauge = reading.utilization_percent if self.metric == "utilization" else reading.memory_used_bytes
        by_pod: dict[str, int] = {}
        for process in reading.processes:
            if process.pod_uid is not None and process.used_memory_bytes is not None:
                by_pod[process.pod_uid] = by_pod.get(process.pod_uid, 0) + process.used_memory_bytes
        return DeviceState(now, gauge, reading.energy_mj, by_pod)

    def _attribute_step(
        self,
        uuid: str,
        reading: DeviceReading,
        previous: DeviceState,
        now: int,
        mig_memory: Mapping[str, int],
    ) -> None:
        step_ms = now - previous.time_ms
        holders = self.ownership.holders_during(uuid, previous.time_ms, now)
        if not holders:
            return  # an idle, unallocated device is nobody's usage
        shared = any(h.shared for h, _ in holders) or sum(ms for _, ms in holders) > step_ms
        mig = reading.parent_uuid is not None
        attribution: Attribution = "process-share" if shared else "exclusive"
        windows = self._windows(previous.time_ms, now)

        # Weights for a shared device: SM-utilization samples of each pod's processes in this step.
        weights: dict[str, int] = {}
        for sample in reading.process_samples or ():
            sample_pod = sample.pod_uid or ""
            weights[sample_pod] = weights.get(sample_pod, 0) + sample.sm_util_percent
        total_weight = sum(weights.values())

        for holder, held_ms in holders:
            kind: Attribution = "mig-slice-share" if mig and self.metric == "energy" else attribution
            key = self._usage(holder, uuid, kind)
            if self.metric == "energy":
                amounts, reason = self._energy_step(reading, previous, now, mig_memory)
            else:
                gauge = previous.gauge
                if self.metric == "memoryUsed" and shared:
                    gauge = previous.process_memory_bytes.get(holder.pod_uid, 0)
                if gauge is None:
                    self.usage.flag(key, windows, f"NVML reports no {self.metric} for {uuid} (MIG instance)")
                    continue
                step = integrate_gauge(
                    GaugeSample(previous.time_ms, gauge), now, self.max_step_ms, self.window_ms
                )
                amounts, reason = step.value_ms_by_window, None
                if step.gap_ms_by_window:
                    self.usage.flag(
                        key,
                        step.gap_ms_by_window,
                        f"no NVML reading of {uuid} from {previous.time_ms} to {now} ms",
                    )
            numerator, denominator = held_ms, step_ms
            if shared and self.metric != "memoryUsed":
                if total_weight:
                    numerator *= weights.get(holder.pod_uid, 0)
                    denominator *= total_weight
                elif self.metric == "utilization" and any(amounts.values()):
                    self.usage.flag(key, windows, f"{uuid} was busy but NVML gave no per-process samples")
                    continue
                else:
                    # No process was busy: idle energy is shared by the holders in proportion to time.
                    denominator = sum(ms for _, ms in holders)
            self.usage.add(
                key, {start: amount * numerator // denominator for start, amount in amounts.items()}
            )
            if reason:
                self.usage.flag(key, windows, reason)

    def _energy_step(
        self, reading: DeviceReading, previous: DeviceState, now: int, mig_memory: Mapping[str, int]
    ) -> tuple[dict[int, int], str | None]:
        if reading.energy_mj is None or previous.energy_mj is None:
            return {}, f"NVML has no energy counter for {reading.uuid} (needs Volta or newer)"
        delta = counter_delta(
            CounterSample(previous.time_ms, previous.energy_mj), CounterSample(now, reading.energy_mj)
        )
        amount = delta.amount
        if reading.parent_uuid is not None:
            # MIG instances share the parent's counter; each gets the share of its memory slice.
            amount = amount * reading.memory_total_bytes // max(1, mig_memory[reading.parent_uuid])
        shares = spread(amount, delta.from_ms, delta.to_ms, self.window_ms)
        reason = None
        if delta.reset:
            reason = (
                f"the energy counter of {reading.uuid} went back from {previous.energy_mj} to "
                f"{reading.energy_mj} mJ (driver reload); energy before the reload was not observed"
            )
        if now - previous.time_ms > self.max_step_ms:
            reason = f"no NVML reading of {reading.uuid} from {previous.time_ms} to {now} ms"
        return shares, reason

    def _usage(self, holder: Holder, device: str, attribution: Attribution) -> UsageKey:
        """The pair's key, recording how it is attributed (a share, once seen, stays a share)."""
        key = (holder.pod_uid, device)
        if key not in self.attribution or attribution != "exclusive":
            self.attribution[key] = attribution
        return key

    def _windows(self, from_ms: int, to_ms: int) -> list[int]:
        first = from_ms - from_ms % self.window_ms
        return list(range(first, max(to_ms, from_ms + 1), self.window_ms))

    # ---- the Source interface (observed_through_ms and fault from Progress) -----------------------
    def readings(self, window: Window, pods: Mapping[str, PodRecord]) -> list[Reading]:
        readings: list[Reading] = []
        late = window.end_ms > self.observed_ms
        keys = set(self.usage.entries)
        if late:
            # Holders we could not read at all during an outage still get a (flagged) reading.
            for interval in self.ownership.intervals():
                if interval.overlap_ms(window.start_ms, window.end_ms) > 0:
                    keys.add((interval.holder.pod_uid, interval.device))
        for uid, device in sorted(keys):
            amount, reason = self.usage.get((uid, device), window.start_ms)
            if late and reason is None and self._holds(uid, device, window.end_ms):
                reason = f"NVML not read since {self.observed_ms} ms ({self.last_error})"
            if amount is None and reason is None:
                continue
            readings.append(
                Reading(
                    uid,
                    Decimal(amount or 0).scaleb(_SCALE[self.metric]),
                    part=device,
                    complete=reason is None,
                    incomplete_reason=reason,
                    dimensions=self._dimensions(uid, device),
                )
            )
        return readings

    def _dimensions(self, uid: str, device: str) -> dict[str, str]:
        """``gpu`` and ``gpu_model`` say which device; ``attribution`` whether the value is exact
        (``exclusive``) or a share of a shared GPU (``process-share``, ``mig-slice-share``)."""
        dimensions = {"gpu": device, "attribution": self.attribution.get((uid, device), "exclusive")}
        if device in self.models:
            dimensions["gpu_model"] = self.models[device]
        return dimensions

    def _holds(self, uid: str, device: str, moment_ms: int) -> bool:
        return any(
            i.holder.pod_uid == uid and (i.end_ms is None or i.end_ms >= moment_ms)
            for i in self.ownership.intervals(device)
        )

    def committed(self, window: Window) -> None:
        self.usage.commit(window)
        held = {(i.holder.pod_uid, i.device) for i in self.ownership.intervals()}
        self.attribution = {k: v for k, v in self.attribution.items() if k in self.usage.entries or k in held}
        # Keep ownership that may still overlap a step not yet read.
        self.ownership.forget_before(min(window.end_ms, self.observed_ms) - self.max_step_ms)

    def snapshot(self) -> dict[str, Any]:
        return {
            "observed_ms": self.observed_ms,
            "devices": {
                uuid: [s.time_ms, s.gauge, s.energy_mj, s.process_memory_bytes]
                for uuid, s in self.devices.items()
            },
            "models": self.models,
            "ownership": self.ownership.to_json(),
            "attribution": [[uid, device, kind] for (uid, device), kind in self.attribution.items()],
            "usage": self.usage.to_json(list),
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        self.observed_ms = int(state["observed_ms"])
        self.devices = {
            uuid: DeviceState(time_ms, gauge, energy, dict(memory))
            for uuid, (time_ms, gauge, energy, memory) in state["devices"].items()
        }
        self.models = dict(state["models"])
        self.ownership.restore(state["ownership"])
        self.attribution = {(uid, device): kind for uid, device, kind in state["attribution"]}
        self.usage.restore(state["usage"], lambda key: (str(key[0]), str(key[1])))


def build(
    metric: NvmlMetric,
    window_ms: int,
    interval_ms: int,
    not_before_ms: int,
    socket_path: str,
    proc_root: Path,
    pods: Callable[[], Mapping[str, PodRecord]],
    on_error: Callable[[str, BaseException], None] = lambda source, error: None,
) -> NvmlSource:
    """What the agent's ``build_source`` calls for ``spec.source.nvml``; ``proc_root`` is the host's
    ``/proc`` (host PIDs, which NVML reports, are mapped to pods through it)."""
    return NvmlSource(
        metric,
        window_ms,
        interval_ms,
        not_before_ms,
        NvmlEdge(proc_root=proc_root),
        PodResourcesClient(socket_path),
        resolver_from_pods(pods),
        on_error=on_error,
    )
