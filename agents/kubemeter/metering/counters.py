"""Cumulative counters: deltas with reset detection, spread exactly over windows."""

from __future__ import annotations

from dataclasses import dataclass

from kubemeter.metering.windows import split_by_windows, window_containing


@dataclass(frozen=True)
class CounterSample:
    """One read of a cumulative counter (for example ``usageCoreNanoSeconds``)."""

    time_ms: int
    value: int
    # When the counted object started (the pod's startTime): a new start means a new counter.
    counter_start_ms: int | None = None


@dataclass(frozen=True)
class CounterDelta:
    amount: int
    # The usage counted since the counter restarted; anything between the previous sample and the
    # restart was never observed.
    reset: bool
    # The interval the amount was accrued over, for spreading it across windows.
    from_ms: int
    to_ms: int


def counter_delta(previous: CounterSample, current: CounterSample) -> CounterDelta:
    """The increase from ``previous`` to ``current``; a counter that went down, or whose object
    restarted, is counted from zero (Prometheus ``increase`` semantics, without extrapolation)."""
    restarted = (
        previous.counter_start_ms is not None
        and current.counter_start_ms is not None
        and current.counter_start_ms != previous.counter_start_ms
    )
    if restarted or current.value < previous.value:
        from_ms = previous.time_ms
        if current.counter_start_ms is not None and current.counter_start_ms > previous.time_ms:
            from_ms = min(current.counter_start_ms, current.time_ms)
        return CounterDelta(current.value, True, from_ms, current.time_ms)
    return CounterDelta(current.value - previous.value, False, previous.time_ms, current.time_ms)


def first_delta(current: CounterSample, not_before_ms: int) -> CounterDelta:
    """The first read of a counter: everything since the object started, clipped to ``not_before_ms``
    by proportion (a pod already running when metering began is billed only from then on)."""
    start_ms = current.counter_start_ms if current.counter_start_ms is not None else current.time_ms
    start_ms = min(start_ms, current.time_ms)
    if start_ms >= not_before_ms:
        return CounterDelta(current.value, False, start_ms, current.time_ms)
    span_ms = current.time_ms - start_ms
    kept_ms = max(0, current.time_ms - not_before_ms)
    amount = current.value * kept_ms // span_ms if span_ms else current.value
    return CounterDelta(amount, False, max(start_ms, not_before_ms), current.time_ms)


def spread(amount: int, from_ms: int, to_ms: int, window_ms: int) -> dict[int, int]:
    """``amount`` accrued over ``[from_ms, to_ms)`` split over windows in proportion to time.

    Integer shares come from a cumulative floor, so they always add up to ``amount`` exactly; a
    zero-length interval lands whole in the window that contains ``to_ms``.
    """
    if to_ms <= from_ms:
        return {window_containing(to_ms, window_ms).start_ms: amount} if amount else {}
    span_ms = to_ms - from_ms
    shares: dict[int, int] = {}
    elapsed_ms = 0
    given = 0
    for window_start_ms, piece_ms in split_by_windows(from_ms, to_ms, window_ms):
        elapsed_ms += piece_ms
        cumulative = amount * elapsed_ms // span_ms
        if cumulative - given:
            shares[window_start_ms] = shares.get(window_start_ms, 0) + cumulative - given
        given = cumulative
    return shares
