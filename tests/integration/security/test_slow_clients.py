"""Slow and greedy clients cannot hold the gateway: connections over the cap are refused, a
connection that sends no request head in time is closed, a body that does not arrive in time is
answered 408, requests over the in-flight cap get 503 with Retry-After; each is counted, and the
counters' values are what the test itself did. The gateway runs as a real process on loopback with
small caps so the test stays short; valid events sent afterwards are billed exactly once."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.output.harness import GatewayProcess, gateway_config
from tests.integration.security.support import (
    SinkProcess,
    cloudevent,
    compact,
    metric_value,
    raw_request,
    wait_for,
)
from tests.integration.security.test_bad_input import INGEST_TOKEN, http

pytestmark = pytest.mark.integration

MAX_CONNECTIONS = 12
MAX_IN_FLIGHT = 2
IDLE_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 2.0


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[SinkProcess]:
    process = SinkProcess(tmp_path / "sink-work")
    process.start()
    yield process
    assert process.stop() == 0, process.log_tail()


@pytest.fixture
def gateway(tmp_path: Path, sink: SinkProcess) -> Iterator[GatewayProcess]:
    work = tmp_path / "gateway-work"
    work.mkdir()
    (work / "ingest-token").write_text(INGEST_TOKEN + "\n")
    (work / "billing-token").write_text(f"{sink.token}\n")
    config = gateway_config(work, sink.url, credentials_file=work / "billing-token")
    limits = [
        f"--max-connections={MAX_CONNECTIONS}",
        f"--max-requests-in-flight={MAX_IN_FLIGHT}",
        f"--idle-timeout-seconds={IDLE_TIMEOUT_S}",
        f"--body-timeout-seconds={BODY_TIMEOUT_S}",
    ]
    process = GatewayProcess(work, config, ingest_token_file=work / "ingest-token", extra_args=limits)
    process.start()
    asyncio.run(process.wait_ready(timeout_s=60))
    yield process
    assert process.terminate() == 0, process.log_tail()


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=30)


def closed_by_server(connection: socket.socket) -> bool:
    """True once the server has closed ``connection`` (EOF or reset), without blocking long."""
    connection.settimeout(0.05)
    try:
        return connection.recv(4096) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def read_answer(connection: socket.socket) -> bytes:
    connection.settimeout(30)
    received = b""
    while chunk := connection.recv(65536):
        received += chunk
    return received


def test_idle_and_excess_connections_are_closed_and_counted(gateway: GatewayProcess) -> None:
    metrics = f"{gateway.url}/metrics"
    idle = [connect(gateway.port) for _ in range(MAX_CONNECTIONS - 2)]
    # One more sends its request head a byte at a time (slowloris): still closed on the idle clock.
    trickler = connect(gateway.port)
    head = b"POST /api/v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"a" * 200
    wait_for(
        lambda: (
            metric_value(httpx.get(metrics, timeout=10).text, "kubemeter_http_connections") == MAX_CONNECTIONS
        ),  # the idle ones, the trickler and this scrape
        timeout_s=10,
        what="every connection to be counted",
    )
    idle.append(connect(gateway.port))  # the cap is reached
    refused = connect(gateway.port)
    answer = read_answer(refused)
    assert answer.startswith(b"HTTP/1.1 503 "), answer[:200]
    assert b"Retry-After: 1" in answer
    assert f"{MAX_CONNECTIONS} connections, its cap".encode() in answer
    refused.close()

    started = time.monotonic()
    open_ones = [*idle, trickler]
    sent = 0
    while open_ones and time.monotonic() - started < 20:
        if sent < len(head) and not closed_by_server(trickler):
            trickler.sendall(head[sent : sent + 1])
            sent += 1
        open_ones = [c for c in open_ones if not closed_by_server(c)]
    assert not open_ones, f"{len(open_ones)} connections still open after 20 s"
    waited_s = time.monotonic() - started
    print(f"{len(idle) + 1} idle connections closed after {waited_s:.1f} s (idle timeout {IDLE_TIMEOUT_S} s)")
    for connection in [*idle, trickler]:
        connection.close()

    text = httpx.get(metrics, timeout=10).text
    assert metric_value(text, "kubemeter_http_connections") == 1  # this scrape only
    assert metric_value(text, "kubemeter_http_connections_refused_total") == 1
    assert metric_value(text, "kubemeter_http_idle_timeouts_total") == MAX_CONNECTIONS
    assert gateway.process is not None and gateway.process.poll() is None


def test_slow_bodies_time_out_and_requests_over_the_cap_wait_and_valid_events_are_billed_once(
    gateway: GatewayProcess, sink: SinkProcess
) -> None:
    metrics = f"{gateway.url}/metrics"
    body = compact([cloudevent("slow-a"), cloudevent("slow-b")])
    slow = []
    for _ in range(MAX_IN_FLIGHT):
        connection = connect(gateway.port)
        connection.sendall(http("/api/v1/events", body)[: -len(body) // 2])  # the head and half a body
        slow.append(connection)
    wait_for(
        lambda: (
            metric_value(httpx.get(metrics, timeout=10).text, "kubemeter_http_requests_in_flight")
            == MAX_IN_FLIGHT
        ),
        timeout_s=10,
        what="the slow requests to be in flight",
    )
    status, detail = raw_request(gateway.port, http("/api/v1/events", compact([cloudevent("busy")])))
    assert status == 503, detail
    assert f"{MAX_IN_FLIGHT} requests are in flight" in detail

    started = time.monotonic()
    for connection in slow:
        answer = read_answer(connection)
        print(f"408 after {time.monotonic() - started:.1f} s")
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
        assert f"did not arrive within {BODY_TIMEOUT_S:g} s".encode() in answer
        connection.close()

    # The same events, sent whole, are taken; the refused ones stored nothing.
    status, detail = raw_request(gateway.port, http("/api/v1/events", body))
    assert status == 204, detail
    status, detail = raw_request(gateway.port, http("/api/v1/events", compact([cloudevent("busy")])))
    assert status == 204, detail
    started = time.monotonic()
    wait_for(lambda: len(sink.events()) >= 3, timeout_s=60, what="delivery to the sink")
    print(f"delivered after {time.monotonic() - started:.1f} s")
    assert sorted(e["eventId"] for e in sink.events()) == ["busy", "slow-a", "slow-b"]

    text = httpx.get(metrics, timeout=10).text
    assert metric_value(text, "kubemeter_http_requests_in_flight") == 0
    refused = "kubemeter_http_requests_refused_total"
    assert metric_value(text, refused, 'reason="busy"') == 1
    assert metric_value(text, refused, 'reason="body_timeout"') == MAX_IN_FLIGHT
    assert gateway.process is not None and gateway.process.poll() is None
