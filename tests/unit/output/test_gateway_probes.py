"""The gateway's probes over real loopback HTTP on a real on-disk queue: liveness (/livez, /healthz)
answers while the process serves; readiness (/readyz) is 503 while the buffer is full under Block or
the queue is closed, and 200 again once there is room."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
from aiohttp import web
from kubemeter.gateway.app import GatewayApp
from kubemeter.output.queue import DurableQueue, QueueLimits, QueueRecord, WhenFull
from prometheus_client import CollectorRegistry

PAYLOAD = json.dumps({"id": "x", "data": "y" * 900}).encode()


async def probes(client: httpx.AsyncClient) -> tuple[int, int, int]:
    return (
        (await client.get("/livez")).status_code,
        (await client.get("/healthz")).status_code,
        (await client.get("/readyz")).status_code,
    )


def run_gateway(tmp_path: Path, limits: QueueLimits) -> list[tuple[int, int, int]]:
    """Probe answers: empty, after filling to the cap, after delivering one batch, after closing."""

    async def scenario() -> list[tuple[int, int, int]]:
        queue = await DurableQueue.open(tmp_path / "queue.db", limits)
        app = GatewayApp(queue, delivery=None, ingest_token=None, registry=CollectorRegistry())
        runner = web.AppRunner(app.build())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        seen = []
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                seen.append(await probes(client))
                records = [QueueRecord("s", f"e{i}", PAYLOAD) for i in range(10)]
                await queue.enqueue(records)
                seen.append(await probes(client))
                await queue.ack(await queue.lease(10))
                seen.append(await probes(client))
                await queue.close()
                seen.append(await probes(client))
        finally:
            await runner.cleanup()
        return seen

    return asyncio.run(scenario())


def test_readiness_follows_the_buffer_and_liveness_does_not(tmp_path: Path) -> None:
    cap_bytes = 10 * len(PAYLOAD)  # the ten events fill it exactly
    seen = run_gateway(tmp_path, QueueLimits(max_bytes=cap_bytes, when_full=WhenFull.BLOCK))
    assert seen == [(200, 200, 200), (200, 200, 503), (200, 200, 200), (200, 200, 503)]


def test_drop_oldest_stays_ready_at_the_cap(tmp_path: Path) -> None:
    cap_bytes = 10 * len(PAYLOAD)
    seen = run_gateway(tmp_path, QueueLimits(max_bytes=cap_bytes, when_full=WhenFull.DROP_OLDEST))
    assert seen[:3] == [(200, 200, 200), (200, 200, 200), (200, 200, 200)]


def test_readiness_is_false_while_the_batch_it_refused_for_room_would_be_refused_again(
    tmp_path: Path,
) -> None:
    async def scenario() -> list[int]:
        queue = await DurableQueue.open(
            tmp_path / "queue.db", QueueLimits(max_bytes=10 * len(PAYLOAD), when_full=WhenFull.BLOCK)
        )
        app = GatewayApp(queue, delivery=None, ingest_token=None, registry=CollectorRegistry())
        runner = web.AppRunner(app.build())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        seen = []
        batch = [  # each smaller than PAYLOAD: room for four after three are delivered, not before
            {
                "specversion": "1.0",
                "id": f"b{i}",
                "source": "s",
                "type": "t",
                "subject": "s",
                "time": "2026-01-01T00:00:00Z",
                "data": {"value": 1, "pad": "y" * 700},
            }
            for i in range(4)
        ]
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                await queue.enqueue([QueueRecord("s", f"e{i}", PAYLOAD) for i in range(8)])
                seen.append((await client.get("/readyz")).status_code)  # 8 of 10: room for some
                ingest = await client.post(
                    "/api/v1/events",
                    content=json.dumps(batch),
                    headers={"Content-Type": "application/cloudevents-batch+json"},
                )
                seen.append(ingest.status_code)  # four do not fit in two free
                seen.append((await client.get("/readyz")).status_code)
                await queue.ack(await queue.lease(3))  # delivered: now they fit
                seen.append((await client.get("/readyz")).status_code)
        finally:
            await runner.cleanup()
            await queue.close()
        return seen

    assert asyncio.run(scenario()) == [200, 503, 503, 200]
