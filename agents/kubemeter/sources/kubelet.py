"""Usage from the kubelet's own counters: ``GET https://<node InternalIP>:<kubelet port>/stats/summary``.

CPU is ``usageCoreNanoSeconds`` per pod, a cumulative counter: core-seconds are counter deltas, so a
missed poll loses resolution but never usage, and a reset counts from zero. Memory is the
``workingSetBytes`` gauge, held from one sample to the next (byte-seconds); a late sample leaves a
flagged gap. The kubelet authorises ``/stats/*`` as ``nodes/stats`` (not the broad ``nodes/proxy``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

import httpx
import msgspec

from kubemeter.metering.counters import CounterSample, counter_delta, first_delta, spread
from kubemeter.metering.gauges import GaugeSample, integrate_gauge
from kubemeter.metering.pods import parse_time_ms
from kubemeter.metering.windows import Window, split_by_windows
from kubemeter.sources.base import PodRecord, Progress, Reading, WindowLedger
from kubemeter.sources.informer import Backoff, now_ms

log = logging.getLogger(__name__)

KUBELET_CA_FILE_ENV = "KUBEMETER_KUBELET_CA_FILE"
# How long a window waits for the kubelet's next sample. The kubelet serves cAdvisor's cached stats,
# refreshed every 10-15 s and, for a container whose stats do not change, less often (steps of up to
# 29 s measured on kubelet 1.36.3, tests/integration/realnode/test_max_request_usage.py); a counter delta
# arriving after its window closed would be lost to it.
KUBELET_SAMPLE_HOLD_MS = 60_000
KUBELET_INSECURE_ENV = "KUBEMETER_KUBELET_INSECURE_SKIP_TLS_VERIFY"
Metric = Literal["cpu", "memory"]


class KubeletStatsError(Exception):
    """The kubelet answered, but not with a usable summary."""


def kubelet_stats_url(node: Mapping[str, Any]) -> str:
    """Where the node says its kubelet listens: InternalIP and ``daemonEndpoints.kubeletEndpoint``."""
    status = node.get("status") or {}
    addresses = {a.get("type"): a.get("address") for a in status.get("addresses") or []}
    address = addresses.get("InternalIP") or addresses.get("Hostname")
    port = ((status.get("daemonEndpoints") or {}).get("kubeletEndpoint") or {}).get("Port") or 10250
    if not address:
        name = (node.get("metadata") or {}).get("name")
        raise KubeletStatsError(
            f"node {name} lists no InternalIP in status.addresses; cannot reach its kubelet"
        )
    host = f"[{address}]" if ":" in address else address
    return f"https://{host}:{port}/stats/summary?only_cpu_and_memory=true"


def kubelet_ssl_context() -> ssl.SSLContext | bool:
    if os.environ.get(KUBELET_INSECURE_ENV, "").lower() in {"1", "true", "yes"}:
        return False
    return ssl.create_default_context(cafile=os.environ.get(KUBELET_CA_FILE_ENV) or None)


@dataclass
class PodCounter:
    """A pod's previous sample, the left end of its next step; saved with the cursor."""

    last_time_ms: int
    last_value: int
    counter_start_ms: int | None
    # The agent's last good poll that listed the pod (its sample moved or not): a sample step is a
    # gap only if polls were missed in it, not because the kubelet's own stats are 10-15 s apart.
    last_polled_ms: int | None = None

    def to_json(self) -> list[int | None]:
        return [self.last_time_ms, self.last_value, self.counter_start_ms, self.last_polled_ms]


# Only the fields metering reads: msgspec decodes straight into these and never builds the rest of
# the summary (containers, network, volumes, filesystems). The stdlib json.loads of a real kubelet's
# summary built every field as Python objects, for each poll, beside the body as bytes and as text.
class _PodRef(msgspec.Struct):
    uid: str
    namespace: str = ""
    name: str = ""


class _CpuStats(msgspec.Struct, rename="camel"):
    time: str | None = None
    usage_core_nano_seconds: int | None = None


class _MemoryStats(msgspec.Struct, rename="camel"):
    time: str | None = None
    working_set_bytes: int | None = None


class _PodStats(msgspec.Struct, rename="camel"):
    pod_ref: _PodRef
    start_time: str | None = None
    cpu: _CpuStats | None = None
    memory: _MemoryStats | None = None


class _Summary(msgspec.Struct):
    pods: list[_PodStats]


_decode_summary = msgspec.json.Decoder(_Summary).decode


def _stats(pod: _PodStats) -> dict[str, Any]:
    stats: dict[str, Any] = {"startTime": pod.start_time}
    if pod.cpu is not None:
        stats["cpu"] = {"time": pod.cpu.time, "usageCoreNanoSeconds": pod.cpu.usage_core_nano_seconds}
    if pod.memory is not None:
        stats["memory"] = {"time": pod.memory.time, "workingSetBytes": pod.memory.working_set_bytes}
    return stats


def parse_summary(body: bytes | str) -> dict[str, tuple[str, str, Mapping[str, Any]]]:
    """uid -> (namespace, name, pod stats); raises :class:`KubeletStatsError` on garbage."""
    try:
        summary = _decode_summary(body)
    except msgspec.MsgspecError as error:
        raise KubeletStatsError(
            f"the kubelet's /stats/summary is not the expected JSON ({type(error).__name__}: {error})"
        ) from error
    return {pod.pod_ref.uid: (pod.pod_ref.namespace, pod.pod_ref.name, _stats(pod)) for pod in summary.pods}


class KubeletPoller:
    """Reads ``/stats/summary`` once per interval for every kubelet meter of the agent.

    One read feeds all of them, so the CPU and memory meters see the same samples (and the kubelet
    one request per interval, not one per meter)."""

    def __init__(
        self,
        interval_ms: int,
        stats_url: Callable[[], str],
        token: Callable[[], str | None],
        on_error: Callable[[str, BaseException], None] = lambda source, error: None,
    ) -> None:
        self.interval_ms = interval_ms
        self.stats_url = stats_url
        self.token = token
        self.client = httpx.AsyncClient(
            verify=kubelet_ssl_context(), timeout=max(5.0, interval_ms / 1000), trust_env=False
        )
        self.on_error = on_error
        self.subscribers: list[KubeletUsageSource] = []

    async def run(self) -> None:
        backoff = Backoff(initial_s=self.interval_ms / 2000, max_s=max(30.0, self.interval_ms / 1000))
        while True:
            if not self.subscribers:
                await asyncio.sleep(self.interval_ms / 1000)
                continue
            try:
                pods = parse_summary(await self._fetch())
                polled_at_ms = now_ms()
                for source in list(self.subscribers):
                    source.ingest(pods, polled_at_ms)
                    source.last_error = None
                backoff.reset()
                await asyncio.sleep(self.interval_ms / 1000)
            except asyncio.CancelledError:
                raise
            except (httpx.HTTPError, OSError, TimeoutError, KubeletStatsError) as error:
                reason = f"kubelet stats unavailable: {type(error).__name__}: {error}"
                for source in self.subscribers:
                    source.last_error = reason
                self.on_error("kubelet", error)
                log.warning("%s; retrying", reason)
                await asyncio.sleep(backoff.next_delay_s())

    async def _fetch(self) -> bytes:
        token = self.token()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        response = await self.client.get(self.stats_url(), headers=headers)
        body = response.content  # decoded as bytes: response.text would be a second copy
        if response.status_code in (401, 403):
            raise KubeletStatsError(
                f"kubelet refused /stats/summary ({response.status_code}); grant the agent's "
                "ServiceAccount get on nodes/stats"
            )
        if response.status_code >= 400:
            raise KubeletStatsError(
                f"kubelet answered {response.status_code}: {body[:200].decode(errors='replace')}"
            )
        return body


class KubeletUsageSource(Progress):
    def __init__(
        self,
        metric: Metric,
        window_ms: int,
        interval_ms: int,
        not_before_ms: int,
        poller: KubeletPoller,
        zero_readings: bool = False,
    ) -> None:
        self.metric = metric
        # Also a reading of 0 for a window the counter covered without moving (maxRequestUsage must
        # tell "used nothing" from "no data"); a plain usage meter writes no event for nothing.
        self.zero_readings = zero_readings
        self.hold_limit_ms = max(2 * window_ms, KUBELET_SAMPLE_HOLD_MS)
        self.window_ms = window_ms
        # A sample later than this after the previous one means polls were missed.
        self.max_step_ms = interval_ms * 5 // 2
        self.not_before_ms = not_before_ms
        self.poller = poller
        self.pods: dict[str, PodCounter] = {}
        self.ledger: WindowLedger[str] = WindowLedger(not_before_ms)
        self.scale = -9 if metric == "cpu" else -3  # core-ns -> core-s; byte-ms -> byte-s

    async def run(self) -> None:
        self.poller.subscribers.append(self)
        try:
            await asyncio.Event().wait()
        finally:
            self.poller.subscribers.remove(self)

    def ingest(self, pods: Mapping[str, tuple[str, str, Mapping[str, Any]]], polled_at_ms: int) -> None:
        """Fold one summary into the per-window amounts (pure apart from ``self``)."""
        oldest_ms = polled_at_ms
        for uid, (_namespace, _name, stats) in pods.items():
            sample = self._sample(stats)
            if sample is None:
                continue
            time_ms, value, start_ms = sample
            oldest_ms = min(oldest_ms, time_ms)
            state = self.pods.get(uid)
            if state is None:
                state = PodCounter(time_ms, value, start_ms, polled_at_ms)
                self.pods[uid] = state
                if self.metric == "cpu":
                    delta = first_delta(CounterSample(time_ms, value, start_ms), self.not_before_ms)
                    self.ledger.add(uid, self._shares(delta.amount, delta.from_ms, delta.to_ms))
                continue
            last_polled_ms, state.last_polled_ms = state.last_polled_ms, polled_at_ms
            if time_ms <= state.last_time_ms:
                continue  # the kubelet's cached stats did not move
            # The kubelet refreshes its stats every 10-15 s (cAdvisor housekeeping): a longer step
            # between samples is its resolution, not a gap, while the agent polled all along.
            if last_polled_ms is None:  # a cursor saved before polls were tracked
                gap = time_ms - state.last_time_ms > self.max_step_ms
            else:
                gap = polled_at_ms - last_polled_ms > self.max_step_ms
            if self.metric == "cpu":
                delta = counter_delta(
                    CounterSample(state.last_time_ms, state.last_value, state.counter_start_ms),
                    CounterSample(time_ms, value, start_ms),
                )
                shares = self._shares(delta.amount, delta.from_ms, delta.to_ms)
                self.ledger.add(uid, shares)
                if gap:
                    reason = (
                        f"no kubelet sample from {state.last_time_ms} to {time_ms} ms; the counter "
                        "delta over the gap is spread evenly"
                    )
                    self.ledger.flag(uid, shares, reason)
            else:
                step = integrate_gauge(
                    GaugeSample(state.last_time_ms, state.last_value),
                    time_ms,
                    self.max_step_ms if gap else time_ms - state.last_time_ms,
                    self.window_ms,
                )
                self.ledger.add(uid, step.value_ms_by_window)
                reason = f"no kubelet sample from {state.last_time_ms} to {time_ms} ms; memory not observed"
                self.ledger.flag(uid, step.gap_ms_by_window, reason)
            state.last_time_ms, state.last_value, state.counter_start_ms = time_ms, value, start_ms
        self.observed_ms = max(self.observed_ms, oldest_ms)

    def _shares(self, amount: int, from_ms: int, to_ms: int) -> dict[int, int]:
        """A counter delta spread over the windows of its step; with ``zero_readings`` every window
        the step covers has an entry, 0 where the counter did not move."""
        shares = spread(amount, from_ms, to_ms, self.window_ms)
        if self.zero_readings:
            for window_start_ms, _piece_ms in split_by_windows(from_ms, to_ms, self.window_ms):
                shares.setdefault(window_start_ms, 0)
        return shares

    def _sample(self, stats: Mapping[str, Any]) -> tuple[int, int, int | None] | None:
        section = stats.get(self.metric) or {}
        key = "usageCoreNanoSeconds" if self.metric == "cpu" else "workingSetBytes"
        if section.get(key) is None or not section.get("time"):
            return None
        start = stats.get("startTime")
        return parse_time_ms(section["time"]), int(section[key]), parse_time_ms(start) if start else None

    # ---- the Source interface (observed_through_ms and fault from Progress) -----------------------
    def readings(self, window: Window, pods: Mapping[str, PodRecord]) -> list[Reading]:
        readings: list[Reading] = []
        late = window.end_ms > self.observed_ms
        for uid, state in self.pods.items():
            amount, reason = self.ledger.get(uid, window.start_ms)
            still_running = (
                state.last_time_ms < window.end_ms and uid in pods and pods[uid].deleted_at_ms is None
            )
            if late and still_running and reason is None:
                reason = f"kubelet not read since {self.observed_ms} ms ({self.last_error})"
            if amount is None and reason is None:
                continue
            value = Decimal(amount or 0).scaleb(self.scale)
            readings.append(Reading(uid, value, complete=reason is None, incomplete_reason=reason))
        return readings

    def committed(self, window: Window) -> None:
        self.ledger.commit(window)
        for uid in list(self.pods):
            amounts = self.ledger.entries.get(uid)
            # A pod gone from the summary for a whole window after its last sample is finished.
            if (amounts is None or not amounts.by_window) and (
                self.pods[uid].last_time_ms + self.window_ms < window.start_ms
            ):
                del self.pods[uid]
                self.ledger.entries.pop(uid, None)

    def snapshot(self) -> dict[str, Any]:
        return {
            "observed_ms": self.observed_ms,
            "pods": {uid: state.to_json() for uid, state in self.pods.items()},
            "ledger": self.ledger.to_json(str),
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        self.observed_ms = int(state["observed_ms"])
        self.pods = {uid: PodCounter(*data) for uid, data in state["pods"].items()}
        self.ledger.restore(state["ledger"], str)
