"""The local billing API's HTTP surface: four ingest dialects, usage queries, fault injection.

Each dialect answers as the real API does (status codes, error bodies, deduplication):

- OpenMeter ``POST /api/v1/events``: CloudEvents, dedup on (source, id), 204.
- Flexprice ``POST /v1/events/bulk`` and ``/v1/events``: ``x-api-key``, dedup on (event_id,
  timestamp, customer), 202; a different timestamp is a different event, as in ClickHouse there.
- Lago ``POST /api/v1/events/batch`` and ``/api/v1/events`` (``{"event": ...}``): dedup on
  (subscription, transaction_id); a batch holding a stored id fails whole with 422
  ``value_already_exist`` per index, as the Postgres event store does.
- CloudEvents ``POST /cloudevents``: structured or batch mode, dedup on (source, id), 204.

With spec validators loaded, a body that does not match the API's OpenAPI schema is refused with
400 and counted in ``specViolations``. Bad input of any kind is answered 4xx with the reason, never
500: a body that is not UTF-8 JSON, nested too deeply, a query parameter that is not a number.

Fault injection (``/_sink/faults``) is off unless the sink is started with it, and then needs the
sink's token when it has one; a fault is held as (answer, count), so its memory does not grow with
``requests``.
"""

from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest

from kubemeter.events import format_rfc3339
from kubemeter.gateway.limits import BodyRefused, ConnectionGuard, HttpLimits
from kubemeter.output.credentials import SecretFile
from kubemeter.output.ingest import BATCH, STRUCTURED, IngestError, cloudevent_problem, media_type
from kubemeter.sink.specs import RequestValidator, SpecValidators
from kubemeter.sink.store import BilledEvent, UsageStore

FLEXPRICE_MAX_BULK_EVENTS = 1000
MAX_REQUEST_BYTES = 64 * 2**20
MAX_FAULT_REQUESTS = 1_000_000
MAX_FAULT_ENTRIES = 1000
MAX_RETRY_AFTER_S = 3600
# Events one GET /api/v1/usage/events returns: 100,000 unless ``limit`` asks for up to 10^6 (the
# chaos suite's verdict reads a whole run at once).
DEFAULT_EVENTS_LIMIT = 100_000
MAX_EVENTS_LIMIT = 1_000_000
# Unix seconds Lago can store: from 1970 to the end of year 9999.
MAX_UNIX_SECONDS = 253_402_300_799
_SEP = "\x1f"


@dataclass(frozen=True)
class Fault:
    """One injected answer to the next ingest request."""

    status: int
    retry_after_s: float | None = None


def fault_from(body: Any) -> tuple[Fault, int]:
    """The fault and how many requests it answers, from ``/_sink/faults``'s body; ValueError names
    what is wrong."""
    if not isinstance(body, dict):
        raise ValueError('send a JSON object, e.g. {"status": 503, "requests": 3}')
    status = body.get("status")
    # 1xx is not a final answer; below 100 or above 599 is not a status line at all.
    if isinstance(status, bool) or not isinstance(status, int) or not 200 <= status <= 599:
        raise ValueError(f"status must be an HTTP status code from 200 to 599, got {status!r}")
    requests = body.get("requests", 1)
    if isinstance(requests, bool) or not isinstance(requests, int) or not 1 <= requests <= MAX_FAULT_REQUESTS:
        raise ValueError(f"requests must be an integer from 1 to {MAX_FAULT_REQUESTS}, got {requests!r}")
    retry_after = body.get("retryAfterSeconds")
    if retry_after is not None and (
        isinstance(retry_after, bool)
        or not isinstance(retry_after, int | float)
        or not 0 <= retry_after <= MAX_RETRY_AFTER_S
    ):
        raise ValueError(f"retryAfterSeconds must be a number from 0 to {MAX_RETRY_AFTER_S}, or null")
    return Fault(status=status, retry_after_s=retry_after), requests


class Refusal(Exception):
    """An ingest request is refused with this response."""

    def __init__(self, response: web.Response, *, spec_violation: bool = False) -> None:
        super().__init__(response.status)
        self.response = response
        self.spec_violation = spec_violation


def _number(value: Any) -> float | None:
    """A usage value: numbers, or numeric strings (Flexprice and Lago send properties as text)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("value must be a number, not a boolean")
    if isinstance(value, int | float | str):
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"value must be a number, got {value!r}") from None
    else:
        raise ValueError(f"value must be a number, got {type(value).__name__}")
    if not math.isfinite(number):
        raise ValueError(f"value must be finite, got {value!r}")
    return number


def _rfc3339_seconds(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _split_value(fields: dict[str, Any]) -> tuple[float | None, dict[str, Any]]:
    dimensions = {key: value for key, value in fields.items() if key != "value"}
    return _number(fields.get("value")), dimensions


class SinkApp:
    def __init__(
        self,
        store: UsageStore,
        *,
        token: SecretFile | None = None,
        validators: SpecValidators | None = None,
        lago_max_batch_events: int = 100,
        faults_enabled: bool = False,
        limits: HttpLimits | None = None,
    ) -> None:
        self.store = store
        self.token = token
        self.validators = validators
        self.lago_max_batch_events = lago_max_batch_events
        self.faults_enabled = faults_enabled
        # [fault, requests it still answers], oldest first.
        self.faults: deque[list[Any]] = deque()
        self.registry = CollectorRegistry()
        self.guard = ConnectionGuard(limits or HttpLimits(), self.registry)

    def _next_fault(self) -> Fault | None:
        if not self.faults:
            return None
        entry = self.faults[0]
        entry[1] -= 1
        if entry[1] == 0:
            self.faults.popleft()
        fault: Fault = entry[0]
        return fault

    def queued_faults(self) -> int:
        return sum(count for _, count in self.faults)

    def build(self) -> web.Application:
        app = web.Application(client_max_size=MAX_REQUEST_BYTES, middlewares=[self.guard.middleware])
        app.router.add_post("/api/v1/events", self.openmeter_or_lago_single)
        app.router.add_post("/api/v1/events/batch", self.lago_batch)
        app.router.add_post("/v1/events/bulk", self.flexprice_bulk)
        app.router.add_post("/v1/events", self.flexprice_single)
        app.router.add_post("/cloudevents", self.cloudevents)
        app.router.add_get("/api/v1/usage", self.usage)
        app.router.add_get("/api/v1/usage/events", self.events)
        app.router.add_get("/_sink/stats", self.stats)
        app.router.add_post("/_sink/faults", self.add_faults)
        app.router.add_delete("/_sink/faults", self.clear_faults)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/metrics", self.metrics)
        return app

    # -- ingest ------------------------------------------------------------------------------

    async def _ingest(self, request: web.Request, api: str, handler: Any) -> web.Response:
        await self.store.bump(f"requests_{api}")
        fault = self._next_fault()
        if fault is not None:
            headers = {} if fault.retry_after_s is None else {"Retry-After": f"{fault.retry_after_s:g}"}
            return web.json_response({"error": "injected fault"}, status=fault.status, headers=headers)
        try:
            self._check_auth(request, api)
            document = await self._read_json(request, api)
            response: web.Response = await handler(request, document)
            return response
        except Refusal as refusal:
            await self.store.bump(f"rejected_requests_{api}")
            if refusal.spec_violation:
                await self.store.bump("spec_violations")
            return refusal.response

    async def _read_json(self, request: web.Request, api: str) -> Any:
        try:
            body = await self.guard.read_body(request, MAX_REQUEST_BYTES)
        except BodyRefused as refused:
            raise Refusal(self._error(api, refused.status, refused.detail)) from refused
        if request.headers.get("Content-Encoding", "identity").lower() != "identity":
            raise Refusal(self._error(api, 415, "send the body uncompressed (no Content-Encoding)"))
        try:
            document = json.loads(body)
            # A lone surrogate escape parses, but is not text any store could keep.
            json.dumps(document, ensure_ascii=False).encode()
        except (ValueError, UnicodeEncodeError) as error:
            raise Refusal(self._error(api, 400, f"Invalid request payload: {error}")) from error
        except RecursionError as error:
            message = "Invalid request payload: nested too deeply to parse"
            raise Refusal(self._error(api, 400, message)) from error
        return document

    def _presented_token(self, request: web.Request, api: str) -> str:
        if api == "flexprice":
            presented = request.headers.get("x-api-key", "")
        else:
            scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
            presented = presented if scheme.lower() == "bearer" else ""
        # aiohttp keeps undecodable header bytes as surrogates; no token is anything but ASCII.
        return presented.strip() if presented.isascii() else ""

    def _check_auth(self, request: web.Request, api: str) -> None:
        if self.token is None:
            return
        presented = self._presented_token(request, api)
        if not presented or not self.token.accepts(presented):
            raise Refusal(self._error(api, 401, "Invalid API key" if api == "flexprice" else "Unauthorized"))

    def _error(self, api: str, status: int, message: str, details: Any = None) -> web.Response:
        if api == "flexprice":
            if status == 401:
                return web.json_response({"error": message}, status=401)
            body: dict[str, Any] = {
                "code": "validation_error",
                "message": message,
                "http_status_code": status,
            }
            if details is not None:
                body["details"] = details
            return web.json_response(body, status=status)
        if status in (408, 413, 415):
            return web.json_response({"status": status, "error": message}, status=status)
        if api == "lago":
            if status == 422:
                return web.json_response(
                    {
                        "status": 422,
                        "error": "Unprocessable Entity",
                        "code": "validation_errors",
                        "error_details": details or {},
                    },
                    status=422,
                )
            error = "Unauthorized" if status == 401 else f"BadRequest: {message}"
            return web.json_response({"status": status, "error": error}, status=status)
        title = "Unauthorized" if status == 401 else "Bad Request"
        problem = {"type": "about:blank", "title": title, "status": status, "detail": message}
        return web.Response(status=status, body=json.dumps(problem), content_type="application/problem+json")

    def _validate(self, api: str, validator: RequestValidator | None, document: Any) -> None:
        if validator is None:
            return
        problems = validator.problems(document)
        if problems:
            message = f"the body does not match the {api} API spec: {'; '.join(problems)}"
            raise Refusal(self._error(api, 400, message), spec_violation=True)

    # -- OpenMeter and CloudEvents -----------------------------------------------------------

    async def openmeter_or_lago_single(self, request: web.Request) -> web.Response:
        # Lago's single-event endpoint shares the path; its body is {"event": {...}}.
        if media_type(request.content_type) == "application/json":
            try:
                body = await self.guard.read_body(request, MAX_REQUEST_BYTES)
            except BodyRefused:
                body = b""  # _ingest answers it
            if body.lstrip().startswith(b"{") and b'"specversion"' not in body:
                return await self._ingest(request, "lago", self._lago_single)
        return await self._ingest(request, "openmeter", self._openmeter)

    async def cloudevents(self, request: web.Request) -> web.Response:
        return await self._ingest(request, "cloudevents", self._cloudevents)

    async def _openmeter(self, request: web.Request, document: Any) -> web.Response:
        if self.validators is not None:
            single = isinstance(document, dict)
            validator = self.validators.openmeter_event if single else self.validators.openmeter_batch
            self._validate("openmeter", validator, document)
        return await self._store_cloudevents("openmeter", request, document)

    async def _cloudevents(self, request: web.Request, document: Any) -> web.Response:
        kind = media_type(request.content_type)
        if kind == BATCH and not isinstance(document, list):
            raise Refusal(self._error("cloudevents", 400, f"{BATCH} carries a JSON array"))
        if kind == STRUCTURED and not isinstance(document, dict):
            raise Refusal(self._error("cloudevents", 400, f"{STRUCTURED} carries one JSON object"))
        if self.validators is not None:
            for event in document if isinstance(document, list) else [document]:
                self._validate("cloudevents", self.validators.cloudevent, event)
        return await self._store_cloudevents("cloudevents", request, document)

    async def _store_cloudevents(self, api: str, request: web.Request, document: Any) -> web.Response:
        events = document if isinstance(document, list) else [document]
        billed = []
        now = format_rfc3339(datetime.now(UTC))
        for index, event in enumerate(events):
            problem = cloudevent_problem(event)
            try:
                if problem:
                    raise IngestError(problem)
                value, dimensions = _split_value(event.get("data") or {})
            except ValueError as error:
                raise Refusal(
                    self._error(api, 400, f"event {index} (id {event.get('id')!r}): {error}")
                ) from error
            moment = event.get("time") or now
            billed.append(
                BilledEvent(
                    api=api,
                    dedup_key=f"{event['source']}{_SEP}{event['id']}",
                    event_id=event["id"],
                    source=event["source"],
                    subject=event["subject"],
                    type=event["type"],
                    time=moment,
                    time_s=_rfc3339_seconds(moment),
                    value=value,
                    dimensions=dimensions,
                )
            )
        await self.store.add(billed)
        return web.Response(status=204)

    # -- Flexprice ---------------------------------------------------------------------------

    async def flexprice_bulk(self, request: web.Request) -> web.Response:
        return await self._ingest(request, "flexprice", self._flexprice_bulk)

    async def flexprice_single(self, request: web.Request) -> web.Response:
        return await self._ingest(request, "flexprice", self._flexprice_single)

    async def _flexprice_bulk(self, request: web.Request, document: Any) -> web.Response:
        if self.validators is not None:
            self._validate("flexprice", self.validators.flexprice_bulk, document)
        events = document.get("events") if isinstance(document, dict) else None
        if not isinstance(events, list) or not events:
            raise Refusal(self._error("flexprice", 400, "Request validation failed"))
        if len(events) > FLEXPRICE_MAX_BULK_EVENTS:
            raise Refusal(self._error("flexprice", 400, "Maximum 1000 events per batch"))
        await self.store.add([self._flexprice_event(index, event) for index, event in enumerate(events)])
        return web.json_response({"message": "Events accepted for processing"}, status=202)

    async def _flexprice_single(self, request: web.Request, document: Any) -> web.Response:
        if self.validators is not None:
            self._validate("flexprice", self.validators.flexprice_event, document)
        event = self._flexprice_event(0, document)
        await self.store.add([event])
        return web.json_response(
            {"message": "Event accepted for processing", "event_id": event.event_id}, status=202
        )

    def _flexprice_event(self, index: int, event: Any) -> BilledEvent:
        try:
            if not isinstance(event, dict):
                raise ValueError("an event must be a JSON object")
            name = str(event.get("event_name") or "").strip()
            customer = event.get("external_customer_id")
            if not name or not customer:
                raise ValueError("event_name and external_customer_id are required")
            stamp = event.get("timestamp") or format_rfc3339(datetime.now(UTC))
            moment = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
            if moment.tzinfo is None:
                raise ValueError(f"timestamp {stamp!r} has no zone")
            value, dimensions = _split_value(event.get("properties") or {})
        except (ValueError, AttributeError) as error:
            raise Refusal(
                self._error("flexprice", 400, f"Request validation failed: event {index}: {error}")
            ) from error
        event_id = event.get("event_id") or f"event_{index}_{moment.timestamp()}"
        # ClickHouse keeps milliseconds; equal (id, ms timestamp, customer) collapse.
        millis = round(moment.timestamp() * 1000)
        return BilledEvent(
            api="flexprice",
            dedup_key=f"{event_id}{_SEP}{millis}{_SEP}{customer}",
            event_id=event_id,
            source=str(event.get("source") or ""),
            subject=customer,
            type=name,
            time=format_rfc3339(moment),
            time_s=millis / 1000,
            value=value,
            dimensions=dimensions,
        )

    # -- Lago --------------------------------------------------------------------------------

    async def lago_batch(self, request: web.Request) -> web.Response:
        return await self._ingest(request, "lago", self._lago_batch)

    async def _lago_batch(self, request: web.Request, document: Any) -> web.Response:
        if self.validators is not None:
            self._validate("lago", self.validators.lago_batch, document)
        events = document.get("events") if isinstance(document, dict) else None
        if not isinstance(events, list) or not events:
            raise Refusal(self._error("lago", 422, "no_events", {"events": ["no_events"]}))
        if len(events) > self.lago_max_batch_events:
            raise Refusal(self._error("lago", 422, "too_many_events", {"events": ["too_many_events"]}))
        return await self._store_lago(events, batch=True)

    async def _lago_single(self, request: web.Request, document: Any) -> web.Response:
        if self.validators is not None:
            self._validate("lago", self.validators.lago_event, document)
        return await self._store_lago([document.get("event")], batch=False)

    async def _store_lago(self, events: list[Any], *, batch: bool) -> web.Response:
        billed: list[BilledEvent] = []
        errors: dict[str, dict[str, list[str]]] = {}
        for index, event in enumerate(events):
            try:
                billed.append(self._lago_event(event))
            except ValueError as error:
                field, _, code = str(error).partition(":")
                errors[str(index)] = {field: [code]}
        if errors:
            raise Refusal(self._error("lago", 422, "validation_errors", errors if batch else errors["0"]))
        stored = await self.store.add_unless_stored(billed)
        if stored:
            duplicate = {"transaction_id": ["value_already_exist"]}
            details: Any = {str(index): duplicate for index in stored} if batch else duplicate
            raise Refusal(self._error("lago", 422, "validation_errors", details))
        objects = [
            {
                "lago_id": None,
                "transaction_id": e.event_id,
                "lago_customer_id": None,
                "code": e.type,
                "timestamp": e.time,
                "lago_subscription_id": None,
                "external_subscription_id": e.subject,
                "properties": {**e.dimensions, **({"value": e.value} if e.value is not None else {})},
            }
            for e in billed
        ]
        return web.json_response({"events": objects} if batch else {"event": objects[0]}, status=200)

    @staticmethod
    def _lago_event(event: Any) -> BilledEvent:
        if not isinstance(event, dict):
            raise ValueError("event:invalid_format")
        for field in ("transaction_id", "external_subscription_id", "code"):
            if not isinstance(event.get(field), str) or not event[field]:
                raise ValueError(f"{field}:value_is_mandatory")
        stamp = event.get("timestamp")
        try:
            time_s = datetime.now(UTC).timestamp() if stamp is None else float(str(stamp))
        except ValueError:
            raise ValueError("timestamp:invalid_format") from None
        if not 0 <= time_s <= MAX_UNIX_SECONDS:  # also NaN
            raise ValueError("timestamp:invalid_format")
        properties = event.get("properties") or {}
        try:
            value, dimensions = _split_value(properties)
        except ValueError:
            raise ValueError("properties:value_is_not_a_number") from None
        return BilledEvent(
            api="lago",
            dedup_key=f"{event['external_subscription_id']}{_SEP}{event['transaction_id']}",
            event_id=event["transaction_id"],
            source="",
            subject=event["external_subscription_id"],
            type=event["code"],
            time=format_rfc3339(datetime.fromtimestamp(time_s, UTC)),
            time_s=time_s,
            value=value,
            dimensions=dimensions,
        )

    # -- queries and control -----------------------------------------------------------------

    async def usage(self, request: web.Request) -> web.Response:
        query = request.query

        def seconds(name: str) -> float | None:
            text = query.get(name)
            return None if not text else _rfc3339_seconds(text)

        def window_seconds() -> float | None:
            text = query.get("windowSeconds")
            if not text:
                return None
            window_s = float(text)
            if not math.isfinite(window_s) or window_s <= 0:
                raise ValueError(f"windowSeconds is {text!r}")
            return window_s

        try:
            rows = await self.store.usage(
                subject=query.get("subject"),
                event_type=query.get("type"),
                api=query.get("api"),
                from_s=seconds("from"),
                to_s=seconds("to"),
                window_s=window_seconds(),
                group_by=query.getall("groupBy", []),
            )
        except (ValueError, OverflowError) as error:
            message = f"bad query: {error}; times are RFC 3339, windowSeconds a positive number of seconds"
            raise web.HTTPBadRequest(text=message) from error
        for row in rows:
            for edge in ("windowStart", "windowEnd"):
                if row[edge] is not None:
                    row[edge] = format_rfc3339(datetime.fromtimestamp(row[edge], UTC))
        return web.json_response({"data": rows})

    async def events(self, request: web.Request) -> web.Response:
        text = request.query.get("limit", str(DEFAULT_EVENTS_LIMIT))
        if not text.isdigit() or not 1 <= int(text) <= MAX_EVENTS_LIMIT:
            raise web.HTTPBadRequest(
                text=f"limit must be an integer from 1 to {MAX_EVENTS_LIMIT}, got {text!r}"
            )
        limit = int(text)
        return web.json_response(
            {"events": await self.store.events(api=request.query.get("api"), limit=limit)}
        )

    async def stats(self, request: web.Request) -> web.Response:
        counters = await self.store.counters()
        requests = sum(v for k, v in counters.items() if k.startswith("requests_"))
        rejected = sum(v for k, v in counters.items() if k.startswith("rejected_requests_"))
        return web.json_response(
            {
                "storedEvents": counters.get("stored_events", 0),
                "distinctEventIds": counters.get("distinct_event_ids", 0),
                "duplicateEvents": counters.get("duplicate_events", 0),
                "requests": requests,
                "rejectedRequests": rejected,
                "specViolations": counters.get("spec_violations", 0),
                "counters": counters,
            }
        )

    def _faults_refusal(self, request: web.Request) -> web.Response | None:
        if not self.faults_enabled:
            return web.json_response(
                {"error": "fault injection is off; start the sink with --enable-faults"}, status=404
            )
        if self.token is not None:
            presented = self._presented_token(request, "faults")
            if not presented or not self.token.accepts(presented):
                return web.json_response(
                    {"error": "send the sink's token as 'Authorization: Bearer <token>'"}, status=401
                )
        return None

    async def add_faults(self, request: web.Request) -> web.Response:
        """``{"status": 429, "retryAfterSeconds": 1, "requests": 3}``: the next 3 ingest answers."""
        refusal = self._faults_refusal(request)
        if refusal is not None:
            return refusal
        try:
            fault, requests = fault_from(await self._read_json(request, "faults"))
        except Refusal as refused:
            return refused.response
        except ValueError as error:
            return web.json_response({"error": str(error)}, status=400)
        if len(self.faults) >= MAX_FAULT_ENTRIES:
            message = f"{MAX_FAULT_ENTRIES} faults are queued; DELETE /_sink/faults first"
            return web.json_response({"error": message}, status=409)
        self.faults.append([fault, requests])
        return web.json_response({"queued": self.queued_faults()})

    async def clear_faults(self, request: web.Request) -> web.Response:
        refusal = self._faults_refusal(request)
        if refusal is not None:
            return refusal
        self.faults.clear()
        return web.json_response({"queued": 0})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), content_type="text/plain", charset="utf-8")

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")
