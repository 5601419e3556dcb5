"""Output benchmark: gateway durable ingest and ack latency, ingest against concurrent senders, drain
to the local billing API, disk bytes per event, and the yardstick: SQLite alone doing the queue's
write on the same disk in the same run.

The yardstick is the same work without kubemeter: the queue's own schema (``events`` with its
``UNIQUE (source, event_id)`` index), the same rows (the events' bytes, source and id), the same
``INSERT ... SELECT`` bulk statement, WAL and ``synchronous=FULL``, and the same commit grouping: as
many rows per transaction as the gateway put in each of its fsync'd commits in the round before
(read from its ``kubemeter_buffer_commits`` counter). The gateway's ingest and the yardstick
alternate ``ROUNDS`` times (gateway, yardstick, yardstick, gateway, ...); the figures are medians
and the fraction is the median of the per-round ratios. Every round is printed.

``run()`` returns figures ``{name, value, unit, baseline}``. The gateway and the local billing API
run as real processes (``kubemeter gateway``, ``kubemeter sink``); this process is the load:
pre-encoded CloudEvents batches over aiohttp.
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
import msgspec
from kubemeter.api.rendered import GatewayConfig
from kubemeter.events import UsageEvent
from kubemeter.output.queue import _BULK_INSERT, SCHEMA, QueueRecord, _bulk_rows

from bench import plots
from bench.load import event_batches, post_all

ABOUT = "gateway ingest vs a same-work SQLite yardstick, ingest vs senders, ack latency, drain, disk bytes"

REPO_ROOT = Path(__file__).resolve().parents[1]
_SPLIT = msgspec.json.Decoder(list[msgspec.Raw]).decode
INGEST_EVENTS = 100_000  # per round
ROUNDS = 3
INGEST_BATCH_EVENTS = 1000
INGEST_CONCURRENCY = 8
PACED_EVENTS_PER_S = 10_000
PACED_BATCH_EVENTS = 100
PACED_SECONDS = 3.0
SENDER_COUNTS = (1, 2, 4, 8, 16, 32, 64)
SENDER_CURVE_EVENTS = 20_000
SENDER_CURVE_BATCH_EVENTS = 100


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _event(prefix: str, n: int) -> dict[str, Any]:
    from datetime import UTC, datetime, timedelta

    return UsageEvent(
        id=f"{prefix}-{n:08d}",
        source="kubemeter/bench",
        type="io.kubemeter.gpu.seconds",
        subject=f"team-{n % 16}",
        # Recent times: the gateway refuses events more than two years old.
        time=datetime.now(UTC).replace(minute=n % 60, second=0, microsecond=0) - timedelta(hours=1),
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


def sqlite_yardstick(directory: Path, bodies: list[bytes], rows_per_commit: int) -> float:
    """Rows/s for the queue's write done by SQLite alone: the queue's schema (UNIQUE index), its bulk
    statement, WAL, ``synchronous=FULL``, ``rows_per_commit`` rows per transaction."""
    path = directory / "yardstick.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    records = [
        QueueRecord(event["source"], event["id"], raw)
        for body in bodies
        for event, raw in zip(json.loads(body), _SPLIT(body), strict=True)
    ]
    groups = [records[i : i + rows_per_commit] for i in range(0, len(records), rows_per_commit)]
    parameters = [_bulk_rows(group) for group in groups]  # prepared before the clock, as ingest does
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("PRAGMA auto_vacuum=INCREMENTAL")
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")
        connection.executescript(SCHEMA)
        started = time.perf_counter()
        for payloads, index in parameters:
            connection.execute("BEGIN IMMEDIATE")
            connection.execute(_BULK_INSERT, (time.time(), payloads, index))
            connection.execute("COMMIT")
        return len(records) / (time.perf_counter() - started)
    finally:
        connection.close()


async def _commits(session: aiohttp.ClientSession, gateway_url: str) -> float:
    async with session.get(f"{gateway_url}/metrics") as reply:
        text = await reply.text()
    for line in text.splitlines():
        if line.startswith("kubemeter_buffer_commits_total "):
            return float(line.split()[1])
    raise RuntimeError("the gateway's /metrics has no kubemeter_buffer_commits_total")


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
    payload = json.dumps(_event("probe", 0), separators=(",", ":")).encode()

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
    yard_rounds = [
        [body.replace(b'"id":"bulk-', f'"id":"y{n}-'.encode()) for body in bulk] for n in range(ROUNDS)
    ]
    paced_requests = int(PACED_EVENTS_PER_S * PACED_SECONDS / PACED_BATCH_EVENTS)
    paced = _bodies("paced", paced_requests * PACED_BATCH_EVENTS, PACED_BATCH_EVENTS)
    try:
        connector = aiohttp.TCPConnector(limit=INGEST_CONCURRENCY * 2)
        async with aiohttp.ClientSession(connector=connector) as session:
            await _wait_ready(session, f"{gateway_url}/readyz")
            # The billing API is down while ingest is measured, so delivery does not compete.
            yardsticks_per_s: list[float] = []
            ingests_per_s: list[float] = []
            groupings: list[float] = []
            rows_per_commit = INGEST_CONCURRENCY * INGEST_BATCH_EVENTS  # until the gateway has shown its own

            async def gateway_round(bodies: list[bytes]) -> None:
                commits_before = await _commits(session, gateway_url)
                started = time.perf_counter()
                await _send_all(session, ingest_url, bodies)
                ingests_per_s.append(INGEST_EVENTS / (time.perf_counter() - started))
                groupings.append(INGEST_EVENTS / (await _commits(session, gateway_url) - commits_before))

            for number, bodies in enumerate(rounds, 1):
                # Alternate: gateway then yardstick, then yardstick then gateway, ...
                if number % 2 == 1 or not groupings:
                    await gateway_round(bodies)
                    rows_per_commit = round(groupings[-1])
                yardsticks_per_s.append(
                    await asyncio.to_thread(
                        sqlite_yardstick, directory, yard_rounds[number - 1], rows_per_commit
                    )
                )
                if number % 2 == 0 and len(ingests_per_s) < number:
                    await gateway_round(bodies)
                    rows_per_commit = round(groupings[-1])
                print(
                    f"round {number}: gateway ingest {ingests_per_s[-1]:,.0f} events/s in commits of "
                    f"{groupings[-1]:,.0f}; yardstick {yardsticks_per_s[-1]:,.0f} rows/s in commits of "
                    f"{rows_per_commit:,}; fraction {ingests_per_s[-1] / yardsticks_per_s[-1]:.3f}",
                    flush=True,
                )
            ingest_per_s = statistics.median(ingests_per_s)
            yardstick_per_s = statistics.median(yardsticks_per_s)
            fraction = statistics.median(i / y for i, y in zip(ingests_per_s, yardsticks_per_s, strict=True))
            grouping = statistics.median(groupings)

            # Ingest against concurrent senders: 100-event requests, each sender sending on ack.
            sender_curve: list[tuple[int, float]] = []
            for senders in SENDER_COUNTS:
                curve_bodies = event_batches(
                    f"senders-{senders}", SENDER_CURVE_EVENTS, SENDER_CURVE_BATCH_EVENTS
                )
                sent = await post_all(ingest_url, curve_bodies, senders=senders)
                sender_curve.append((senders, len(sent.acked) * SENDER_CURVE_BATCH_EVENTS / sent.seconds()))
                print(f"{senders:>3} senders: {sender_curve[-1][1]:,.0f} events/s", flush=True)

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

    plots.line_plot(
        "gateway-ingest-vs-senders",
        "Gateway durable ingest vs concurrent senders (100-event requests)",
        "concurrent senders",
        "events/s acknowledged",
        {"kubemeter gateway": sender_curve},
        log_x=True,
    )
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
            "baseline": "output/gateway-ack-p99-at-10k-events-per-s",
        },
        {
            "name": "output/drain-to-local-sink",
            "value": round(drain_per_s),
            "unit": "events/s",
            "baseline": "output/yardstick-sqlite-same-work",
        },
        {
            "name": "output/disk-bytes-per-event",
            "value": round(bytes_per_event),
            "unit": "bytes",
            "baseline": len(payload),
        },
        {
            "name": "output/yardstick-sqlite-same-work",
            "value": round(yardstick_per_s),
            "unit": f"rows/s (queue schema, UNIQUE index, {round(grouping)} rows/commit, FULL)",
            "baseline": "yardstick: SQLite alone, same disk, same run",
        },
        {
            "name": "output/gateway-events-per-commit",
            "value": round(grouping),
            "unit": f"events per fsync'd commit, {INGEST_CONCURRENCY} senders",
            "baseline": f"{INGEST_CONCURRENCY * INGEST_BATCH_EVENTS} (every sender's request in one commit)",
        },
        {
            "name": "output/gateway-ingest-fraction-of-yardstick",
            "value": round(fraction, 3),
            "unit": f"ratio, median of {ROUNDS} alternating rounds",
            "baseline": "goal >= 0.5 (output/yardstick-sqlite-same-work)",
        },
        *(
            {
                "name": f"output/gateway-ingest-{senders}-senders",
                "value": round(per_s),
                "unit": f"events/s, {SENDER_CURVE_BATCH_EVENTS}-event requests",
                "baseline": "output/gateway-ingest-1-senders",
            }
            for senders, per_s in sender_curve
        ),
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
