"""Prometheus metrics of the operator itself (served by ``kubemeter operator --metrics-port``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RECONCILES = Counter(
    "kubemeter_operator_reconciles_total", "Namespace reconciliations, by outcome.", ["outcome"]
)
RECONCILE_SECONDS = Histogram(
    "kubemeter_operator_reconcile_duration_seconds", "Time to reconcile one namespace."
)
CHILD_WRITES = Counter(
    "kubemeter_operator_child_writes_total", "Server-side applies of Collector children, by kind.", ["kind"]
)
STATUS_WRITES = Counter("kubemeter_operator_status_writes_total", "Status patches, by kind.", ["kind"])
DEGRADED_OBJECTS = Gauge(
    "kubemeter_operator_degraded_objects", "Meters, Pipelines and Collectors currently Degraded.", ["kind"]
)
