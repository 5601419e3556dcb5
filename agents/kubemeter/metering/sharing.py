"""Devices held by several pods at once (a shared ResourceClaim): who gets how much of a window.

A device is split **equally among the pods holding it at each instant**: a pod holding it alone gets
all of that time, two pods holding it together get half each. Shares are exact fractions inside;
the integer milli-device-milliseconds handed out are rounded by largest remainder, so they always
add up to exactly ``1000 * (time the device had a holder)`` and each is within one milli-device-ms
(10^-6 device-seconds) of its exact share.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from fractions import Fraction

from kubemeter.metering.intervals import Interval
from kubemeter.metering.windows import Window

DEVICE_MILLI = 1000  # one whole device, in milli-devices


def _clipped(interval: Interval, window: Window) -> tuple[int, int] | None:
    start_ms = max(interval.start_ms, window.start_ms)
    end_ms = window.end_ms if interval.end_ms is None else min(interval.end_ms, window.end_ms)
    return (start_ms, end_ms) if end_ms > start_ms else None


def largest_remainder(exact: Mapping[str, Fraction]) -> dict[str, int]:
    """Integers that add up to ``round(sum(exact))`` (an integer sum here), each the floor of its
    exact value or one more; the largest remainders (ties: smallest key) get the extra units."""
    floors = {key: value.numerator // value.denominator for key, value in exact.items()}
    total = sum(exact.values(), Fraction(0))
    missing = int(total) - sum(floors.values()) if total.denominator == 1 else 0
    by_remainder = sorted(exact, key=lambda key: (-(exact[key] - floors[key]), key))
    for key in by_remainder[:missing]:
        floors[key] += 1
    return floors


def split_among_holders(
    holders: Mapping[str, Interval], window: Window, amount_milli: int = DEVICE_MILLI
) -> dict[str, int]:
    """Milli-unit-milliseconds of one device each holder gets in ``window``.

    ``holders`` maps a holder (pod uid) to the interval it holds the device. At every instant the
    device's ``amount_milli`` is divided equally among the holders holding it then.
    """
    pieces = {key: span for key, interval in holders.items() if (span := _clipped(interval, window))}
    if not pieces:
        return {}
    moments = sorted({moment for span in pieces.values() for moment in span})
    exact: dict[str, Fraction] = dict.fromkeys(pieces, Fraction(0))
    for segment_start_ms, segment_end_ms in itertools.pairwise(moments):
        active = [
            key for key, (start, end) in pieces.items() if start <= segment_start_ms and end >= segment_end_ms
        ]
        if not active:
            continue
        share = Fraction(amount_milli * (segment_end_ms - segment_start_ms), len(active))
        for key in active:
            exact[key] += share
    return {key: amount for key, amount in largest_remainder(exact).items() if amount}


def covered_ms(holders: Mapping[str, Interval], window: Window) -> int:
    """Milliseconds of ``window`` in which at least one holder holds the device."""
    spans = sorted(span for interval in holders.values() if (span := _clipped(interval, window)))
    covered, reach_ms = 0, window.start_ms
    for start_ms, end_ms in spans:
        start_ms = max(start_ms, reach_ms)
        if end_ms > start_ms:
            covered += end_ms - start_ms
            reach_ms = end_ms
    return covered


def union_of(intervals: list[Interval]) -> list[Interval]:
    """The same moments as disjoint intervals, in order (an open interval swallows what follows)."""
    merged: list[Interval] = []
    for interval in sorted(intervals, key=lambda i: i.start_ms):
        if merged:
            last = merged[-1]
            if last.end_ms is None:
                continue
            if interval.start_ms <= last.end_ms:
                end_ms = None if interval.end_ms is None else max(last.end_ms, interval.end_ms)
                merged[-1] = Interval(last.start_ms, end_ms)
                continue
        merged.append(interval)
    return merged
