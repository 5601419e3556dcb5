"""The delivery core against the local billing API over real HTTP: every sink's payloads pass the
API's spec, and each fault ends with zero events lost and zero billed twice."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from kubemeter.events import UsageEvent
from kubemeter.output.credentials import SecretFile
from kubemeter.output.delivery import DeliveryCore, Sink
from kubemeter.output.queue import DurableQueue
from kubemeter.output.sinks import CloudEventsSink, FlexpriceSink, LagoSink, OpenMeterSink
from kubemeter.output.spool import usage_record

from tests.integration.output.harness import (
    FAST_POLICY,
    LocalBillingApi,
    assert_exactly_once,
    eventually,
    usage_events,
)


@pytest.fixture
async def billing_api(tmp_path: Path) -> AsyncIterator[LocalBillingApi]:
    api = LocalBillingApi(tmp_path / "billing")
    await api.start()
    yield api
    await api.stop()


def sink_for(kind: str, api: LocalBillingApi) -> Sink:
    sinks: dict[str, Sink] = {
        "openmeter": OpenMeterSink(api.url),
        "flexprice": FlexpriceSink(f"{api.url}/v1"),
        "lago": LagoSink(f"{api.url}/api/v1"),
        "cloudevents-batch": CloudEventsSink(f"{api.url}/cloudevents", mode="batch"),
        "cloudevents-structured": CloudEventsSink(f"{api.url}/cloudevents", mode="structured"),
    }
    return sinks[kind]


class Delivery:
    """A queue on disk and a delivery core draining it to one sink."""

    def __init__(self, queue: DurableQueue, core: DeliveryCore) -> None:
        self.queue = queue
        self.core = core

    @classmethod
    async def start(cls, path: Path, sink: Sink, credentials: SecretFile | None = None) -> Delivery:
        queue = await DurableQueue.open(path)
        core = DeliveryCore(queue, sink, policy=FAST_POLICY, credentials=credentials)
        await core.start()
        return cls(queue, core)

    async def send(self, events: list[UsageEvent]) -> None:
        await self.queue.enqueue([usage_record(event) for event in events])

    async def settled(self, timeout_s: float = 60.0) -> None:
        await eventually(
            lambda: self.queue.stats().events == 0, timeout_s=timeout_s, what="the queue to drain"
        )

    async def stop(self) -> None:
        await self.core.stop()
        await self.queue.close()


@pytest.mark.parametrize(
    "kind", ["openmeter", "flexprice", "lago", "cloudevents-batch", "cloudevents-structured"]
)
async def test_every_sink_sends_payloads_that_match_its_api_spec(
    kind: str, billing_api: LocalBillingApi, tmp_path: Path
) -> None:
    events = usage_events(250 if kind != "cloudevents-structured" else 40)
    delivery = await Delivery.start(tmp_path / "q.db", sink_for(kind, billing_api))
    await delivery.send(events)
    await delivery.settled()
    await delivery.stop()
    assert_exactly_once(await billing_api.stats(), await billing_api.events(), {e.id for e in events})
    async with httpx.AsyncClient() as client:
        usage = (await client.get(f"{billing_api.url}/api/v1/usage", params={"subject": "team-0"})).json()[
            "data"
        ]
    subject = "team-0"
    expected = sum(e.data["value"] for e in events if e.subject == subject)
    assert sum(row["value"] for row in usage) == pytest.approx(expected)


@pytest.mark.parametrize("kind", ["openmeter", "flexprice", "lago"])
async def test_events_the_api_already_has_count_as_delivered(
    kind: str, billing_api: LocalBillingApi, tmp_path: Path
) -> None:
    events = usage_events(300)
    first = await Delivery.start(tmp_path / "first.db", sink_for(kind, billing_api))
    await first.send(events)
    await first.settled()
    await first.stop()
    # A second queue sends them all again, as a gateway does after a crash before its acks were saved.
    again = await Delivery.start(tmp_path / "again.db", sink_for(kind, billing_api))
    await again.send(events)
    await again.settled()
    assert again.queue.stats().dead_letters == 0
    assert again.core.status.delivered_events_total == len(events)
    await again.stop()
    stats = await billing_api.stats()
    assert stats["duplicateEvents"] >= len(events)
    assert_exactly_once(stats, await billing_api.events(), {e.id for e in events})


@pytest.mark.parametrize("kind", ["openmeter", "lago", "flexprice"])
async def test_one_poison_event_in_a_batch_of_1000_is_dead_lettered_and_999_delivered(
    kind: str, billing_api: LocalBillingApi, tmp_path: Path
) -> None:
    events = usage_events(1000)
    poison = events[613].model_copy(update={"data": {**events[613].data, "value": "ten"}})
    events[613] = poison
    delivery = await Delivery.start(tmp_path / "q.db", sink_for(kind, billing_api))
    await delivery.send(events)
    await delivery.settled()
    stats = delivery.queue.stats()
    status = delivery.core.status
    print(f"{kind}: delivered={status.delivered_events_total} dead_lettered={stats.dead_letters}")
    assert (status.delivered_events_total, stats.dead_letters) == (999, 1)
    await delivery.stop()
    with sqlite3.connect(tmp_path / "q.db") as connection:
        event_id, reason, response = connection.execute(
            "SELECT event_id, reason, response FROM dead_letters"
        ).fetchone()
    assert event_id == poison.id
    assert "number" in reason
    assert response
    assert_exactly_once(
        await billing_api.stats(), await billing_api.events(), {e.id for e in events} - {poison.id}
    )


async def test_429_with_retry_after_is_honoured(billing_api: LocalBillingApi, tmp_path: Path) -> None:
    events = usage_events(400)
    await billing_api.inject(429, requests=2, retry_after_s=1)
    delivery = await Delivery.start(tmp_path / "q.db", sink_for("openmeter", billing_api))
    started_s = time.monotonic()
    await delivery.send(events)
    await delivery.settled()
    waited_s = time.monotonic() - started_s
    retries = delivery.core.status.retried_requests_total
    print(f"429 x2 with Retry-After: 1 -> drained in {waited_s:.2f} s, retries={retries}")
    assert waited_s >= 1.0
    assert delivery.core.status.retried_requests_total == 2
    await delivery.stop()
    assert_exactly_once(await billing_api.stats(), await billing_api.events(), {e.id for e in events})


async def test_server_errors_are_retried_until_delivered(
    billing_api: LocalBillingApi, tmp_path: Path
) -> None:
    events = usage_events(200)
    await billing_api.inject(503, requests=3)
    await billing_api.inject(500, requests=2)
    delivery = await Delivery.start(tmp_path / "q.db", sink_for("flexprice", billing_api))
    await delivery.send(events)
    await delivery.settled()
    assert delivery.core.status.retried_requests_total == 5
    await delivery.stop()
    assert_exactly_once(await billing_api.stats(), await billing_api.events(), {e.id for e in events})


async def test_billing_api_down_for_a_stretch_then_back_loses_nothing(
    billing_api: LocalBillingApi, tmp_path: Path
) -> None:
    await billing_api.stop()
    delivery = await Delivery.start(tmp_path / "q.db", sink_for("lago", billing_api))
    events = usage_events(700)
    await delivery.send(events[:350])
    await eventually(
        lambda: delivery.core.status.retried_requests_total >= 5, what="retries while the API is down"
    )
    await delivery.send(events[350:])
    assert delivery.queue.stats().events == 700
    await billing_api.start()
    await delivery.settled()
    status = delivery.core.status
    print(f"retries while down: {status.retried_requests_total}; last error: {status.last_error}")
    await delivery.stop()
    assert_exactly_once(await billing_api.stats(), await billing_api.events(), {e.id for e in events})


async def test_401_pauses_delivery_until_the_credentials_are_fixed(tmp_path: Path) -> None:
    accepted = tmp_path / "accepted-keys"
    accepted.write_text("right-key\n")
    api = LocalBillingApi(tmp_path / "billing", token_file=accepted)
    await api.start()
    credentials = tmp_path / "credentials"
    credentials.write_text("wrong-key\n")
    delivery = await Delivery.start(tmp_path / "q.db", sink_for("flexprice", api), SecretFile(credentials))
    events = usage_events(300)
    await delivery.send(events)
    await eventually(lambda: delivery.core.status.paused_reason, what="delivery to pause on 401")
    reason = delivery.core.status.paused_reason or ""
    print(f"paused: {reason}")
    assert "401" in reason and "credentialsSecretRef" in reason
    assert delivery.queue.stats().events == 300
    assert delivery.queue.stats().dead_letters == 0
    credentials.write_text("right-key\n")  # what a Secret update does to the mounted file
    await delivery.settled()
    assert delivery.core.status.paused_reason is None
    await delivery.stop()
    stats: dict[str, Any] = await api.stats()
    assert_exactly_once(stats, await api.events(), {e.id for e in events})
    await api.stop()
