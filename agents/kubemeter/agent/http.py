"""The agent's own HTTP endpoint (``/healthz``, ``/metrics``): two GET routes on asyncio streams.

A web framework would cost the agent more memory than everything it meters (aiohttp is ~16 MiB of
RSS); Prometheus and the kubelet's probes only ever send a plain GET.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus

# A route answers (status, content type, body).
Handler = Callable[[], Awaitable[tuple[int, str, bytes]]]
MAX_REQUEST_HEAD_BYTES = 16 * 1024


async def serve(routes: Mapping[str, Handler], host: str, port: int) -> asyncio.Server:
    """Start serving ``routes`` (path -> handler, query strings ignored); close the server to stop."""

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
            if len(head) > MAX_REQUEST_HEAD_BYTES:
                raise ValueError("request head too large")
            method, target, _version = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            handler = routes.get(target.split("?", 1)[0])
            if method not in ("GET", "HEAD"):
                status, content_type, body = 405, "text/plain", b"only GET\n"
            elif handler is None:
                status, content_type, body = 404, "text/plain", b"not found\n"
            else:
                status, content_type, body = await handler()
            reason = HTTPStatus(status).phrase
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode("latin-1")
            )
            if method != "HEAD":
                writer.write(body)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError, OSError):
            pass  # a probe that hung up or sent garbage gets nothing
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    return await asyncio.start_server(connection, host, port)
