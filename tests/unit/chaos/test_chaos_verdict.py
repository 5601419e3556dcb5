"""The fault suite's judge: the truth from pod timestamps, and every way the sink can differ from it."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from chaos.faults import metric
from chaos.verdict import (
    PodLife,
    StoredEvent,
    expected_events,
    judge,
    judge_filler,
    quantity,
    stored_usage_events,
)

T0 = 1_800_000_000_000  # a window boundary (ms)


def pod(name: str = "p", bound: int = T0 + 7_000, released: int = T0 + 23_500, **requests: str) -> PodLife:
    return PodLife(
        namespace="ns",
        name=name,
        cohort="fault",
        customer="acme",
        requests=requests or {"nvidia.com/gpu": "2", "cpu": "500m"},
        node="kwok-gpu-0",
        bound_ms=bound,
        released_ms=released,
    )


def stored(
    key: tuple[str, str, str, int], value: str, event_id: str = "", subject: str = "acme"
) -> StoredEvent:
    return StoredEvent(key, event_id or f"id-{key}", subject, Decimal(value), True, None)


def as_stored(expected: dict[tuple[str, str, str, int], Decimal]) -> list[StoredEvent]:
    return [stored(key, str(value)) for key, value in expected.items()]


def test_a_pod_held_16_5_seconds_is_three_windows_of_exact_resource_seconds() -> None:
    expected = expected_events([pod()])
    gpu = {k[3] - T0: v for k, v in expected.items() if k[2] == "gpu-seconds"}
    assert gpu == {0: Decimal(6), 10_000: Decimal(20), 20_000: Decimal(7)}  # 3 s, 10 s, 3.5 s of 2 GPUs
    cpu = {k[3] - T0: v for k, v in expected.items() if k[2] == "cpu-core-seconds"}
    assert cpu == {0: Decimal("1.5"), 10_000: Decimal(5), 20_000: Decimal("1.75")}
    assert not any(k[2] == "memory-byte-seconds" for k in expected), "no memory request, no event"


def test_quantities_the_pods_use_are_parsed_exactly() -> None:
    assert quantity("250m") == Decimal("0.25")
    assert quantity("1536Mi") == 1536 * 2**20
    assert quantity("16Gi") == 16 * 2**30
    assert quantity("4") == 4


def test_unbound_or_unreleased_pods_owe_nothing() -> None:
    assert expected_events([pod(bound=None), pod(released=None), pod(released=T0 + 7_000)]) == {}  # type: ignore[arg-type]


def test_the_sink_holding_exactly_the_truth_is_exact() -> None:
    pods = [pod("a"), pod("b", bound=T0, released=T0 + 10_000)]
    outcome = judge("fault", pods, as_stored(expected_events(pods)))
    assert outcome.exact
    assert (outcome.pods, outcome.expected_events, outcome.lost, outcome.max_error_s) == (2, 8, 0, 0)


def test_a_missing_window_is_lost_and_shows_as_seconds_of_error_on_that_pod() -> None:
    pods = [pod()]
    events = as_stored(expected_events(pods))
    last = next(e for e in events if e.key[2] == "gpu-seconds" and e.key[3] == T0 + 20_000)
    outcome = judge("fault", pods, [e for e in events if e is not last])
    assert not outcome.exact
    assert outcome.lost == 1
    assert outcome.max_error_s == Decimal("3.5")
    (error,) = outcome.errors
    assert (error.meter, error.expected, error.billed) == ("gpu-seconds", Decimal(33), Decimal(26))
    assert error.windows == [{"window_start_ms": T0 + 20_000, "expected": "7", "billed": "0"}]


def test_one_window_under_two_event_ids_is_billed_twice() -> None:
    pods = [pod()]
    events = as_stored(expected_events(pods))
    again = events[0]
    events.append(stored(again.key, str(again.value), event_id="another-id"))
    outcome = judge("fault", pods, events)
    assert outcome.billed_twice == 1 and not outcome.exact


def test_an_overbilled_window_is_a_wrong_value_with_its_error_in_seconds() -> None:
    pods = [pod()]
    events = [
        stored(e.key, "9") if e.key[2] == "gpu-seconds" and e.key[3] == T0 + 20_000 else e
        for e in as_stored(expected_events(pods))
    ]
    outcome = judge("fault", pods, events)
    assert outcome.wrong_value == 1 and not outcome.exact
    assert outcome.max_error_s == Decimal(1)  # 2 GPU-seconds too many of a 2-GPU pod


def test_usage_after_the_release_is_unexpected_and_a_wrong_customer_is_caught() -> None:
    pods = [pod()]
    events = as_stored(expected_events(pods))
    events.append(stored(("ns", "p", "gpu-seconds", T0 + 30_000), "2"))
    events[0] = stored(events[0].key, str(events[0].value), subject="globex")
    outcome = judge("fault", pods, events)
    assert (outcome.unexpected, outcome.wrong_subject) == (1, 1)


def test_the_sinks_event_listing_is_read_into_keys() -> None:
    listing: list[dict[str, Any]] = [
        {
            "eventId": "e1",
            "source": "kubemeter/local",
            "subject": "acme",
            "type": "gpu-seconds",
            "value": 1.5,
            "dimensions": {
                "namespace": "ns",
                "pod": "p",
                "window_start": "2027-01-15T08:00:00Z",
                "complete": False,
                "incomplete_reason": "pod watch down",
            },
        },
        {"eventId": "f1", "source": "chaos/filler", "type": "chaos-filler", "subject": "x", "value": 1},
    ]
    (event,) = stored_usage_events(listing)
    assert event.key == ("ns", "p", "gpu-seconds", T0)
    assert (event.value, event.complete) == (Decimal("1.5"), False)


def test_application_events_acknowledged_by_the_gateway_must_all_be_stored_once() -> None:
    assert judge_filler({"a", "b"}, ["a", "b"]).exact
    assert judge_filler({"a", "b"}, ["a"]).lost == 1
    assert judge_filler({"a"}, ["a", "c"]).unexpected == 1


def test_prometheus_samples_are_summed_by_label() -> None:
    text = (
        "# HELP x\n"
        'kubemeter_ingest_refused_requests_total{reason="full"} 3.0\n'
        'kubemeter_ingest_refused_requests_total{reason="malformed"} 1.0\n'
        "kubemeter_agent_config_reloads_total 2.0\n"
    )
    assert metric(text, "kubemeter_ingest_refused_requests_total", reason="full") == 3
    assert metric(text, "kubemeter_ingest_refused_requests_total") == 4
    assert metric(text, "kubemeter_agent_config_reloads_total") == 2
