"""Usage from a Prometheus query per Meter (dcgm-exporter, kube-state-metrics, any exporter)."""

from kubemeter.sources.prometheus.client import (
    PrometheusClient,
    PrometheusConnection,
    PrometheusError,
    PrometheusQueryError,
)
from kubemeter.sources.prometheus.query import QueryError, node_scoped_selector, range_query
from kubemeter.sources.prometheus.source import PrometheusSource

__all__ = [
    "PrometheusClient",
    "PrometheusConnection",
    "PrometheusError",
    "PrometheusQueryError",
    "PrometheusSource",
    "QueryError",
    "node_scoped_selector",
    "range_query",
]
