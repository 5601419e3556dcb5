"""The gateway's HTTP surface: ingest, the agents' fault reports, /metrics, /healthz (= /livez),
/readyz, /status.

An ingest request is answered only after its events are committed to disk (204), or refused as a
whole: 400 malformed (naming the event and the fix), 401 unauthenticated, 408 body too slow, 413
too large (also once inflated), 415 an unsupported encoding, 503 with ``Retry-After`` when the
buffer is full or too many requests are in flight. A client that forwards through
:class:`~kubemeter.output.delivery.DeliveryCore` (every agent) splits a refused batch to deliver
the valid events beside a bad one.
"""

from __future__ import annotations

import json
import math
import time
import zlib
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from pydantic import ValidationError

from kubemeter.api.rendered import (
    AGENT_REPORT_PATH,
    FAULT_REPORT_TTL_SECONDS,
    LIVENESS_PATH,
    READINESS_PATH,
    AgentFaultReport,
    GatewayStatusReport,
)
from kubemeter.gateway.agent_reports import AgentReportTable
from kubemeter.gateway.limits import BodyRefused, ConnectionGuard, HttpLimits
from kubemeter.output.credentials import SecretFile
from kubemeter.output.delivery import DeliveryCore
from kubemeter.output.ingest import IngestError, read_cloudevents
from kubemeter.output.queue import DurableQueue, QueueFullError, WhenFull

INGEST_PATH = "/api/v1/events"
MAX_REQUEST_BYTES = 32 * 2**20
MAX_AGENT_REPORT_BYTES = 256 * 2**10
PROBLEM_JSON = "application/problem+json"
# zlib's window bits: gzip framing, zlib framing (what "deflate" means in HTTP).
_INFLATE_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def problem(status: int, title: str, detail: str, headers: dict[str, str] | None = None) -> web.Response:
    """An RFC 9457 problem document, the error shape OpenMeter clients expect."""
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    return web.Response(status=status, body=json.dumps(body), content_type=PROBLEM_JSON, headers=headers)


def inflate(body: bytes, encoding: str, max_bytes: int) -> bytes:
    """``body`` decoded from its Content-Encoding, never more than ``max_bytes`` of it in memory.

    aiohttp's own decoding is turned off (``auto_decompress=False``): it would inflate before any
    limit applies, so a 1 MB gzip bomb could take a gigabyte."""
    if encoding in ("", "identity"):
        return body
    wbits = _INFLATE_WBITS.get(encoding)
    if wbits is None:
        raise BodyRefused(
            415,
            "Unsupported Media Type",
            f"Content-Encoding {encoding!r} is not accepted; send the body as is, or gzip or deflate",
        )
    inflater = zlib.decompressobj(wbits)
    try:
        inflated = inflater.decompress(body, max_bytes + 1)
    except zlib.error as error:
        raise BodyRefused(400, "Bad Request", f"the body is not valid {encoding}: {error}") from error
    if len(inflated) > max_bytes:
        raise BodyRefused(
            413, "Payload Too Large", f"the body inflates past {max_bytes} bytes; send smaller batches"
        )
    if not inflater.eof or inflater.unused_data:
        raise BodyRefused(400, "Bad Request", f"the {encoding} body is truncated or has trailing data")
    return inflated


class _QueueGauges(Collector):
    """Buffer gauges read at scrape time, so they are never stale."""

    def __init__(self, queue: DurableQueue) -> None:
        self._queue = queue

    def collect(self) -> Any:
        stats = self._queue.stats()
        yield GaugeMetricFamily(
            "kubemeter_buffer_events", "Events on disk not yet delivered", value=stats.events
        )
        yield GaugeMetricFamily(
            "kubemeter_buffer_bytes", "Payload bytes of the events on disk", value=stats.payload_bytes
        )
        yield GaugeMetricFamily(
            "kubemeter_buffer_oldest_age_seconds",
            "Age of the oldest buffered event",
            value=stats.oldest_age_s,
        )
        yield GaugeMetricFamily(
            "kubemeter_buffer_dead_letters", "Events in the dead-letter table", value=stats.dead_letters
        )
        yield GaugeMetricFamily(
            "kubemeter_buffer_dropped_events",
            "Events dropped by the DropOldest policy since start",
            value=stats.dropped_events_total,
        )
        yield CounterMetricFamily(
            "kubemeter_buffer_commits",
            "Transactions the buffer committed, one fsync each (events per commit is the grouping)",
            value=stats.commits_total,
        )


class GatewayApp:
    """Wires ingest to the queue; ``delivery`` is optional so ingest can be measured on its own."""

    def __init__(
        self,
        queue: DurableQueue,
        *,
        delivery: DeliveryCore | None,
        ingest_token: SecretFile | None,
        registry: CollectorRegistry,
        limits: HttpLimits | None = None,
        agent_reports: AgentReportTable | None = None,
    ) -> None:
        self.queue = queue
        self.agent_reports = agent_reports or AgentReportTable(FAULT_REPORT_TTL_SECONDS)
        self.delivery = delivery
        self.ingest_token = ingest_token
        self.registry = registry
        self.guard = ConnectionGuard(limits or HttpLimits(), registry)
        registry.register(_QueueGauges(queue))
        self.ingested = Counter(
            "kubemeter_ingest_events", "Events accepted by ingest (committed to disk)", registry=registry
        )
        self.refused = Counter(
            "kubemeter_ingest_refused_requests", "Ingest requests refused", ["reason"], registry=registry
        )
        self.ack_seconds = Histogram(
            "kubemeter_ingest_ack_seconds",
            "From request received to acknowledgement (includes the fsync'd commit)",
            registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )

    def build(self) -> web.Application:
        app = web.Application(client_max_size=MAX_REQUEST_BYTES, middlewares=[self.guard.middleware])
        app.router.add_post(INGEST_PATH, self.ingest)
        app.router.add_post(AGENT_REPORT_PATH, self.agent_report)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get(LIVENESS_PATH, self.healthz)
        app.router.add_get(READINESS_PATH, self.readyz)
        app.router.add_get("/status", self.status)
        return app

    def _authorized(self, request: web.Request) -> str | None:
        """None when the request may ingest, else why not."""
        if self.ingest_token is None:
            return None
        header = request.headers.get("Authorization", "")
        if not header.isascii():
            return "the Authorization header must be ASCII: send 'Authorization: Bearer <token>'"
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return "send the gateway token as 'Authorization: Bearer <token>'"
        if not self.ingest_token.accepts(token.strip()):
            return "the bearer token is not accepted; use the token from the gateway's ingest Secret"
        return None

    async def ingest(self, request: web.Request) -> web.Response:
        started_s = time.perf_counter()
        refusal = self._authorized(request)
        if refusal:
            self.refused.labels("unauthorized").inc()
            return problem(401, "Unauthorized", refusal, {"WWW-Authenticate": 'Bearer realm="kubemeter"'})
        try:
            body = await self.guard.read_body(request, MAX_REQUEST_BYTES)
            encoding = request.headers.get("Content-Encoding", "").strip().lower()
            records = read_cloudevents(request.content_type, inflate(body, encoding, MAX_REQUEST_BYTES))
        except IngestError as error:
            self.refused.labels("malformed").inc()
            return problem(400, "Bad Request", str(error))
        except BodyRefused as refused:
            reason = {408: "body_timeout", 413: "too_large", 415: "encoding"}.get(refused.status, "malformed")
            self.refused.labels(reason).inc()
            return problem(refused.status, refused.title, refused.detail)
        try:
            await self.queue.enqueue(records)
        except QueueFullError as error:
            self.refused.labels("full").inc()
            retry_after_s = str(max(1, math.ceil(error.retry_after_s)))
            return problem(503, "Service Unavailable", error.reason, {"Retry-After": retry_after_s})
        self.ingested.inc(len(records))
        self.ack_seconds.observe(time.perf_counter() - started_s)
        return web.Response(status=204)

    async def agent_report(self, request: web.Request) -> web.Response:
        """An agent's source faults (its whole current set), kept in memory: agents re-post while
        they have any, so a restarted gateway knows them again within one refresh."""
        refusal = self._authorized(request)
        if refusal:
            self.refused.labels("unauthorized").inc()
            return problem(401, "Unauthorized", refusal, {"WWW-Authenticate": 'Bearer realm="kubemeter"'})
        try:
            body = await self.guard.read_body(request, MAX_AGENT_REPORT_BYTES)
            report = AgentFaultReport.model_validate_json(body)
        except BodyRefused as refused:
            return problem(refused.status, refused.title, refused.detail)
        except ValidationError as error:
            self.refused.labels("malformed").inc()
            return problem(400, "Bad Request", f"not an agent fault report: {error}")
        if not self.agent_reports.record(report):
            return problem(503, "Service Unavailable", "too many agents reporting", {"Retry-After": "30"})
        return web.Response(status=204)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), content_type="text/plain", charset="utf-8")

    async def healthz(self, request: web.Request) -> web.Response:
        """Liveness: this event loop answers. Nothing outside the process is asked."""
        return web.Response(text="ok")

    async def readyz(self, request: web.Request) -> web.Response:
        """Readiness: ingest would store events now. 503 while the queue is closed or full (Block), so
        a Service sends agents to a replica with room; they spool meanwhile."""
        refusal = self.not_ready_reason()
        if refusal:
            return web.Response(status=503, text=refusal + "\n")
        return web.Response(text="ready\n")

    def not_ready_reason(self) -> str | None:
        if not self.queue.accepting:
            return "the queue is closed"
        limits = self.queue.limits
        if limits.when_full is not WhenFull.BLOCK:
            return None  # DropOldest makes room for every batch
        stats = self.queue.stats()
        if limits.max_bytes is not None and stats.payload_bytes >= limits.max_bytes:
            return f"the buffer is full: {stats.payload_bytes} of {limits.max_bytes} bytes"
        refused_bytes = self.queue.refused_batch_bytes
        if limits.max_bytes is not None and stats.payload_bytes + refused_bytes > limits.max_bytes:
            # Short of the cap, but the batch last refused for room would be refused again.
            return (
                f"the buffer is full: {stats.payload_bytes} of {limits.max_bytes} bytes, no room for "
                f"the {refused_bytes}-byte batch last refused"
            )
        if limits.max_age_s is not None and stats.events and stats.oldest_age_s > limits.max_age_s:
            return f"the buffer is full: its oldest event is {stats.oldest_age_s:.0f} s old (retention)"
        return None

    def status_report(self) -> GatewayStatusReport:
        stats = self.queue.stats()
        delivery = self.delivery.status if self.delivery is not None else None
        return GatewayStatusReport(
            buffered_events=stats.events,
            buffered_bytes=stats.payload_bytes,
            oldest_event_age_seconds=stats.oldest_age_s,
            delivered_events=delivery.delivered_events_total if delivery else 0,
            dead_lettered_events=stats.dead_letters,
            last_delivery_error=delivery.last_error if delivery else None,
            paused_reason=delivery.paused_reason if delivery else None,
            agent_reports=self.agent_reports.live(),
            agent_reports_complete=self.agent_reports.complete(),
        )

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(self.status_report().to_wire())
