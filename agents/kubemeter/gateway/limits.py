"""Bounds on what HTTP clients may hold: connections, requests in flight, time to send a request.

aiohttp closes a keep-alive connection that stays idle past ``keepalive_timeout`` but puts no cap on
how many connections or requests it serves at once, so a client that opens a thousand connections
and sends nothing (or sends a request a byte at a time) holds memory and file descriptors for as
long as it likes. :class:`ConnectionGuard` sits between the event loop and aiohttp's protocol: it
refuses connections over the cap with a 503, closes a connection that has not sent a complete
request head within the idle timeout, and (as middleware) answers 503 ``Retry-After`` when too many
requests are in flight. Each outcome is counted. Used by the gateway and the local billing API.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge

from kubemeter.api.rendered import LIVENESS_PATH, READINESS_PATH

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_BODY_KEY = web.RequestKey("kubemeter.body", object)
LINGERING_S = 2.0


@dataclass(frozen=True)
class HttpLimits:
    """``idle_timeout_s`` bounds the wait for a request's head, on a new connection and between
    keep-alive requests; ``body_timeout_s`` bounds reading one request body."""

    max_connections: int = 1024
    max_requests_in_flight: int = 64
    idle_timeout_s: float = 15.0
    body_timeout_s: float = 30.0
    # Probes and scrapes must answer under load, so they do not count against the request cap.
    uncapped_paths: frozenset[str] = frozenset({"/healthz", LIVENESS_PATH, READINESS_PATH, "/metrics"})


def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line flags of :class:`HttpLimits`, defaults from it."""
    defaults = HttpLimits()
    parser.add_argument(
        "--max-connections",
        type=int,
        default=defaults.max_connections,
        help="client connections held at once; more are answered 503 and closed",
    )
    parser.add_argument(
        "--max-requests-in-flight",
        type=int,
        default=defaults.max_requests_in_flight,
        help="requests served at once (probes and /metrics aside); more are answered 503 with Retry-After",
    )
    parser.add_argument(
        "--idle-timeout-seconds",
        type=float,
        default=defaults.idle_timeout_s,
        help="a connection that sends no complete request head for this long is closed",
    )
    parser.add_argument(
        "--body-timeout-seconds",
        type=float,
        default=defaults.body_timeout_s,
        help="a request body that takes longer to arrive is answered 408",
    )


def limits_from(args: argparse.Namespace) -> HttpLimits:
    return HttpLimits(
        max_connections=args.max_connections,
        max_requests_in_flight=args.max_requests_in_flight,
        idle_timeout_s=args.idle_timeout_seconds,
        body_timeout_s=args.body_timeout_seconds,
    )


def _busy_response(detail: str) -> bytes:
    body = json.dumps(
        {"type": "about:blank", "title": "Service Unavailable", "status": 503, "detail": detail}
    )
    return (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/problem+json\r\n"
        f"Retry-After: 1\r\nConnection: close\r\nContent-Length: {len(body)}\r\n\r\n{body}"
    ).encode()


class _GuardedConnection(asyncio.Protocol):
    """One client connection: counts itself, times out if no request arrives, then defers to aiohttp."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self.guard = guard
        self.inner = inner
        self.requests = 0
        self.admitted = False
        self._idle_timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        if self.guard.open_connections >= self.guard.limits.max_connections:
            self.guard.connections_refused.inc()
            transport.write(
                _busy_response(
                    f"the server holds {self.guard.limits.max_connections} connections, its cap; "
                    "retry after a second, and reuse one keep-alive connection per client"
                )
            )
            transport.close()
            return
        self.admitted = True
        self.guard.opened()
        loop = asyncio.get_running_loop()
        self._idle_timer = loop.call_later(self.guard.limits.idle_timeout_s, self._idle_timeout)
        self.inner.connection_made(transport)

    def _idle_timeout(self) -> None:
        # Later requests on a kept-alive connection are timed by aiohttp's keepalive_timeout.
        if self.requests == 0 and self._transport is not None and not self._transport.is_closing():
            self.guard.idle_timeouts.inc()
            self._transport.abort()

    def request_started(self) -> None:
        self.requests += 1

    def data_received(self, data: bytes) -> None:
        if self.admitted:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.admitted else None

    def pause_writing(self) -> None:
        if self.admitted:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.admitted:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        if self.admitted:
            self.admitted = False
            self.guard.closed()
            self.inner.connection_lost(exc)


class ConnectionGuard:
    """Caps and timeouts for one HTTP server, with their metrics in ``registry``."""

    def __init__(self, limits: HttpLimits, registry: CollectorRegistry) -> None:
        self.limits = limits
        self.open_connections = 0
        self.requests_in_flight = 0
        self.connections = Gauge("kubemeter_http_connections", "Client connections open", registry=registry)
        self.connections_refused = Counter(
            "kubemeter_http_connections_refused",
            "Connections refused with 503 because max_connections were open",
            registry=registry,
        )
        self.idle_timeouts = Counter(
            "kubemeter_http_idle_timeouts",
            "Connections closed for sending no complete request head within the idle timeout",
            registry=registry,
        )
        self.in_flight = Gauge(
            "kubemeter_http_requests_in_flight", "Requests being served (capped paths)", registry=registry
        )
        self.requests_refused = Counter(
            "kubemeter_http_requests_refused",
            "Requests refused: busy (503, too many in flight) or body_timeout (408, body too slow)",
            ["reason"],
            registry=registry,
        )

    def opened(self) -> None:
        self.open_connections += 1
        self.connections.set(self.open_connections)

    def closed(self) -> None:
        self.open_connections -= 1
        self.connections.set(self.open_connections)

    def protocol_factory(self, server: web.Server) -> Callable[[], asyncio.Protocol]:
        return lambda: _GuardedConnection(self, server())

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        transport = request.transport
        connection = transport.get_protocol() if transport is not None else None
        if isinstance(connection, _GuardedConnection):
            connection.request_started()
        if request.path in self.limits.uncapped_paths:
            return await handler(request)
        if self.requests_in_flight >= self.limits.max_requests_in_flight:
            self.requests_refused.labels("busy").inc()
            detail = (
                f"{self.limits.max_requests_in_flight} requests are in flight, the server's cap; "
                "retry after the Retry-After seconds"
            )
            body = json.dumps(
                {"type": "about:blank", "title": "Service Unavailable", "status": 503, "detail": detail}
            )
            return web.Response(
                status=503, body=body, content_type="application/problem+json", headers={"Retry-After": "1"}
            )
        self.requests_in_flight += 1
        self.in_flight.set(self.requests_in_flight)
        try:
            return await handler(request)
        finally:
            self.requests_in_flight -= 1
            self.in_flight.set(self.requests_in_flight)

    async def read_body(self, request: web.Request, max_bytes: int) -> bytes:
        """The raw body, within ``body_timeout_s``; raises the 408 or 413 to answer. The outcome
        is kept on the request, so a second call (a handler that peeks first) gets the same."""
        outcome = request.get(_BODY_KEY)
        if outcome is None:
            try:
                async with asyncio.timeout(self.limits.body_timeout_s):
                    outcome = await _read_at_most(request, max_bytes)
            except BodyRefused as refused:
                outcome = refused
            except TimeoutError:
                self.requests_refused.labels("body_timeout").inc()
                outcome = BodyRefused(
                    408,
                    "Request Timeout",
                    f"the body did not arrive within {self.limits.body_timeout_s:g} s; send it at once",
                )
            request[_BODY_KEY] = outcome
        if isinstance(outcome, BodyRefused):
            raise outcome
        assert isinstance(outcome, bytes)
        return outcome


class BodyRefused(Exception):
    """The request body is refused with this status; ``detail`` says what to do instead."""

    def __init__(self, status: int, title: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail


async def _read_at_most(request: web.Request, max_bytes: int) -> bytes:
    declared = request.content_length
    if declared is not None and declared > max_bytes:
        raise BodyRefused(413, "Payload Too Large", f"send at most {max_bytes} bytes per request")
    body = bytearray()
    async for chunk in request.content.iter_any():
        body += chunk
        if len(body) > max_bytes:
            raise BodyRefused(413, "Payload Too Large", f"send at most {max_bytes} bytes per request")
    return bytes(body)


def make_runner(app: web.Application, limits: HttpLimits) -> web.AppRunner:
    """An AppRunner that leaves Content-Encoding to the handler (aiohttp would inflate a body before
    any size limit) and times idle keep-alive connections out after ``idle_timeout_s``."""
    return web.AppRunner(
        app,
        access_log=None,
        auto_decompress=False,
        keepalive_timeout=limits.idle_timeout_s,
        # After answering a request whose body was not read (408, 413), aiohttp drains the rest for
        # this long so the client sees the answer before the close; its default (10 s) would let a
        # slow client hold the connection five times longer than the body timeout allowed.
        lingering_time=LINGERING_S,
    )


async def start_site(runner: web.AppRunner, guard: ConnectionGuard, host: str, port: int) -> asyncio.Server:
    """Listen on ``host:port`` with every connection behind ``guard`` (instead of ``web.TCPSite``)."""
    server = runner.server
    assert server is not None, "call runner.setup() first"
    loop = asyncio.get_running_loop()
    return await loop.create_server(guard.protocol_factory(server), host, port, reuse_address=True)
