"""The Kafka sink's pure parts: the record encoding (CloudEvents Kafka binding), the verdicts read
from delivery reports, the producer settings that carry the guarantees, and the model's rules."""

from __future__ import annotations

import json
from typing import Any

import pytest
from confluent_kafka import KafkaError
from kubemeter.api.collector import KafkaOutputSpec, OutputSpec
from kubemeter.output.delivery import DeliveryOutcome, UnencodableEvent
from kubemeter.output.queue import QueuedEvent
from kubemeter.output.sinks.kafka import KafkaCredentialFiles, KafkaSink, classify, producer_config
from pydantic import ValidationError

EVENT: dict[str, Any] = {
    "specversion": "1.0",
    "id": "e1",
    "source": "kubemeter/c1",
    "type": "io.kubemeter.gpu.seconds",
    "subject": "team-a",
    "time": "2025-08-22T12:00:00Z",
    "datacontenttype": "application/json",
    "data": {"value": 1.5, "unit": "s"},
}


def queued(event: dict[str, Any]) -> QueuedEvent:
    return QueuedEvent(
        seq=1,
        source=event["source"],
        event_id=event["id"],
        payload=json.dumps(event).encode(),
        enqueued_at_s=0,
    )


def spec(**options: Any) -> KafkaOutputSpec:
    return KafkaOutputSpec.model_validate(
        {"bootstrapServers": ["127.0.0.1:9092"], "topic": "usage", **options}
    )


def test_structured_mode_sends_the_stored_event_unchanged_keyed_by_its_id() -> None:
    event = queued(EVENT)
    (record,) = KafkaSink(spec()).encode([event])
    assert record.key == b"e1"
    assert record.value == event.payload
    assert record.headers == (("content-type", b"application/cloudevents+json; charset=UTF-8"),)


def test_binary_mode_puts_attributes_in_ce_headers_and_data_in_the_value() -> None:
    (record,) = KafkaSink(spec(mode="binary")).encode([queued({**EVENT, "cluster": "eu1"})])
    headers = dict(record.headers)
    assert json.loads(record.value) == EVENT["data"]
    assert headers["content-type"] == b"application/json"
    assert headers["ce_id"] == b"e1"
    assert headers["ce_type"] == b"io.kubemeter.gpu.seconds"
    assert headers["ce_cluster"] == b"eu1"  # extension attributes too
    assert "ce_data" not in headers and "ce_datacontenttype" not in headers


def test_topic_expression_picks_the_topic_and_an_illegal_name_is_unencodable() -> None:
    sink = KafkaSink(spec(topic=None, topicExpression="'usage.' + event.subject"))
    assert sink.encode([queued(EVENT)])[0].topic == "usage.team-a"
    with pytest.raises(UnencodableEvent) as caught:
        sink.encode([queued(EVENT), queued({**EVENT, "id": "e2", "subject": "a b"})])
    assert caught.value.index == 1
    assert "not a legal Kafka topic name" in caught.value.reason


@pytest.mark.parametrize(
    ("error", "outcome", "words"),
    [
        (None, DeliveryOutcome.DELIVERED, ""),
        (KafkaError(KafkaError.MSG_SIZE_TOO_LARGE), DeliveryOutcome.REJECTED, "max.message.bytes"),
        (KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED), DeliveryOutcome.UNAUTHORIZED, "WRITE"),
        (KafkaError(KafkaError._AUTHENTICATION), DeliveryOutcome.UNAUTHORIZED, "sasl.secretRef"),
        (KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART), DeliveryOutcome.RETRY_LATER, "create it"),
        (KafkaError(KafkaError.NOT_ENOUGH_REPLICAS), DeliveryOutcome.RETRY_LATER, ""),
        (KafkaError(KafkaError._PURGE_QUEUE), DeliveryOutcome.RETRY_LATER, ""),
    ],
)
def test_one_delivery_report_gives_the_delivery_rule(
    error: KafkaError | None, outcome: DeliveryOutcome, words: str
) -> None:
    verdict = classify([error])
    assert verdict.outcome is outcome
    assert words in verdict.reason


def test_a_mixed_batch_settles_the_acknowledged_and_refused_and_retries_the_rest() -> None:
    verdict = classify(
        [None, KafkaError(KafkaError.MSG_SIZE_TOO_LARGE), KafkaError(KafkaError.REQUEST_TIMED_OUT)]
    )
    assert verdict.outcome is DeliveryOutcome.RETRY_LATER
    assert verdict.per_event[0][0] is DeliveryOutcome.DELIVERED
    assert verdict.per_event[1][0] is DeliveryOutcome.REJECTED
    assert 2 not in verdict.per_event  # not settled: sent again


def test_the_producer_is_idempotent_acks_all_bounded_in_flight_and_never_gives_up() -> None:
    config = producer_config(spec(maxInFlight=3, compression="zstd"), KafkaCredentialFiles())
    assert config["enable.idempotence"] is True
    assert config["acks"] == "all"
    assert config["max.in.flight.requests.per.connection"] == 3
    assert config["message.timeout.ms"] == 0
    assert config["compression.type"] == "zstd"
    assert "security.protocol" not in config


def test_sasl_over_tls_reads_the_mounted_secret_files(tmp_path: Any) -> None:
    (tmp_path / "username").write_text("meter\n")
    (tmp_path / "password").write_text("s3cret\n")
    files = KafkaCredentialFiles(
        username=tmp_path / "username", password=tmp_path / "password", ca=tmp_path / "ca.crt"
    )
    options = {"sasl": {"mechanism": "SCRAM-SHA-256", "secretRef": {"name": "k"}}, "tls": {}}
    config = producer_config(spec(**options), files)
    assert config["security.protocol"] == "sasl_ssl"
    assert config["sasl.mechanism"] == "SCRAM-SHA-256"
    assert (config["sasl.username"], config["sasl.password"]) == ("meter", "s3cret")
    assert config["ssl.ca.location"] == str(tmp_path / "ca.crt")


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ({"type": "kafka"}, "output.kafka is required for type kafka"),
        (
            {"type": "kafka", "url": "https://x.io", "kafka": {"bootstrapServers": ["b:9092"], "topic": "t"}},
            "does not apply to type kafka",
        ),
        ({"type": "kafka", "kafka": {"bootstrapServers": ["b:9092"]}}, "set exactly one of topic"),
        ({"type": "openmeter"}, "output.url is required"),
        ({"type": "kafka", "kafka": {"bootstrapServers": ["b:9092"], "topic": "a b"}}, "topic"),
    ],
)
def test_a_wrong_kafka_output_is_refused_naming_the_field_and_the_fix(
    output: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        OutputSpec.model_validate(output)
    assert message in str(caught.value)
