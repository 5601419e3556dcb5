"""Output benchmark: gateway durable ingest and ack latency, drain to the local billing API, disk
bytes per event, and raw batched SQLite inserts on the same disk in the same run (the yardstick).

``run()`` returns figures ``{name, value, unit, baseline}`` and prints them. The gateway and the
local billing API run as real processes (``kubemeter gateway``, ``kubemeter sink``); this process
is the load: pre-encoded CloudEvents batches over aiohttp.

The machine is shared, so the yardstick and the gateway's ingest are measured in alternation,
``ROUNDS`` times (yardstick, then ingest, then yardstick, ...); the figures are the medians, and the
fraction is the median of each round's ingest / yardstick. Every round is printed.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from kubemeter.api.rendered import GatewayConfig
from kubemeter.events import UsageEvent

ABOUT = "gateway ingest, ack latency, drain, disk bytes per event"

REPO_ROOT = Path(__file__).resolve().parents[1]
INGEST_EVENTS = 200_000  # per round
ROUNDS = 3
INGEST_BATCH_EVENTS = 1000
INGEST_CONCURRENCY = 8
PACED_EVENTS_PER_S = 10_000
PACED_BATCH_EVENTS = 100
PACED_SECONDS = 3.0
YARDSTICK_BATCH_ROWS = 500
YARDSTICK_BATCHES = 200


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _event(prefix: str, n: int) -> dict[str, Any]:
    from datetime import UTC, datetime

    return UsageEvent(
        id=f"{prefix}-{n:08d}",
        source="kubemeter/bench",
        type="io.kubemeter.gpu.seconds",
        subject=f"team-{n % 16}",
        time=datetime(2025, 8, 22, 12, n % 60, tzinfo=UTC),
        data={
            "value": 60.0,
            "unit": "s",
            "window_start": "2025-08-22T11:59:00Z",
            "window_end": "2025-08-22T12:00:00Z",
            "namespace": "vision",
            "pod": f"trainer-{n % 500}",
            "node": "gpu-07",
            "complete": True,
        },
    ).to_cloudevent()


def _bodies(prefix: str, events: int, batch: int) -> list[bytes]:
    return [
        json.dumps([_event(prefix, n) for n in range(start, start + batch)], separators=(",", ":")).encode()
        for start in range(0, events, batch)
    ]


def sqlite_yardstick(directory: Path, payload: bytes) -> float:
    """Rows/s in transactions of 500 rows, WAL, synchronous=FULL, rows the size of our events."""
    path = directory / "yardstick.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")
        connection.execute("CREATE TABLE events (seq INTEGER PRIMARY KEY, payload BLOB NOT NULL)")
        started = time.perf_counter()
        for _ in range(YARDSTICK_BATCHES):
            connection.execute("BEGIN")
            connection.executemany(
                "INSERT INTO events (payload) VALUES (?)", [(payload,)] * YARDSTICK_BATCH_ROWS
            )
            connection.execute("COMMIT")
        return YARDSTICK_BATCH_ROWS * YARDSTICK_BATCHES / (time.perf_counter() - started)
    finally:
        connection.close()


def _start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "kubemeter_cli", *args],
            stdout=sink,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
        )


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def _wait_ready(session: aiohttp.ClientSession, url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            async with session.get(url) as reply:
                if reply.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout_s} s")


async def _post(session: aiohttp.ClientSession, url: str, body: bytes) -> float:
    started = time.perf_counter()
    headers = {"Content-Type": "application/cloudevents-batch+json"}
    async with session.post(url, data=body, headers=headers) as reply:
        await reply.read()
        if reply.status != 204:
            raise RuntimeError(f"gateway answered {reply.status}: {await reply.text()}")
    return time.perf_counter() - started


async def _send_all(session: aiohttp.ClientSession, url: str, bodies: list[bytes]) -> None:
    """Every body, ``INGEST_CONCURRENCY`` requests at a time, each sent once it is acknowledged."""
    pending = list(reversed(bodies))

    async def sender() -> None:
        while pending:
            await _post(session, url, pending.pop())

    await asyncio.gather(*(sender() for _ in range(INGEST_CONCURRENCY)))


async def _measure(directory: Path) -> list[dict[str, Any]]:
    payload = json.dumps(_event("yardstick", 0), separators=(",", ":")).encode()

    sink_port = _free_port()
    gateway_port = _free_port()
    config = GatewayConfig.model_validate(
        {
            "cluster": "bench",
            "collector": "bench",
            "namespace": "bench",
            "output": {
                "type": "openmeter",
                "url": f"http://127.0.0.1:{sink_port}",
                "batch": {"maxEvents": 1000, "maxDelaySeconds": 0.05},
                "retry": {"initialBackoffSeconds": 1, "maxBackoffSeconds": 2},
                "rateLimit": {"requestsPerSecond": 10_000},
            },
            "bufferMaxBytes": 8 * 2**30,
            "dataDir": str(directory / "pv"),
            "listenAddress": f"127.0.0.1:{gateway_port}",
        }
    )
    (directory / "gateway.yaml").write_text(config.to_yaml())
    gateway = _start(["gateway", "--config", str(directory / "gateway.yaml")], directory / "gateway.log")
    sink: subprocess.Popen[bytes] | None = None
    gateway_url = f"http://127.0.0.1:{gateway_port}"
    ingest_url = f"{gateway_url}/api/v1/events"
    bulk = _bodies("bulk", INGEST_EVENTS, INGEST_BATCH_EVENTS)
    # Each round sends new ids (the same bytes otherwise), so every event is stored, none deduplicated.
    rounds = [[body.replace(b'"id":"bulk-', f'"id":"r{n}-'.encode()) for body in bulk] for n in range(ROUNDS)]
    paced_requests = int(PACED_EVENTS_PER_S * PACED_SECONDS / PACED_BATCH_EVENTS)
    paced = _bodies("paced", paced_requests * PACED_BATCH_EVENTS, PACED_BATCH_EVENTS)
    try:
        connector = aiohttp.TCPConnector(limit=INGEST_CONCURRENCY * 2)
        async with aiohttp.ClientSession(connector=connector) as session:
            await _wait_ready(session, f"{gateway_url}/readyz")
            # The billing API is down while ingest is measured, so delivery does not compete.
            yardsticks_per_s: list[float] = []
            ingests_per_s: list[float] = []
            for number, bodies in enumerate(rounds, 1):
                yardsticks_per_s.append(await asyncio.to_thread(sqlite_yardstick, directory, payload))
                started = time.perf_counter()
                await _send_all(session, ingest_url, bodies)
                ingests_per_s.append(INGEST_EVENTS / (time.perf_counter() - started))
                print(
                    f"round {number}: yardstick {yardsticks_per_s[-1]:,.0f} rows/s, gateway ingest "
                    f"{ingests_per_s[-1]:,.0f} events/s, "
                    f"fraction {ingests_per_s[-1] / yardsticks_per_s[-1]:.3f}",
                    flush=True,
                )
            ingest_per_s = statistics.median(ingests_per_s)
            yardstick_per_s = statistics.median(yardsticks_per_s)
            fraction = statistics.median(i / y for i, y in zip(ingests_per_s, yardsticks_per_s, strict=True))

            # 10,000 events/s as agents send them: a batch of 100 every 10 ms, on schedule.
            interval_s = PACED_BATCH_EVENTS / PACED_EVENTS_PER_S
            loop = asyncio.get_running_loop()
            start_at = loop.time() + 0.1

            async def paced_send(index: int, body: bytes) -> float:
                await asyncio.sleep(max(0.0, start_at + index * interval_s - loop.time()))
                return await _post(session, ingest_url, body)

            latencies = sorted(await asyncio.gather(*(paced_send(i, b) for i, b in enumerate(paced))))
            p99_ms = latencies[int(len(latencies) * 0.99) - 1] * 1000
            p50_ms = latencies[len(latencies) // 2] * 1000

            async with session.get(f"{gateway_url}/status") as reply:
                buffered = int((await reply.json())["bufferedEvents"])
            pv = directory / "pv"
            disk_bytes = sum(
                f.stat().st_size for f in pv.glob("queue.db*") if not f.name.endswith(".reserve")
            )
            bytes_per_event = disk_bytes / buffered

            sink = _start(
                [
                    "sink",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(sink_port),
                    "--data-dir",
                    str(directory / "sink"),
                ],
                directory / "sink.log",
            )
            await _wait_ready(session, f"http://127.0.0.1:{sink_port}/healthz")
            started = time.perf_counter()
            while True:
                async with session.get(f"{gateway_url}/status") as reply:
                    if (await reply.json())["bufferedEvents"] == 0:
                        break
                await asyncio.sleep(0.05)
            drain_per_s = buffered / (time.perf_counter() - started)
    finally:
        _stop(gateway)
        if sink is not None:
            _stop(sink)

    return [
        {
            "name": "output/gateway-durable-ingest",
            "value": round(ingest_per_s),
            "unit": "events/s",
            "baseline": 100_000,
        },
        {
            "name": "output/gateway-ack-p99-at-10k-events-per-s",
            "value": round(p99_ms, 2),
            "unit": "ms",
            "baseline": 50,
        },
        {
            "name": "output/gateway-ack-p50-at-10k-events-per-s",
            "value": round(p50_ms, 2),
            "unit": "ms",
            "baseline": None,
        },
        {
            "name": "output/drain-to-local-sink",
            "value": round(drain_per_s),
            "unit": "events/s",
            "baseline": None,
        },
        {
            "name": "output/disk-bytes-per-event",
            "value": round(bytes_per_event),
            "unit": "bytes",
            "baseline": len(payload),
        },
        {
            "name": "output/yardstick-sqlite-batched-insert",
            "value": round(yardstick_per_s),
            "unit": "rows/s",
            "baseline": 300_000,
        },
        {
            "name": "output/gateway-ingest-fraction-of-sqlite",
            "value": round(fraction, 3),
            "unit": "ratio",
            "baseline": round(1 / 3, 3),
        },
    ]


def run(directory: Path | None = None) -> list[dict[str, Any]]:
    """Measure and print; ``directory`` is where the queue lives (a temporary folder by default)."""
    with tempfile.TemporaryDirectory(prefix="kubemeter-bench-output-", dir=directory) as scratch:
        figures = asyncio.run(_measure(Path(scratch)))
    for figure in figures:
        print(
            f"{figure['name']:<48} {figure['value']:>12} {figure['unit']:<10} baseline {figure['baseline']}"
        )
    return figures


if __name__ == "__main__":
    run(Path(os.environ["BENCH_DIR"]) if "BENCH_DIR" in os.environ else None)
