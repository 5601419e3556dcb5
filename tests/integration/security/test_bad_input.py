"""The bad-input suite: distinct bad inputs to the gateway, the local billing API and the API server.

Each is answered with its 4xx and a message that names the fix (never a 500, never a traceback in
the log); the process stays up and its peak memory stays bounded; and every valid event sent beside
a bad one is billed exactly once. The gateway and ``kubemeter sink`` run as real processes on
loopback, the custom resources go through ``kubectl apply`` to the real API server.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import sqlite3
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from kubemeter.output.queue import QueueRecord
from kubemeter.output.spool import SPOOL_FILE, SpoolOutput

from testbed.controlplane import ControlPlane
from tests.integration.output.harness import FAST_POLICY, GatewayProcess, eventually, gateway_config
from tests.integration.security.support import (
    SinkProcess,
    cloudevent,
    compact,
    memory_mib,
    metric_value,
    raw_request,
    wait_for,
)

pytestmark = pytest.mark.integration

BATCH = "application/cloudevents-batch+json"
INGEST_TOKEN = "ingest-token"
# The gateway's pod limit is 512Mi; the whole suite (three gzip bombs at once included) must stay
# far below it, as must the local billing API.
PEAK_MEMORY_MIB = 256
# The most the API server's resident memory may grow while it refuses the bad custom resources.
API_SERVER_GROWTH_MIB = 128


def http(
    path: str,
    body: bytes = b"",
    *,
    method: str = "POST",
    content_type: str | None = BATCH,
    auth: str | None = f"Bearer {INGEST_TOKEN}",
    headers: dict[str, str] | None = None,
    extra_head: bytes = b"",
    content_length: int | None = None,
) -> bytes:
    """One HTTP/1.1 request as bytes (so a header can hold what no client library would send)."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    if content_type:
        lines.append(f"Content-Type: {content_type}")
    if auth is not None:
        lines.append(f"Authorization: {auth}")
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    lines.append(f"Content-Length: {len(body) if content_length is None else content_length}")
    return "\r\n".join(lines).encode() + b"\r\n" + extra_head + b"\r\n" + body


@dataclass(frozen=True)
class BadInput:
    name: str
    request: bytes
    status: int
    message: str
    # Valid events sent in the same request; refused with it, then sent again on their own.
    valid_ids: tuple[str, ...] = ()


def mixed(case: str, *bad: Any, raw: bytes | None = None) -> tuple[bytes, tuple[str, ...]]:
    """A batch of two valid events around the bad one(s) (``raw``: bad JSON spliced in as is)."""
    valid = [cloudevent(f"{case}-ok-a"), cloudevent(f"{case}-ok-b")]
    parts = [compact(valid[0]), *(compact(b) for b in bad)]
    if raw is not None:
        parts.append(raw)
    parts.append(compact(valid[1]))
    return b"[" + b",".join(parts) + b"]", (valid[0]["id"], valid[1]["id"])


def gzip_bomb(inflated_bytes: int = 1 << 30) -> bytes:
    """About 1 MB of gzip that inflates to a gigabyte of JSON whitespace."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = b" " * (1 << 20)
    parts = [packer.compress(b"[")]
    parts += [packer.compress(block) for _ in range(inflated_bytes >> 20)]
    parts += [packer.compress(b"]"), packer.flush()]
    return b"".join(parts)


def nested(levels: int) -> bytes:
    return b'{"a":' * levels + b"1" + b"}" * levels


def event_cases() -> list[tuple[str, Any, str]]:
    """Bad events (as objects, or raw JSON bytes): what a billing API would refuse, and the fix."""
    return [
        ("no-subject", cloudevent("x", subject=...), "subject must be a non-empty string"),
        ("empty-id", cloudevent(""), "id must be a non-empty string"),
        ("id-257-chars", cloudevent("i" * 257), "id is 257 characters long"),
        ("subject-10000-chars", cloudevent("x", subject="s" * 10_000), "send at most 256"),
        ("source-over-limit", cloudevent("x", source="s" * 300), "source is 300 characters long"),
        ("spec-0.3", cloudevent("x", specversion="0.3"), 'specversion must be "1.0"'),
        ("negative-value", cloudevent("x", data={"value": -5}), "usage is never negative"),
        ("negative-fraction", cloudevent("x", data={"value": -0.25}), "usage is never negative"),
        ("value-text", cloudevent("x", data={"value": "ten"}), "data.value must be a JSON number"),
        ("value-bool", cloudevent("x", data={"value": True}), "data.value must be a JSON number"),
        ("value-list", cloudevent("x", data={"value": [1]}), "data.value must be a JSON number"),
        ("data-text", cloudevent("x", data="usage"), "data must be a JSON object"),
        ("data-base64", cloudevent("x", data_base64="AA=="), "data_base64 is not accepted"),
        ("content-type-xml", cloudevent("x", datacontenttype="text/xml"), "datacontenttype must be"),
        ("time-years-ahead", cloudevent("x", time="2099-01-01T00:00:00Z"), "more than 1 day ahead"),
        ("time-1970", cloudevent("x", time="1970-01-01T00:00:00Z"), "more than 731 days before"),
        ("time-no-zone", cloudevent("x", time="2025-01-01T00:00:00"), "has no zone; add Z"),
        ("time-month-13", cloudevent("x", time="2025-13-01T00:00:00Z"), "not a valid date and time"),
        ("time-number", cloudevent("x", time=1735689600), "time must be an RFC 3339 string"),
        ("data-40-deep", cloudevent("x", data={"value": 1, "d": json.loads(nested(40))}), "flatten it"),
        ("event-not-object", "an event", "an event must be a JSON object"),
        (
            "value-1e400",
            b'{"specversion":"1.0","id":"x","source":"s","type":"t","subject":"c","data":{"value":1e400}}',
            "data.value is inf, which does not fit a double",
        ),
        (
            "dimension-minus-1e999",
            b'{"specversion":"1.0","id":"x","source":"s","type":"t","subject":"c","data":{"n":-1e999}}',
            "data.n is -inf",
        ),
        (
            "extension-huge-int",
            b'{"specversion":"1.0","id":"x","source":"s","type":"t","subject":"c","ext":' + b"9" * 400 + b"}",
            "ext is 9999",
        ),
        (
            "subject-invalid-utf8",
            b'{"specversion":"1.0","id":"x","source":"s","type":"t","subject":"\xff\xfe"}',
            "the body is not valid UTF-8",
        ),
        (
            "subject-lone-surrogate",
            b'{"specversion":"1.0","id":"x","source":"s","type":"t","subject":"\\udcff"}',
            "lone surrogate escape",
        ),
        (
            "data-50000-deep",
            b'{"specversion":"1.0","id":"x","source":"s","type":"t","subject":"c","data":'
            + nested(50_000)
            + b"}",
            "nested too deeply",
        ),
    ]


def gateway_cases() -> list[BadInput]:
    path = "/api/v1/events"
    ok = compact([cloudevent("unused")])
    cases = []
    for name, event, message in event_cases():
        raw = event if isinstance(event, bytes) else None
        body, valid = mixed(name, *([] if raw else [event]), raw=raw)
        cases.append(BadInput(name, http(path, body), 400, message, valid))
    body, valid = mixed("no-token")
    cases += [
        BadInput("no-token", http(path, body, auth=None), 401, "Authorization: Bearer <token>", valid),
        BadInput("wrong-token", http(path, ok, auth="Bearer nope"), 401, "is not accepted"),
        BadInput("basic-auth", http(path, ok, auth="Basic dXNlcjpwYXNz"), 401, "Authorization: Bearer"),
        BadInput(
            "auth-invalid-utf8",
            http(path, ok, auth=None, extra_head=b"Authorization: Bearer \xff\xfe\xfd\r\n"),
            401,
            "the Authorization header must be ASCII",
        ),
        BadInput(
            "text-plain", http(path, ok, content_type="text/plain"), 400, "'text/plain' is not accepted"
        ),
        BadInput(
            "no-content-type",
            http(path, ok, content_type=None),
            400,
            "'application/octet-stream' is not accepted",
        ),
        BadInput("not-json", http(path, b"[{"), 400, "the body is not valid JSON"),
        BadInput("empty-body", http(path, b""), 400, "the body is not valid JSON"),
        BadInput("nan-literal", http(path, b'[{"value": NaN}]'), 400, "NaN is not a JSON number"),
        BadInput("array-50000-deep", http(path, b"[" * 50_000 + b"]" * 50_000), 400, "nested too deeply"),
        BadInput(
            "structured-with-array",
            http(path, ok, content_type="application/cloudevents+json"),
            400,
            "carries one event, a JSON object",
        ),
        BadInput(
            "batch-with-object", http(path, compact(cloudevent("o"))), 400, "carries a JSON array of events"
        ),
        BadInput(
            "declared-40MB",
            http(path, ok, content_length=40_000_000),
            413,
            "send at most 33554432 bytes per request",
        ),
        BadInput(
            "brotli",
            http(path, ok, headers={"Content-Encoding": "br"}),
            415,
            "Content-Encoding 'br' is not accepted",
        ),
        BadInput(
            "gzip-corrupt",
            http(path, b"this is not gzip", headers={"Content-Encoding": "gzip"}),
            400,
            "the body is not valid gzip",
        ),
        BadInput(
            "gzip-truncated",
            http(path, gzip.compress(ok)[:-12], headers={"Content-Encoding": "gzip"}),
            400,
            "truncated or has trailing data",
        ),
        BadInput("get-ingest", http(path, method="GET", content_type=None), 405, "Method Not Allowed"),
    ]
    return cases


GATEWAY_CASES = gateway_cases()


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
    process = GatewayProcess(work, config, ingest_token_file=work / "ingest-token")
    process.start()
    asyncio.run(process.wait_ready(timeout_s=60))
    yield process
    assert process.terminate() == 0, process.log_tail()


def assert_alive_and_bounded(name: str, pid: int, alive: bool, log: str) -> float:
    assert alive, f"{name} died: {log}"
    assert "Traceback" not in log, f"{name} logged a traceback: {log}"
    rss_mib, peak_mib = memory_mib(pid)
    print(f"{name}: RSS {rss_mib:.0f} MiB, peak {peak_mib:.0f} MiB")
    assert peak_mib < PEAK_MEMORY_MIB, f"{name} peaked at {peak_mib:.0f} MiB"
    return peak_mib


def test_the_suite_sends_at_least_50_distinct_bad_inputs() -> None:
    names = (
        [case.name for case in GATEWAY_CASES]
        + [name for name, *_ in SINK_CASES]
        + [name for name, *_ in CRD_CASES]
    )
    print(f"gateway {len(GATEWAY_CASES)}, sink {len(SINK_CASES)}, API server {len(CRD_CASES)}")
    assert len(names) == len(set(names))
    assert len(names) >= 50


def test_gateway_refuses_every_bad_input_with_the_fix_and_bills_the_valid_events_beside_once(
    gateway: GatewayProcess, sink: SinkProcess
) -> None:
    assert gateway.process is not None
    failures = []
    expected_ids: set[str] = set()
    for case in GATEWAY_CASES:
        status, body = raw_request(gateway.port, case.request)
        detail = (
            body if status >= 500 else (json.loads(body).get("detail", body) if body[:1] == "{" else body)
        )
        print(f"{case.name:28} {status} {detail[:110]}")
        if status != case.status or case.message not in detail:
            failures.append(f"{case.name}: {status} {detail[:300]!r}, wanted {case.status} {case.message!r}")
        if case.valid_ids:
            # The refused request stored nothing; its valid events, sent again alone, are taken.
            again = compact([cloudevent(event_id) for event_id in case.valid_ids])
            status, body = raw_request(gateway.port, http("/api/v1/events", again))
            if status != 204:
                failures.append(f"{case.name}: the valid events alone got {status} {body[:200]}")
            expected_ids |= set(case.valid_ids)
    assert not failures, "\n".join(failures)

    # Three 1 MB gzip bombs at once (each inflates to 1 GiB): refused while inflating, memory bounded.
    bomb = gzip_bomb()
    request = http("/api/v1/events", bomb, headers={"Content-Encoding": "gzip"})

    async def three_bombs() -> list[tuple[int, str]]:
        return await asyncio.gather(
            *(asyncio.to_thread(raw_request, gateway.port, request) for _ in range(3))
        )

    for status, body in asyncio.run(three_bombs()):
        assert status == 413, body
        assert "inflates past 33554432 bytes" in body

    # A compressed batch within the bound is taken (agents may compress; the bound is what matters).
    packed = gzip.compress(compact([cloudevent("gzip-ok")]))
    status, body = raw_request(
        gateway.port, http("/api/v1/events", packed, headers={"Content-Encoding": "gzip"})
    )
    assert status == 204, body
    expected_ids.add("gzip-ok")

    wait_for(lambda: {e["eventId"] for e in sink.events()} >= expected_ids, timeout_s=60, what="delivery")
    stored = [e["eventId"] for e in sink.events()]
    assert sorted(stored) == sorted(expected_ids), "a valid event was lost or billed twice"
    assert sink.stats()["specViolations"] == 0
    # Every refusal is counted under its reason: the counts are the cases this test sent.
    metrics = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    sent = Counter(case.status for case in GATEWAY_CASES)
    refused = "kubemeter_ingest_refused_requests_total"
    assert metric_value(metrics, refused, 'reason="malformed"') == sent[400]
    assert metric_value(metrics, refused, 'reason="unauthorized"') == sent[401]
    assert metric_value(metrics, refused, 'reason="too_large"') == sent[413] + 3  # the three bombs
    assert metric_value(metrics, refused, 'reason="encoding"') == sent[415]
    peak = assert_alive_and_bounded(
        "gateway", gateway.process.pid, gateway.process.poll() is None, gateway.log_tail(400)
    )
    print(f"gateway peak RSS after {len(GATEWAY_CASES)} bad inputs and three gzip bombs: {peak:.0f} MiB")


async def test_an_agent_forwarding_bad_events_beside_valid_ones_delivers_each_valid_one_once(
    gateway: GatewayProcess, sink: SinkProcess, tmp_path: Path
) -> None:
    """The agent's own forwarder splits each refused batch: the bad events are dead-lettered in its
    spool with the gateway's reason, every valid one reaches the billing API once."""
    token = tmp_path / "agent-token"
    token.write_text(INGEST_TOKEN + "\n")
    spool = await SpoolOutput.open(
        tmp_path / "spool", gateway.url, max_bytes=64 * 2**20, token_file=token, policy=FAST_POLICY
    )
    records, valid_ids, bad = [], set(), {}
    for index, (name, event, message) in enumerate(event_cases()):
        payload = event if isinstance(event, bytes) else compact(event)
        records.append(QueueRecord("agent-test", f"bad-{index}", payload))
        bad[f"bad-{index}"] = message
        for suffix in ("a", "b"):
            valid = cloudevent(f"agent-{name}-{suffix}")
            records.append(QueueRecord(valid["source"], valid["id"], compact(valid)))
            valid_ids.add(valid["id"])
    await spool.queue.enqueue(records)
    await spool.start()
    try:
        await eventually(
            lambda: spool.stats().events == 0, timeout_s=120, what="the spool to forward or dead-letter all"
        )
    finally:
        await spool.close()
    with sqlite3.connect(tmp_path / "spool" / SPOOL_FILE) as connection:
        dead = dict(connection.execute("SELECT event_id, response FROM dead_letters").fetchall())
    assert set(dead) == set(bad)
    for event_id, message in bad.items():
        assert message in json.loads(dead[event_id])["detail"], (event_id, dead[event_id][:300])
    await eventually(
        lambda: {e["eventId"] for e in sink.events()} >= valid_ids, timeout_s=60, what="delivery to the sink"
    )
    stored = [e["eventId"] for e in sink.events()]
    assert sorted(stored) == sorted(valid_ids)
    print(
        f"{len(valid_ids)} valid events billed once, {len(bad)} bad ones dead-lettered in the agent's spool"
    )


# -- the local billing API (kubemeter sink) -------------------------------------------------------


def _om(body: bytes, **kwargs: Any) -> bytes:
    return http("/api/v1/events", body, auth="Bearer sink-token", **kwargs)


def _lago(events: list[dict[str, Any]]) -> bytes:
    return http(
        "/api/v1/events/batch",
        compact({"events": events}),
        content_type="application/json",
        auth="Bearer sink-token",
    )


def _lago_event(timestamp: Any) -> dict[str, Any]:
    return {"transaction_id": "t-1", "external_subscription_id": "sub", "code": "gpu", "timestamp": timestamp}


def _faults(body: bytes, auth: str | None = "Bearer sink-token") -> bytes:
    return http("/_sink/faults", body, content_type="application/json", auth=auth)


def _get(path: str) -> bytes:
    return http(path, method="GET", content_type=None, auth=None)


SINK_OK = compact([cloudevent("sink-ok")])
SINK_CASES: list[tuple[str, bytes, int, str]] = [
    ("sink-not-json", _om(b"not json"), 400, "Invalid request payload"),
    ("sink-invalid-utf8", _om(b'[{"subject":"\xff"}]'), 400, "Invalid request payload"),
    ("sink-50000-deep", _om(b"[" * 50_000 + b"]" * 50_000), 400, "nested too deeply"),
    ("sink-lone-surrogate", _om(b'[{"subject":"\\ud800"}]'), 400, "surrogates not allowed"),
    ("sink-gzip", _om(gzip.compress(SINK_OK), headers={"Content-Encoding": "gzip"}), 415, "uncompressed"),
    ("sink-no-token", http("/api/v1/events", SINK_OK, auth=None), 401, "Unauthorized"),
    (
        "sink-auth-invalid-utf8",
        http("/api/v1/events", SINK_OK, auth=None, extra_head=b"Authorization: Bearer \xff\r\n"),
        401,
        "Unauthorized",
    ),
    (
        "flexprice-wrong-key",
        http(
            "/v1/events/bulk", b"{}", content_type="application/json", auth=None, headers={"x-api-key": "no"}
        ),
        401,
        "Invalid API key",
    ),
    ("limit-abc", _get("/api/v1/usage/events?limit=abc"), 400, "limit must be an integer from 1 to 1000000"),
    ("limit-zero", _get("/api/v1/usage/events?limit=0"), 400, "limit must be an integer"),
    ("limit-huge", _get("/api/v1/usage/events?limit=99999999999"), 400, "limit must be an integer"),
    ("window-nan", _get("/api/v1/usage?windowSeconds=nan"), 400, "windowSeconds is 'nan'"),
    ("window-negative", _get("/api/v1/usage?windowSeconds=-1"), 400, "windowSeconds is '-1'"),
    ("window-inf", _get("/api/v1/usage?windowSeconds=inf"), 400, "a positive number of seconds"),
    ("window-text", _get("/api/v1/usage?windowSeconds=hour"), 400, "windowSeconds a positive number"),
    ("from-not-a-time", _get("/api/v1/usage?from=yesterday"), 400, "times are RFC 3339"),
    ("lago-timestamp-1e20", _lago([_lago_event(1e20)]), 422, "invalid_format"),
    ("lago-timestamp-nan", _lago([_lago_event("NaN")]), 422, "invalid_format"),
    ("lago-timestamp-negative", _lago([_lago_event(-1)]), 422, "invalid_format"),
    (
        "faults-status-99",
        _faults(b'{"status": 99}'),
        400,
        "status must be an HTTP status code from 200 to 599",
    ),
    ("faults-status-text", _faults(b'{"status": "503"}'), 400, "status must be an HTTP status code"),
    ("faults-10-million", _faults(b'{"status": 503, "requests": 10000000}'), 400, "from 1 to 1000000"),
    (
        "faults-retry-after-negative",
        _faults(b'{"status": 429, "retryAfterSeconds": -1}'),
        400,
        "from 0 to 3600",
    ),
    ("faults-not-json", _faults(b"status=503"), 400, "Invalid request payload"),
    ("faults-array", _faults(b"[503]"), 400, "send a JSON object"),
    ("faults-no-token", _faults(b'{"status": 503}', auth=None), 401, "send the sink's token"),
]


def test_the_local_billing_api_refuses_every_bad_input_with_the_fix_and_keeps_the_valid_events(
    sink: SinkProcess,
) -> None:
    assert sink.process is not None
    failures = []
    for name, request, expected_status, message in SINK_CASES:
        status, body = raw_request(sink.port, request)
        print(f"{name:28} {status} {body[:110]}")
        if status != expected_status or message not in body:
            failures.append(f"{name}: {status} {body[:300]!r}, wanted {expected_status} {message!r}")
    assert not failures, "\n".join(failures)
    # Nothing above queued a fault or stored an event; a valid batch beside them is stored once.
    status, body = raw_request(sink.port, _om(compact([cloudevent("sink-ok"), cloudevent("sink-ok-2")])))
    assert status == 204, body
    status, body = raw_request(sink.port, _om(compact([cloudevent("sink-ok")])))
    assert status == 204, body
    assert sorted(e["eventId"] for e in sink.events()) == ["sink-ok", "sink-ok-2"]
    assert sink.stats()["duplicateEvents"] == 1
    assert_alive_and_bounded("kubemeter sink", sink.process.pid, sink.alive(), sink.log_tail(400))


def test_the_local_billing_api_listens_on_loopback_and_injects_faults_only_when_enabled(
    tmp_path: Path,
) -> None:
    plain = SinkProcess(tmp_path, token=None)
    plain.command.remove("--enable-faults")
    plain.start()
    try:
        assert plain.process is not None
        listening = [
            line.split()[1]
            for line in Path(f"/proc/{plain.process.pid}/net/tcp").read_text().splitlines()[1:]
            if line.split()[3] == "0A"  # LISTEN
        ]
        assert f"0100007F:{plain.port:04X}" in listening, listening  # 127.0.0.1, not 0.0.0.0
        status, body = raw_request(plain.port, _faults(b'{"status": 503}', auth=None))
        assert (status, "start the sink with --enable-faults" in body) == (404, True), body
        status, body = raw_request(plain.port, http("/api/v1/events", SINK_OK, auth=None))
        assert status == 204, body  # the fault was not queued
    finally:
        assert plain.stop() == 0


# -- the API server (custom resources) ------------------------------------------------------------

METER: dict[str, Any] = {
    "eventType": "gpu-seconds",
    "unit": "s",
    "source": {"allocation": {"resource": "cpu"}},
}
OUTPUT: dict[str, Any] = {"type": "openmeter", "url": "http://openmeter:8888"}


def _kind(kind: str, name: str, spec: Any) -> dict[str, Any]:
    return {"apiVersion": "kubemeter.io/v1alpha1", "kind": kind, "metadata": {"name": name}, "spec": spec}


def _prometheus(**changes: Any) -> dict[str, Any]:
    return {**METER, "source": {"prometheus": {"url": "http://prometheus:9090", "query": "up", **changes}}}


CRD_CASES: list[tuple[str, dict[str, Any], str]] = [
    (
        "meter-event-type-300-chars",
        _kind("Meter", "m1", {**METER, "eventType": "e" * 300}),
        "spec.eventType: Too long",
    ),
    (
        "meter-event-type-spaces",
        _kind("Meter", "m2", {**METER, "eventType": "gpu seconds"}),
        "spec.eventType: Invalid value",
    ),
    ("meter-unit-100-chars", _kind("Meter", "m3", {**METER, "unit": "u" * 100}), "spec.unit: Too long"),
    (
        "meter-window-text",
        _kind("Meter", "m4", {**METER, "windowSeconds": "sixty"}),
        "spec.windowSeconds: Invalid value",
    ),
    (
        "meter-window-two-days",
        _kind("Meter", "m5", {**METER, "windowSeconds": 172800}),
        "spec.windowSeconds: Invalid value: 172800",
    ),
    (
        "meter-query-5000-chars",
        _kind("Meter", "m6", _prometheus(query="u" * 5000)),
        "spec.source.prometheus.query: Too long",
    ),
    (
        "meter-40-headers",
        _kind("Meter", "m7", _prometheus(headers={f"h{n}": "v" for n in range(40)})),
        "spec.source.prometheus.headers: Too many",
    ),
    (
        "meter-negative-scale",
        _kind("Meter", "m8", _prometheus(valueScale=-1)),
        "spec.source.prometheus.valueScale: Invalid value: -1",
    ),
    (
        "meter-300-namespaces",
        _kind("Meter", "m9", {**METER, "pods": {"namespaces": [f"n{n}" for n in range(300)]}}),
        "spec.pods.namespaces: Too many",
    ),
    (
        "meter-subject-2000-chars",
        _kind("Meter", "m10", {**METER, "subject": {"expression": "'" + "s" * 2000 + "'"}}),
        "spec.subject.expression: Too long",
    ),
    (
        "meter-40-dimensions",
        _kind("Meter", "m11", {**METER, "dimensions": {f"d{n}": "'x'" for n in range(40)}}),
        "spec.dimensions: Too many",
    ),
    ("meter-spec-a-string", _kind("Meter", "m12", "everything"), 'spec: Invalid value: "string"'),
    ("meter-bad-name", _kind("Meter", "Bad_Name", METER), 'metadata.name: Invalid value: "Bad_Name"'),
    (
        "collector-url-javascript",
        _kind("Collector", "c1", {"output": {**OUTPUT, "url": "javascript:alert(1)"}}),
        "spec.output.url: Invalid value",
    ),
    (
        "collector-batch-zero",
        _kind("Collector", "c2", {"output": {**OUTPUT, "batch": {"maxEvents": 0}}}),
        "spec.output.batch.maxEvents: Invalid value: 0",
    ),
    (
        "collector-batch-billion",
        _kind("Collector", "c3", {"output": {**OUTPUT, "batch": {"maxEvents": 10**9}}}),
        "spec.output.batch.maxEvents: Invalid value: 1000000000",
    ),
    (
        "collector-retention-zero",
        _kind("Collector", "c4", {"output": OUTPUT, "buffer": {"retentionHours": 0}}),
        "spec.buffer.retentionHours: Invalid value: 0",
    ),
    (
        "collector-17-replicas",
        _kind("Collector", "c5", {"output": OUTPUT, "gateway": {"replicas": 17}}),
        "spec.gateway.replicas: Invalid value: 17",
    ),
    (
        "collector-negative-timeout",
        _kind("Collector", "c6", {"output": {**OUTPUT, "timeoutSeconds": -1}}),
        "spec.output.timeoutSeconds: Invalid value: -1",
    ),
    (
        "collector-cpu-lots",
        _kind("Collector", "c7", {"output": OUTPUT, "agent": {"resources": {"requests": {"cpu": "lots"}}}}),
        'spec.agent.resources.requests.cpu: Invalid value: "lots"',
    ),
    (
        "pipeline-51-processors",
        _kind("Pipeline", "p1", {"collectorRef": "c", "meters": ["m"], "processors": [{"drop": ["x"]}] * 51}),
        "spec.processors: Too many",
    ),
    (
        "pipeline-filter-2000-chars",
        _kind(
            "Pipeline",
            "p2",
            {"collectorRef": "c", "meters": ["m"], "processors": [{"filter": "'" + "f" * 2000 + "'"}]},
        ),
        "spec.processors[0].filter: Too long",
    ),
    (
        "pipeline-meter-bad-name",
        _kind("Pipeline", "p3", {"collectorRef": "c", "meters": ["Bad_Name"]}),
        'spec.meters[0]: Invalid value: "Bad_Name"',
    ),
    (
        "pipeline-set-40-keys",
        _kind(
            "Pipeline",
            "p4",
            {
                "collectorRef": "c",
                "meters": ["m"],
                "processors": [{"set": {f"k{n}": "'v'" for n in range(40)}}],
            },
        ),
        "spec.processors[0].set: Too many",
    ),
]


@pytest.fixture
def crds(cluster: ControlPlane) -> None:
    from testbed.controlplane import REPO_ROOT

    cluster.kubectl("apply", "--server-side", "-f", str(REPO_ROOT / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")


def test_the_api_server_refuses_every_bad_resource_naming_the_field_and_keeps_serving(
    cluster: ControlPlane, crds: None, namespace: str
) -> None:
    (apiserver,) = [c for c in cluster.components if c.name == "kube-apiserver"]
    assert apiserver.process is not None
    rss_before_mib, _ = memory_mib(apiserver.process.pid)
    documents = [manifest for _, manifest, _ in CRD_CASES]
    documents.append(_kind("Meter", "valid-beside-the-bad", METER))
    result = cluster.kubectl(
        "apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(documents), check=False
    )
    assert result.returncode != 0
    failures = []
    for name, manifest, message in CRD_CASES:
        lines = [line for line in result.stderr.splitlines() if f'"{manifest["metadata"]["name"]}"' in line]
        if not any(message in line for line in lines):
            failures.append(f"{name}: wanted {message!r} in {lines}")
    assert not failures, "\n".join(failures) + "\n" + result.stderr
    kinds = json.loads(
        cluster.kubectl("get", "meters,collectors,pipelines", "-n", namespace, "-o", "json").stdout
    )
    assert [item["metadata"]["name"] for item in kinds["items"]] == ["valid-beside-the-bad"]
    assert cluster.kubectl("get", "--raw", "/readyz").stdout.strip() == "ok"
    # The API server (shared by the session, so its own peak says little) grew by no more than a
    # small fraction of its size while refusing them.
    assert apiserver.process.poll() is None
    rss_after_mib, _ = memory_mib(apiserver.process.pid)
    print(f"kube-apiserver RSS {rss_before_mib:.0f} MiB before the bad resources, {rss_after_mib:.0f} after")
    assert rss_after_mib - rss_before_mib < API_SERVER_GROWTH_MIB
