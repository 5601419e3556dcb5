"""Reading CloudEvents off the wire (HTTP binding, structured and batch mode) into queue records.

Shared by the gateway's ingest and the local billing API. Checks are the CloudEvents 1.0 rules
plus OpenMeter's (``subject`` required, ``data`` an object).

The gateway's durable ingest is measured against raw SQLite inserts, so the common case costs
well under a microsecond per event: msgspec splits a batch into the raw bytes of each event and
checks the envelope of each in C, and the bytes are queued exactly as they arrived (no decoding
into dicts, no re-encoding). Anything the fast path does not accept goes through
:func:`cloudevent_problem`, the reference rules, which either names what is wrong or accepts it.
"""

from __future__ import annotations

import functools
import json
import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import msgspec

from kubemeter.events import format_rfc3339
from kubemeter.output.queue import QueueRecord

STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
JSON = "application/json"

_REQUIRED_TEXT = ("id", "source", "type", "subject")
# RFC 3339 date-time as every billing API parses it (Go's time.RFC3339 wants the upper-case T and Z).
_LOCAL_TIME = r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?"
_RFC3339 = re.compile(_LOCAL_TIME + r"(?:Z|[+-]\d{2}:\d{2})")
_NO_ZONE = re.compile(_LOCAL_TIME)
_JSON_WHITESPACE = b" \t\r\n"


class IngestError(ValueError):
    """The request is malformed; the message says which event and what to fix. Nothing was stored."""


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


# -- the fast path -----------------------------------------------------------------------------

_NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]
# A field's default that a JSON value can never decode to, so "absent" is an identity check.
_ABSENT = msgspec.Raw(b"")


class _AnyObject(msgspec.Struct, gc=False):
    """Decodes any JSON object (its members are skipped, not built) and nothing else."""


class _Envelope(msgspec.Struct, gc=False):
    """The attributes ingest checks; extension attributes and ``data`` stay in the raw bytes."""

    specversion: Literal["1.0"]
    id: _NonEmpty
    source: _NonEmpty
    type: _NonEmpty
    subject: _NonEmpty
    time: str | None = None
    datacontenttype: Literal["application/json"] | None = None
    data: _AnyObject | None = None
    data_base64: msgspec.Raw = _ABSENT


_SPLIT_BATCH = msgspec.json.Decoder(list[msgspec.Raw])
_ENVELOPE = msgspec.json.Decoder(_Envelope)


class _NotFast(Exception):
    """The fast path cannot vouch for this request; the reference rules decide."""


def read_cloudevents(
    content_type: str | None, body: bytes, received_at: datetime | None = None
) -> list[QueueRecord]:
    """The queue records of one request: a structured event, a batch, or ``application/json`` of
    either. Raises :class:`IngestError` naming the event and the fix; then nothing may be stored."""
    kind = media_type(content_type)
    if kind not in (STRUCTURED, BATCH, JSON):
        raise IngestError(
            f"Content-Type {kind or '(none)'!r} is not accepted; send {STRUCTURED} (one event), "
            f"{BATCH} (a JSON array of events) or {JSON}"
        )
    try:
        return _read_fast(kind, body, received_at)
    except _NotFast:
        pass
    return [to_record(event, received_at) for event in parse_cloudevents(content_type, body)]


def _read_fast(kind: str, body: bytes, received_at: datetime | None) -> list[QueueRecord]:
    first = body.lstrip(_JSON_WHITESPACE)[:1]
    try:
        if first == b"[" and kind != STRUCTURED:
            raws = _SPLIT_BATCH.decode(body)
        elif first == b"{" and kind != BATCH:
            raws = [msgspec.Raw(body)]
        else:
            raise _NotFast
        records = []
        stamp: str | None = None
        for raw in raws:
            envelope = _ENVELOPE.decode(raw)
            if envelope.data_base64 is not _ABSENT:
                raise _NotFast
            if envelope.time is None:
                stamp = stamp or format_rfc3339(received_at or datetime.now(UTC))
                event = msgspec.json.decode(raw)
                event["time"] = stamp
                payload = msgspec.json.encode(event)
            elif _valid_time(envelope.time):
                payload = bytes(raw)
            else:
                raise _NotFast
            records.append(QueueRecord(envelope.source, envelope.id, payload))
        return records
    except msgspec.MsgspecError as error:
        raise _NotFast from error


@functools.lru_cache(maxsize=4096)
def _valid_time(moment: str) -> bool:
    # Usage windows end on the clock, so a batch holds few distinct times: check each once.
    return time_problem(moment) is None


# -- the reference rules -----------------------------------------------------------------------


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_cloudevents(content_type: str | None, body: bytes) -> list[dict[str, Any]]:
    """The events of one request: a structured event, a batch, or ``application/json`` of either."""
    kind = media_type(content_type)
    if kind not in (STRUCTURED, BATCH, JSON):
        raise IngestError(
            f"Content-Type {kind or '(none)'!r} is not accepted; send {STRUCTURED} (one event), "
            f"{BATCH} (a JSON array of events) or {JSON}"
        )
    try:
        # NaN and Infinity are not JSON: no billing API would take them back.
        document = json.loads(body, parse_constant=_refuse_constant)
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


def time_problem(moment: Any) -> str | None:
    """What is wrong with a CloudEvent ``time`` value, or None."""
    if not isinstance(moment, str):
        return "time must be an RFC 3339 string such as 2025-01-01T00:00:00Z"
    if not _RFC3339.fullmatch(moment):
        if _NO_ZONE.fullmatch(moment):
            return f"time {moment!r} has no zone; add Z or an offset"
        return f"time {moment!r} is not RFC 3339; send e.g. 2025-01-01T00:00:00Z"
    try:
        datetime.fromisoformat(moment)  # the ranges: no month 13, no hour 24
    except ValueError as error:
        return f"time {moment!r} is not a valid date and time: {error}"
    return None


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
        return time_problem(moment)
    return None


def to_record(event: dict[str, Any], received_at: datetime | None = None) -> QueueRecord:
    """A validated event as it is queued. An event without ``time`` gets the receive time NOW, so
    every retry carries the same timestamp (Flexprice and Lago deduplicate on id and time)."""
    if event.get("time") is None:
        event = {**event, "time": format_rfc3339(received_at or datetime.now(UTC))}
    try:
        payload = json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError as error:
        problem = f"event {event.get('id')!r} holds text that is not valid Unicode: {error}"
        raise IngestError(problem) from error
    return QueueRecord(source=event["source"], event_id=event["id"], payload=payload)
