"""Billable intervals and their overlap with windows."""

from __future__ import annotations

from dataclasses import dataclass

from kubemeter.metering.windows import Window


@dataclass(frozen=True)
class Interval:
    """``[start_ms, end_ms)``; ``end_ms`` is None while the interval is still open."""

    start_ms: int
    end_ms: int | None = None

    def ends_by(self, moment_ms: int) -> bool:
        return self.end_ms is not None and self.end_ms <= moment_ms


def overlap_ms(interval: Interval, window: Window) -> int:
    """Milliseconds of ``window`` covered by ``interval`` (an open interval runs to the window end)."""
    end_ms = window.end_ms if interval.end_ms is None else min(interval.end_ms, window.end_ms)
    return max(0, end_ms - max(interval.start_ms, window.start_ms))
