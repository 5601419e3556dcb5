"""Real Kafka brokers (testbed.kafka) and the gateway as a process producing to them."""

from __future__ import annotations

import collections
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from kubemeter.api.rendered import GatewayConfig

from testbed.kafka import KafkaCluster, missing_parts
from tests.integration.output.harness import GatewayProcess, eventually, free_port, usage_events
from tests.support.ci import unavailable

BATCH = "application/cloudevents-batch+json"


def start_cluster(
    tmp_path_factory: pytest.TempPathFactory, name: str, **options: Any
) -> Iterator[KafkaCluster]:
    problem = missing_parts()
    if problem:
        unavailable(problem)
    cluster = KafkaCluster(tmp_path_factory.mktemp(name), **options)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaCluster]:
    """One combined broker+controller."""
    yield from start_cluster(tmp_path_factory, "kafka")


@pytest.fixture(scope="module")
def kafka_trio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaCluster]:
    """Three brokers, a static controller quorum, RF 3 and min.insync.replicas 2."""
    yield from start_cluster(tmp_path_factory, "kafka3", brokers=3)


def kafka_gateway_config(
    work_dir: Path,
    cluster: KafkaCluster,
    topic: str | None,
    *,
    kafka_options: dict[str, Any] | None = None,
    kafka_files: dict[str, str] | None = None,
    batch_max_events: int = 200,
    timeout_seconds: float = 5,
) -> GatewayConfig:
    kafka: dict[str, Any] = {"bootstrapServers": cluster.bootstrap_servers, **(kafka_options or {})}
    if topic is not None:
        kafka["topic"] = topic
    return GatewayConfig.model_validate(
        {
            "cluster": "test-cluster",
            "collector": "default",
            "namespace": "kubemeter",
            "output": {
                "type": "kafka",
                "kafka": kafka,
                "batch": {"maxEvents": batch_max_events, "maxDelaySeconds": 0.05},
                "retry": {"initialBackoffSeconds": 0.05, "maxBackoffSeconds": 1.0},
                "timeoutSeconds": timeout_seconds,
            },
            "kafkaFiles": kafka_files or {},
            "bufferMaxBytes": 256 * 2**20,
            "dataDir": str(work_dir / "data"),
            "listenAddress": f"127.0.0.1:{free_port()}",
        }
    )


async def send(gateway: GatewayProcess, events: list[dict[str, Any]], *, chunk: int = 500) -> None:
    """POST the events to the gateway's ingest; each answer must be 204 (committed to its volume)."""
    async with httpx.AsyncClient(timeout=30) as client:
        for start in range(0, len(events), chunk):
            body = json.dumps(events[start : start + chunk])
            reply = await client.post(
                f"{gateway.url}/api/v1/events", content=body, headers={"Content-Type": BATCH}
            )
            assert reply.status_code == 204, reply.text


def cloudevents(count: int, prefix: str) -> list[dict[str, Any]]:
    return [event.to_cloudevent() for event in usage_events(count, prefix=prefix)]


@dataclass
class TopicCount:
    records: int
    lost: set[str]
    duplicates: int  # records beyond the first for a key
    unexpected: set[str]


def count_topic(cluster: KafkaCluster, topic: str, expected_ids: set[str]) -> TopicCount:
    """Read the whole topic as a consumer would (the key is the event id)."""
    keys = collections.Counter(key.decode() for key, _, _ in cluster.read_topic(topic))
    return TopicCount(
        records=sum(keys.values()),
        lost=expected_ids - set(keys),
        duplicates=sum(n - 1 for n in keys.values()),
        unexpected=set(keys) - expected_ids,
    )


def report(fault: str, count: TopicCount, expected: int) -> None:
    """One row of the fault table (docs/output.md), printed with -s / in the CI log."""
    print(
        f"\nKAFKA-FAULT | {fault} | sent={expected} in_topic={count.records} lost={len(count.lost)} "
        f"duplicates={count.duplicates}"
    )


async def wait_delivered(gateway: GatewayProcess, count: int, timeout_s: float = 120.0) -> dict[str, Any]:
    async def delivered() -> dict[str, Any] | None:
        status = await gateway.status()
        done = status.get("bufferedEvents") == 0 and status.get("deliveredEvents", 0) >= count
        return status if done else None

    status: dict[str, Any] = await eventually(
        delivered, timeout_s=timeout_s, what=f"{count} events acknowledged by Kafka"
    )
    return status


@pytest.fixture
def gateways() -> Iterator[list[GatewayProcess]]:
    """Gateways a test starts; each is stopped (and its log printed on failure) afterwards."""
    started: list[GatewayProcess] = []
    yield started
    for gateway in started:
        gateway.terminate()
