"""The agent's own metrics (``/metrics``), in a registry of its own."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge

from kubemeter.sources.informer import Informer


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
            "Barriers (a consistent pod LIST, then a bookmark after it) that proved the pod cache "
            "current before windows closed.",
            registry=self.registry,
        )
        self.pods_missed_by_barrier = Counter(
            "kubemeter_agent_pods_missed_by_barrier",
            "Pods whose first event arrived after a barrier that began when they already existed "
            "(their windows may have closed without them).",
            registry=self.registry,
        )
        self.pod_watch_resumes = Counter(
            "kubemeter_agent_pod_watch_resumes",
            "Pod watches started again from the kept resourceVersion (after a restart or a break).",
            registry=self.registry,
        )
        self.pod_relists = Counter(
            "kubemeter_agent_pod_relists",
            "Pod LISTs read from scratch: at the first start, or when the resume point was gone (410).",
            registry=self.registry,
        )
        self.pods_vanished = Counter(
            "kubemeter_agent_pods_vanished",
            "Pods that ended without a final state saying when (flagged complete=false).",
            registry=self.registry,
        )
        self._seen: dict[str, int] = {}
        self.config_reloads = Counter(
            "kubemeter_agent_config_reloads",
            "Configuration files read after a change, by result (applied or refused).",
            ["result"],
            registry=self.registry,
        )
        for result in ("applied", "refused"):
            self.config_reloads.labels(result)  # both exposed from the start, at 0

    def window_closed(self, meter: str, events: int, incomplete: int) -> None:
        self.windows_closed.labels(meter).inc()
        self.events_emitted.labels(meter).inc(events)
        if incomplete:
            self.incomplete_events.labels(meter).inc(incomplete)

    def source_error(self, source: str, error: BaseException) -> None:
        self.source_errors.labels(source).inc()

    def pod_watch(self, pods: Informer) -> None:
        """Bring the counters up to the pod informer's own counts (it is shared by every meter)."""
        for name, counter, count in (
            ("barriers", self.pod_list_barriers, pods.barriers),
            ("missed", self.pods_missed_by_barrier, pods.missed_by_barrier),
            ("resumes", self.pod_watch_resumes, pods.resumes),
            ("relists", self.pod_relists, pods.relists),
            ("vanished", self.pods_vanished, pods.vanished_total),
        ):
            counter.inc(max(0, count - self._seen.get(name, 0)))
            self._seen[name] = max(count, self._seen.get(name, 0))

    def lag(self, meter: str, seconds: float) -> None:
        self.lag_seconds.labels(meter).set(seconds)

    def source_faults(self, faults: Mapping[str, str], meters: Iterable[str]) -> None:
        current = set(meters)
        for gone in self._faulted_meters - current:
            self.source_faulted.remove(gone)  # a removed meter's series ends rather than going stale
        for meter in current:
            self.source_faulted.labels(meter).set(1 if meter in faults else 0)
        self._faulted_meters = current
