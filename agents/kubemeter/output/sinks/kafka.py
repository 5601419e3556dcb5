"""Apache Kafka: one record per event, key = the event id, value = the CloudEvent (Kafka binding).

Like every sink this module only encodes a batch (:meth:`KafkaSink.encode`) and classifies what
came back (:func:`classify`); retry, backoff, pausing and dead-lettering stay in
:mod:`kubemeter.output.delivery`. The transport is a librdkafka producer (confluent-kafka) instead
of an HTTP client: idempotent, ``acks=all``, at most ``maxInFlight`` requests per connection, and
no delivery timeout of its own, so librdkafka retries a record with the same producer id and
sequence number until the broker answers (the broker drops the copies). The delivery core is told
an event is delivered only from the broker's acknowledgement (the delivery report).

A batch whose acknowledgement has not come back within ``timeoutSeconds`` is reported as
RETRY_LATER, but its records are not produced again: the next attempt waits on the same
outstanding records (by event id). Producing them again would write a second copy if the first
reached the log.

After a restart the broker cannot drop copies (a new process is a new producer id), so before the
first send :meth:`KafkaSink.already_written` reads the topic from shortly before the oldest queued
events were stored and the delivery core marks the ones it finds delivered.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import json
import logging
import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from kubemeter.api.collector import KAFKA_TOPIC_PATTERN, KafkaMode, KafkaOutputSpec
from kubemeter.output.delivery import DeliveryOutcome, UnencodableEvent, Verdict
from kubemeter.output.queue import QueuedEvent
from kubemeter.output.sinks._common import decode, dumps
from kubemeter.pipeline.cel import CelError, Expression

log = logging.getLogger(__name__)

STRUCTURED_CONTENT_TYPE = b"application/cloudevents+json; charset=UTF-8"
_TOPIC = re.compile(KAFKA_TOPIC_PATTERN)
# CloudEvents attributes that are not ce_ headers in binary mode (data is the value, datacontenttype
# is the content-type header).
_NOT_HEADERS = frozenset({"data", "data_base64", "datacontenttype"})
_POLL_INTERVAL_S = 0.1
# The restart look-up (KafkaSink.already_written): records are looked for from this long before the
# oldest candidate was queued (clock differences between the gateway and a LogAppendTime broker),
# at most this many records back per partition, within this long in all; past a bound the rest
# is sent again (a copy at worst).
_LOOKUP_MARGIN_S = 60.0
_LOOKUP_RECORDS_PER_PARTITION = 200_000
_LOOKUP_TIMEOUT_S = 30.0

# What the broker (or librdkafka for it) says about one record, by error code.
_REFUSED = {
    KafkaError.MSG_SIZE_TOO_LARGE: "the record is larger than the topic's max.message.bytes",
    KafkaError.RECORD_LIST_TOO_LARGE: "the record batch is larger than the broker accepts",
    KafkaError.INVALID_RECORD: "the broker refused the record as invalid",
    KafkaError.TOPIC_EXCEPTION: "the topic name is not valid",
    KafkaError.POLICY_VIOLATION: "the broker's policy refused the record",
    KafkaError.INVALID_TIMESTAMP: "the record timestamp is outside the topic's accepted range",
}
_UNAUTHORIZED = {
    KafkaError.TOPIC_AUTHORIZATION_FAILED: "the principal may not write to the topic; grant it WRITE "
    "(and DESCRIBE) on the topic in the broker's ACLs",
    KafkaError.CLUSTER_AUTHORIZATION_FAILED: "the principal may not get an idempotent producer id; "
    "grant it WRITE (and DESCRIBE) on the topic in the broker's ACLs (Kafka 2.8 and later need no "
    "more) or IDEMPOTENT_WRITE on the cluster",
    KafkaError.SASL_AUTHENTICATION_FAILED: "the brokers refused the SASL credentials; fix username and "
    "password in the Secret named by output.kafka.sasl.secretRef",
    KafkaError._AUTHENTICATION: "the brokers refused the SASL credentials; fix username and password in "
    "the Secret named by output.kafka.sasl.secretRef",
    KafkaError._SSL: "the TLS handshake with the brokers failed; check output.kafka.tls (CA and client "
    "certificate Secrets)",
}
_UNKNOWN_TOPIC = (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC, KafkaError._UNKNOWN_PARTITION)


@dataclass(frozen=True)
class KafkaRecord:
    topic: str
    key: bytes
    value: bytes
    headers: tuple[tuple[str, bytes], ...]


@dataclass(frozen=True)
class KafkaCredentialFiles:
    """Files of the mounted Secrets (re-read whenever one changes: the producer is rebuilt)."""

    username: Path | None = None
    password: Path | None = None
    ca: Path | None = None
    certificate: Path | None = None
    key: Path | None = None

    def paths(self) -> list[Path]:
        return [p for p in (self.username, self.password, self.ca, self.certificate, self.key) if p]

    def version(self) -> tuple[tuple[int, int, int] | None, ...]:
        versions: list[tuple[int, int, int] | None] = []
        for path in self.paths():
            try:
                status = path.stat()
            except FileNotFoundError:
                versions.append(None)
                continue
            versions.append((status.st_ino, status.st_size, status.st_mtime_ns))
        return tuple(versions)


def producer_config(
    spec: KafkaOutputSpec, files: KafkaCredentialFiles, *, client_id: str = "kubemeter-gateway"
) -> dict[str, Any]:
    """librdkafka settings for ``output.kafka``: the delivery guarantees are fixed, not options."""
    config: dict[str, Any] = {
        "client.id": client_id,
        "enable.idempotence": True,
        "acks": "all",
        "max.in.flight.requests.per.connection": spec.max_in_flight,
        # No delivery timeout: a record is retried (same producer id and sequence) until the broker
        # answers; the delivery core's timeout only decides when to report "still waiting".
        "message.timeout.ms": 0,
        "retry.backoff.ms": 100,
        "retry.backoff.max.ms": 5000,
        "compression.type": spec.compression.value,
        "linger.ms": 5,
        # The brokers know each topic's max.message.bytes: let them refuse a large record (it is
        # dead-lettered with their reason) rather than guess a limit here.
        "message.max.bytes": 16 * 2**20,
        "socket.keepalive.enable": True,
    }
    return config | connection_config(spec, files)


def connection_config(spec: KafkaOutputSpec, files: KafkaCredentialFiles) -> dict[str, Any]:
    """Where the brokers are and how to log in (TLS, SASL): the same for producer and consumer."""
    config: dict[str, Any] = {"bootstrap.servers": ",".join(spec.bootstrap_servers)}
    tls, sasl = spec.tls, spec.sasl
    if sasl is not None:
        config["security.protocol"] = "sasl_ssl" if tls is not None else "sasl_plaintext"
        config["sasl.mechanism"] = sasl.mechanism.value
        config["sasl.username"] = _read(files.username)
        config["sasl.password"] = _read(files.password)
    elif tls is not None:
        config["security.protocol"] = "ssl"
    if tls is not None:
        if files.ca is not None:
            config["ssl.ca.location"] = str(files.ca)
        if files.certificate is not None and files.key is not None:
            config["ssl.certificate.location"] = str(files.certificate)
            config["ssl.key.location"] = str(files.key)
    return config


def _read(path: Path | None) -> str:
    if path is None:
        return ""
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return ""


def classify(results: Sequence[KafkaError | None], *, last_error: str | None = None) -> Verdict:
    """The batch's verdict from one delivery result per record (None: acknowledged; missing from
    ``results``: no answer yet, reported as RETRY_LATER with ``last_error``).

    ``per_event`` names only the records that are settled (acknowledged or refused for good); the
    others are produced again (or waited on again) by the delivery core.
    """
    per_event: dict[int, tuple[DeliveryOutcome, str]] = {}
    unauthorized: str | None = None
    retry: str | None = None
    for index, error in enumerate(results):
        if error is None:
            per_event[index] = (DeliveryOutcome.DELIVERED, "")
            continue
        code = error.code()
        if code in _REFUSED:
            per_event[index] = (DeliveryOutcome.REJECTED, f"{_REFUSED[code]} ({error.str()})")
        elif code in _UNAUTHORIZED:
            unauthorized = f"{error.str()}: {_UNAUTHORIZED[code]}"
        elif code in _UNKNOWN_TOPIC:
            retry = retry or (
                f"{error.str()}: the topic does not exist; create it (kubemeter never creates topics) "
                "or fix output.kafka.topic"
            )
        else:
            retry = retry or error.str()
    if len(per_event) == len(results) and all(o is DeliveryOutcome.DELIVERED for o, _ in per_event.values()):
        return Verdict(DeliveryOutcome.DELIVERED)
    if unauthorized is not None:
        return Verdict(DeliveryOutcome.UNAUTHORIZED, unauthorized, per_event=per_event)
    if retry is not None or len(per_event) < len(results):
        reason = retry or f"no acknowledgement from the brokers yet: {last_error or 'waiting'}"
        return Verdict(DeliveryOutcome.RETRY_LATER, reason, per_event=per_event)
    refused = next(reason for outcome, reason in per_event.values() if outcome is DeliveryOutcome.REJECTED)
    return Verdict(DeliveryOutcome.REJECTED, refused, per_event=per_event)


def binary_headers(cloudevent: Mapping[str, Any]) -> tuple[tuple[str, bytes], ...]:
    """Binary content mode: every attribute but data as a ``ce_<name>`` header, plus content-type."""
    headers = [
        (f"ce_{name}", _attribute_text(value))
        for name, value in cloudevent.items()
        if name not in _NOT_HEADERS and value is not None
    ]
    headers.append(("content-type", str(cloudevent.get("datacontenttype") or "application/json").encode()))
    return tuple(headers)


def _attribute_text(value: Any) -> bytes:
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bool):
        return b"true" if value else b"false"
    return json.dumps(value, separators=(",", ":")).encode()


class KafkaSink:
    """Encoder, classifier and the producer that carries the records (see the module docstring)."""

    kind = "kafka"

    def __init__(
        self,
        spec: KafkaOutputSpec,
        *,
        files: KafkaCredentialFiles | None = None,
        max_batch_events: int = 500,
        ack_timeout_s: float = 30.0,
        client_id: str = "kubemeter-gateway",
    ) -> None:
        self.spec = spec
        self.files = files or KafkaCredentialFiles()
        self.max_batch_events = max_batch_events
        self.ack_timeout_s = ack_timeout_s
        self.client_id = client_id
        self.topic_expression = (
            Expression(spec.topic_expression, "output.kafka.topicExpression")
            if spec.topic_expression is not None
            else None
        )
        self._producer: Producer | None = None
        self._producer_version: tuple[tuple[int, int, int] | None, ...] = ()
        self._poller: threading.Thread | None = None
        self._polling = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        # Records handed to librdkafka and not yet read back by produce(), by event id.
        self._outstanding: dict[str, asyncio.Future[KafkaError | None]] = {}
        self._last_error: str | None = None
        self._auth_error: str | None = None
        self._fatal = False

    # -- the encoder ---------------------------------------------------------------------------

    def topic_for(self, cloudevent: Mapping[str, Any]) -> str:
        if self.topic_expression is None:
            assert self.spec.topic is not None
            return self.spec.topic
        try:
            topic = self.topic_expression.evaluate({"event": cloudevent})
        except CelError as error:
            raise ValueError(f"no topic: {error}") from error
        if not isinstance(topic, str) or not _TOPIC.match(topic) or topic in (".", ".."):
            raise ValueError(
                f"no topic: {self.topic_expression.text!r} (output.kafka.topicExpression) gave {topic!r}, "
                "not a legal Kafka topic name (1-249 of a-z A-Z 0-9 . _ -); fix the expression, then "
                "kubemeter dlq replay"
            )
        return topic

    def encode(self, events: Sequence[QueuedEvent]) -> list[KafkaRecord]:
        records: list[KafkaRecord] = []
        for index, event in enumerate(events):
            needs_decoding = self.topic_expression is not None or self.spec.mode is KafkaMode.BINARY
            cloudevent = decode(event) if needs_decoding else {}
            try:
                topic = self.topic_for(cloudevent)
            except ValueError as error:
                raise UnencodableEvent(index, str(error)) from error
            if self.spec.mode is KafkaMode.BINARY:
                value = dumps(cloudevent.get("data"))
                headers = binary_headers(cloudevent)
            else:
                # The stored event already is the structured-mode value: no re-encoding.
                value = event.payload
                headers = (("content-type", STRUCTURED_CONTENT_TYPE),)
            records.append(KafkaRecord(topic, event.event_id.encode(), value, headers))
        return records

    # -- the transport -------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._ensure_producer()

    async def stop(self) -> None:
        """Stop now: records without an acknowledgement stay queued in the gateway; the next process
        looks them up in the topic (:meth:`already_written`) and produces the ones it does not find."""
        self._close_producer()
        self._outstanding.clear()

    async def produce(self, events: Sequence[QueuedEvent], records: Sequence[KafkaRecord]) -> Verdict:
        """Hand the records to the producer (or find them already there) and wait for the brokers'
        acknowledgements, at most ``ack_timeout_s``."""
        self._ensure_producer()
        assert self._producer is not None
        futures: list[asyncio.Future[KafkaError | None]] = []
        for event, record in zip(events, records, strict=True):
            future = self._outstanding.get(event.event_id)
            if future is None or (future.done() and future.result() is not None):
                future = self._produce_one(record)
                self._outstanding[event.event_id] = future
            futures.append(future)
        pending = [f for f in futures if not f.done()]
        if pending:
            await asyncio.wait(pending, timeout=self.ack_timeout_s)
        results: list[KafkaError | None] = []
        answered: list[bool] = []
        for event, future in zip(events, futures, strict=True):
            if future.done():
                results.append(future.result())
                answered.append(True)
                self._outstanding.pop(event.event_id, None)
            else:
                answered.append(False)
                results.append(None)
        if any(a and r is None for r, a in zip(results, answered, strict=True)):
            self._auth_error = None  # the brokers took a record: whatever was refused is fixed
        if any(r is not None and r.code() == KafkaError._FATAL for r in results):
            self._fatal = True  # rebuilt before the next attempt
        errors = collections.Counter(r.str() for r in results if r is not None)
        if errors:
            log.warning(
                "kafka: %d of %d records not written: %s", sum(errors.values()), len(results), dict(errors)
            )
        if all(answered):
            verdict = classify(results, last_error=self._last_error)
            if verdict.outcome is DeliveryOutcome.RETRY_LATER and self._auth_error is not None:
                return Verdict(DeliveryOutcome.UNAUTHORIZED, self._auth_error, per_event=verdict.per_event)
            return verdict
        verdict = classify(
            [r for r, a in zip(results, answered, strict=True) if a], last_error=self._last_error
        )
        # Re-index per_event to the whole batch; unanswered records are not settled.
        positions = [i for i, a in enumerate(answered) if a]
        per_event = {positions[i]: outcome for i, outcome in verdict.per_event.items()}
        if verdict.outcome is DeliveryOutcome.UNAUTHORIZED:
            return Verdict(DeliveryOutcome.UNAUTHORIZED, verdict.reason, per_event=per_event)
        if self._auth_error is not None:
            return Verdict(DeliveryOutcome.UNAUTHORIZED, self._auth_error, per_event=per_event)
        return Verdict(DeliveryOutcome.RETRY_LATER, self._waiting_reason(), per_event=per_event)

    async def already_written(self, events: Sequence[QueuedEvent]) -> set[str]:
        """Ids of ``events`` already in their topics: read with a consumer (no group, nothing
        committed; needs READ on the topic) from shortly before the oldest was queued."""
        wanted: dict[str, set[str]] = collections.defaultdict(set)
        for event in events:
            try:
                (record,) = self.encode([event])
            except UnencodableEvent:
                continue  # dead-lettered when it is sent
            wanted[record.topic].add(event.event_id)
        if not wanted:
            return set()
        since_ms = int((min(event.enqueued_at_s for event in events) - _LOOKUP_MARGIN_S) * 1000)
        return await asyncio.to_thread(self._look_up, dict(wanted), since_ms)

    def _look_up(self, wanted: dict[str, set[str]], since_ms: int) -> set[str]:
        deadline_s = time.monotonic() + _LOOKUP_TIMEOUT_S
        config = connection_config(self.spec, self.files) | {
            "group.id": f"{self.client_id}-restart-lookup",  # required; never joined or committed
            "enable.auto.commit": False,
            "enable.partition.eof": False,
            "client.id": f"{self.client_id}-restart-lookup",
        }
        consumer = Consumer(config)
        found: set[str] = set()
        try:
            ends: dict[tuple[str, int], int] = {}
            starts: list[TopicPartition] = []
            for topic in wanted:
                partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
                at_time = consumer.offsets_for_times(
                    [TopicPartition(topic, p, since_ms) for p in partitions], timeout=10
                )
                for position in at_time:
                    low, high = consumer.get_watermark_offsets(
                        TopicPartition(topic, position.partition), timeout=10
                    )
                    start = high if position.offset < 0 else position.offset  # < 0: nothing since
                    start = max(start, low, high - _LOOKUP_RECORDS_PER_PARTITION)
                    if start < high:
                        starts.append(TopicPartition(topic, position.partition, start))
                        ends[(topic, position.partition)] = high
            if not starts:
                return found
            consumer.assign(starts)
            while ends and time.monotonic() < deadline_s:
                for message in consumer.consume(1000, timeout=1.0):
                    error = message.error()
                    if error is not None:
                        if error.code() == KafkaError._PARTITION_EOF:
                            continue
                        raise KafkaException(error)  # e.g. no READ on the topic
                    topic, key = str(message.topic()), message.key()
                    if isinstance(key, bytes) and key.decode(errors="replace") in wanted.get(topic, ()):
                        found.add(key.decode())
                    where = (topic, message.partition() or 0)
                    if where in ends and (message.offset() or 0) + 1 >= ends[where]:
                        del ends[where]
            if ends:
                log.warning("kafka: restart look-up gave up after %g s; the rest is sent", _LOOKUP_TIMEOUT_S)
        except KafkaException as error:
            log.warning("kafka: restart look-up failed (%s); what it did not find is sent", error)
        finally:
            consumer.close()
        return found

    def _waiting_reason(self) -> str:
        return (
            f"no acknowledgement from the brokers ({','.join(self.spec.bootstrap_servers)}) within "
            f"{self.ack_timeout_s:g} s; last error: {self._last_error or 'none'}"
        )

    def _produce_one(self, record: KafkaRecord) -> asyncio.Future[KafkaError | None]:
        assert self._loop is not None and self._producer is not None
        future: asyncio.Future[KafkaError | None] = self._loop.create_future()
        try:
            self._producer.produce(
                record.topic,
                value=record.value,
                key=record.key,
                headers=list(record.headers),
                on_delivery=functools.partial(self._on_delivery, future),
            )
        except KafkaException as error:
            future.set_result(error.args[0])
        except BufferError:
            # librdkafka's own queue is full: not sent, so safe to produce again later.
            future.set_result(KafkaError(KafkaError._QUEUE_FULL, "the producer's local queue is full"))
        return future

    def _on_delivery(
        self, future: asyncio.Future[KafkaError | None], error: KafkaError | None, _: Any
    ) -> None:
        # Runs on the poll thread.
        assert self._loop is not None
        self._loop.call_soon_threadsafe(_resolve, future, error)

    def _on_error(self, error: KafkaError) -> None:
        # Runs on the poll thread: connection-level trouble (brokers down, authentication refused,
        # a fatal error of the idempotent producer such as no permission to get a producer id).
        self._last_error = error.str()
        if error.code() in _UNAUTHORIZED:
            # Kept apart from _last_error: "brokers down" follows a refused login and must not hide it.
            self._auth_error = f"{error.str()}: {_UNAUTHORIZED[error.code()]}"
        if error.fatal():
            self._fatal = True
        log.warning("kafka: %s", error.str())

    def _ensure_producer(self) -> None:
        version = self.files.version()
        if self._producer is not None and not self._fatal and version == self._producer_version:
            return
        if version != self._producer_version:
            self._auth_error = None  # new credentials: whatever was refused may be fixed
        if self._producer is not None:
            why = "fatal error" if self._fatal else "credentials changed"
            log.info("kafka: %s; rebuilding the producer", why)
        self._close_producer()
        # The old producer's records were purged (not written): produce them again on the new one.
        self._outstanding.clear()
        config = producer_config(self.spec, self.files, client_id=self.client_id)
        config["error_cb"] = self._on_error
        self._producer = Producer(config)
        self._producer_version = version
        self._fatal = False
        self._last_error = None
        self._polling.set()
        self._poller = threading.Thread(
            target=self._poll, args=(self._producer,), name="kafka-delivery-reports", daemon=True
        )
        self._poller.start()

    def _poll(self, producer: Producer) -> None:
        while self._polling.is_set():
            try:
                producer.poll(_POLL_INTERVAL_S)
            except KafkaException as error:
                # A fatal producer error is raised here as well as passed to error_cb.
                self._on_error(error.args[0])

    def _close_producer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is None:
            return
        # Records still in librdkafka are failed back (_PURGE_*), so produce() sends them again with
        # the new producer; delivery reports fire on the poll thread until it stops.
        with contextlib.suppress(KafkaException):
            producer.purge(in_queue=True, in_flight=True, blocking=False)
        deadline_s = time.monotonic() + 5.0
        while len(producer) and time.monotonic() < deadline_s:
            time.sleep(_POLL_INTERVAL_S)
        self._polling.clear()
        if self._poller is not None:
            self._poller.join(timeout=5.0)
            self._poller = None
        producer.flush(0)


def _resolve(future: asyncio.Future[KafkaError | None], error: KafkaError | None) -> None:
    if not future.done():
        future.set_result(error)
