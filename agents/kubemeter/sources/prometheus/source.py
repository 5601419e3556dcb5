"""A Prometheus query per Meter: raw samples of this node's series, integrated exactly per pod.

Every poll reads all samples since the previous one (an instant query of a range selector), so an
outage of Prometheus or of the agent is back-filled from Prometheus's own storage. Counters are
summed as deltas between consecutive samples (a drop is a reset: counted from zero and flagged);
gauges are held from one sample to the next. A step longer than 2.5 scrape intervals is a scrape
gap: the gauge is not filled across it and the counter's increase over it is flagged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

from kubemeter.metering.counters import CounterSample, counter_delta, spread
from kubemeter.metering.gauges import GaugeSample, integrate_gauge
from kubemeter.metering.windows import Window
from kubemeter.sources.base import PodRecord, Progress, Reading, WindowLedger, poll_with_backoff
from kubemeter.sources.informer import Backoff, now_ms
from kubemeter.sources.prometheus.client import PrometheusClient, PrometheusError, Series
from kubemeter.sources.prometheus.query import QueryError, node_scoped_selector, range_query

log = logging.getLogger(__name__)

Kind = Literal["counter", "gauge"]
# Sample values are kept as integer nano-units so the window sums are exact.
_NANO = 9
# One query reads at most this much history; a longer outage is read back in chunks.
MAX_QUERY_RANGE_MS = 3_600_000
UID_LABELS = ("pod_uid", "uid")


PodKey = tuple[str, str, str]  # namespace, pod, uid label ("" when the series has none)


@dataclass
class SeriesState:
    pod_key: PodKey
    last_time_ms: int
    last_value: int


class PrometheusSource(Progress):
    def __init__(
        self,
        kind: Kind,
        query: str,
        node: str,
        client: PrometheusClient,
        window_ms: int,
        scrape_interval_ms: int,
        poll_interval_ms: int,
        not_before_ms: int,
        node_label: str = "node",
        pod_label: str = "pod",
        namespace_label: str = "namespace",
        value_scale: Decimal = Decimal(1),
        clock_ms: Callable[[], int] = now_ms,
        on_error: Callable[[str, BaseException], None] = lambda source, error: None,
    ) -> None:
        self.kind = kind
        self.client = client
        self.window_ms = window_ms
        self.scrape_interval_ms = scrape_interval_ms
        self.max_step_ms = scrape_interval_ms * 5 // 2
        self.poll_interval_ms = poll_interval_ms
        self.pod_label = pod_label
        self.namespace_label = namespace_label
        self.value_scale = value_scale
        self.clock_ms = clock_ms
        self.on_error = on_error
        self.series: dict[tuple[tuple[str, str], ...], SeriesState] = {}
        self.usage: WindowLedger[PodKey] = WindowLedger(not_before_ms)
        self.last_sample_ms: dict[PodKey, int] = {}  # the newest sample of any of the pod's series
        self.read_through_ms = not_before_ms  # samples up to here are ingested
        self.selector: str | None = None
        try:
            self.selector = node_scoped_selector(query, node_label, node)
        except QueryError as error:
            self.last_error = str(error)

    # ---- observing ------------------------------------------------------------------------------
    async def run(self) -> None:
        try:
            if self.selector is None:
                log.error("%s", self.last_error)
                await asyncio.Event().wait()  # a query that cannot work is reported, not retried
            await poll_with_backoff(
                self.poll,
                self.poll_interval_ms / 1000,
                Backoff(
                    initial_s=self.poll_interval_ms / 2000, max_s=max(60.0, self.poll_interval_ms / 1000)
                ),
                (PrometheusError,),
                self._unexpected,
            )
        finally:
            await self.close()

    async def close(self) -> None:
        await self.client.close()

    def _unexpected(self, error: Exception) -> None:
        self.last_error = f"prometheus: {type(error).__name__}: {error}"
        self.on_error("prometheus", error)

    async def poll(self) -> None:
        """Read every sample since the last poll (in chunks after an outage). Raises
        :class:`PrometheusError` after recording it as the fault."""
        if self.selector is None:
            raise PrometheusError(self.last_error or "no query")
        now = self.clock_ms()
        try:
            while self.read_through_ms < now:
                until_ms = min(now, self.read_through_ms + MAX_QUERY_RANGE_MS)
                # Reach one gap-length back so every series has the sample left of the range.
                range_ms = until_ms - self.read_through_ms + self.max_step_ms
                series = await self.client.raw_samples(range_query(self.selector, range_ms), until_ms)
                self.ingest(series, until_ms)
        except PrometheusError as error:
            self.last_error = f"prometheus: {error}"
            self.on_error("prometheus", error)
            log.warning("%s; retrying", self.last_error)
            raise
        self.last_error = None

    def ingest(self, series: list[Series], queried_at_ms: int) -> None:
        """Fold raw samples read at ``queried_at_ms`` into per-pod window amounts."""
        for one in series:
            namespace = one.labels.get(self.namespace_label, "")
            pod = one.labels.get(self.pod_label, "")
            if not pod or not namespace:
                continue  # e.g. dcgm-exporter's series for an unallocated GPU: nobody's usage
            uid = next((one.labels[label] for label in UID_LABELS if one.labels.get(label)), "")
            pod_key = (namespace, pod, uid)
            state = self.series.get(one.key)
            for sample in one.samples:
                value = int(sample.value.scaleb(_NANO).to_integral_value())
                if state is None:
                    # The first sample is the baseline: a counter's value before it is unknown.
                    state = self.series[one.key] = SeriesState(pod_key, sample.time_ms, value)
                    continue
                if sample.time_ms <= state.last_time_ms:
                    continue
                self._step(pod_key, state, sample.time_ms, value)
                state.last_time_ms, state.last_value = sample.time_ms, value
                self.last_sample_ms[pod_key] = max(self.last_sample_ms.get(pod_key, 0), sample.time_ms)
        self.read_through_ms = max(self.read_through_ms, queried_at_ms)
        # A scrape that began before the query can still land with an earlier timestamp, and a
        # series still being scraped is known only up to its last sample: its next step is open.
        active_ms = [
            s.last_time_ms for s in self.series.values() if s.last_time_ms >= queried_at_ms - self.max_step_ms
        ]
        self.observed_ms = max(self.observed_ms, min([queried_at_ms - self.scrape_interval_ms, *active_ms]))

    def _step(self, pod_key: PodKey, state: SeriesState, time_ms: int, value: int) -> None:
        gap = time_ms - state.last_time_ms > self.max_step_ms
        if self.kind == "counter":
            delta = counter_delta(
                CounterSample(state.last_time_ms, state.last_value), CounterSample(time_ms, value)
            )
            shares = spread(delta.amount, delta.from_ms, delta.to_ms, self.window_ms)
            self.usage.add(pod_key, shares)
            if delta.reset:
                self.usage.flag(
                    pod_key,
                    list(shares) or [time_ms - time_ms % self.window_ms],
                    f"counter reset between {state.last_time_ms} and {time_ms} ms (exporter or driver "
                    "restart); the increase before the reset was not observed",
                )
            if gap:
                self.usage.flag(
                    pod_key,
                    shares,
                    f"scrape gap from {state.last_time_ms} to {time_ms} ms; the increase over it is "
                    "spread evenly",
                )
            return
        step = integrate_gauge(
            GaugeSample(state.last_time_ms, state.last_value), time_ms, self.max_step_ms, self.window_ms
        )
        self.usage.add(pod_key, step.value_ms_by_window)
        self.usage.flag(
            pod_key,
            step.gap_ms_by_window,
            f"scrape gap from {state.last_time_ms} to {time_ms} ms; not filled",
        )

    # ---- the Source interface (observed_through_ms and fault from Progress) -----------------------
    def readings(self, window: Window, pods: Mapping[str, PodRecord]) -> list[Reading]:
        uids = _uids_by_name(pods)
        late = window.end_ms > self.observed_ms
        values: dict[str, tuple[int, str | None]] = {}
        for pod_key, last_sample_ms in sorted(self.last_sample_ms.items()):
            namespace, pod, uid_label = pod_key
            uid = uid_label or uids.get((namespace, pod))
            if uid is None:
                log.info("no pod %s/%s known on this node; its Prometheus series is skipped", namespace, pod)
                continue
            amount, reason = self.usage.get(pod_key, window.start_ms)
            if late and reason is None and last_sample_ms + self.max_step_ms >= self.observed_ms:
                reason = f"Prometheus not read since {self.observed_ms} ms ({self.last_error})"
            if amount is None and reason is None:
                continue
            total, first_reason = values.get(uid, (0, None))
            values[uid] = (total + (amount or 0), first_reason or reason)
        scale = -_NANO - (3 if self.kind == "gauge" else 0)  # gauge: unit·ms → unit·s
        return [
            Reading(
                uid,
                Decimal(total).scaleb(scale) * self.value_scale,
                complete=reason is None,
                incomplete_reason=reason,
            )
            for uid, (total, reason) in values.items()
        ]

    def committed(self, window: Window) -> None:
        self.usage.commit(window)
        for key, last_sample_ms in list(self.last_sample_ms.items()):
            amounts = self.usage.entries.get(key)
            if (
                amounts is None or not amounts.by_window
            ) and last_sample_ms + self.window_ms < window.start_ms:
                del self.last_sample_ms[key]
                self.usage.entries.pop(key, None)
                self.series = {k: s for k, s in self.series.items() if s.pod_key != key}

    def snapshot(self) -> dict[str, Any]:
        return {
            "read_through_ms": self.read_through_ms,
            "observed_ms": self.observed_ms,
            "series": [
                [list(map(list, k)), list(s.pod_key), s.last_time_ms, s.last_value]
                for k, s in self.series.items()
            ],
            "last_sample_ms": [[list(key), at_ms] for key, at_ms in self.last_sample_ms.items()],
            "usage": self.usage.to_json(list),
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        self.read_through_ms = max(self.read_through_ms, int(state["read_through_ms"]))
        self.observed_ms = int(state["observed_ms"])
        self.series = {
            tuple((str(a), str(b)) for a, b in key): SeriesState(_pod_key(pk), t, v)
            for key, pk, t, v in state["series"]
        }
        self.last_sample_ms = {_pod_key(key): int(at_ms) for key, at_ms in state["last_sample_ms"]}
        self.usage.restore(state["usage"], _pod_key)


def _pod_key(data: Any) -> PodKey:
    return (str(data[0]), str(data[1]), str(data[2]))


def _uids_by_name(pods: Mapping[str, PodRecord]) -> dict[tuple[str, str], str]:
    """(namespace, name) → uid; a live pod wins over a deleted one of the same name."""
    found: dict[tuple[str, str], str] = {}
    for uid, record in sorted(pods.items(), key=lambda item: item[1].deleted_at_ms is None):
        metadata = record.object.get("metadata") or {}
        found[(metadata.get("namespace", ""), metadata.get("name", ""))] = uid
    return found
