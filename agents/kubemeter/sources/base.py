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

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Protocol

from kubemeter.metering.windows import Window
from kubemeter.sources.informer import CachedObject


@dataclass(frozen=True)
class Reading:
    """One pod's (or one of its containers' or devices') value for one window, in the meter's unit."""

    pod_uid: str
    value: Decimal
    part: str = ""  # container name or device id; "" for the whole pod; part of the event id
    complete: bool = True
    incomplete_reason: str | None = None


# The pods the agent knows on this node (live, deleted, restored from the checkpoint), by uid.
PodRecord = CachedObject


class Source(Protocol):
    """A measurement of this node's pods for one meter."""

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
