"""Physical yardsticks measured in the same run as kubemeter's figures: what this disk and this
loopback can do at all, so kubemeter's numbers can be read as fractions of them."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from aiohttp import web

ABOUT = "physical yardsticks: fsync, batched SQLite insert, loopback HTTP"


def fsync_rate(directory: Path, seconds: float = 2.0) -> float:
    """Appends of 512 bytes, each followed by fsync: the ceiling for commits that are really durable."""
    path = directory / "fsync.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        count, deadline = 0, time.perf_counter() + seconds
        started = time.perf_counter()
        while time.perf_counter() < deadline:
            os.write(fd, b"x" * 512)
            os.fsync(fd)
            count += 1
        return count / (time.perf_counter() - started)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)


def sqlite_batched_insert_rate(directory: Path, batch: int = 500, batches: int = 200) -> float:
    """Rows/s inserted in transactions of ``batch`` rows, WAL, ``synchronous=FULL``; ~300-byte rows,
    the size of a usage event."""
    path = directory / "yardstick.sqlite"
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")
        connection.execute("CREATE TABLE events (id TEXT PRIMARY KEY, body BLOB NOT NULL)")
        body = b"e" * 300
        started = time.perf_counter()
        for batch_index in range(batches):
            rows = [(f"{batch_index}-{row}", body) for row in range(batch)]
            connection.execute("BEGIN")
            connection.executemany("INSERT INTO events VALUES (?, ?)", rows)
            connection.execute("COMMIT")
        return batch * batches / (time.perf_counter() - started)
    finally:
        connection.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)


async def _loopback_http_rate(requests: int = 4000, concurrency: int = 32) -> float:
    """Small POSTs/s from httpx to an aiohttp server on 127.0.0.1: the ceiling for one-event requests."""

    async def accept(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=202)

    app = web.Application()
    app.router.add_post("/", accept)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            remaining = requests

            async def worker() -> None:
                nonlocal remaining
                while remaining > 0:
                    remaining -= 1
                    await client.post("/", content=b"{}")

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return requests / (time.perf_counter() - started)
    finally:
        await runner.cleanup()


def run(directory: Path | None = None) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        where = Path(scratch)
        return [
            {
                "name": "yardstick/fsync-rate",
                "value": round(fsync_rate(where)),
                "unit": "fsyncs/s",
                "baseline": None,
            },
            {
                "name": "yardstick/sqlite-batched-insert",
                "value": round(sqlite_batched_insert_rate(where)),
                "unit": "rows/s (batches of 500, synchronous=FULL)",
                "baseline": None,
            },
            {
                "name": "yardstick/loopback-http",
                "value": round(asyncio.run(_loopback_http_rate())),
                "unit": "requests/s",
                "baseline": None,
            },
        ]
