"""The Kafka output against a SASL broker with ACLs (StandardAuthorizer): refused credentials and
a missing grant pause delivery with a reason that says what to fix; fixing them resumes it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.kafka import KafkaCluster
from tests.integration.kafka.conftest import (
    cloudevents,
    count_topic,
    kafka_gateway_config,
    report,
    send,
    start_cluster,
    wait_delivered,
)
from tests.integration.output.harness import GatewayProcess, SecretVolume, eventually

pytestmark = pytest.mark.integration

METER_USER, METER_PASSWORD = "meter", "meter-secret"


@pytest.fixture(scope="module")
def kafka_sasl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaCluster]:
    """One broker with SASL (SCRAM-SHA-512 for the gateway) and the StandardAuthorizer: no ACL, no write."""
    yield from start_cluster(
        tmp_path_factory, "kafka-sasl", sasl=True, scram_users={METER_USER: METER_PASSWORD}
    )


async def test_authorization_refused_pauses_with_the_reason_and_resumes_when_fixed(
    kafka_sasl: KafkaCluster, tmp_path: Path, gateways: list[GatewayProcess]
) -> None:
    topic = "usage.acl"
    kafka_sasl.create_topic(topic, partitions=3, replication=1)
    secret = SecretVolume(tmp_path / "sasl")
    secret.write(username=METER_USER, password="wrong-password")
    config = kafka_gateway_config(
        tmp_path,
        kafka_sasl,
        topic,
        kafka_options={"sasl": {"mechanism": "SCRAM-SHA-512", "secretRef": {"name": "kafka-sasl"}}},
        kafka_files={"username": str(secret.path("username")), "password": str(secret.path("password"))},
    )
    gateway = GatewayProcess(tmp_path, config)
    gateways.append(gateway)
    gateway.start()
    await gateway.wait_ready()
    events = cloudevents(1000, "acl")
    await send(gateway, events)

    async def paused_because(text: str) -> str | None:
        reason = (await gateway.status()).get("pausedReason") or ""
        return reason if text in reason else None

    # 1. Wrong password: paused, the reason names the Secret to fix.
    reason = await eventually(
        lambda: paused_because("output.kafka.sasl.secretRef"), timeout_s=60, what="a pause for bad SASL"
    )
    print(f"paused: {reason}")
    # 2. Right password, but no ACL lets the principal write: paused, the reason says which grant.
    secret.write(username=METER_USER, password=METER_PASSWORD)
    reason = await eventually(
        lambda: paused_because("WRITE"), timeout_s=60, what="a pause for the missing ACL"
    )
    print(f"paused: {reason}")
    assert (await gateway.status())["bufferedEvents"] == len(events)
    # 3. The ACL granted on the broker: delivery resumes by itself.
    kafka_sasl.allow_write(f"User:{METER_USER}", topic)
    status = await wait_delivered(gateway, len(events), timeout_s=120)
    assert status.get("pausedReason") is None
    count = count_topic(kafka_sasl, topic, {e["id"] for e in events})
    report("authorization refused (bad SASL password, then no ACL), fixed", count, len(events))
    assert not count.lost and not count.unexpected
