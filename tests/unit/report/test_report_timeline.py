"""Charts over time: a bucket that suits the period, every bucket present, exact sums per customer."""

from __future__ import annotations

import pytest
from kubemeter.report.compute import IDLE_LABEL, MAX_SERIES, OTHERS_LABEL, build_timeline
from kubemeter.report.pricing import Pricing
from kubemeter.report.svg import nice_ticks
from kubemeter.report.usage import MAX_BUCKETS, UsageRow, choose_bucket_seconds

DAY, HOUR = 86_400, 3_600


def at(subject: str, bucket_start: str, gpu_seconds: float) -> UsageRow:
    return UsageRow(
        subject, "gpu-seconds", "gpu-seconds", "", "", bucket_start[:10], gpu_seconds, 1, 0, bucket_start
    )


@pytest.mark.parametrize(
    ("span_s", "bucket_s"),
    [
        (180, 60),
        (HOUR, 60),
        (HOUR + 1, 300),
        (3 * HOUR, 300),
        (2 * DAY, HOUR),
        (3 * DAY, 6 * HOUR),
        (30 * DAY, DAY),
    ],
)
def test_the_bucket_gives_at_most_sixty_bars(span_s: float, bucket_s: int) -> None:
    assert choose_bucket_seconds(span_s) == bucket_s
    assert span_s / bucket_s <= MAX_BUCKETS


def test_every_bucket_from_first_to_last_is_present_and_sums_are_exact() -> None:
    usage = [
        at("a", "2026-11-01T10:00:00Z", 3600),
        at("a", "2026-11-01T10:00:00Z", 1800),
        at("b", "2026-11-01T13:00:00Z", 7200),
        at("platform-idle", "2026-11-01T11:00:00Z", 3600),
    ]
    timeline = build_timeline(usage, HOUR, Pricing(unit_prices={"GPU-hours": 2.0}))
    assert [int(start) % DAY // HOUR for start in timeline.buckets] == [10, 11, 12, 13]
    assert timeline.series == ["b", "a", IDLE_LABEL]  # largest customer first (b: 4.0), idle last
    assert timeline.amount("a", timeline.buckets[0]) == pytest.approx(3.0)  # 1.5 GPU-h x 2
    assert timeline.bucket_total(timeline.buckets[2]) == 0.0
    assert timeline.total == pytest.approx(3.0 + 4.0 + 2.0)
    assert timeline.measure == "cost (USD)"


def test_customers_past_the_tenth_are_summed_as_others() -> None:
    usage = [at(f"c{i:02d}", "2026-11-01T10:00:00Z", 100 + i) for i in range(15)]
    timeline = build_timeline(usage, HOUR, Pricing())
    assert len(timeline.series) == MAX_SERIES and timeline.series[-1] == OTHERS_LABEL
    assert timeline.series[0] == "c14"
    assert timeline.total == pytest.approx(sum(100 + i for i in range(15)) / 3600)
    assert timeline.measure == "GPU-hours"


def test_ticks_are_round_and_reach_past_the_largest_column() -> None:
    assert nice_ticks(9.2) == [0, 2, 4, 6, 8, 10]
    assert nice_ticks(0.037) == [0, 0.01, 0.02, 0.03, 0.04]
    assert nice_ticks(0) == [0, 1]
