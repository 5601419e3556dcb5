"""Reading CloudEvents off the wire (HTTP binding, structured and batch mode) into queue records.

Shared by the gateway's ingest and the local billing API. Checks are the CloudEvents 1.0 rules
plus OpenMeter's (``subject`` required, ``data`` an object), written out by hand because pydantic
per event would cost more than the fsync'd commit the gateway is measured against.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from kubemeter.events import format_rfc3339
from kubemeter.output.queue import QueueRecord

STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
JSON = "application/json"

_REQUIRED_TEXT = ("id", "source", "type", "subject")


class IngestError(ValueError):
    """The request is malformed; the message says which event and what to fix. Nothing was stored."""


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def parse_cloudevents(content_type: str | None, body: bytes) -> list[dict[str, Any]]:
    """The events of one request: a structured event, a batch, or ``application/json`` of either."""
    kind = media_type(content_type)
    if kind not in (STRUCTURED, BATCH, JSON):
        raise IngestError(
            f"Content-Type {kind or '(none)'!r} is not accepted; send {STRUCTURED} (one event), "
            f"{BATCH} (a JSON array of events) or {JSON}"
        )
    try:
        document = json.loads(body)
    except ValueError as error:
        raise IngestError(f"the body is not valid JSON: {error}") from error
    if kind == STRUCTURED and not isinstance(document, dict):
        raise IngestError(f"{STRUCTURED} carries one event, a JSON object; send arrays as {BATCH}")
    if kind == BATCH and not isinstance(document, list):
        raise IngestError(f"{BATCH} carries a JSON array of events")
    events = document if isinstance(document, list) else [document]
    for index, event in enumerate(events):
        problem = cloudevent_problem(event)
        if problem:
            where = f"event {index}" if isinstance(document, list) else "the event"
            event_id = event.get("id") if isinstance(event, dict) else None
            raise IngestError(f"{where}{f' (id {event_id!r})' if event_id else ''}: {problem}")
    return events


def cloudevent_problem(event: Any) -> str | None:
    """What is wrong with one CloudEvent, or None."""
    if not isinstance(event, dict):
        return "an event must be a JSON object"
    if event.get("specversion") != "1.0":
        return f'specversion must be "1.0", got {event.get("specversion")!r}'
    for name in _REQUIRED_TEXT:
        value = event.get(name)
        if not isinstance(value, str) or not value:
            hint = "; the subject is the customer billed for the usage" if name == "subject" else ""
            return f"{name} must be a non-empty string{hint}"
    data = event.get("data")
    if data is not None and not isinstance(data, dict):
        return "data must be a JSON object (or absent)"
    if "data_base64" in event:
        return "data_base64 is not accepted; send data as a JSON object"
    content = event.get("datacontenttype")
    if content is not None and content != JSON:
        return f"datacontenttype must be {JSON} (or absent), got {content!r}"
    moment = event.get("time")
    if moment is not None:
        if not isinstance(moment, str):
            return "time must be an RFC 3339 string such as 2025-01-01T00:00:00Z"
        try:
            parsed = datetime.fromisoformat(moment)
        except ValueError:
            return f"time {moment!r} is not RFC 3339; send e.g. 2025-01-01T00:00:00Z"
        if parsed.tzinfo is None:
            return f"time {moment!r} has no zone; add Z or an offset"
    return None


def to_record(event: dict[str, Any], received_at: datetime | None = None) -> QueueRecord:
    """A validated event as it is queued. An event without ``time`` gets the receive time NOW, so
    every retry carries the same timestamp (Flexprice and Lago deduplicate on id and time)."""
    if event.get("time") is None:
        event = {**event, "time": format_rfc3339(received_at or datetime.now(UTC))}
    payload = json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()
    return QueueRecord(source=event["source"], event_id=event["id"], payload=payload)
