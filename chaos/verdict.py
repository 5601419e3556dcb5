"""Ground truth and the verdict, pure functions: no cluster, no HTTP.

The truth comes only from what the API server recorded for each pod: when it was bound
(``PodScheduled`` ``lastTransitionTime``) and when its deletion was requested (``deletionTimestamp -
deletionGracePeriodSeconds`` in the answer to our own DELETE). From those two instants and the pod's
requests it derives every event the sink should hold: one per (pod, meter, window) that the pod
overlaps, with value ``quantity * overlap``. The verdict compares that with the events the sink
stored, one by one and summed per pod.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

WINDOW_MS = 10_000

# Event type -> the resource it meters (chaos/manifests.yaml).
METERS: dict[str, str] = {
    "gpu-seconds": "nvidia.com/gpu",
    "cpu-core-seconds": "cpu",
    "memory-byte-seconds": "memory",
    "mig-seconds": "nvidia.com/mig-1g.10gb",
}

_SUFFIXES = {
    "m": Decimal("0.001"),
    "Ki": Decimal(2**10),
    "Mi": Decimal(2**20),
    "Gi": Decimal(2**30),
    "Ti": Decimal(2**40),
}

# (namespace, pod, event type, window start ms)
EventKey = tuple[str, str, str, int]


def quantity(text: str) -> Decimal:
    """The few quantity forms the suite's pods use (``1``, ``500m``, ``1536Mi``, ``16Gi``)."""
    for suffix, factor in _SUFFIXES.items():
        if text.endswith(suffix):
            return Decimal(text[: -len(suffix)]) * factor
    return Decimal(text)


def parse_time_ms(text: str) -> int:
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return round(moment.timestamp() * 1000)


@dataclass(frozen=True)
class PodLife:
    """One pod of the churn, as the API server recorded it."""

    namespace: str
    name: str
    cohort: str  # the fault during which it was created
    customer: str
    requests: Mapping[str, str]
    node: str | None = None
    bound_ms: int | None = None  # None: never bound, so never billable
    released_ms: int | None = None

    def held_ms(self) -> int:
        if self.bound_ms is None or self.released_ms is None:
            return 0
        return max(0, self.released_ms - self.bound_ms)


def expected_events(pods: Iterable[PodLife], window_ms: int = WINDOW_MS) -> dict[EventKey, Decimal]:
    """Every event the sink should hold for these (ended) pods: value per window they overlap."""
    expected: dict[EventKey, Decimal] = {}
    for pod in pods:
        if pod.bound_ms is None or pod.released_ms is None or pod.held_ms() == 0:
            continue
        for event_type, resource in METERS.items():
            if resource not in pod.requests:
                continue
            amount = quantity(pod.requests[resource])
            start = pod.bound_ms - pod.bound_ms % window_ms
            while start < pod.released_ms:
                overlap_ms = min(pod.released_ms, start + window_ms) - max(pod.bound_ms, start)
                if overlap_ms > 0:
                    key = (pod.namespace, pod.name, event_type, start)
                    expected[key] = amount * overlap_ms / 1000
                start += window_ms
    return expected


@dataclass(frozen=True)
class StoredEvent:
    key: EventKey
    event_id: str
    subject: str
    value: Decimal
    complete: bool
    incomplete_reason: str | None


def stored_usage_events(sink_events: Iterable[Mapping[str, Any]]) -> list[StoredEvent]:
    """The sink's stored events (``GET /api/v1/usage/events``) that are usage of the suite's meters."""
    stored = []
    for event in sink_events:
        if event.get("type") not in METERS:
            continue
        data = event.get("dimensions") or {}
        key = (data["namespace"], data["pod"], event["type"], parse_time_ms(data["window_start"]))
        stored.append(
            StoredEvent(
                key=key,
                event_id=event["eventId"],
                subject=event["subject"],
                value=Decimal(str(event["value"])),
                complete=bool(data.get("complete", True)),
                incomplete_reason=data.get("incomplete_reason"),
            )
        )
    return stored


@dataclass
class PodError:
    """A (pod, meter) whose billed total differs from the truth, in seconds of its quantity."""

    namespace: str
    pod: str
    node: str | None
    meter: str
    expected: Decimal
    billed: Decimal
    error_s: Decimal
    windows: list[dict[str, Any]]  # the windows that differ: start, expected, billed

    def to_json(self) -> dict[str, Any]:
        return {
            "pod": f"{self.namespace}/{self.pod}",
            "node": self.node,
            "meter": self.meter,
            "expected": str(self.expected),
            "billed": str(self.billed),
            "error_s": str(self.error_s),
            "windows": self.windows,
        }


@dataclass
class Outcome:
    """What the sink holds for one cohort of pods (the pods started during one fault)."""

    cohort: str
    pods: int = 0
    expected_events: int = 0
    stored_events: int = 0
    lost: int = 0  # expected (pod, meter, window) with no stored event
    billed_twice: int = 0  # (pod, meter, window) stored under more than one event id
    unexpected: int = 0  # stored for a (pod, meter, window) the pod did not overlap
    wrong_value: int = 0
    wrong_subject: int = 0
    flagged: int = 0  # stored with complete=false
    max_error_s: Decimal = Decimal(0)
    errors: list[PodError] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        return not (
            self.lost or self.billed_twice or self.unexpected or self.wrong_value or self.wrong_subject
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "cohort": self.cohort,
            "pods": self.pods,
            "expected_events": self.expected_events,
            "stored_events": self.stored_events,
            "lost": self.lost,
            "billed_twice": self.billed_twice,
            "unexpected": self.unexpected,
            "wrong_value": self.wrong_value,
            "wrong_subject": self.wrong_subject,
            "flagged_incomplete": self.flagged,
            "max_pod_error_s": str(self.max_error_s),
            "exact": self.exact,
            "pod_errors": [error.to_json() for error in self.errors],
            "examples": self.examples,
        }


def judge(cohort: str, pods: Sequence[PodLife], stored: Sequence[StoredEvent]) -> Outcome:
    """Compare the sink's events for ``pods`` with the truth, event by event and per pod."""
    outcome = Outcome(cohort, pods=sum(1 for pod in pods if pod.bound_ms is not None))
    by_name = {(pod.namespace, pod.name): pod for pod in pods}
    expected = expected_events(pods)
    outcome.expected_events = len(expected)
    mine = [event for event in stored if (event.key[0], event.key[1]) in by_name]
    outcome.stored_events = len(mine)

    found: dict[EventKey, list[StoredEvent]] = defaultdict(list)
    for event in mine:
        found[event.key].append(event)
    for key in expected.keys() - found.keys():
        outcome.lost += 1
        _example(outcome, f"lost: {_describe(key)} expected {expected[key]}")
    for key, events in found.items():
        if len({event.event_id for event in events}) > 1:
            outcome.billed_twice += 1
            _example(outcome, f"billed twice: {_describe(key)} ids {sorted(e.event_id for e in events)}")
        if key not in expected:
            outcome.unexpected += 1
            _example(outcome, f"unexpected: {_describe(key)} value {events[0].value}")
        elif any(event.value != expected[key] for event in events):
            outcome.wrong_value += 1
            _example(
                outcome, f"wrong value: {_describe(key)} expected {expected[key]}, got {events[0].value}"
            )
        customer = by_name[(key[0], key[1])].customer
        if any(event.subject != customer for event in events):
            outcome.wrong_subject += 1
            _example(outcome, f"wrong subject: {_describe(key)} {events[0].subject!r} != {customer!r}")
        outcome.flagged += sum(1 for event in events if not event.complete)

    # Per (pod, meter): the billed total against the truth, as seconds of the pod's quantity.
    for (namespace, name), pod in by_name.items():
        for event_type, resource in METERS.items():
            if resource not in pod.requests:
                continue
            amount = quantity(pod.requests[resource])
            truth = {k: v for k, v in expected.items() if k[:3] == (namespace, name, event_type)}
            billed = {
                k: events[0].value for k, events in found.items() if k[:3] == (namespace, name, event_type)
            }
            expected_total, billed_total = sum(truth.values(), Decimal(0)), sum(billed.values(), Decimal(0))
            if expected_total == billed_total and truth == billed:
                continue
            error_s = abs(billed_total - expected_total) / amount
            windows = [
                {
                    "window_start_ms": start[3],
                    "expected": str(truth.get(start, Decimal(0))),
                    "billed": str(billed.get(start, Decimal(0))),
                }
                for start in sorted(truth.keys() | billed.keys(), key=lambda k: k[3])
                if truth.get(start) != billed.get(start)
            ]
            outcome.errors.append(
                PodError(
                    namespace, name, pod.node, event_type, expected_total, billed_total, error_s, windows
                )
            )
            outcome.max_error_s = max(outcome.max_error_s, error_s)
    outcome.errors.sort(key=lambda error: error.error_s, reverse=True)
    return outcome


def _describe(key: EventKey) -> str:
    return f"{key[0]}/{key[1]} {key[2]} window {key[3]}"


def _example(outcome: Outcome, text: str) -> None:
    if len(outcome.examples) < 8:
        outcome.examples.append(text)


@dataclass
class FillerOutcome:
    """Application events the gateway acknowledged (204) against what the sink stored of them."""

    acknowledged: int
    stored: int
    lost: int
    unexpected: int

    @property
    def exact(self) -> bool:
        return not (self.lost or self.unexpected)


def judge_filler(acknowledged_ids: set[str], stored_ids: Iterable[str]) -> FillerOutcome:
    stored = list(stored_ids)
    held = set(stored)
    return FillerOutcome(
        acknowledged=len(acknowledged_ids),
        stored=len(stored),
        lost=len(acknowledged_ids - held),
        unexpected=len(held - acknowledged_ids) + (len(stored) - len(held)),
    )
