"""Clock-aligned windows: ``[start_ms, end_ms)`` with ``start_ms % window_ms == 0``.

Aligning to the epoch (not to the agent's start) is what makes a window, and therefore an event id,
the same on every node and after every restart.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Window:
    start_ms: int
    end_ms: int

    def __post_init__(self) -> None:
        if self.end_ms <= self.start_ms:
            raise ValueError(f"window end {self.end_ms} must be after its start {self.start_ms}")

    @property
    def duration_ms(self) -> int:
        return self.end_ms - self.start_ms


def window_containing(moment_ms: int, window_ms: int) -> Window:
    """The aligned window that contains ``moment_ms`` (a window owns its start, not its end)."""
    if window_ms <= 0:
        raise ValueError(f"window length must be positive, got {window_ms} ms")
    start_ms = moment_ms - moment_ms % window_ms
    return Window(start_ms, start_ms + window_ms)


def next_boundary_ms(moment_ms: int, window_ms: int) -> int:
    """The first aligned boundary strictly after ``moment_ms``."""
    return window_containing(moment_ms, window_ms).end_ms


def windows_between(cursor_ms: int, horizon_ms: int, window_ms: int) -> Iterator[Window]:
    """Windows from ``cursor_ms`` up to (not past) ``horizon_ms``, each ending on an aligned boundary.

    The first window starts at ``cursor_ms`` even if that is not aligned: after a change of window
    length the meter continues from where it stopped, so nothing is skipped or counted twice.
    """
    start_ms = cursor_ms
    while True:
        end_ms = next_boundary_ms(start_ms, window_ms)
        if end_ms > horizon_ms:
            return
        yield Window(start_ms, end_ms)
        start_ms = end_ms


def split_by_windows(start_ms: int, end_ms: int, window_ms: int) -> list[tuple[int, int]]:
    """``[start_ms, end_ms)`` cut at aligned boundaries: ``[(window_start_ms, overlap_ms), ...]``."""
    pieces: list[tuple[int, int]] = []
    cursor_ms = start_ms
    while cursor_ms < end_ms:
        window = window_containing(cursor_ms, window_ms)
        piece_end_ms = min(window.end_ms, end_ms)
        pieces.append((window.start_ms, piece_end_ms - cursor_ms))
        cursor_ms = piece_end_ms
    return pieces
