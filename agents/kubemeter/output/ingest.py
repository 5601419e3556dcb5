"""Reading CloudEvents off the wire (HTTP binding, structured and batch mode) into queue records.

Shared by the gateway's ingest and the local billing API. Checks are the CloudEvents 1.0 rules,
OpenMeter's (``subject`` required, ``data`` an object), and what a billing API would refuse later
(so it is refused now, with 400, instead of dead-lettered after the ack): text that is not valid
UTF-8, numbers that do not fit a double, ``data.value`` that is not a number or is negative (usage
is never negative: a negative value would credit the subject), ids over
:data:`MAX_ATTRIBUTE_CHARS`, times more than :data:`MAX_FUTURE` ahead of or :data:`MAX_PAST`
behind the receive time, ``data`` nested deeper than :data:`MAX_DATA_DEPTH`.

The gateway's durable ingest is measured against raw SQLite inserts, so the common case must stay
cheap: msgspec splits a batch into the raw bytes of each event and checks each in C against a typed
envelope (``data`` one level of scalars or lists/objects of scalars), and the bytes are queued
exactly as they arrived (no re-encoding). Anything the fast path does not vouch for goes through
:func:`cloudevent_problem`, the reference rules, which either names what is wrong or accepts it.
"""

from __future__ import annotations

import functools
import json
import math
import re
from datetime import UTC, datetime, timedelta
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

# Bounds on what a billing API stores: ids are database keys, data is flattened into properties.
MAX_ATTRIBUTE_CHARS = 256
MAX_DATA_DEPTH = 32
# Windows end on the clock, so an agent's event is never ahead of it; a day covers skewed clocks.
MAX_FUTURE = timedelta(days=1)
# Older than two years is past any open billing period (and any gateway's retention).
MAX_PAST = timedelta(days=731)


class IngestError(ValueError):
    """The request is malformed; the message says which event and what to fix. Nothing was stored."""


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


# -- the fast path -----------------------------------------------------------------------------

_Attribute = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ATTRIBUTE_CHARS)]
# Wider integers (up to a double's range) are legal; the reference rules check those.
_Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
_Scalar = str | bool | None | _Int64 | float
# msgspec checks UTF-8, escapes and the double range of every member it builds, so data is built
# (a dict per event, then dropped): the price of refusing at ingest what a billing API would.
_DataMember = _Scalar | list[_Scalar] | dict[str, _Scalar]


class _Envelope(msgspec.Struct, gc=False, forbid_unknown_fields=True):
    """A plain event; one with extension attributes (or data_base64) takes the reference rules."""

    specversion: Literal["1.0"]
    id: _Attribute
    source: _Attribute
    type: _Attribute
    subject: _Attribute
    time: str | None = None
    datacontenttype: Literal["application/json"] | None = None
    data: dict[str, _DataMember] | None = None


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
    received_at = received_at or datetime.now(UTC)
    try:
        return _read_fast(kind, body, received_at)
    except _NotFast:
        pass
    events = parse_cloudevents(content_type, body, received_at)
    return [to_record(event, received_at) for event in events]


def _read_fast(kind: str, body: bytes, received_at: datetime) -> list[QueueRecord]:
    first = body.lstrip(_JSON_WHITESPACE)[:1]
    received_s = received_at.timestamp()
    earliest_s = received_s - MAX_PAST.total_seconds()
    latest_s = received_s + MAX_FUTURE.total_seconds()
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
            data = envelope.data
            if data is not None and "value" in data:
                value = data["value"]
                kind_of_value = type(value)
                if (kind_of_value is not int and kind_of_value is not float and value is not None) or (
                    value is not None and value < 0  # type: ignore[operator]
                ):
                    raise _NotFast
            if envelope.time is None:
                stamp = stamp or format_rfc3339(received_at)
                event = msgspec.json.decode(raw)
                event["time"] = stamp
                payload = msgspec.json.encode(event)
            else:
                moment_s = _time_seconds(envelope.time)
                if moment_s is None or not earliest_s <= moment_s <= latest_s:
                    raise _NotFast
                payload = bytes(raw)
            records.append(QueueRecord(envelope.source, envelope.id, payload))
        return records
    except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError) as error:
        raise _NotFast from error


@functools.lru_cache(maxsize=4096)
def _time_seconds(moment: str) -> float | None:
    # Usage windows end on the clock, so a batch holds few distinct times: parse each once.
    if time_problem(moment) is not None:
        return None
    return datetime.fromisoformat(moment).timestamp()


# -- the reference rules -----------------------------------------------------------------------


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_cloudevents(
    content_type: str | None, body: bytes, received_at: datetime | None = None
) -> list[dict[str, Any]]:
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
    except UnicodeDecodeError as error:
        raise IngestError(
            f"the body is not valid UTF-8 (byte {error.start}): encode the JSON as UTF-8"
        ) from error
    except ValueError as error:
        raise IngestError(f"the body is not valid JSON: {error}") from error
    except RecursionError as error:
        raise IngestError(
            f"the body is nested too deeply to parse; keep data within {MAX_DATA_DEPTH} levels"
        ) from error
    if kind == STRUCTURED and not isinstance(document, dict):
        raise IngestError(f"{STRUCTURED} carries one event, a JSON object; send arrays as {BATCH}")
    if kind == BATCH and not isinstance(document, list):
        raise IngestError(f"{BATCH} carries a JSON array of events")
    events = document if isinstance(document, list) else [document]
    for index, event in enumerate(events):
        problem = cloudevent_problem(event, received_at)
        if problem:
            where = f"event {index}" if isinstance(document, list) else "the event"
            event_id = event.get("id") if isinstance(event, dict) else None
            raise IngestError(f"{where}{f' (id {event_id!r})' if event_id else ''}: {problem}")
    return events


def time_problem(moment: Any, received_at: datetime | None = None) -> str | None:
    """What is wrong with a CloudEvent ``time`` value, or None; with ``received_at``, also a time
    more than :data:`MAX_FUTURE` ahead of it or :data:`MAX_PAST` behind it."""
    if not isinstance(moment, str):
        return "time must be an RFC 3339 string such as 2025-01-01T00:00:00Z"
    if not _RFC3339.fullmatch(moment):
        if _NO_ZONE.fullmatch(moment):
            return f"time {moment!r} has no zone; add Z or an offset"
        return f"time {moment!r} is not RFC 3339; send e.g. 2025-01-01T00:00:00Z"
    try:
        parsed = datetime.fromisoformat(moment)  # the ranges: no month 13, no hour 24
    except ValueError as error:
        return f"time {moment!r} is not a valid date and time: {error}"
    if received_at is not None:
        if parsed > received_at + MAX_FUTURE:
            return (
                f"time {moment!r} is more than {MAX_FUTURE.days} day ahead of the gateway's clock "
                f"({format_rfc3339(received_at)}); send the time the usage happened"
            )
        if parsed < received_at - MAX_PAST:
            return (
                f"time {moment!r} is more than {MAX_PAST.days} days before the gateway's clock "
                f"({format_rfc3339(received_at)}); usage that old is past every billing period"
            )
    return None


def _number_problem(number: int | float, where: str) -> str | None:
    try:
        finite = math.isfinite(number)
    except OverflowError:  # an int beyond a double
        finite = False
    if not finite:
        return f"{where} is {number!r:.40}, which does not fit a double; billing APIs refuse it"
    return None


def _nested_problem(node: Any, where: str, depth: int) -> str | None:
    """Numbers that fit a double, nesting within MAX_DATA_DEPTH, anywhere under ``node``."""
    if isinstance(node, bool) or node is None or isinstance(node, str):
        return None
    if isinstance(node, int | float):
        return _number_problem(node, where)
    if depth >= MAX_DATA_DEPTH:
        return f"{where} is nested more than {MAX_DATA_DEPTH} levels deep; flatten it"
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for key, item in items:
        problem = _nested_problem(item, f"{where}.{key}", depth + 1)
        if problem:
            return problem
    return None


def value_problem(value: Any) -> str | None:
    """What is wrong with ``data.value`` (the usage quantity), or None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"data.value must be a JSON number, got {json.dumps(value)[:40]}"
    if value < 0:
        return (
            f"data.value is {value!r}; usage is never negative (it would credit the subject): "
            "send the quantity used, 0 or more"
        )
    return None


def cloudevent_problem(event: Any, received_at: datetime | None = None) -> str | None:
    """What is wrong with one CloudEvent, or None. ``received_at`` bounds its time."""
    if not isinstance(event, dict):
        return "an event must be a JSON object"
    if event.get("specversion") != "1.0":
        return f'specversion must be "1.0", got {event.get("specversion")!r}'
    for name in _REQUIRED_TEXT:
        value = event.get(name)
        if not isinstance(value, str) or not value:
            hint = "; the subject is the customer billed for the usage" if name == "subject" else ""
            return f"{name} must be a non-empty string{hint}"
        if len(value) > MAX_ATTRIBUTE_CHARS:
            return (
                f"{name} is {len(value)} characters long; billing APIs key on it: "
                f"send at most {MAX_ATTRIBUTE_CHARS}"
            )
    data = event.get("data")
    if data is not None and not isinstance(data, dict):
        return "data must be a JSON object (or absent)"
    if data is not None:
        problem = value_problem(data.get("value"))
        if problem:
            return problem
    for name, member in event.items():
        problem = _nested_problem(member, name, 0 if name == "data" else 1)
        if problem:
            return problem
    if "data_base64" in event:
        return "data_base64 is not accepted; send data as a JSON object"
    content = event.get("datacontenttype")
    if content is not None and content != JSON:
        return f"datacontenttype must be {JSON} (or absent), got {content!r}"
    moment = event.get("time")
    if moment is not None:
        return time_problem(moment, received_at)
    return None


def to_record(event: dict[str, Any], received_at: datetime | None = None) -> QueueRecord:
    """A validated event as it is queued. An event without ``time`` gets the receive time NOW, so
    every retry carries the same timestamp (Flexprice and Lago deduplicate on id and time)."""
    if event.get("time") is None:
        event = {**event, "time": format_rfc3339(received_at or datetime.now(UTC))}
    try:
        payload = json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError as error:
        problem = (
            f"event {event.get('id')!r} holds a lone surrogate escape ({error.object[error.start]!a}), "
            "which is not Unicode text; escape characters beyond U+FFFF as a surrogate pair"
        )
        raise IngestError(problem) from error
    return QueueRecord(source=event["source"], event_id=event["id"], payload=payload)
