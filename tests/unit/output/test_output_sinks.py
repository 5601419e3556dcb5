"""Every sink's payload matches the billing API's published spec; responses are classified by the
delivery rules; CloudEvents ingest refuses malformed events with the reason."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from kubemeter.api.collector import OutputSpec
from kubemeter.events import UsageEvent
from kubemeter.gateway.main import sink_for
from kubemeter.output.delivery import DeliveryOutcome, UnencodableEvent, retry_after_seconds, standard_verdict
from kubemeter.output.ingest import IngestError, parse_cloudevents, to_record
from kubemeter.output.queue import QueuedEvent
from kubemeter.output.sinks import CloudEventsSink, FlexpriceSink, LagoSink, OpenMeterSink
from kubemeter.output.sinks.lago import SubscriptionMapping
from kubemeter.output.spool import usage_record

from tests.support.billing_specs import spec_validators

WINDOW_END = datetime(2025, 8, 22, 12, 0, tzinfo=UTC)


def usage_events(count: int) -> list[QueuedEvent]:
    events = []
    for n in range(count):
        event = UsageEvent(
            id=f"km-{n:04d}",
            source="kubemeter/cluster-eu1",
            type="io.kubemeter.gpu.seconds",
            subject=f"team-{n % 3}",
            # every third event ends on a fraction of a second, to exercise sub-second timestamps
            time=WINDOW_END + timedelta(milliseconds=250 * (n % 3 == 2)),
            data={
                "value": 60.0 if n % 2 else 7,
                "unit": "s",
                "window_start": "2025-08-22T11:59:00Z",
                "window_end": "2025-08-22T12:00:00Z",
                "namespace": "vision",
                "pod": f"trainer-{n}",
                "node": "gpu-07",
                "complete": n % 4 != 0,
                "gpu_model": "H200",
                "labels": {"team": "vision"},
                "note": None,
            },
        )
        record = usage_record(event)
        events.append(QueuedEvent(n + 1, record.source, record.event_id, record.payload, 0.0))
    return events


def body(sink: Any, events: list[QueuedEvent]) -> Any:
    return json.loads(sink.encode(events).body)


def test_openmeter_batch_matches_the_openmeter_spec() -> None:
    sink = OpenMeterSink("https://openmeter.example")
    request = sink.encode(usage_events(50))
    assert request.url == "https://openmeter.example/api/v1/events"
    assert request.headers["Content-Type"] == "application/cloudevents-batch+json"
    assert spec_validators().openmeter_batch.problems(json.loads(request.body)) == []
    assert sink.auth_headers("k") == {"Authorization": "Bearer k"}


def test_flexprice_bulk_matches_the_flexprice_spec_with_stable_ids_and_times() -> None:
    sink = FlexpriceSink("https://us.api.flexprice.io/v1")
    events = usage_events(50)
    document = body(sink, events)
    assert sink.encode(events).url == "https://us.api.flexprice.io/v1/events/bulk"
    assert spec_validators().flexprice_bulk.problems(document) == []
    first = document["events"][0]
    assert first["event_id"] == "km-0000"
    assert first["external_customer_id"] == "team-0"
    assert first["timestamp"] == "2025-08-22T12:00:00Z"
    assert first["properties"]["value"] == "7"
    assert document["events"][2]["timestamp"] == "2025-08-22T12:00:00.250000Z"
    assert "note" not in first["properties"]
    assert body(sink, events) == document  # a retry sends byte-for-byte the same events
    assert sink.auth_headers("k") == {"x-api-key": "k"}


def test_flexprice_refuses_a_batch_size_it_cannot_take() -> None:
    with pytest.raises(ValueError, match="at most 1000"):
        FlexpriceSink("https://x/v1", max_batch_events=1001)


def test_lago_batch_matches_the_lago_spec_with_unix_seconds_and_subscriptions() -> None:
    sink = LagoSink(
        "https://api.getlago.com/api/v1",
        subscriptions=SubscriptionMapping(by_subject={"team-1": "sub-vision-gpu"}),
    )
    document = body(sink, usage_events(50))
    assert spec_validators().lago_batch.problems(document) == []
    first, second, third = document["events"][:3]
    assert first["transaction_id"] == "km-0000"
    assert first["timestamp"] == int(WINDOW_END.timestamp())
    assert third["timestamp"] == f"{int(WINDOW_END.timestamp())}.25"
    assert first["external_subscription_id"] == "team-0"
    assert second["external_subscription_id"] == "sub-vision-gpu"
    assert first["code"] == "io.kubemeter.gpu.seconds"
    assert first["properties"]["complete"] == "false"


@pytest.mark.parametrize(
    ("mapping", "expected"),
    [
        (SubscriptionMapping(), ["team-0", "team-1", "team-2"]),
        (SubscriptionMapping(dimension="gpu_model"), ["H200", "H200", "H200"]),
        (
            SubscriptionMapping(expression="event.subject + '-' + event.data.gpu_model"),
            ["team-0-H200", "team-1-H200", "team-2-H200"],
        ),
        (
            SubscriptionMapping(by_subject={"team-2": "sub_42"}, expression="'gpu-' + event.data.namespace"),
            ["gpu-vision", "gpu-vision", "sub_42"],
        ),
    ],
)
def test_lago_subscription_comes_from_the_subject_map_a_dimension_or_an_expression(
    mapping: SubscriptionMapping, expected: list[str]
) -> None:
    document = body(LagoSink("https://lago/api/v1", subscriptions=mapping), usage_events(3))
    assert [e["external_subscription_id"] for e in document["events"]] == expected
    assert spec_validators().lago_batch.problems(document) == []


@pytest.mark.parametrize(
    ("mapping", "reason"),
    [
        (SubscriptionMapping(dimension="subscription"), "data key 'subscription'"),
        (SubscriptionMapping(expression="event.data.subscription"), "event.data.subscription"),
        (SubscriptionMapping(expression="event.data.complete"), "gave False, not a non-empty string"),
    ],
)
def test_an_event_lago_cannot_bill_is_refused_at_encoding_with_the_reason(
    mapping: SubscriptionMapping, reason: str
) -> None:
    with pytest.raises(UnencodableEvent, match=reason) as refused:
        LagoSink("https://lago/api/v1", subscriptions=mapping).encode(usage_events(3))
    assert refused.value.index == 0


def test_lago_mapping_takes_a_dimension_or_an_expression_not_both() -> None:
    with pytest.raises(ValueError, match="not both"):
        SubscriptionMapping(dimension="a", expression="event.subject")
    with pytest.raises(ValueError, match="not both"):
        OutputSpec.model_validate(
            {
                "type": "lago",
                "url": "https://lago",
                "credentialsSecretRef": {"name": "lago", "key": "key"},
                "lago": {"subscriptionIdDimension": "a", "subscriptionIdExpression": "event.subject"},
            }
        )


def test_type_options_apply_to_their_type_only() -> None:
    with pytest.raises(ValueError, match=r"output\.lago applies to type lago only"):
        OutputSpec.model_validate({"type": "openmeter", "url": "https://om", "lago": {}})
    with pytest.raises(ValueError, match=r"output\.cloudevents applies to type cloudevents only"):
        OutputSpec.model_validate(
            {"type": "openmeter", "url": "https://om", "cloudevents": {"mode": "batch"}}
        )


def test_the_gateway_builds_each_sink_from_the_output_spec() -> None:
    structured = sink_for(
        OutputSpec.model_validate(
            {"type": "cloudevents", "url": "https://ce/in", "cloudevents": {"mode": "structured"}}
        )
    )
    assert isinstance(structured, CloudEventsSink)
    assert (structured.mode, structured.max_batch_events, structured.url) == (
        "structured",
        1,
        "https://ce/in",
    )
    batch = sink_for(OutputSpec.model_validate({"type": "cloudevents", "url": "https://ce/in"}))
    assert isinstance(batch, CloudEventsSink) and batch.mode == "batch"
    lago = sink_for(
        OutputSpec.model_validate(
            {
                "type": "lago",
                "url": "https://lago/api/v1",
                "credentialsSecretRef": {"name": "lago", "key": "key"},
                "lago": {
                    "subscriptionIdBySubject": {"team-0": "sub_0"},
                    "subscriptionIdExpression": "event.subject + '-gpu'",
                },
            }
        )
    )
    assert isinstance(lago, LagoSink)
    assert [e["external_subscription_id"] for e in body(lago, usage_events(2))["events"]] == [
        "sub_0",
        "team-1-gpu",
    ]


def test_cloudevents_structured_and_batch_match_the_cloudevents_schema() -> None:
    events = usage_events(20)
    batch = CloudEventsSink("http://ce.example/ingest", headers={"X-Tenant": "a"})
    request = batch.encode(events)
    assert request.headers["X-Tenant"] == "a"
    assert request.headers["Content-Type"].startswith("application/cloudevents-batch+json")
    for event in json.loads(request.body):
        assert spec_validators().cloudevent.problems(event) == []
    structured = CloudEventsSink("http://ce.example/ingest", mode="structured")
    assert structured.max_batch_events == 1
    single = structured.encode(events[:1])
    assert single.headers["Content-Type"].startswith("application/cloudevents+json")
    assert spec_validators().cloudevent.problems(json.loads(single.body)) == []


def response(status: int, body: Any = None, headers: dict[str, str] | None = None) -> httpx.Response:
    content = b"" if body is None else json.dumps(body).encode()
    return httpx.Response(status, content=content, headers=headers)


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, DeliveryOutcome.DELIVERED),
        (202, DeliveryOutcome.DELIVERED),
        (204, DeliveryOutcome.DELIVERED),
        (409, DeliveryOutcome.DELIVERED),
        (400, DeliveryOutcome.REJECTED),
        (413, DeliveryOutcome.REJECTED),
        (422, DeliveryOutcome.REJECTED),
        (401, DeliveryOutcome.UNAUTHORIZED),
        (403, DeliveryOutcome.UNAUTHORIZED),
        (404, DeliveryOutcome.RETRY_LATER),
        (429, DeliveryOutcome.RETRY_LATER),
        (500, DeliveryOutcome.RETRY_LATER),
        (502, DeliveryOutcome.RETRY_LATER),
        (503, DeliveryOutcome.RETRY_LATER),
    ],
)
def test_status_codes_follow_the_delivery_rules(status: int, outcome: DeliveryOutcome) -> None:
    assert standard_verdict(response(status)).outcome is outcome


def test_retry_after_is_read_in_seconds_dates_and_rate_limit_resets() -> None:
    now_s = 1_755_864_000.0
    assert retry_after_seconds({"retry-after": "3"}, now_s=now_s) == 3
    assert retry_after_seconds({"retry-after": "Fri, 22 Aug 2025 12:00:10 GMT"}, now_s=now_s) == 10
    assert retry_after_seconds({"x-ratelimit-reset": "7"}, now_s=now_s) == 7
    assert retry_after_seconds({"x-ratelimit-reset": str(now_s + 4)}, now_s=now_s) == 4
    assert retry_after_seconds({}, now_s=now_s) is None
    verdict = standard_verdict(response(429, headers={"Retry-After": "2"}))
    assert verdict.retry_after_s == 2


def test_lago_already_stored_counts_as_delivered_and_names_the_bad_event() -> None:
    sink = LagoSink("https://lago/api/v1")
    details = {
        "0": {"transaction_id": ["value_already_exist"]},
        "2": {"properties": ["value_is_not_a_number"]},
    }
    verdict = sink.classify(
        response(
            422,
            {
                "status": 422,
                "error": "Unprocessable Entity",
                "code": "validation_errors",
                "error_details": details,
            },
        ),
        usage_events(3),
    )
    assert verdict.per_event[0][0] is DeliveryOutcome.DELIVERED
    assert verdict.per_event[2] == (DeliveryOutcome.REJECTED, "HTTP 422: properties: value_is_not_a_number")
    assert 1 not in verdict.per_event  # not named: sent again


def test_lago_whole_batch_errors_fall_back_to_bisecting() -> None:
    sink = LagoSink("https://lago/api/v1")
    verdict = sink.classify(
        response(422, {"error_details": {"events": ["too_many_events"]}}), usage_events(2)
    )
    assert verdict.outcome is DeliveryOutcome.REJECTED
    assert not verdict.per_event


def cloudevent(**changes: Any) -> dict[str, Any]:
    event = {
        "specversion": "1.0",
        "id": "a-1",
        "source": "app",
        "type": "api.call",
        "subject": "cust-1",
        "time": "2025-01-01T00:00:00Z",
        "data": {"value": 1},
    }
    event.update(changes)
    return {k: v for k, v in event.items() if v is not ...}


def test_ingest_accepts_structured_batch_and_plain_json() -> None:
    one = json.dumps(cloudevent()).encode()
    many = json.dumps([cloudevent(), cloudevent(id="a-2")]).encode()
    assert len(parse_cloudevents("application/cloudevents+json; charset=utf-8", one)) == 1
    assert len(parse_cloudevents("application/cloudevents-batch+json", many)) == 2
    assert len(parse_cloudevents("application/json", many)) == 2


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        (cloudevent(subject=...), "subject must be a non-empty string"),
        (cloudevent(specversion="0.3"), "specversion must be"),
        (cloudevent(data=[1, 2]), "data must be a JSON object"),
        (cloudevent(time="yesterday"), "is not RFC 3339"),
        (cloudevent(time="2025-01-01T00:00:00"), "has no zone"),
        (cloudevent(datacontenttype="text/plain"), "datacontenttype must be"),
    ],
)
def test_ingest_refuses_malformed_events_with_the_reason(event: dict[str, Any], reason: str) -> None:
    with pytest.raises(IngestError, match=reason):
        parse_cloudevents(
            "application/cloudevents-batch+json", json.dumps([cloudevent(id="ok"), event]).encode()
        )


def test_ingest_refuses_the_wrong_content_type_and_shape() -> None:
    with pytest.raises(IngestError, match="text/plain"):
        parse_cloudevents("text/plain", b"{}")
    with pytest.raises(IngestError, match="JSON array"):
        parse_cloudevents("application/cloudevents-batch+json", json.dumps(cloudevent()).encode())


def test_an_event_without_time_is_stamped_once_at_ingest() -> None:
    received = datetime(2025, 3, 1, 8, 30, tzinfo=UTC)
    record = to_record(cloudevent(time=...), received)
    assert json.loads(record.payload)["time"] == "2025-03-01T08:30:00Z"
