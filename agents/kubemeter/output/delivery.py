"""The delivery core: moves events from a :class:`DurableQueue` to one billing API.

Batching, retry with exponential backoff and jitter, ``Retry-After``, rate limiting, bisecting a
refused batch and dead-lettering exist here once; a sink only encodes a batch into one HTTP request
and classifies the response (see :mod:`kubemeter.output.sinks`). A sink that is not HTTP (Kafka)
brings its own transport (:class:`RecordSink`): it sends what it encoded and returns the verdict,
and the same rules apply to that verdict.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol, runtime_checkable

import httpx
from prometheus_client import CollectorRegistry, Counter, Histogram

from kubemeter.output.credentials import SecretFile
from kubemeter.output.queue import DurableQueue, QueuedEvent

log = logging.getLogger(__name__)

# Kept with a dead letter: enough to read the API's reason, bounded so one reply cannot bloat the PV.
_RESPONSE_KEEP_BYTES = 4096
# Retry-After values beyond this are treated as this (a misconfigured API must not park us for days).
_MAX_RETRY_AFTER_S = 3600.0


class DeliveryOutcome(Enum):
    DELIVERED = "delivered"  # 2xx, or the API says it already has the events
    RETRY_LATER = "retry_later"  # 429, 5xx, timeouts: the same events again, later
    REJECTED = "rejected"  # 400/422: some event in the batch is bad; isolate and dead-letter it
    UNAUTHORIZED = "unauthorized"  # 401/403: pause until the credentials change


@dataclass(frozen=True)
class Verdict:
    """A sink's reading of one response.

    ``per_event`` (index in the batch → outcome and reason) lets an API that names the failing
    events (Lago) settle them without bisecting; events it does not name are sent again.
    """

    outcome: DeliveryOutcome
    reason: str = ""
    retry_after_s: float | None = None
    per_event: Mapping[int, tuple[DeliveryOutcome, str]] = field(default_factory=dict)


class UnencodableEvent(ValueError):
    """Raised by :meth:`Sink.encode`: the event at ``index`` of the batch cannot be expressed in this
    API (e.g. no Lago subscription for it). It is dead-lettered with ``reason``; the rest is sent."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(reason)
        self.index = index
        self.reason = reason


@dataclass(frozen=True)
class EncodedRequest:
    """One HTTP request: ``url`` is absolute, ``headers`` exclude authentication."""

    url: str
    headers: Mapping[str, str]
    body: bytes


class Sink(Protocol):
    """One billing API: an encoder and a response classifier. Nothing else."""

    kind: str
    max_batch_events: int

    def encode(self, events: Sequence[QueuedEvent]) -> EncodedRequest: ...

    def auth_headers(self, secret: str) -> dict[str, str]: ...

    def classify(self, response: httpx.Response, batch: Sequence[QueuedEvent]) -> Verdict: ...


@runtime_checkable
class RecordSink(Protocol):
    """A sink with its own transport (a Kafka producer): ``encode`` gives what ``produce`` sends;
    ``produce`` returns the verdict once the far side answered or a timeout passed."""

    kind: str
    max_batch_events: int

    def encode(self, events: Sequence[QueuedEvent]) -> Any: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def produce(self, events: Sequence[QueuedEvent], request: Any) -> Verdict: ...

    async def already_written(self, events: Sequence[QueuedEvent]) -> set[str]:
        """Ids of ``events`` the far side already holds (written by a process that died before it
        could mark them delivered); only ids it found, so a miss can cost a copy, never an event."""
        ...


def retry_after_seconds(headers: Mapping[str, str], *, now_s: float | None = None) -> float | None:
    """Seconds to wait from ``Retry-After`` (seconds or HTTP date) or ``X-RateLimit-Reset``."""
    now_s = time.time() if now_s is None else now_s
    value = headers.get("retry-after")
    if value:
        value = value.strip()
        try:
            return min(max(0.0, float(value)), _MAX_RETRY_AFTER_S)
        except ValueError:
            with contextlib.suppress(TypeError, ValueError):
                moment = email.utils.parsedate_to_datetime(value).timestamp()
                return min(max(0.0, moment - now_s), _MAX_RETRY_AFTER_S)
    reset = headers.get("x-ratelimit-reset")
    if reset:
        with contextlib.suppress(ValueError):
            number = float(reset)
            # Lago sends seconds until the reset; others an epoch time.
            seconds = number - now_s if number > 1_000_000_000 else number
            return min(max(0.0, seconds), _MAX_RETRY_AFTER_S)
    return None


BILLING_CREDENTIALS_FIX = "fix the API key in the Secret named by output.credentialsSecretRef"


def standard_verdict(response: httpx.Response, *, unauthorized_fix: str = BILLING_CREDENTIALS_FIX) -> Verdict:
    """The delivery rules every API shares, by status code (DESIGN.md, "Delivery rules").
    ``unauthorized_fix`` is what a 401/403 tells the reader to do."""
    status = response.status_code
    if 200 <= status < 300:
        return Verdict(DeliveryOutcome.DELIVERED)
    reason = f"HTTP {status}: {response_excerpt(response, 300)}"
    if status == 409:
        # Conflict on ingest means the API already holds an event with this id.
        return Verdict(DeliveryOutcome.DELIVERED, reason="duplicate (409)")
    if status == 429:
        return Verdict(
            DeliveryOutcome.RETRY_LATER, reason, retry_after_s=retry_after_seconds(response.headers)
        )
    if status in (401, 403):
        return Verdict(DeliveryOutcome.UNAUTHORIZED, f"{reason}; {unauthorized_fix}")
    if status in (400, 413, 422):
        return Verdict(DeliveryOutcome.REJECTED, reason)
    if status in (404, 405):
        return Verdict(DeliveryOutcome.RETRY_LATER, f"{reason}; check output.url (the API's base URL)")
    return Verdict(DeliveryOutcome.RETRY_LATER, reason, retry_after_s=retry_after_seconds(response.headers))


def response_excerpt(response: httpx.Response, limit: int = _RESPONSE_KEEP_BYTES) -> str:
    return response.content[:limit].decode("utf-8", errors="replace")


@dataclass(frozen=True)
class DeliveryPolicy:
    max_batch_events: int = 500
    max_batch_delay_s: float = 1.0
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 60.0
    requests_per_second: float | None = None
    max_in_flight: int = 2
    request_timeout_s: float = 30.0
    # While paused on 401/403, try again this often even if the credentials file has not changed
    # (someone may have fixed the key on the API side).
    unauthorized_recheck_s: float = 60.0


class DeliveryMetrics:
    """The counters and histograms of one delivery core, in the registry given."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.delivered = Counter(
            "kubemeter_delivered_events",
            "Events the billing API accepted (duplicates included)",
            registry=registry,
        )
        self.retried = Counter(
            "kubemeter_delivery_retries",
            "Requests that will be sent again (429, 5xx, timeouts)",
            registry=registry,
        )
        self.dead_lettered = Counter(
            "kubemeter_dead_lettered_events",
            "Events the billing API refused, kept in the dead-letter table",
            registry=registry,
        )
        self.request_seconds = Histogram(
            "kubemeter_delivery_request_seconds",
            "Time for one request to the billing API",
            registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.latency_seconds = Histogram(
            "kubemeter_delivery_latency_seconds",
            "From enqueue to the billing API's acknowledgement",
            registry=registry,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600, 86400),
        )


@dataclass
class DeliveryStatus:
    """What the operator reports on the Collector (``Degraded`` reason, last error)."""

    delivered_events_total: int = 0
    dead_lettered_events_total: int = 0
    retried_requests_total: int = 0
    found_after_restart_total: int = 0  # queued events a RecordSink found already written at start
    last_error: str | None = None
    paused_reason: str | None = None
    last_delivery_at_s: float | None = None


class RateLimiter:
    """At most ``requests_per_second`` request starts, evenly spaced (no bursts)."""

    def __init__(self, requests_per_second: float | None) -> None:
        self._interval_s = 0.0 if not requests_per_second else 1.0 / requests_per_second
        self._next_start_s = 0.0

    async def acquire(self) -> None:
        if not self._interval_s:
            return
        loop = asyncio.get_running_loop()
        now_s = loop.time()
        start_s = max(now_s, self._next_start_s)
        self._next_start_s = start_s + self._interval_s
        if start_s > now_s:
            await asyncio.sleep(start_s - now_s)


class DeliveryCore:
    """Delivers a queue to one sink until stopped: every event ends delivered or dead-lettered."""

    def __init__(
        self,
        queue: DurableQueue,
        sink: Sink | RecordSink,
        *,
        policy: DeliveryPolicy | None = None,
        credentials: SecretFile | None = None,
        registry: CollectorRegistry | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """``headers`` (``output.headers``) go with every request; the sink's own win on a clash."""
        self.queue = queue
        self.sink = sink
        self.headers = dict(headers or {})
        self.policy = policy or DeliveryPolicy()
        self.credentials = credentials
        self.status = DeliveryStatus()
        self.metrics = DeliveryMetrics(registry or CollectorRegistry())
        self._rate_limiter = RateLimiter(self.policy.requests_per_second)
        self._paused_until_s = 0.0
        self._progress = asyncio.Condition()
        self._workers: list[asyncio.Task[None]] = []
        self._client: httpx.AsyncClient | None = None
        self._recovery: asyncio.Task[None] | None = None
        self._recovered = asyncio.Event()

    async def start(self) -> None:
        self._client = httpx.AsyncClient(
            timeout=self.policy.request_timeout_s,
            limits=httpx.Limits(max_connections=self.policy.max_in_flight),
        )
        self.queue.rewind()
        self._recovered.clear()
        if isinstance(self.sink, RecordSink):
            await self.sink.start()
            self._recovery = asyncio.create_task(self._recover(self.sink), name="deliver-recovery")
        else:
            self._recovered.set()
        self._workers = [
            asyncio.create_task(self._work(), name=f"deliver-{self.sink.kind}-{n}")
            for n in range(self.policy.max_in_flight)
        ]

    async def stop(self) -> None:
        """Stop now; events in flight stay queued and are sent again by the next process."""
        if self._recovery is not None:
            self._recovery.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._recovery
            self._recovery = None
        for worker in self._workers:
            worker.cancel()
        for worker in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        self._workers = []
        if isinstance(self.sink, RecordSink):
            await self.sink.stop()
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def drain(self, timeout_s: float) -> bool:
        """Keep delivering until the queue is empty or ``timeout_s`` passed; True when empty."""

        async def emptied() -> None:
            async with self._progress:
                await self._progress.wait_for(lambda: self.queue.stats().events == 0)

        try:
            await asyncio.wait_for(emptied(), timeout_s)
        except TimeoutError:
            return False
        return True

    # -- the loop ------------------------------------------------------------------------------

    async def _recover(self, sink: RecordSink) -> None:
        """Before the first send: the oldest queued events are the ones the previous process may
        have had in flight when it died. A record sink has no idempotency key on the far side
        across processes (a new Kafka producer id means new sequences), so it looks them up there,
        and the ones it finds are marked delivered instead of being written a second time."""
        try:
            window = self.policy.max_in_flight * min(self.policy.max_batch_events, self.sink.max_batch_events)
            candidates = await self.queue.lease(window)
            if not candidates:
                return
            started_s = time.monotonic()
            found = await sink.already_written(candidates)
            done = [event for event in candidates if event.event_id in found]
            if done:
                await self.queue.ack(done)
                self.status.found_after_restart_total += len(done)
                await self._notify_progress()
            log.info(
                "%d of the %d oldest queued events were already written (by the previous process); "
                "not sent again (looked up in %.1f s)",
                len(done),
                len(candidates),
                time.monotonic() - started_s,
            )
        except asyncio.CancelledError:
            raise
        except Exception:
            # Only costs copies: every queued event is sent as usual.
            log.exception("could not look up the previous process's records; sending every queued event")
        finally:
            self.queue.rewind()
            self._recovered.set()

    async def _work(self) -> None:
        await self._recovered.wait()
        while True:
            batch = await self._next_batch()
            if batch:
                try:
                    await self._settle(batch)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    # Our own bug, not the API's: keep the events queued and try them again later.
                    log.exception("delivery of %d events failed unexpectedly; they stay queued", len(batch))
                    self.queue.rewind()
                    await asyncio.sleep(self.policy.max_backoff_s)

    async def _next_batch(self) -> list[QueuedEvent]:
        loop = asyncio.get_running_loop()
        limit = min(self.policy.max_batch_events, self.sink.max_batch_events)
        await self.queue.wait_for_events()
        batch = await self.queue.lease(limit)
        deadline_s = loop.time() + self.policy.max_batch_delay_s
        while batch and len(batch) < limit:
            remaining_s = deadline_s - loop.time()
            if remaining_s <= 0 or not await self.queue.wait_for_events(remaining_s):
                break
            batch += await self.queue.lease(limit - len(batch))
        return batch

    async def _settle(self, batch: list[QueuedEvent]) -> None:
        parts = [batch]
        while parts:
            part = parts.pop()
            try:
                request = self.sink.encode(part)
            except UnencodableEvent as error:
                await self._dead_letter([part[error.index]], f"not sent: {error.reason}", "")
                rest = [*part[: error.index], *part[error.index + 1 :]]
                if rest:
                    parts.append(rest)
                continue
            verdict, response_text = await self._send(part, request)
            if verdict.outcome is DeliveryOutcome.DELIVERED:
                await self._delivered(part)
                continue
            settled_any = False
            if verdict.per_event:
                delivered = [
                    e
                    for i, e in enumerate(part)
                    if verdict.per_event.get(i, (None,))[0] is DeliveryOutcome.DELIVERED
                ]
                if delivered:
                    await self._delivered(delivered)
                for index, (outcome, reason) in sorted(verdict.per_event.items()):
                    if outcome is DeliveryOutcome.REJECTED and index < len(part):
                        await self._dead_letter([part[index]], reason, response_text)
                settled = {
                    i
                    for i, (outcome, _) in verdict.per_event.items()
                    if outcome is not DeliveryOutcome.RETRY_LATER
                }
                rest = [e for i, e in enumerate(part) if i not in settled]
                settled_any = len(rest) < len(part)
                if settled_any:
                    if rest:
                        parts.append(rest)
                    continue
            if len(part) == 1:
                await self._dead_letter(part, verdict.reason, response_text)
            else:
                middle = len(part) // 2
                parts += [part[middle:], part[:middle]]

    async def _send(self, part: Sequence[QueuedEvent], request: Any) -> tuple[Verdict, str]:
        """Send until the API gives a final answer for this batch: delivered or rejected, or (for
        the part of it that is settled) a partial answer whose settled events :meth:`_settle` takes."""
        assert self._client is not None, "start() the delivery core first"
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            if self._paused_until_s > loop.time():
                await asyncio.sleep(self._paused_until_s - loop.time())
            await self._rate_limiter.acquire()
            headers = httpx.Headers(self.headers)
            credentials_version = None
            if self.credentials is not None:
                credentials_version = self.credentials.version()
            if not isinstance(self.sink, RecordSink):
                headers.update(request.headers)  # case-insensitive: the sink's Content-Type wins
                secret = self.credentials.value() if self.credentials is not None else None
                if secret:
                    headers.update(self.sink.auth_headers(secret))
            started_s = loop.time()
            response_text = ""
            if isinstance(self.sink, RecordSink):
                verdict = await self.sink.produce(part, request)
            else:
                try:
                    response = await self._client.post(request.url, content=request.body, headers=headers)
                except httpx.HTTPError as error:
                    verdict = Verdict(
                        DeliveryOutcome.RETRY_LATER, f"{type(error).__name__} calling {request.url}: {error}"
                    )
                else:
                    verdict = self.sink.classify(response, part)
                    response_text = response_excerpt(response)
            self.metrics.request_seconds.observe(loop.time() - started_s)

            settles_some = any(
                outcome in (DeliveryOutcome.DELIVERED, DeliveryOutcome.REJECTED)
                for outcome, _ in verdict.per_event.values()
            )
            if settles_some and verdict.outcome not in (DeliveryOutcome.DELIVERED, DeliveryOutcome.REJECTED):
                # Settle what the far side answered now; the rest comes back here as a smaller batch.
                self.status.last_error = verdict.reason
                return verdict, response_text
            if verdict.outcome in (DeliveryOutcome.DELIVERED, DeliveryOutcome.REJECTED):
                if self.status.paused_reason:
                    log.info("billing API accepts our credentials again; delivery resumed")
                self.status.paused_reason = None
                return verdict, response_text
            self.status.last_error = verdict.reason
            if verdict.outcome is DeliveryOutcome.UNAUTHORIZED:
                if self.status.paused_reason is None:
                    log.error("delivery paused: %s", verdict.reason)
                self.status.paused_reason = verdict.reason
                if self.credentials is not None:
                    await self.credentials.wait_for_change(
                        credentials_version, self.policy.unauthorized_recheck_s
                    )
                else:
                    await asyncio.sleep(self.policy.unauthorized_recheck_s)
                continue
            # RETRY_LATER
            self.metrics.retried.inc()
            self.status.retried_requests_total += 1
            if verdict.retry_after_s is not None:
                delay_s = verdict.retry_after_s
                # The API asked everyone to wait: other in-flight batches wait too.
                self._paused_until_s = max(self._paused_until_s, loop.time() + delay_s)
            else:
                delay_s = self._backoff_s(attempt)
            attempt += 1
            log.warning(
                "delivery of %d events will be retried in %.2f s: %s", len(part), delay_s, verdict.reason
            )
            await asyncio.sleep(delay_s)

    def _backoff_s(self, attempt: int) -> float:
        # Exponential with "equal jitter": at least half the step, so retries never bunch at zero.
        step_s = min(self.policy.max_backoff_s, self.policy.initial_backoff_s * (2.0**attempt))
        return step_s / 2 + random.uniform(0, step_s / 2)

    async def _delivered(self, events: Sequence[QueuedEvent]) -> None:
        await self.queue.ack(events)
        now_s = time.time()
        for event in events:
            self.metrics.latency_seconds.observe(max(0.0, now_s - event.enqueued_at_s))
        self.metrics.delivered.inc(len(events))
        self.status.delivered_events_total += len(events)
        self.status.last_delivery_at_s = now_s
        await self._notify_progress()

    async def _dead_letter(self, events: Sequence[QueuedEvent], reason: str, response_text: str) -> None:
        log.error("dead-lettered %d event(s) (%s): %s", len(events), events[0].event_id, reason)
        await self.queue.dead_letter(events, reason=reason, response=response_text)
        self.metrics.dead_lettered.inc(len(events))
        self.status.dead_lettered_events_total += len(events)
        await self._notify_progress()

    async def _notify_progress(self) -> None:
        async with self._progress:
            self._progress.notify_all()
