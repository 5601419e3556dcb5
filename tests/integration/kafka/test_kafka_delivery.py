"""The Kafka output against one real broker: records keyed by event id in both CloudEvents modes,
refused records dead-lettered with the reason, and the faults of one broker (gateway SIGKILL
mid-produce, broker restart, broker down 60 s, topic missing) with 0 lost."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from kubemeter.output.dead_letters import list_dead_letters
from kubemeter.output.sqlite_worker import open_connection

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


def _gateway(
    tmp_path: Path, gateways: list[GatewayProcess], config_dir: str, **kwargs: object
) -> GatewayProcess:
    work = tmp_path / config_dir
    work.mkdir()
    gateway = GatewayProcess(work, kafka_gateway_config(work, **kwargs))  # type: ignore[arg-type]
    gateways.append(gateway)
    gateway.start()
    return gateway


async def test_every_event_is_one_record_keyed_by_its_id_in_structured_and_binary_mode(
    kafka: KafkaCluster, tmp_path: Path, gateways: list[GatewayProcess]
) -> None:
    kafka.create_topic("usage.structured")
    kafka.create_topic("usage.binary")
    events = cloudevents(300, "modes")
    sent = {event["id"]: event for event in events}
    for mode in ("structured", "binary"):
        gateway = _gateway(
            tmp_path,
            gateways,
            mode,
            cluster=kafka,
            topic=f"usage.{mode}",
            kafka_options={"mode": mode, "compression": "zstd"},
        )
        await gateway.wait_ready()
        await send(gateway, events)
        await wait_delivered(gateway, len(events))
        records = kafka.read_topic(f"usage.{mode}")
        assert sorted(key.decode() for key, _, _ in records) == sorted(sent)
        for key, value, headers in records:
            original = sent[key.decode()]
            header_map = {name: raw.decode() for name, raw in headers}
            if mode == "structured":
                assert header_map["content-type"].startswith("application/cloudevents+json")
                assert json.loads(value) == original
            else:
                assert json.loads(value) == original["data"]
                assert header_map["content-type"] == "application/json"
                for attribute in ("specversion", "id", "source", "type", "subject", "time"):
                    assert header_map[f"ce_{attribute}"] == original[attribute]
        gateway.terminate()


async def test_topic_chosen_by_cel_and_refused_records_are_dead_lettered_with_the_reason(
    kafka: KafkaCluster, tmp_path: Path, gateways: list[GatewayProcess]
) -> None:
    kafka.create_topic("usage.team-0")
    kafka.create_topic("usage.team-1")
    gateway = _gateway(
        tmp_path,
        gateways,
        "cel",
        cluster=kafka,
        topic=None,
        # team-2 maps to an illegal topic name; team-3 to a topic that exists nowhere (retried, below)
        kafka_options={
            "topicExpression": "event.subject == 'team-2' ? 'usage/bad name' : 'usage.' + event.subject",
            "compression": "none",
        },
    )
    await gateway.wait_ready()
    events = [e for e in cloudevents(40, "cel") if e["subject"] != "team-3"]
    big = cloudevents(1, "big")[0] | {"subject": "team-1"}
    # Over the broker's default message.max.bytes (1 MiB): the broker refuses it, nothing else.
    big["data"] = {**big["data"], "note": "x" * (1_100_000)}
    await send(gateway, [*events, big])

    async def settled() -> bool:
        status = await gateway.status()
        return bool(status["bufferedEvents"] == 0)

    await eventually(settled, timeout_s=60, what="every event delivered or dead-lettered")
    gateway.terminate()
    connection = open_connection(Path(gateway.config.data_dir) / "queue.db")
    try:
        letters = {str(row["id"]): str(row["reason"]) for row in list_dead_letters(connection, 1000)}
    finally:
        connection.close()
    bad_name = {e["id"] for e in events if e["subject"] == "team-2"}
    assert set(letters) == bad_name | {big["id"]}
    assert "not a legal Kafka topic name" in letters[next(iter(bad_name))]
    assert "max.message.bytes" in letters[big["id"]]
    for team in ("team-0", "team-1"):
        expected = {e["id"] for e in events if e["subject"] == team}
        count = count_topic(kafka, f"usage.{team}", expected)
        assert not count.lost and not count.unexpected and count.duplicates == 0


async def test_gateway_sigkilled_mid_produce_loses_nothing(
    kafka: KafkaCluster, tmp_path: Path, gateways: list[GatewayProcess]
) -> None:
    topic = "usage.sigkill"
    kafka.create_topic(topic)
    gateway = _gateway(tmp_path, gateways, "gw", cluster=kafka, topic=topic, batch_max_events=100)
    await gateway.wait_ready()
    expected: set[str] = set()
    rounds, per_round = 4, 4000
    left_at_kill: list[int] = []
    for round_number in range(rounds):
        events = cloudevents(per_round, f"kill{round_number}")
        expected |= {e["id"] for e in events}
        await send(gateway, events)
        # Kill once this process has had records acknowledged while others are still buffered: some
        # records are in flight, some acknowledged ones may not be marked in the queue yet.
        status = await _first_acknowledgement(gateway)
        gateway.kill()
        left_at_kill.append(int(status["bufferedEvents"]))
        gateway.start()
        await gateway.wait_ready()
    await eventually(
        lambda: _buffer_empty(gateway), timeout_s=120, what="the gateway to drain after the last restart"
    )
    count = count_topic(kafka, topic, expected)
    print(f"buffered events when each SIGKILL came: {left_at_kill}")
    report(f"gateway SIGKILL mid-produce ({rounds}x)", count, len(expected))
    assert all(left > 0 for left in left_at_kill), "a kill came after the round was delivered"
    assert not count.lost, f"{len(count.lost)} events lost, e.g. {sorted(count.lost)[:3]}"
    assert not count.unexpected
    # Records the dead process had written but not yet marked delivered are found at restart.
    assert count.duplicates == 0


async def _first_acknowledgement(gateway: GatewayProcess, timeout_s: float = 60.0) -> dict[str, Any]:
    """The gateway's status as soon as this process has delivered anything (polled every 5 ms)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = await gateway.status()
        if status.get("deliveredEvents", 0) > 0:
            return status
        await asyncio.sleep(0.005)
    raise AssertionError(f"nothing delivered within {timeout_s} s: {status}")


async def _buffer_empty(gateway: GatewayProcess) -> bool:
    return bool((await gateway.status())["bufferedEvents"] == 0)


async def test_broker_restarted_while_producing_loses_nothing(
    kafka: KafkaCluster, tmp_path: Path, gateways: list[GatewayProcess]
) -> None:
    topic = "usage.restart"
    kafka.create_topic(topic)
    gateway = _gateway(tmp_path, gateways, "gw", cluster=kafka, topic=topic)
    await gateway.wait_ready()
    first, second = cloudevents(1500, "before"), cloudevents(1500, "during")
    await send(gateway, first)
    kafka.stop_node(1, timeout_s=15)
    await send(gateway, second)  # accepted onto the gateway's volume while the broker is away
    kafka.start_node(1)
    expected = {e["id"] for e in first + second}
    await wait_delivered(gateway, len(expected), timeout_s=180)
    count = count_topic(kafka, topic, expected)
    report("broker restart (SIGTERM, start)", count, len(expected))
    assert not count.lost and not count.unexpected


async def test_broker_down_60_s_then_back_loses_nothing(
    kafka: KafkaCluster, tmp_path: Path, gateways: list[GatewayProcess]
) -> None:
    topic = "usage.down60"
    kafka.create_topic(topic)
    gateway = _gateway(tmp_path, gateways, "gw", cluster=kafka, topic=topic)
    await gateway.wait_ready()
    expected: set[str] = set()
    events = cloudevents(1000, "pre")
    expected |= {e["id"] for e in events}
    await send(gateway, events)
    kafka.kill_node(1)
    down_at = time.monotonic()
    n = 0
    while time.monotonic() - down_at < 60:  # bounded: 60 s, one batch a second
        events = cloudevents(100, f"down{n:02d}")
        expected |= {e["id"] for e in events}
        await send(gateway, events)
        n += 1
        await asyncio.sleep(1.0)
    status = await gateway.status()
    assert status["bufferedEvents"] > 0
    assert status["lastDeliveryError"], status
    kafka.start_node(1)
    await wait_delivered(gateway, len(expected), timeout_s=180)
    count = count_topic(kafka, topic, expected)
    report("broker down 60 s (SIGKILL, start)", count, len(expected))
    assert not count.lost and not count.unexpected


async def test_topic_missing_is_retried_until_created_and_loses_nothing(
    kafka: KafkaCluster, tmp_path: Path, gateways: list[GatewayProcess]
) -> None:
    topic = "usage.later"
    gateway = _gateway(tmp_path, gateways, "gw", cluster=kafka, topic=topic)
    await gateway.wait_ready()
    events = cloudevents(500, "missing")
    await send(gateway, events)

    async def told_why() -> str | None:
        error = (await gateway.status()).get("lastDeliveryError") or ""
        return error if "does not exist" in error or "Unknown topic" in error else None

    reason = await eventually(told_why, timeout_s=90, what="the gateway to report the missing topic")
    print(f"reported: {reason}")
    assert (await gateway.status())["bufferedEvents"] == len(events)
    kafka.create_topic(topic)
    await wait_delivered(gateway, len(events), timeout_s=120)
    count = count_topic(kafka, topic, {e["id"] for e in events})
    report("topic missing, created later", count, len(events))
    assert not count.lost and not count.unexpected
