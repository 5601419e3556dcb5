"""Where usage events leave a process: the seam between metering and delivery.

Everything that produces events (the agent's meters, the gateway's HTTP ingest) writes through an
:class:`EventOutput`. ``write`` returns only after the events are committed to disk, so a caller may
advance its checkpoint as soon as it returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from kubemeter.events import UsageEvent

if TYPE_CHECKING:
    from kubemeter.api.rendered import AgentConfig
    from kubemeter.output.spool import LazySpoolOutput


class OutputFullError(Exception):
    """The buffer is at its cap and the policy is to push back; retry the same events later."""


class EventOutput(Protocol):
    async def write(self, events: Sequence[UsageEvent]) -> None:
        """Durably accept ``events`` (all or none). Raise :class:`OutputFullError` to push back."""
        ...


def agent_output(config: AgentConfig, *, token_file: Path | None = None) -> LazySpoolOutput:
    """The agent's :class:`EventOutput`: the node-local spool, forwarded to ``config.gateway_url``
    with the ingest token of ``config.ingest_token_file`` (``token_file`` overrides it).

    Call ``await output.start()`` at startup (forwards what a killed run left in the spool) and
    ``await output.close(drain_timeout_s)`` on SIGTERM.
    """
    from kubemeter.output.spool import LazySpoolOutput

    if token_file is None and config.ingest_token_file:
        token_file = Path(config.ingest_token_file)
    return LazySpoolOutput(
        Path(config.spool_dir), config.gateway_url, max_bytes=config.spool_max_bytes, token_file=token_file
    )
