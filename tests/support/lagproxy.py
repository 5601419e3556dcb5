"""A loopback TCP proxy that delivers everything the server sends a fixed time late.

It stands between an agent and the real API server to make "the agent's view lags the API server"
reproducible: watch events, list answers and errors all arrive ``delay_s`` after the server sent
them, in order, as on a slow or congested link. TLS passes through untouched (the server's
certificate names 127.0.0.1, so only the port changes in the kubeconfig).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator


class LagProxy:
    def __init__(self, upstream_host: str, upstream_port: int, delay_s: float) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.delay_s = delay_s
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="lag proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)
        self.port = int(self._server.sockets[0].getsockname()[1])

    def stop(self) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _listen(self) -> asyncio.Server:
        return await asyncio.start_server(self._connection, "127.0.0.1", 0)

    async def _connection(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            server_r, server_w = await asyncio.open_connection(*self.upstream)
            await asyncio.gather(
                self._pipe(client_r, server_w, 0.0),
                self._pipe(server_r, client_w, self.delay_s),
                return_exceptions=True,
            )
        except OSError:
            pass
        finally:
            self._tasks.discard(task)
            client_w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float) -> None:
        # Chunks are stamped on arrival and written when due, so the delay does not accumulate.
        due: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                at, chunk = await due.get()
                if not chunk:
                    break
                await asyncio.sleep(max(0.0, at - time.monotonic()))
                writer.write(chunk)
                await writer.drain()
            with contextlib.suppress(OSError):
                writer.write_eof()

        delivery = asyncio.create_task(deliver())
        try:
            while chunk := await reader.read(65536):
                due.put_nowait((time.monotonic() + delay_s, chunk))
        finally:
            due.put_nowait((time.monotonic() + delay_s, b""))
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await delivery


@contextlib.contextmanager
def lagging(upstream_host: str, upstream_port: int, delay_s: float) -> Iterator[LagProxy]:
    proxy = LagProxy(upstream_host, upstream_port, delay_s)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()
