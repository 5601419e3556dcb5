"""The metering core keeps its promises in exact numbers."""

from __future__ import annotations

import itertools
from decimal import Decimal

import pytest
from kubemeter.metering import (
    CounterSample,
    GaugeSample,
    Interval,
    Window,
    counter_delta,
    event_id,
    overlap_ms,
    parse_quantity_milli,
    unit_seconds,
    window_containing,
    windows_between,
)
from kubemeter.metering.counters import first_delta, spread
from kubemeter.metering.gauges import integrate_gauge, integrate_samples
from kubemeter.metering.quantities import exact_unit_seconds

T0 = 1_700_000_000_000  # a moment aligned to 10 s and 60 s windows


def test_windows_are_aligned_to_the_clock_not_to_the_agent() -> None:
    minute_ms = 60_000
    assert window_containing(T0 + 1_234, minute_ms) == Window(1_699_999_980_000, 1_700_000_040_000)
    assert window_containing(T0, 10_000) == Window(T0, T0 + 10_000)
    assert window_containing(T0 + 10_000, 10_000).start_ms == T0 + 10_000


def test_windows_between_continue_from_an_unaligned_cursor_without_gap_or_overlap() -> None:
    # after the window length changes from 10 s to 15 s at T0 + 10 s
    windows = list(windows_between(T0 + 10_000, T0 + 60_000, 15_000))
    assert windows[0].start_ms == T0 + 10_000
    assert all(a.end_ms == b.start_ms for a, b in itertools.pairwise(windows))
    assert all(w.end_ms % 15_000 == 0 for w in windows)
    assert windows[-1].end_ms <= T0 + 60_000


def test_seven_second_job_is_billed_seven_gpu_seconds() -> None:
    job = Interval(T0 + 3_000, T0 + 10_000)
    gpu_milli = parse_quantity_milli("1")
    milli_gpu_ms = sum(
        gpu_milli * overlap_ms(job, window) for window in windows_between(T0, T0 + 60_000, 5_000)
    )
    assert unit_seconds(milli_gpu_ms) == 7


def test_a_job_straddling_a_boundary_is_split_exactly_between_windows() -> None:
    job = Interval(T0 + 8_500, T0 + 11_250)
    assert overlap_ms(job, Window(T0, T0 + 10_000)) == 1_500
    assert overlap_ms(job, Window(T0 + 10_000, T0 + 20_000)) == 1_250
    assert overlap_ms(job, Window(T0 + 20_000, T0 + 30_000)) == 0


def test_a_running_pod_fills_the_window_up_to_its_end() -> None:
    assert overlap_ms(Interval(T0 - 5_000, None), Window(T0, T0 + 10_000)) == 10_000


@pytest.mark.parametrize(
    ("quantity", "milli"),
    [
        ("500m", 500),
        ("2", 2000),
        ("1Gi", 1073741824000),
        ("1.5Gi", 1610612736000),
        ("128974848", 128974848000),
        ("129e6", 129000000000),
        ("1k", 1_000_000),
        ("1n", 1),  # rounded up to one milli, as Kubernetes does
        (8, 8000),
    ],
)
def test_quantities_parse_to_exact_milli_units(quantity: str | int, milli: int) -> None:
    assert parse_quantity_milli(quantity) == milli


def test_a_malformed_quantity_says_how_to_write_one() -> None:
    with pytest.raises(ValueError, match="500m"):
        parse_quantity_milli("lots")


def test_values_are_exact_decimals_not_float_sums() -> None:
    # 3 x 0.1 CPU-second, summed as integers, is exactly 0.3
    assert unit_seconds(3 * 100 * 1000) == 0.3
    assert exact_unit_seconds(3 * 100 * 1000) == Decimal("0.3")
    # 256 MiB held for 7.123 s
    assert unit_seconds(parse_quantity_milli("256Mi") * 7_123) == 1912065753.088


def test_counter_delta_is_the_plain_difference() -> None:
    delta = counter_delta(CounterSample(T0, 5_000), CounterSample(T0 + 10_000, 7_500))
    assert (delta.amount, delta.reset) == (2_500, False)


def test_counter_reset_counts_the_new_value_from_zero() -> None:
    delta = counter_delta(CounterSample(T0, 9_000_000), CounterSample(T0 + 10_000, 1_500))
    assert (delta.amount, delta.reset) == (1_500, True)


def test_a_restarted_object_is_a_reset_even_if_the_counter_grew() -> None:
    previous = CounterSample(T0, 100, counter_start_ms=T0 - 50_000)
    current = CounterSample(T0 + 10_000, 900, counter_start_ms=T0 + 4_000)
    delta = counter_delta(previous, current)
    assert (delta.amount, delta.reset, delta.from_ms) == (900, True, T0 + 4_000)


def test_the_first_read_of_a_pod_counts_from_the_pod_start() -> None:
    delta = first_delta(CounterSample(T0 + 10_000, 3_000, counter_start_ms=T0 + 7_000), T0)
    assert (delta.amount, delta.from_ms) == (3_000, T0 + 7_000)


def test_the_first_read_of_an_old_pod_bills_only_since_metering_began() -> None:
    delta = first_delta(CounterSample(T0 + 10_000, 10_000, counter_start_ms=T0 - 90_000), T0)
    assert (delta.amount, delta.from_ms) == (1_000, T0)


def test_a_delta_spread_over_windows_adds_up_exactly() -> None:
    shares = spread(1_000_003, T0 + 7_000, T0 + 23_000, 10_000)
    assert shares == {T0: 187_500, T0 + 10_000: 625_002, T0 + 20_000: 187_501}
    assert sum(shares.values()) == 1_000_003


def test_gauge_integration_holds_each_sample_until_the_next() -> None:
    samples = [GaugeSample(T0, 100), GaugeSample(T0 + 4_000, 300), GaugeSample(T0 + 14_000, 0)]
    step = integrate_samples(samples, max_step_ms=10_000, window_ms=10_000)
    assert step.value_ms_by_window == {T0: 100 * 4_000 + 300 * 6_000, T0 + 10_000: 300 * 4_000}
    assert step.gap_ms_by_window == {}


def test_a_missed_sample_is_a_flagged_gap_never_zero_or_average() -> None:
    step = integrate_gauge(GaugeSample(T0, 100), T0 + 35_000, max_step_ms=10_000, window_ms=10_000)
    assert step.value_ms_by_window == {T0: 100 * 10_000}
    assert step.gap_ms_by_window == {T0 + 10_000: 10_000, T0 + 20_000: 10_000, T0 + 30_000: 5_000}


def test_event_ids_are_deterministic_and_ignore_everything_but_identity() -> None:
    first = event_id("prod", "team-a/gpu", "uid-1", T0)
    assert first == event_id("prod", "team-a/gpu", "uid-1", T0)
    assert (
        len(
            {
                first,
                event_id("prod", "team-a/gpu", "uid-1", T0 + 10_000),
                event_id("prod", "team-a/gpu", "uid-2", T0),
                event_id("dev", "team-a/gpu", "uid-1", T0),
                event_id("prod", "team-a/cpu", "uid-1", T0),
                event_id("prod", "team-a/gpu", "uid-1", T0, part="GPU-0"),
            }
        )
        == 6
    )
