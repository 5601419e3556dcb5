"""Gauges (memory working set): integrated as a step function over the sample intervals."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from kubemeter.metering.windows import split_by_windows


@dataclass(frozen=True)
class GaugeSample:
    time_ms: int
    value: int


@dataclass(frozen=True)
class GaugeStep:
    """What one sample interval contributes: ``value_ms`` (value * milliseconds) per window, and the
    gap it leaves when the next sample came too late to trust the step."""

    value_ms_by_window: dict[int, int]
    gap_ms_by_window: dict[int, int]


def integrate_gauge(
    previous: GaugeSample, current_time_ms: int, max_step_ms: int, window_ms: int
) -> GaugeStep:
    """Hold ``previous.value`` until ``current_time_ms`` (left step), cut at window boundaries.

    A step longer than ``max_step_ms`` means samples were missed: the value is held for
    ``max_step_ms`` (the normal sampling interval) and the rest is a gap, never zero-filled nor
    averaged.
    """
    held_until_ms = min(current_time_ms, previous.time_ms + max_step_ms)
    values = {
        window_start_ms: previous.value * piece_ms
        for window_start_ms, piece_ms in split_by_windows(previous.time_ms, held_until_ms, window_ms)
    }
    gaps = dict(split_by_windows(held_until_ms, current_time_ms, window_ms))
    return GaugeStep(values, gaps)


def integrate_samples(samples: list[GaugeSample], max_step_ms: int, window_ms: int) -> GaugeStep:
    """The whole series at once (for tests and catch-up): the sum of its steps."""
    values: dict[int, int] = {}
    gaps: dict[int, int] = {}
    for previous, current in itertools.pairwise(samples):
        step = integrate_gauge(previous, current.time_ms, max_step_ms, window_ms)
        for key, amount in step.value_ms_by_window.items():
            values[key] = values.get(key, 0) + amount
        for key, amount in step.gap_ms_by_window.items():
            gaps[key] = gaps.get(key, 0) + amount
    return GaugeStep(values, gaps)
