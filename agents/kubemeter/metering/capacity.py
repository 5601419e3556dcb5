"""A node's capacity over time and its idle part: what nobody held.

The node's life is a list of segments ``[start, end)`` in which its allocatable amount and its state
(``schedulable`` or ``cordoned``) are constant. For every window and state::

    idle = allocatable * time present  -  sum over pods of (amount held * time held)

with the pods' holdings counted inside the node's segments only, so that for every node and window
``sum(pod holdings) + sum(idle) == allocatable * time present`` exactly (integer milli-unit-ms).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from kubemeter.metering.intervals import Interval, overlap_ms
from kubemeter.metering.windows import Window

SCHEDULABLE = "schedulable"
CORDONED = "cordoned"


@dataclass(frozen=True)
class NodeSegment:
    """``[start_ms, end_ms)`` (end None: still so) with constant allocatable amount and state."""

    start_ms: int
    end_ms: int | None
    allocatable_milli: int
    state: str = SCHEDULABLE

    @property
    def interval(self) -> Interval:
        return Interval(self.start_ms, self.end_ms)


@dataclass(frozen=True)
class Holding:
    """One pod's (or device holder's) constant amount over an interval."""

    interval: Interval
    amount_milli: int


@dataclass(frozen=True)
class IdleShare:
    state: str
    capacity_milli_ms: int  # allocatable * time present
    held_milli_ms: int  # what pods held in that time
    idle_milli_ms: int  # capacity - held (negative only when pods hold more than allocatable)


def _intersection(first: Interval, second: Interval) -> Interval | None:
    start_ms = max(first.start_ms, second.start_ms)
    ends = [end for end in (first.end_ms, second.end_ms) if end is not None]
    end_ms = min(ends) if ends else None
    if end_ms is not None and end_ms <= start_ms:
        return None
    return Interval(start_ms, end_ms)


def idle_by_state(
    segments: Sequence[NodeSegment], holdings: Iterable[Holding], window: Window
) -> dict[str, IdleShare]:
    """Capacity, held and idle milli-unit-ms of the window, per node state."""
    holdings = list(holdings)
    capacity: dict[str, int] = {}
    held: dict[str, int] = {}
    for segment in segments:
        present_ms = overlap_ms(segment.interval, window)
        if present_ms == 0:
            continue
        capacity[segment.state] = capacity.get(segment.state, 0) + segment.allocatable_milli * present_ms
        held.setdefault(segment.state, 0)
        for holding in holdings:
            common = _intersection(holding.interval, segment.interval)
            if common is not None:
                held[segment.state] += holding.amount_milli * overlap_ms(common, window)
    return {
        state: IdleShare(state, capacity[state], held[state], capacity[state] - held[state])
        for state in capacity
    }


def held_outside_segments_milli_ms(
    segments: Sequence[NodeSegment], holdings: Iterable[Holding], window: Window
) -> int:
    """What pods held in the window while the node was not there (after it was removed, say):
    billed to them, but no capacity to set it against, so the idle reading says so."""
    outside = 0
    for holding in holdings:
        inside = sum(
            overlap_ms(common, window)
            for segment in segments
            if (common := _intersection(holding.interval, segment.interval)) is not None
        )
        outside += holding.amount_milli * (overlap_ms(holding.interval, window) - inside)
    return outside


def observe(
    segments: list[NodeSegment], moment_ms: int, allocatable_milli: int, state: str
) -> list[NodeSegment]:
    """The segments after seeing the node with ``allocatable_milli`` and ``state`` at ``moment_ms``:
    a change starts a new segment at that moment, no change extends the open one."""
    if segments and segments[-1].end_ms is None:
        last = segments[-1]
        if (last.allocatable_milli, last.state) == (allocatable_milli, state):
            return segments
        moment_ms = max(moment_ms, last.start_ms)
        closed = NodeSegment(last.start_ms, moment_ms, last.allocatable_milli, last.state)
        kept = segments[:-1] + ([closed] if moment_ms > last.start_ms else [])
        return [*kept, NodeSegment(moment_ms, None, allocatable_milli, state)]
    return [*segments, NodeSegment(moment_ms, None, allocatable_milli, state)]


def removed(segments: list[NodeSegment], moment_ms: int) -> list[NodeSegment]:
    """The node is gone from ``moment_ms``: the open segment ends there."""
    if not segments or segments[-1].end_ms is not None:
        return segments
    last = segments[-1]
    end_ms = max(moment_ms, last.start_ms)
    return [*segments[:-1], NodeSegment(last.start_ms, end_ms, last.allocatable_milli, last.state)]
