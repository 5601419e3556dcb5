"""Stand-in agent ``/healthz`` endpoints for the operator's resync benchmark: one process listening on
``count`` loopback addresses (127.0.30.1, 127.0.30.2, ...) at one port, as agent pods share one
port at their own IPs. Each answers an ``AgentStatusReport`` for its node.

    python -m bench.agent_endpoints COUNT PORT     # prints "ready" once every address listens
"""

from __future__ import annotations

import asyncio
import json
import sys

from aiohttp import web


def address(index: int) -> str:
    return f"127.0.{30 + index // 250}.{index % 250 + 1}"


async def serve(count: int, port: int) -> None:
    async def healthz(request: web.Request) -> web.Response:
        node = f"node-{request.host.split(':')[0]}"
        report = {"node": node, "problems": [], "sourceFaults": {}, "meters": {"bench/cpu": "ok"}}
        return web.Response(body=json.dumps(report), content_type="application/json")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    for index in range(count):
        await web.TCPSite(runner, address(index), port, backlog=16).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), int(sys.argv[2])))
