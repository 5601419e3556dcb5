"""Queries become node-scoped raw-sample reads; anything that would extrapolate is refused."""

from __future__ import annotations

from decimal import Decimal

import pytest
from kubemeter.metering.windows import Window
from kubemeter.sources.informer import CachedObject
from kubemeter.sources.prometheus import PrometheusSource, QueryError, node_scoped_selector, range_query
from kubemeter.sources.prometheus.client import Sample, Series, parse_matrix


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("DCGM_FI_DEV_FB_USED", 'DCGM_FI_DEV_FB_USED{node="n-1"}'),
        ('DCGM_FI_DEV_FB_USED{pod!=""}', 'DCGM_FI_DEV_FB_USED{node="n-1", pod!=""}'),
        ('{__name__="up", job="x",}', '{node="n-1", __name__="up", job="x"}'),
        (
            'kube_pod_container_resource_requests{resource="nvidia_com_gpu", host="$node"}',
            'kube_pod_container_resource_requests{resource="nvidia_com_gpu", host="n-1"}',
        ),
    ],
)
def test_selectors_are_scoped_to_this_node(query: str, expected: str) -> None:
    assert node_scoped_selector(query, "node", "n-1") == expected


@pytest.mark.parametrize(
    "query",
    ["rate(x[5m])", "increase(DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION[1h])", "sum by (pod) (x)", "x * 2", ""],
)
def test_expressions_that_extrapolate_or_aggregate_are_refused_with_the_fix(query: str) -> None:
    with pytest.raises(QueryError, match="recording rule"):
        node_scoped_selector(query, "node", "n-1")


def test_a_range_selector_reads_raw_samples() -> None:
    assert range_query('x{node="n"}', 61_250) == 'x{node="n"}[61250ms]'


def test_the_matrix_is_parsed_exactly_and_nan_is_dropped() -> None:
    body = {
        "status": "success",
        "data": {
            "resultType": "matrix",
            "result": [
                {"metric": {"pod": "p"}, "values": [[1714557600.123, "0.412"], [1714557601.123, "NaN"]]}
            ],
        },
    }
    assert parse_matrix(body) == [Series({"pod": "p"}, [Sample(1714557600123, Decimal("0.412"))])]


def series(kind_values: list[tuple[int, str]], pod: str = "train-0") -> Series:
    labels = {"namespace": "ml", "pod": pod, "UUID": "GPU-a"}
    return Series(labels, [Sample(t, Decimal(v)) for t, v in kind_values])


PODS = {"uid-0": CachedObject({"metadata": {"namespace": "ml", "name": "train-0", "uid": "uid-0"}})}


def source(kind: str) -> PrometheusSource:
    return PrometheusSource(
        kind,
        "x",
        "n",
        None,
        window_ms=10_000,
        scrape_interval_ms=1_000,  # type: ignore[arg-type]
        poll_interval_ms=1_000,
        not_before_ms=0,
    )


def test_a_counter_reset_counts_from_zero_and_flags_the_window() -> None:
    meter = source("counter")
    values = [(0, "100"), (1_000, "200"), (2_000, "300"), (3_000, "50")]
    values += [(t, str(50 + (t - 3_000) // 10)) for t in range(4_000, 10_001, 1_000)]
    meter.ingest([series(values)], 11_000)
    (reading,) = meter.readings(Window(0, 10_000), PODS)
    assert reading.value == Decimal(100 + 100 + 50 + 7 * 100)
    assert not reading.complete and "counter reset" in (reading.incomplete_reason or "")


def test_a_gauge_gap_is_flagged_and_not_filled() -> None:
    meter = source("gauge")
    meter.ingest([series([(t, "2") for t in (0, 1_000, 2_000, 7_000, 8_000, 9_000, 10_000)])], 11_000)
    (reading,) = meter.readings(Window(0, 10_000), PODS)
    # held 2 s, then 2.5 s (the longest trusted step) over the gap, then 3 s: 7.5 s x 2
    assert reading.value == Decimal(15)
    assert not reading.complete and "scrape gap from 2000 to 7000 ms" in (reading.incomplete_reason or "")


def test_series_of_pods_not_on_this_node_or_unallocated_gpus_are_skipped() -> None:
    meter = source("gauge")
    unallocated = Series({"UUID": "GPU-b"}, [Sample(0, Decimal(1)), Sample(1_000, Decimal(1))])
    meter.ingest([unallocated, series([(0, "1"), (1_000, "1")], pod="elsewhere")], 2_000)
    assert meter.readings(Window(0, 10_000), PODS) == []
