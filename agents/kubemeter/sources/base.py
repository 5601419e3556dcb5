"""The one interface every source implements, and the records it exchanges with the agent.

The agent owns time: it decides when a window closes, asks each source for that window's readings,
writes the events, and only then tells the source the window is committed. A source never emits
events, never sleeps on the agent's behalf and never raises into the agent for a fault it can
describe; it marks the affected readings incomplete instead.

Lifecycle, as the agent drives it::

    source.restore(saved_state)               # after a restart, the state saved with the cursor
    task = asyncio.create_task(source.run())  # observe forever, retrying faults with backoff
    loop:
        horizon = source.observed_through_ms()
        for each closable window W:
            readings = source.readings(W, pods)    # pure w.r.t. the source's state
            ... events written durably ...
            source.committed(W); save source.snapshot() with the cursor
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Generic, Protocol, TypeVar

from kubemeter.metering.windows import Window
from kubemeter.sources.informer import Backoff, CachedObject

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reading:
    """One pod's (or one of its containers' or devices') value for one window, in the meter's unit."""

    pod_uid: str
    value: Decimal
    part: str = ""  # container name or device id; "" for the whole pod; part of the event id
    complete: bool = True
    incomplete_reason: str | None = None
    # What the source knows about the reading that the pod does not say (Run:ai project, GPU model,
    # how a shared GPU was split); merged into the event's data.
    dimensions: Mapping[str, Any] = field(default_factory=dict)
    # Set only on a node-level reading (idle capacity): no pod, ``pod_uid`` keys the event id, and
    # the source names who is billed.
    subject: str | None = None


# The pods the agent knows on this node (live, deleted, restored from the checkpoint), by uid.
PodRecord = CachedObject


class Source(Protocol):
    """A measurement of this node's pods for one meter."""

    # How long past its settle time the agent may hold a window for this source to catch up, or None
    # for the agent's default (two windows). A source that can back-fill later holds longer.
    hold_limit_ms: int | None

    async def run(self) -> None:
        """Observe until cancelled. Faults are retried with backoff and reported through
        :meth:`fault`, never raised."""
        ...

    def observed_through_ms(self) -> int:
        """Everything up to this moment has been observed; windows ending later are not final yet."""
        ...

    def fault(self) -> str | None:
        """Why the source is behind right now (``kubelet unreachable: ...``), or None."""
        ...

    def readings(self, window: Window, pods: Mapping[str, PodRecord]) -> list[Reading]:
        """Readings for a window the agent is closing. A window past :meth:`observed_through_ms`
        (closed anyway after a long fault) must come back with ``complete=False`` and the reason."""
        ...

    def committed(self, window: Window) -> None:
        """Events up to ``window.end_ms`` are on disk; state before it may be dropped."""
        ...

    def snapshot(self) -> dict[str, Any]:
        """JSON-able state to save with the cursor, so a restart resumes exactly."""
        ...

    def restore(self, state: Mapping[str, Any]) -> None: ...


# ---------------------------------------------------------------------------------------------------
# Pieces the sources share


class Progress:
    """How far a source has observed and why it is behind: the two things the agent asks of it."""

    observed_ms: int = 0
    last_error: str | None = None
    hold_limit_ms: int | None = None

    def observed_through_ms(self) -> int:
        return self.observed_ms

    def fault(self) -> str | None:
        return self.last_error


@dataclass
class WindowAmounts:
    """One key's integer amounts per window (by window start) and why a window is incomplete."""

    by_window: dict[int, int] = field(default_factory=dict)
    gaps: dict[int, str] = field(default_factory=dict)

    def to_json(self) -> list[Any]:
        return [{str(k): v for k, v in self.by_window.items()}, {str(k): v for k, v in self.gaps.items()}]

    @classmethod
    def from_json(cls, data: list[Any]) -> WindowAmounts:
        by_window, gaps = data
        return cls({int(k): int(v) for k, v in by_window.items()}, {int(k): str(v) for k, v in gaps.items()})


Key = TypeVar("Key", bound=Hashable)


class WindowLedger(Generic[Key]):
    """Amounts accumulated per key (a pod, a pod and device, ...) and window, until the agent commits
    the window. Amounts and flags for a window already closed (during an outage, flagged) are
    dropped: that window's event is written and its id is final."""

    def __init__(self, closed_through_ms: int) -> None:
        self.closed_through_ms = closed_through_ms
        self.entries: dict[Key, WindowAmounts] = {}

    def entry(self, key: Key) -> WindowAmounts:
        found = self.entries.get(key)
        if found is None:
            found = self.entries[key] = WindowAmounts()
        return found

    def add(self, key: Key, shares: Mapping[int, int]) -> None:
        """Add ``window start -> amount`` to the key's open windows."""
        entry = self.entry(key)
        for window_start_ms, amount in shares.items():
            if window_start_ms >= self.closed_through_ms:
                entry.by_window[window_start_ms] = entry.by_window.get(window_start_ms, 0) + amount

    def flag(self, key: Key, window_starts: Iterable[int], reason: str) -> None:
        """Mark the key's open windows incomplete; the first reason given for a window is kept."""
        entry = self.entry(key)
        for window_start_ms in window_starts:
            if window_start_ms >= self.closed_through_ms:
                entry.gaps.setdefault(window_start_ms, reason)

    def get(self, key: Key, window_start_ms: int) -> tuple[int | None, str | None]:
        """The key's amount for a window (None when nothing was added) and its gap reason."""
        entry = self.entries.get(key)
        if entry is None:
            return None, None
        return entry.by_window.get(window_start_ms), entry.gaps.get(window_start_ms)

    def commit(self, window: Window) -> None:
        """The window's events are on disk: drop what lies before its end, and keys left empty."""
        self.closed_through_ms = max(self.closed_through_ms, window.end_ms)
        for key in list(self.entries):
            entry = self.entries[key]
            entry.by_window = {k: v for k, v in entry.by_window.items() if k >= window.end_ms}
            entry.gaps = {k: v for k, v in entry.gaps.items() if k >= window.end_ms}
            if not entry.by_window and not entry.gaps:
                del self.entries[key]

    def to_json(self, key_to_json: Callable[[Key], Any]) -> dict[str, Any]:
        return {
            "closed_through_ms": self.closed_through_ms,
            "entries": [[key_to_json(key), entry.to_json()] for key, entry in self.entries.items()],
        }

    def restore(self, state: Mapping[str, Any], key_from_json: Callable[[Any], Key]) -> None:
        self.closed_through_ms = max(self.closed_through_ms, int(state["closed_through_ms"]))
        self.entries = {key_from_json(key): WindowAmounts.from_json(entry) for key, entry in state["entries"]}


async def poll_with_backoff(
    poll: Callable[[], Awaitable[None]],
    interval_s: float,
    backoff: Backoff,
    expected: tuple[type[Exception], ...],
    unexpected: Callable[[Exception], None],
) -> None:
    """Call ``poll`` every ``interval_s`` forever. A fault ``poll`` already recorded (one of
    ``expected``) waits out the backoff and tries again; anything else is handed to ``unexpected``
    (so the source can report it) and retried the same way: a source never dies of a fault."""
    while True:
        try:
            await poll()
            backoff.reset()
            await asyncio.sleep(interval_s)
        except asyncio.CancelledError:
            raise
        except expected:
            await asyncio.sleep(backoff.next_delay_s())
        except Exception as error:  # a defect or a surprise from a library: report it, keep going
            log.exception("source poll failed unexpectedly; retrying")
            unexpected(error)
            await asyncio.sleep(backoff.next_delay_s())


class SharedPoller(ABC):
    """A poll loop that every meter of one kind in an agent shares: started by the first meter's
    :meth:`run`, cancelled with the last. A failed poll is reported and retried with backoff; the
    loop never dies. Subclasses define :meth:`poll` and :meth:`describe_failure`."""

    task_name = "shared poller"
    error_source = "poller"

    def __init__(self, poll_interval_s: float, on_error: Callable[[str, BaseException], None]) -> None:
        self.poll_interval_s = poll_interval_s
        self.on_error = on_error
        self.last_error: str | None = None
        self._users = 0
        self._task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        self._users += 1
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self.poll_forever(), name=self.task_name)
        try:
            await asyncio.Event().wait()
        finally:
            self._users -= 1
            if self._users == 0 and self._task is not None:
                self._task.cancel()
                self._task = None

    async def poll_forever(self) -> None:
        backoff = Backoff(initial_s=self.poll_interval_s / 2, max_s=30.0)
        while True:
            try:
                await self.poll()
                backoff.reset()
                await asyncio.sleep(self.poll_interval_s)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the API answered oddly: report, retry, never die
                self.last_error = self.describe_failure(error)
                self.on_error(self.error_source, error)
                log.warning("%s: %s; retrying", self.task_name, self.last_error)
                await asyncio.sleep(backoff.next_delay_s())

    @abstractmethod
    async def poll(self) -> None:
        """One read of what the meters share."""

    def describe_failure(self, error: BaseException) -> str:
        return f"{type(error).__name__}: {error}"
