"""An emulator of the Run:ai REST endpoints kubemeter uses, on 127.0.0.1 (aiohttp).

- ``POST /api/v2/token`` (form, ``grant_type=client_credentials``) → ``{access_token, token_type,
  expires_in}``; tokens expire on the emulator's clock and can be revoked (a 401 mid-run).
- ``GET /api/v1/workloads`` and ``GET /api/v1/workloads/pods``: ``offset``/``limit`` (1-500) pages
  with ``next`` while more remain.
- ``GET /api/v1/workloads/{id}/pods/{podId}/metrics?metricType&start&end&numberOfSamples``:
  ``{measurements: [{type, values: [{value: "<string>", timestamp}]}]}`` with the samples evenly
  spaced over ``[start, end]``, each the value of ``metric_value(pod, metric, time_ms)``.
- ``outage = True`` answers 503 everywhere, as a control plane that is down.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

MetricValue = Callable[[dict[str, Any], str, int], str | None]


def _iso(moment_ms: int) -> str:
    return (
        datetime.fromtimestamp(moment_ms / 1000, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def _ms(text: str) -> int:
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return int(moment.timestamp()) * 1000 + moment.microsecond // 1000


class RunaiEmulator:
    def __init__(
        self,
        workloads: list[dict[str, Any]],
        pods: list[dict[str, Any]],
        metric_value: MetricValue,
        clock_s: Callable[[], float],
        client_id: str = "kubemeter",
        client_secret: str = "s3cret",
        token_ttl_s: int = 3600,
    ) -> None:
        self.workloads = workloads
        self.pods = pods
        self.metric_value = metric_value
        self.clock_s = clock_s
        self.client_id = client_id
        self.client_secret = client_secret
        self.token_ttl_s = token_ttl_s
        self.tokens: dict[str, float] = {}  # token → expiry on the emulator's clock
        self.outage = False
        self.requests: list[str] = []
        self.unauthorized = 0
        self._counter = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> str:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_post("/api/v2/token", self._token)
        app.router.add_get("/api/v1/workloads", self._workloads)
        app.router.add_get("/api/v1/workloads/pods", self._pods)
        app.router.add_get("/api/v1/workloads/{workload_id}/pods/{pod_id}/metrics", self._metrics)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def revoke_tokens(self) -> None:
        self.tokens.clear()

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests.append(f"{request.method} {request.path}")
        if self.outage:
            return web.json_response({"message": "service unavailable"}, status=503)
        if request.path != "/api/v2/token":
            token = request.headers.get("Authorization", "").removeprefix("Bearer ")
            if self.tokens.get(token, 0) <= self.clock_s():
                self.unauthorized += 1
                return web.json_response({"message": "unauthorized"}, status=401)
        response: web.StreamResponse = await handler(request)
        return response

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        if (form.get("grant_type"), form.get("client_id"), form.get("client_secret")) != (
            "client_credentials",
            self.client_id,
            self.client_secret,
        ):
            return web.json_response({"message": "invalid client credentials"}, status=401)
        token = f"token-{next(self._counter)}"
        self.tokens[token] = self.clock_s() + self.token_ttl_s
        return web.json_response(
            {"access_token": token, "token_type": "Bearer", "expires_in": self.token_ttl_s}
        )

    @staticmethod
    def _page(request: web.Request, items: list[dict[str, Any]], key: str) -> web.Response:
        offset = int(request.query.get("offset", 0))
        limit = int(request.query.get("limit", 50))
        if not 1 <= limit <= 500:
            return web.json_response({"message": "limit must be between 1 and 500"}, status=400)
        body: dict[str, Any] = {key: items[offset : offset + limit]}
        if offset + limit < len(items):
            body["next"] = offset + limit
        return web.json_response(body)

    async def _workloads(self, request: web.Request) -> web.Response:
        return self._page(request, self.workloads, "workloads")

    async def _pods(self, request: web.Request) -> web.Response:
        return self._page(request, self.pods, "pods")

    async def _metrics(self, request: web.Request) -> web.Response:
        pod = next((p for p in self.pods if p["id"] == request.match_info["pod_id"]), None)
        if pod is None or pod["workloadId"] != request.match_info["workload_id"]:
            return web.json_response({"message": "pod not found"}, status=404)
        metric = request.query["metricType"]
        start_ms, end_ms = _ms(request.query["start"]), _ms(request.query["end"])
        count = int(request.query.get("numberOfSamples", 20))
        if not 0 <= count <= 1000:
            return web.json_response({"message": "numberOfSamples must be between 0 and 1000"}, status=400)
        values = []
        for index in range(count):
            time_ms = start_ms + (end_ms - start_ms) * index // max(1, count - 1)
            value = self.metric_value(pod, metric, time_ms)
            if value is not None:
                values.append({"value": value, "timestamp": _iso(time_ms)})
        return web.json_response({"measurements": [{"type": metric, "labels": None, "values": values}]})
