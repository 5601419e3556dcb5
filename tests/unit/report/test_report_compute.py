"""Chargeback arithmetic: units, prices per GPU model, grouping; exact numbers."""

from __future__ import annotations

from pathlib import Path

import pytest
from kubemeter.report.compute import NONE_LABEL, Dimension, build_report
from kubemeter.report.pricing import (
    Pricing,
    PricingError,
    display_unit,
    load_pricing,
    parse_assignments,
)
from kubemeter.report.usage import UsageRow

GIB_HOUR_BYTE_SECONDS = 3600 * 2**30


def row(
    subject: str,
    event_type: str,
    value: float,
    *,
    unit: str = "",
    namespace: str = "",
    gpu_model: str = "",
    day: str = "2026-11-01",
    events: int = 1,
    incomplete: int = 0,
) -> UsageRow:
    return UsageRow(subject, event_type, unit, namespace, gpu_model, day, value, events, incomplete)


PRICING = Pricing(
    currency="EUR",
    unit_prices={"GPU-hours": 2.0, "core-hours": 0.05, "GiB-hours": 0.01},
    gpu_model_prices={"NVIDIA-H100-80GB-HBM3": 4.0, "NVIDIA-H200": 5.0},
)

USAGE = [
    row("team-a", "gpu-seconds", 7200, unit="gpu-seconds", namespace="a", gpu_model="NVIDIA-H100-80GB-HBM3"),
    row(
        "team-a",
        "gpu-seconds",
        3600,
        unit="gpu-seconds",
        namespace="a",
        gpu_model="NVIDIA-H100-80GB-HBM3",
        day="2026-11-02",
    ),
    row("team-a", "cpu-core-seconds", 36000, unit="core-seconds", namespace="a"),
    row("team-a", "memory-byte-seconds", 4 * GIB_HOUR_BYTE_SECONDS, unit="byte-seconds", namespace="a-batch"),
    row(
        "team-b",
        "gpu-seconds",
        1800,
        unit="gpu-seconds",
        namespace="b",
        gpu_model="NVIDIA-H200",
        incomplete=1,
    ),
    row("team-b", "gpu-seconds", 3600, unit="gpu-seconds", namespace="b", gpu_model="NVIDIA-A100-SXM4-80GB"),
    row("team-b", "cpu-core-seconds", 7200, unit="core-seconds", namespace="b"),
]


def test_seconds_become_hours_and_byte_seconds_gib_hours() -> None:
    assert display_unit("gpu-seconds", "gpu-seconds") == display_unit("x", "gpu-seconds")
    assert display_unit("x", "gpu-seconds").name == "GPU-hours"
    assert display_unit("x", "byte-seconds").divisor == GIB_HOUR_BYTE_SECONDS
    # OpenMeter rows carry no unit: the event type's suffix decides
    assert display_unit("cpu-core-seconds", "").name == "core-hours"
    assert display_unit("memory-byte-seconds", "").name == "GiB-hours"
    assert display_unit("api-calls", "calls").name == "calls"
    assert display_unit("api-calls", "").name == "units"


def test_costs_per_customer_price_each_gpu_model_separately() -> None:
    report = build_report(USAGE, [Dimension.SUBJECT], PRICING)
    by_subject = {r.key: r for r in report.rows}
    team_a, team_b = by_subject[("team-a",)], by_subject[("team-b",)]
    assert team_a.quantities == {"gpu-seconds": 3.0, "cpu-core-seconds": 10.0, "memory-byte-seconds": 4.0}
    assert team_a.cost == pytest.approx(3 * 4.0 + 10 * 0.05 + 4 * 0.01)
    # H200 at its own price, A100 at the GPU-hours fallback
    assert team_b.costs["gpu-seconds"] == pytest.approx(0.5 * 5.0 + 1.0 * 2.0)
    assert team_b.incomplete_events == 1
    assert report.total.cost == pytest.approx(team_a.cost + team_b.cost)
    assert report.currency == "EUR" and report.unpriced == []
    assert [c.label for c in report.columns] == ["GPU-hours", "core-hours", "GiB-hours"]


def test_grouping_by_namespace_gpu_model_and_day() -> None:
    report = build_report(USAGE, [Dimension.GPU_MODEL, Dimension.DAY], PRICING)
    keys = {r.key: r.quantities.get("gpu-seconds", 0.0) for r in report.rows}
    assert keys[("NVIDIA-H100-80GB-HBM3", "2026-11-01")] == 2.0
    assert keys[("NVIDIA-H100-80GB-HBM3", "2026-11-02")] == 1.0
    assert keys[(NONE_LABEL, "2026-11-01")] == 0.0  # CPU and memory have no GPU model
    by_namespace = {r.key: r for r in build_report(USAGE, [Dimension.NAMESPACE], PRICING).rows}
    assert by_namespace[("a-batch",)].quantities == {"memory-byte-seconds": 4.0}
    by_meter = {r.key: r for r in build_report(USAGE, [Dimension.METER], PRICING).rows}
    assert by_meter[("cpu-core-seconds",)].quantities == {"cpu-core-seconds": 12.0}


def test_usage_without_a_price_is_listed_not_silently_free() -> None:
    report = build_report(USAGE, [Dimension.SUBJECT], Pricing(unit_prices={"core-hours": 0.05}))
    assert "gpu-seconds (GPU-hours, NVIDIA-H200)" in report.unpriced
    assert "memory-byte-seconds (GiB-hours)" in report.unpriced
    assert report.total.cost == pytest.approx(12 * 0.05)


def test_meter_price_overrides_the_unit_price() -> None:
    pricing = Pricing(unit_prices={"GPU-hours": 2.0}, meter_prices={"gpu-seconds": 1.0})
    report = build_report(USAGE[:1], [Dimension.SUBJECT], pricing)
    assert report.total.cost == pytest.approx(2.0)


def test_two_meters_with_one_unit_get_their_type_in_the_label() -> None:
    usage = [
        row("t", "gpu-seconds", 3600, unit="gpu-seconds"),
        row("t", "gpu-busy-seconds", 3600, unit="gpu-seconds"),
    ]
    labels = {c.label for c in build_report(usage, [Dimension.SUBJECT], PRICING).columns}
    assert labels == {"gpu-seconds (GPU-hours)", "gpu-busy-seconds (GPU-hours)"}


def test_pricing_file_and_flags(tmp_path: Path) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text("currency: CHF\nprices:\n  GPU-hours: 2\ngpuModels:\n  NVIDIA-H200: 5.5\n")
    loaded = load_pricing(path)
    merged = loaded.merged(Pricing(unit_prices=parse_assignments("--price", ["GPU-hours=3"])))
    assert merged.currency == "CHF"
    assert merged.price("gpu-seconds", "GPU-hours", "NVIDIA-H200") == 5.5
    assert merged.price("gpu-seconds", "GPU-hours", "other") == 3.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("prices: [1, 2]\n", "must be a map"),
        ("prices:\n  GPU-hours: cheap\n", "prices.GPU-hours: price must be a number"),
        ("price:\n  GPU-hours: 1\n", "unknown key(s) price"),
    ],
)
def test_a_bad_pricing_file_says_how_to_fix_it(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text(text)
    with pytest.raises(PricingError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_pricing(path)


def test_a_bad_price_flag_shows_the_form() -> None:
    with pytest.raises(PricingError, match="NAME=PRICE"):
        parse_assignments("--price", ["GPU-hours"])
