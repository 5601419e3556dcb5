"""The agent's output: a small spool on the node, forwarded to the gateway.

``write`` commits the events to the spool (SQLite, fsync'd) and returns; a forwarder sends them on
to the gateway in batches and deletes them from the spool only when the gateway acknowledged them,
which it does only after its own commit. A full spool raises :class:`OutputFullError`, so metering
pushes back instead of losing windows.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry

from kubemeter.events import UsageEvent
from kubemeter.output.credentials import SecretFile
from kubemeter.output.delivery import DeliveryCore, DeliveryPolicy
from kubemeter.output.queue import DurableQueue, QueueLimits, QueueRecord, QueueStats
from kubemeter.output.sinks.cloudevents import CloudEventsSink

SPOOL_FILE = "spool.db"
GATEWAY_INGEST_PATH = "/api/v1/events"

# The gateway is close and batches across nodes itself: send soon, in large batches, back off briefly.
FORWARD_POLICY = DeliveryPolicy(
    max_batch_events=1000,
    max_batch_delay_s=0.2,
    initial_backoff_s=0.2,
    max_backoff_s=30.0,
    max_in_flight=1,
    request_timeout_s=30.0,
    unauthorized_recheck_s=30.0,
)


def usage_record(event: UsageEvent) -> QueueRecord:
    payload = json.dumps(event.to_cloudevent(), separators=(",", ":"), ensure_ascii=False).encode()
    return QueueRecord(source=event.source, event_id=event.id, payload=payload)


class SpoolOutput:
    """:class:`~kubemeter.output.EventOutput` for the agent. Open, ``start()`` forwarding, ``write``,
    and on SIGTERM ``close(drain_timeout_s)`` to forward what it can before exiting."""

    def __init__(self, queue: DurableQueue, forwarder: DeliveryCore) -> None:
        self.queue = queue
        self.forwarder = forwarder

    @classmethod
    async def open(
        cls,
        spool_dir: Path,
        gateway_url: str,
        *,
        max_bytes: int,
        token_file: Path | None = None,
        policy: DeliveryPolicy = FORWARD_POLICY,
        registry: CollectorRegistry | None = None,
    ) -> SpoolOutput:
        queue = await DurableQueue.open(spool_dir / SPOOL_FILE, QueueLimits(max_bytes=max_bytes))
        sink = CloudEventsSink(
            gateway_url.rstrip("/") + GATEWAY_INGEST_PATH,
            mode="batch",
            unauthorized_fix=(
                "the gateway refused this agent's ingest token: check the Secret named by "
                "gateway.ingestTokenSecretRef; forwarding resumes when the agent's copy of it changes"
            ),
        )
        credentials = SecretFile(token_file) if token_file else None
        forwarder = DeliveryCore(queue, sink, policy=policy, credentials=credentials, registry=registry)
        return cls(queue, forwarder)

    async def start(self) -> None:
        await self.forwarder.start()

    async def write(self, events: Sequence[UsageEvent]) -> None:
        """Commit ``events`` to the spool (all or none); raises OutputFullError when it is full."""
        await self.queue.enqueue([usage_record(event) for event in events])

    def stats(self) -> QueueStats:
        return self.queue.stats()

    async def close(self, drain_timeout_s: float = 0.0) -> bool:
        """Forward for up to ``drain_timeout_s``, then stop; True when the spool was emptied.
        Whatever is left stays in the spool for the next start."""
        drained = await self.forwarder.drain(drain_timeout_s) if drain_timeout_s > 0 else False
        await self.forwarder.stop()
        await self.queue.close()
        return drained or self.queue.stats().events == 0


class LazySpoolOutput:
    """The agent's output built outside any event loop: the spool opens inside the agent's loop on
    :meth:`start` (forwarding what a previous run left behind) or on the first write."""

    def __init__(self, spool_dir: Path, gateway_url: str, *, max_bytes: int, token_file: Path | None) -> None:
        self.spool_dir = spool_dir
        self.gateway_url = gateway_url
        self.max_bytes = max_bytes
        self.token_file = token_file
        self._output: SpoolOutput | None = None
        self._opening: asyncio.Lock | None = None

    async def start(self) -> SpoolOutput:
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self._output is None:
                output = await SpoolOutput.open(
                    self.spool_dir, self.gateway_url, max_bytes=self.max_bytes, token_file=self.token_file
                )
                await output.start()
                self._output = output
        return self._output

    async def write(self, events: Sequence[UsageEvent]) -> None:
        output = self._output or await self.start()
        await output.write(events)

    async def close(self, drain_timeout_s: float = 0.0) -> bool:
        """On SIGTERM: forward for up to ``drain_timeout_s``; True when the spool is empty."""
        if self._output is None:
            return True
        return await self._output.close(drain_timeout_s)
