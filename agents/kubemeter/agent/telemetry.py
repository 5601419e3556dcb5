"""The agent's own metrics (``/metrics``), in a registry of its own."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge


class Telemetry:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._faulted_meters: set[str] = set()
        self.events_emitted = Counter(
            "kubemeter_agent_events_emitted",
            "Usage events written to the output.",
            ["meter"],
            registry=self.registry,
        )
        self.incomplete_events = Counter(
            "kubemeter_agent_incomplete_readings",
            "Readings flagged complete=false.",
            ["meter"],
            registry=self.registry,
        )
        self.windows_closed = Counter(
            "kubemeter_agent_windows_closed",
            "Windows closed and checkpointed.",
            ["meter"],
            registry=self.registry,
        )
        self.source_errors = Counter(
            "kubemeter_agent_source_errors",
            "Faults reading a source (retried).",
            ["source"],
            registry=self.registry,
        )
        self.lag_seconds = Gauge(
            "kubemeter_agent_lag_seconds",
            "Now minus the end of the last closed window.",
            ["meter"],
            registry=self.registry,
        )
        self.source_faulted = Gauge(
            "kubemeter_agent_source_faulted",
            "1 while the meter's source is behind for a reason (unreachable, refused, no driver), else 0.",
            ["meter"],
            registry=self.registry,
        )
        self.pod_list_barriers = Counter(
            "kubemeter_agent_pod_list_barriers",
            "Consistent pod LISTs that proved the pod cache current before windows closed.",
            registry=self.registry,
        )
        self.pods_missed_by_barrier = Counter(
            "kubemeter_agent_pods_missed_by_barrier",
            "Pod events that arrived after a barrier that should have seen them (pod lived and ended "
            "entirely while the watch lagged).",
            registry=self.registry,
        )
        self._barriers_seen = 0
        self._missed_seen = 0
        self.config_reloads = Counter(
            "kubemeter_agent_config_reloads",
            "Configuration files applied.",
            ["result"],
            registry=self.registry,
        )

    def window_closed(self, meter: str, events: int, incomplete: int) -> None:
        self.windows_closed.labels(meter).inc()
        self.events_emitted.labels(meter).inc(events)
        if incomplete:
            self.incomplete_events.labels(meter).inc(incomplete)

    def source_error(self, source: str, error: BaseException) -> None:
        self.source_errors.labels(source).inc()

    def pod_barrier(self, barriers: int, missed: int) -> None:
        """Bring the counters up to the pod informer's own counts (it is shared by every meter)."""
        self.pod_list_barriers.inc(max(0, barriers - self._barriers_seen))
        self.pods_missed_by_barrier.inc(max(0, missed - self._missed_seen))
        self._barriers_seen = max(barriers, self._barriers_seen)
        self._missed_seen = max(missed, self._missed_seen)

    def lag(self, meter: str, seconds: float) -> None:
        self.lag_seconds.labels(meter).set(seconds)

    def source_faults(self, faults: Mapping[str, str], meters: Iterable[str]) -> None:
        current = set(meters)
        for gone in self._faulted_meters - current:
            self.source_faulted.remove(gone)  # a removed meter's series ends rather than going stale
        for meter in current:
            self.source_faulted.labels(meter).set(1 if meter in faults else 0)
        self._faulted_meters = current
