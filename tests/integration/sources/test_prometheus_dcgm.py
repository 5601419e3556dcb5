"""A real Prometheus scraping a dcgm-exporter-format exporter with known values bills exactly."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from decimal import Decimal

import pytest
from kubemeter.metering.windows import Window, window_containing
from kubemeter.sources.informer import CachedObject
from kubemeter.sources.prometheus import (
    PrometheusClient,
    PrometheusConnection,
    PrometheusError,
    PrometheusQueryError,
    PrometheusSource,
)

from tests.plugins.prometheus import PrometheusFactory
from tests.support.dcgm_exporter import DcgmExporter, Gpu

pytestmark = pytest.mark.prometheus

SCRAPE_MS = 500
WINDOW_MS = 3_000
PODS = {
    "uid-a": CachedObject({"metadata": {"namespace": "team-a", "name": "train-0", "uid": "uid-a"}}),
    "uid-b": CachedObject({"metadata": {"namespace": "team-b", "name": "infer-0", "uid": "uid-b"}}),
}


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@pytest.fixture
async def dcgm(prometheus_server: PrometheusFactory) -> AsyncIterator[tuple[DcgmExporter, PrometheusClient]]:
    exporter = DcgmExporter(
        [
            Gpu(0, "GPU-a", "node-a", "0.75", watts=300, namespace="team-a", pod="train-0"),
            Gpu(1, "GPU-b", "node-a", "0.25", watts=150, namespace="team-b", pod="infer-0"),
            Gpu(2, "GPU-c", "node-a", "0.5", watts=60),  # unallocated: no pod labels, nobody's usage
            Gpu(3, "GPU-d", "node-b", "1", watts=500, namespace="team-a", pod="train-0"),  # other node
        ]
    )
    url = prometheus_server(
        [{"job_name": "dcgm", "honor_labels": True, "static_configs": [{"targets": [exporter.target]}]}],
        scrape_interval_s=SCRAPE_MS / 1000,
    )
    client = PrometheusClient(PrometheusConnection(url))
    yield exporter, client
    await client.close()
    exporter.close()


def meter(
    client: PrometheusClient, kind: str, query: str, not_before_ms: int, scale: str = "1"
) -> PrometheusSource:
    return PrometheusSource(
        kind,  # type: ignore[arg-type]
        query,
        "node-a",
        client,
        window_ms=WINDOW_MS,
        scrape_interval_ms=SCRAPE_MS,
        poll_interval_ms=200,
        not_before_ms=not_before_ms,
        node_label="Hostname",
        value_scale=Decimal(scale),
    )


async def observe_through(window: Window, *sources: PrometheusSource, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(s.observed_through_ms() >= window.end_ms for s in sources):
        assert time.monotonic() < deadline, f"Prometheus did not cover {window} in {timeout_s} s"
        for source in sources:
            await source.poll()
        await asyncio.sleep(0.2)


async def first_scrape_ms(exporter: DcgmExporter) -> int:
    deadline = time.monotonic() + 30
    while exporter.scrapes == 0:
        assert time.monotonic() < deadline, "Prometheus never scraped the exporter"
        await asyncio.sleep(0.05)
    return now_ms()


def values(source: PrometheusSource, window: Window) -> dict[str, tuple[Decimal, bool, str | None]]:
    return {r.pod_uid: (r.value, r.complete, r.incomplete_reason) for r in source.readings(window, PODS)}


async def test_gpu_seconds_and_energy_are_exact_and_a_bad_query_fails_alone(
    dcgm: tuple[DcgmExporter, PrometheusClient],
) -> None:
    exporter, client = dcgm
    # A window that starts after the first scrape, so every series has a sample left of it.
    window = window_containing(await first_scrape_ms(exporter) + 1_000 + WINDOW_MS, WINDOW_MS)
    busy = meter(client, "gauge", "DCGM_FI_PROF_GR_ENGINE_ACTIVE", exporter.t0_ms)
    energy = meter(client, "counter", "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", exporter.t0_ms, scale="0.001")
    broken = meter(client, "gauge", 'DCGM_FI_DEV_FB_USED{pod=~"("}', exporter.t0_ms)

    await observe_through(window, busy, energy)
    with pytest.raises(PrometheusQueryError):
        await broken.poll()

    assert values(busy, window) == {
        "uid-a": (Decimal("2.25"), True, None),  # 0.75 busy x 3 s
        "uid-b": (Decimal("0.75"), True, None),  # 0.25 busy x 3 s
    }
    assert values(energy, window) == {
        "uid-a": (Decimal(900), True, None),  # 300 W x 3 s, joules
        "uid-b": (Decimal(450), True, None),  # 150 W x 3 s
    }
    assert "rejected" in (broken.fault() or "")
    assert busy.fault() is None and energy.fault() is None


async def test_a_scrape_gap_is_flagged_not_filled(dcgm: tuple[DcgmExporter, PrometheusClient]) -> None:
    exporter, client = dcgm
    busy = meter(client, "gauge", "DCGM_FI_PROF_GR_ENGINE_ACTIVE", exporter.t0_ms)
    energy = meter(client, "counter", "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", exporter.t0_ms, scale="0.001")
    window = window_containing(await first_scrape_ms(exporter) + 1_000 + WINDOW_MS, WINDOW_MS)

    await asyncio.sleep(max(0, window.start_ms + 500 - now_ms()) / 1000)
    exporter.serving = False  # the exporter answers 503 for 1.8 s: more than 2.5 scrape intervals
    await asyncio.sleep(1.8)
    exporter.serving = True
    await observe_through(window, busy, energy)

    (value, complete, reason) = values(busy, window)["uid-a"]
    assert not complete and reason is not None and "scrape gap" in reason and "not filled" in reason
    assert Decimal("0.75") <= value < Decimal("2.25")  # the gap is not billed as if it were busy
    (joules, complete, reason) = values(energy, window)["uid-a"]
    # The counter kept counting through the gap: nothing is lost, but the window says it was a gap.
    assert joules == Decimal(900) and not complete and reason is not None and "scrape gap" in reason


async def test_an_unreachable_prometheus_is_a_fault_that_says_what_to_check() -> None:
    client = PrometheusClient(PrometheusConnection("http://127.0.0.1:9", timeout_s=2))
    source = meter(client, "gauge", "DCGM_FI_PROF_GR_ENGINE_ACTIVE", now_ms() - 10_000)
    with pytest.raises(PrometheusError):
        await source.poll()
    assert "unreachable" in (source.fault() or "") and "spec.source.prometheus.url" in (source.fault() or "")
    await client.close()
