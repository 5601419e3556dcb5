"""The agent's /healthz and /metrics endpoint answers plain GETs over real loopback HTTP."""

from __future__ import annotations

import asyncio

import httpx
from kubemeter.agent.http import serve


async def ok() -> tuple[int, str, bytes]:
    return 200, "text/plain", b"fine\n"


async def starting() -> tuple[int, str, bytes]:
    return 503, "application/json", b'{"problems": ["starting"]}'


def test_routes_answer_with_their_status_and_anything_else_is_404_or_405() -> None:
    async def scenario() -> None:
        server = await serve({"/metrics": ok, "/healthz": starting}, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                metrics = await client.get("/metrics?x=1")
                assert (metrics.status_code, metrics.text) == (200, "fine\n")
                health = await client.get("/healthz")
                assert health.status_code == 503 and health.json() == {"problems": ["starting"]}
                assert (await client.get("/nope")).status_code == 404
                assert (await client.post("/metrics", content=b"x")).status_code == 405
            # a client that sends garbage and hangs up does not take the server down
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"\x00\x01garbage")
            writer.close()
            async with httpx.AsyncClient() as client:
                assert (await client.get(f"http://127.0.0.1:{port}/metrics")).status_code == 200
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(scenario())
