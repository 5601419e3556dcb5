"""Ingest's fast path (msgspec, raw bytes queued as they arrived) accepts exactly what the reference
rules accept, stores the event unchanged, and refuses with the reference rules' reason."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

import pytest
from kubemeter.output.ingest import IngestError, parse_cloudevents, read_cloudevents, to_record

BATCH = "application/cloudevents-batch+json"
STRUCTURED = "application/cloudevents+json"
RECEIVED = datetime(2025, 3, 1, 8, 30, tzinfo=UTC)


def cloudevent(**changes: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "specversion": "1.0",
        "id": "a-1",
        "source": "app",
        "type": "api.call",
        "subject": "cust-1",
        "time": "2025-01-01T00:00:00Z",
        "data": {"value": 1},
    }
    event.update(changes)
    return {k: v for k, v in event.items() if v is not ...}


def _nested(levels: int) -> Any:
    node: Any = 1
    for _ in range(levels):
        node = {"n": node}
    return node


EDGE_CASES: list[Any] = [
    cloudevent(),
    cloudevent(time=...),
    cloudevent(time=None),
    cloudevent(data=...),
    cloudevent(data=None),
    cloudevent(data={}),
    cloudevent(datacontenttype="application/json"),
    cloudevent(datacontenttype=None),
    cloudevent(time="2025-01-01T00:00:00.123456789+02:00"),
    cloudevent(time="2025-01-01T00:00:00.5-05:30"),
    cloudevent(traceparent="00-abc", partitionkey={"nested": [1, 2]}),  # extension attributes
    cloudevent(id="ü-ñ-€", subject="客户"),
    # refused, each for its own reason
    cloudevent(time="2025-01-01 00:00:00Z"),
    cloudevent(time="2025-01-01t00:00:00z"),
    cloudevent(time="2025-01-01T00:00:00"),
    cloudevent(time="2025-13-01T00:00:00Z"),
    cloudevent(time="2025-02-30T00:00:00Z"),
    cloudevent(time="2025-01-01T24:00:00Z"),
    cloudevent(time=1735689600),
    cloudevent(id=""),
    cloudevent(id=7),
    cloudevent(subject=...),
    cloudevent(subject=None),
    cloudevent(specversion="0.3"),
    cloudevent(specversion=1.0),
    cloudevent(data=[1]),
    cloudevent(data="text"),
    cloudevent(data_base64="AA=="),
    cloudevent(data_base64=None),
    cloudevent(datacontenttype="text/plain"),
    # what a billing API would refuse after the ack
    cloudevent(data={"value": -1}),
    cloudevent(data={"value": -0.001}),
    cloudevent(data={"value": "ten"}),
    cloudevent(data={"value": True}),
    cloudevent(data={"value": [1]}),
    cloudevent(data={"value": None}),
    cloudevent(data={"value": 0}),
    cloudevent(data={"value": 2**70}),
    cloudevent(data={"value": 1, "bytes": 10**400}),
    cloudevent(data={"value": 1, "deep": {"a": {"b": [1]}}}),
    cloudevent(data={"value": 1, "deep": _nested(40)}),
    cloudevent(id="i" * 256),
    cloudevent(id="i" * 257),
    cloudevent(subject="s" * 300),
    cloudevent(source="s" * 257),
    cloudevent(type="t" * 257),
    cloudevent(time="2025-03-02T08:29:59Z"),
    cloudevent(time="2025-03-02T08:30:01Z"),
    cloudevent(time="2023-02-28T08:30:00Z"),
    cloudevent(time="2023-02-27T08:30:00Z"),
    cloudevent(time="9999-12-31T23:59:59Z"),
    cloudevent(time="0001-01-01T00:00:00Z"),
    cloudevent(traceparent="00-abc", big=10**400),
    [cloudevent()],
    "an event",
    None,
]


def reference(content_type: str, body: bytes) -> list[tuple[str, str, dict[str, Any]]] | str:
    try:
        events = parse_cloudevents(content_type, body, RECEIVED)
    except IngestError as error:
        return str(error)
    return [(r.source, r.event_id, json.loads(r.payload)) for r in (to_record(e, RECEIVED) for e in events)]


def fast(content_type: str, body: bytes) -> list[tuple[str, str, dict[str, Any]]] | str:
    """read_cloudevents, the gateway's entry (fast path first)."""
    try:
        records = read_cloudevents(content_type, body, RECEIVED)
    except IngestError as error:
        return str(error)
    return [(r.source, r.event_id, json.loads(r.payload)) for r in records]


@pytest.mark.parametrize("event", EDGE_CASES, ids=lambda e: json.dumps(e, ensure_ascii=False)[:60])
def test_fast_path_and_reference_rules_agree_on_every_event(event: Any) -> None:
    for content_type, document in ((BATCH, [cloudevent(id="ok"), event]), (STRUCTURED, event)):
        body = json.dumps(document, ensure_ascii=False).encode()
        assert fast(content_type, body) == reference(content_type, body)


def test_events_are_queued_byte_for_byte_as_they_arrived() -> None:
    events = [cloudevent(id=f"a-{n}", data={"value": n / 3, "pod": "p"}) for n in range(3)]
    body = b"[ " + b" ,\n ".join(json.dumps(e).encode() for e in events) + b" ]"
    records = read_cloudevents(BATCH, body)
    assert [r.payload for r in records] == [json.dumps(e).encode() for e in events]
    assert [(r.source, r.event_id) for r in records] == [("app", "a-0"), ("app", "a-1"), ("app", "a-2")]


def test_an_event_without_time_is_stamped_once_with_the_receive_time() -> None:
    body = json.dumps([cloudevent(id="a", time=...), cloudevent(id="b", time=None)]).encode()
    records = read_cloudevents(BATCH, body, RECEIVED)
    assert [json.loads(r.payload)["time"] for r in records] == ["2025-03-01T08:30:00Z"] * 2


@pytest.mark.parametrize(
    ("content_type", "body", "reason"),
    [
        (BATCH, b"[{", "not valid JSON"),
        (BATCH, b'[{"value": NaN}]', "not valid JSON"),
        (BATCH, json.dumps(cloudevent()).encode(), "JSON array"),
        (STRUCTURED, json.dumps([cloudevent()]).encode(), "one event, a JSON object"),
        ("text/plain", b"{}", "text/plain"),
        (BATCH, json.dumps([cloudevent(), cloudevent(time="noon")]).encode(), "event 1 (id 'a-1')"),
    ],
)
def test_malformed_requests_are_refused_with_the_reason(content_type: str, body: bytes, reason: str) -> None:
    with pytest.raises(IngestError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        read_cloudevents(content_type, body)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (
            b'[{"specversion":"1.0","id":"a","source":"s","type":"t","subject":"c","data":{"value":1e400}}]',
            "data.value is inf, which does not fit a double",
        ),
        (
            b'[{"specversion":"1.0","id":"a","source":"s","type":"t","subject":"c","data":{"v":-1e999}}]',
            "data.v is -inf",
        ),
        (json.dumps([cloudevent(data={"value": -3})]).encode(), "usage is never negative"),
        (json.dumps([cloudevent(data={"value": "3"})]).encode(), "data.value must be a JSON number"),
        (json.dumps([cloudevent(data={"value": 1, "n": 10**400})]).encode(), "data.n is 1000"),
        (json.dumps([cloudevent(id="x" * 257)]).encode(), "id is 257 characters long"),
        (json.dumps([cloudevent(subject="x" * 1000)]).encode(), "send at most 256"),
        (json.dumps([cloudevent(time="2031-01-01T00:00:00Z")]).encode(), "more than 1 day ahead"),
        (json.dumps([cloudevent(time="2001-01-01T00:00:00Z")]).encode(), "more than 731 days before"),
        (json.dumps([cloudevent(data={"value": 1, "deep": _nested(40)})]).encode(), "flatten it"),
        (b'[{"specversion":"1.0","id":"a","source":"s","type":"t","subject":"\xff"}]', "not valid UTF-8"),
        (b'[{"specversion":"1.0","id":"a","source":"s","type":"t","subject":"\\udcff"}]', "lone surrogate"),
        (b"[" * 50_000 + b"]" * 50_000, "nested too deeply"),
        (b'[{"data":' + b'{"a":' * 50_000 + b"1" + b"}" * 50_001 + b"]", "nested too deeply"),
    ],
    ids=lambda value: value.decode("latin-1")[:40] if isinstance(value, bytes) else value,
)
def test_what_a_billing_api_would_refuse_is_refused_at_ingest_with_the_fix(body: bytes, reason: str) -> None:
    with pytest.raises(IngestError, match=re.escape(reason)):
        read_cloudevents(BATCH, body, RECEIVED)


def test_a_valid_surrogate_pair_and_large_usage_values_are_accepted() -> None:
    body = b'[{"specversion":"1.0","id":"a","source":"s","type":"t","subject":"\\ud83d\\ude00",'
    body += b'"time":"2025-03-01T08:00:00Z","data":{"value":123456789012345678901234}}]'
    (record,) = read_cloudevents(BATCH, body, RECEIVED)
    assert json.loads(record.payload)["subject"] == "\U0001f600"
