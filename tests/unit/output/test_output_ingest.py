"""Ingest's fast path (msgspec, raw bytes queued as they arrived) accepts exactly what the reference
rules accept, stores the event unchanged, and refuses with the reference rules' reason."""

from __future__ import annotations

import json
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
    [cloudevent()],
    "an event",
    None,
]


def reference(content_type: str, body: bytes) -> list[tuple[str, str, dict[str, Any]]] | str:
    try:
        events = parse_cloudevents(content_type, body)
    except IngestError as error:
        return str(error)
    return [(r.source, r.event_id, json.loads(r.payload)) for r in (to_record(e, RECEIVED) for e in events)]


def fast(content_type: str, body: bytes) -> list[tuple[str, str, dict[str, Any]]] | str:
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
