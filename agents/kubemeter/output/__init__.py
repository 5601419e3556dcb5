"""Where usage events leave a process: the seam between metering and delivery.

Everything that produces events (the agent's meters, the gateway's HTTP ingest) writes through an
:class:`EventOutput`. ``write`` returns only after the events are committed to disk, so a caller may
advance its checkpoint as soon as it returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from kubemeter.events import UsageEvent


class OutputFullError(Exception):
    """The buffer is at its cap and the policy is to push back; retry the same events later."""


class EventOutput(Protocol):
    async def write(self, events: Sequence[UsageEvent]) -> None:
        """Durably accept ``events`` (all or none). Raise :class:`OutputFullError` to push back."""
        ...
