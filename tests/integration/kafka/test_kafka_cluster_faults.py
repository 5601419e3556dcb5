"""The Kafka output against three real brokers (RF 3, min.insync.replicas 2): a partition leader
killed while producing."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.kafka import KafkaCluster
from tests.integration.kafka.conftest import (
    cloudevents,
    count_topic,
    kafka_gateway_config,
    report,
    send,
    wait_delivered,
)
from tests.integration.output.harness import GatewayProcess, eventually

pytestmark = pytest.mark.integration


async def test_partition_leader_killed_in_a_3_broker_cluster_loses_nothing(
    kafka_trio: KafkaCluster, tmp_path: Path, gateways: list[GatewayProcess]
) -> None:
    topic = "usage.leaders"
    kafka_trio.create_topic(topic, partitions=3, replication=3)
    gateway = GatewayProcess(tmp_path, kafka_gateway_config(tmp_path, kafka_trio, topic, timeout_seconds=5))
    gateways.append(gateway)
    gateway.start()
    await gateway.wait_ready()
    expected: set[str] = set()
    first = cloudevents(1500, "lead-a")
    expected |= {e["id"] for e in first}
    await send(gateway, first)
    leaders = kafka_trio.partition_leaders(topic)
    victim = leaders[0]
    kafka_trio.kill_node(victim)  # the leader of partition 0 (and the others it leads)
    second = cloudevents(1500, "lead-b")
    expected |= {e["id"] for e in second}
    await send(gateway, second)

    async def moved() -> dict[int, int] | None:
        now = kafka_trio.partition_leaders(topic)
        return now if now[0] not in (victim, -1) else None

    new_leaders = await eventually(moved, timeout_s=60, what="a new leader for partition 0")
    print(f"leaders before {leaders}, after {new_leaders}")
    await wait_delivered(gateway, len(expected), timeout_s=120)
    kafka_trio.start_node(victim)
    count = count_topic(kafka_trio, topic, expected)
    report("leader change (3 brokers, leader SIGKILLed)", count, len(expected))
    assert not count.lost and not count.unexpected
