"""The load every ingest benchmark sends: pre-encoded CloudEvents batches, posted by concurrent
senders over keep-alive connections, each sender posting its next batch when the last one is
acknowledged. Encoding happens before the clock starts, so the senders cost the pipeline under test
as little CPU as they can on a 2-core machine (aiohttp's client: about a third of httpx's CPU per
request here).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp

BATCH_CONTENT_TYPE = "application/cloudevents-batch+json"
# The last whole minute: the gateway refuses times more than two years old or a day ahead.
_END = datetime.now(UTC).replace(second=0, microsecond=0)
_END_TEXT, _START_TEXT = (f"{moment:%Y-%m-%dT%H:%M:%SZ}" for moment in (_END, _END - timedelta(minutes=1)))


def usage_event(source: str, index: int) -> dict[str, Any]:
    """One usage event shaped as kubemeter emits them (about 370 bytes as JSON)."""
    return {
        "specversion": "1.0",
        "id": f"{source}-{index:08d}",
        "source": source,
        "type": "gpu-seconds",
        "subject": f"customer-{index % 7}",
        "time": _END_TEXT,
        "datacontenttype": "application/json",
        "data": {
            "value": 60,
            "unit": "gpu-seconds",
            "window_start": _START_TEXT,
            "window_end": _END_TEXT,
            "namespace": "team-a",
            "pod": f"train-{index}",
            "node": "gpu-0",
            "complete": True,
        },
    }


def event_batches(source: str, events: int, batch_events: int) -> list[bytes]:
    """``events`` events in JSON-array bodies of ``batch_events``; ids unique within ``source``."""
    return [
        json.dumps(
            [usage_event(source, i) for i in range(start, min(start + batch_events, events))],
            separators=(",", ":"),
        ).encode()
        for start in range(0, events, batch_events)
    ]


@dataclass
class Sent:
    """What the senders saw: which bodies were acknowledged, and when the first and last were."""

    acked: set[int] = field(default_factory=set)
    first_sent_s: float = 0.0
    last_acked_s: float = 0.0
    refused: int = 0

    def seconds(self) -> float:
        return self.last_acked_s - self.first_sent_s


async def post_all(
    url: str,
    bodies: list[bytes],
    *,
    senders: int,
    indices: list[int] | None = None,
    retry: bool = True,
    deadline_s: float = 300.0,
    sent: Sent | None = None,
    on_ack: Any = None,
) -> Sent:
    """POST each body (those at ``indices``) once, or until acknowledged with ``retry``, from
    ``senders`` concurrent senders. Bounded: gives up at ``deadline_s``."""
    sent = sent or Sent()
    pending = list(reversed(range(len(bodies)) if indices is None else indices))
    headers = {"Content-Type": BATCH_CONTENT_TYPE}
    give_up_at = time.perf_counter() + deadline_s
    sent.first_sent_s = sent.first_sent_s or time.perf_counter()

    async def sender(session: aiohttp.ClientSession) -> None:
        while pending and time.perf_counter() < give_up_at:
            index = pending.pop()
            while time.perf_counter() < give_up_at:
                try:
                    async with session.post(url, data=bodies[index], headers=headers) as reply:
                        await reply.read()
                        if 200 <= reply.status < 300:
                            sent.acked.add(index)
                            sent.last_acked_s = time.perf_counter()
                            if on_ack is not None:
                                on_ack(len(sent.acked))
                            break
                        sent.refused += 1
                except (aiohttp.ClientError, OSError):
                    pass
                if not retry:
                    break
                await asyncio.sleep(0.1)

    connector = aiohttp.TCPConnector(limit=senders, force_close=False)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(sender(session) for _ in range(senders)))
    return sent
