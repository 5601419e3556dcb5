"""The per-window accumulator every counter/gauge source shares, and a restart in the middle of it."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any, cast

from kubemeter.metering.windows import Window
from kubemeter.sources.base import WindowLedger
from kubemeter.sources.informer import CachedObject
from kubemeter.sources.prometheus import PrometheusClient, PrometheusSource
from kubemeter.sources.prometheus.client import Sample, Series

W = 10_000


def test_amounts_add_up_per_window_and_a_closed_window_takes_nothing_more() -> None:
    ledger: WindowLedger[str] = WindowLedger(closed_through_ms=W)
    ledger.add("pod", {0: 5, W: 7, 2 * W: 1})  # window 0 was closed (flagged) during an outage
    ledger.add("pod", {W: 3})
    ledger.flag("pod", [W], "scrape gap from 11000 to 15000 ms")
    ledger.flag("pod", [W, 0], "a later reason does not replace the first")
    assert ledger.get("pod", 0) == (None, None)
    assert ledger.get("pod", W) == (10, "scrape gap from 11000 to 15000 ms")
    assert ledger.get("other", W) == (None, None)

    ledger.commit(Window(W, 2 * W))
    assert ledger.get("pod", W) == (None, None) and ledger.get("pod", 2 * W) == (1, None)
    ledger.commit(Window(2 * W, 3 * W))
    assert ledger.entries == {}  # nothing left to emit: the key is gone, memory stays bounded


def test_the_ledger_survives_a_restart_through_json() -> None:
    ledger: WindowLedger[tuple[str, str]] = WindowLedger(0)
    ledger.add(("uid-a", "GPU-1"), {0: 4, W: 2})
    ledger.flag(("uid-a", "GPU-1"), [W], "driver reload")
    saved = json.loads(json.dumps(ledger.to_json(list)))
    restored: WindowLedger[tuple[str, str]] = WindowLedger(0)
    restored.restore(saved, lambda key: (str(key[0]), str(key[1])))
    assert restored.entries == ledger.entries and restored.closed_through_ms == 0


def prometheus_source() -> PrometheusSource:
    return PrometheusSource(
        "counter",
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
        "node-a",
        cast(PrometheusClient, None),
        window_ms=W,
        scrape_interval_ms=1_000,
        poll_interval_ms=1_000,
        not_before_ms=0,
        value_scale=Decimal("0.001"),
    )


def energy(from_ms: int, to_ms: int) -> list[Series]:
    labels = {"namespace": "ml", "pod": "train-0", "Hostname": "node-a"}
    samples = [Sample(t, Decimal(300 * t)) for t in range(from_ms, to_ms + 1, 1_000)]
    return [Series(labels, samples)]


def test_a_prometheus_meter_restarted_mid_window_bills_the_window_as_if_it_never_stopped() -> None:
    pods: dict[str, Any] = {"uid-a": CachedObject({"metadata": {"namespace": "ml", "name": "train-0"}})}
    straight = prometheus_source()
    straight.ingest(energy(0, 21_000), 21_000)

    first = prometheus_source()
    first.ingest(energy(0, 14_000), 14_000)
    first.committed(Window(0, W))
    second = prometheus_source()
    second.restore(json.loads(json.dumps(first.snapshot())))
    second.ingest(energy(13_000, 21_000), 21_000)  # the re-read overlaps: nothing counted twice

    (expected,) = straight.readings(Window(W, 2 * W), pods)
    assert expected.value == Decimal(3000)  # 300 mJ/ms x 10 s in J
    assert second.readings(Window(W, 2 * W), pods) == [expected]
    assert second.observed_through_ms() == straight.observed_through_ms()
