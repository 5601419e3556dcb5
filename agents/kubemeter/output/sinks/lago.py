"""Lago: ``POST /api/v1/events/batch`` (100 events by default), Bearer token.

``transaction_id`` is the event id and ``timestamp`` the event time in Unix seconds, both fixed at
the source, so a retry is the same event. Lago bills subscriptions, not customers: each event's
``external_subscription_id`` comes from a :class:`SubscriptionMapping`. Lago refuses a whole batch
when one event fails; its 422 names the failing events by index, so ``value_already_exist``
(already stored: delivered) and real validation errors (dead-lettered) are settled without bisecting.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from kubemeter.api.collector import LagoOutputSpec
from kubemeter.output.delivery import (
    DeliveryOutcome,
    EncodedRequest,
    UnencodableEvent,
    Verdict,
    response_excerpt,
    standard_verdict,
)
from kubemeter.output.queue import QueuedEvent
from kubemeter.output.sinks._common import decode, dumps, parse_time, scalar_text
from kubemeter.pipeline.cel import CelError, Expression

DEFAULT_MAX_BATCH_EVENTS = 100  # LAGO_EVENTS_BATCH_MAX_LENGTH on the server


def unix_seconds(rfc3339: str) -> int | str:
    """Whole seconds as an integer; sub-second times as a decimal string ("1755864000.123")."""
    moment = parse_time(rfc3339)
    whole = int(moment.timestamp() // 1)
    if moment.microsecond == 0:
        return whole
    return f"{whole}.{moment.microsecond:06d}".rstrip("0")


def property_value(value: Any) -> str:
    # The spec's oneOf [string, integer, number] refuses every whole number (it is both integer and
    # number), and Lago stores properties as text anyway: send them all as text.
    return scalar_text(value)


class SubscriptionMapping:
    """Which Lago subscription an event bills (``output.lago``): the subject's entry in
    ``by_subject``, else the data key ``dimension`` or the CEL ``expression`` over ``event``, else
    (when neither is configured) the subject itself."""

    def __init__(
        self,
        *,
        by_subject: Mapping[str, str] | None = None,
        dimension: str | None = None,
        expression: str | None = None,
    ) -> None:
        if dimension is not None and expression is not None:
            raise ValueError("output.lago: set subscriptionIdDimension or subscriptionIdExpression, not both")
        self.by_subject = dict(by_subject or {})
        self.dimension = dimension
        self.expression = (
            Expression(expression, "output.lago.subscriptionIdExpression") if expression is not None else None
        )

    @classmethod
    def from_spec(cls, spec: LagoOutputSpec | None) -> SubscriptionMapping:
        if spec is None:
            return cls()
        return cls(
            by_subject=spec.subscription_id_by_subject,
            dimension=spec.subscription_id_dimension,
            expression=spec.subscription_id_expression,
        )

    def subscription_id(self, cloudevent: dict[str, Any]) -> str:
        """The event's ``external_subscription_id``; ``ValueError`` saying why there is none."""
        subject: str = cloudevent["subject"]
        if subject in self.by_subject:
            return self.by_subject[subject]
        if self.dimension is not None:
            value = (cloudevent.get("data") or {}).get(self.dimension)
            where = f"data key {self.dimension!r} (output.lago.subscriptionIdDimension)"
        elif self.expression is not None:
            try:
                value = self.expression.evaluate({"event": cloudevent})
            except CelError as error:
                raise ValueError(f"no external_subscription_id: {error}") from error
            where = f"{self.expression.text!r} (output.lago.subscriptionIdExpression)"
        else:
            return subject
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not value:
            raise ValueError(
                f"no external_subscription_id for subject {subject!r}: {where} gave {value!r}, not a "
                "non-empty string; fix the mapping or add the subject to "
                "output.lago.subscriptionIdBySubject, then kubemeter dlq replay"
            )
        return value


class LagoSink:
    kind = "lago"

    def __init__(
        self,
        base_url: str,
        *,
        max_batch_events: int = DEFAULT_MAX_BATCH_EVENTS,
        subscriptions: SubscriptionMapping | None = None,
    ) -> None:
        """``base_url`` is the API root, e.g. ``https://api.getlago.com/api/v1``."""
        self.url = base_url.rstrip("/") + "/events/batch"
        self.max_batch_events = max_batch_events
        self.subscriptions = subscriptions or SubscriptionMapping()

    def lago_event(self, cloudevent: dict[str, Any]) -> dict[str, Any]:
        data = cloudevent.get("data") or {}
        return {
            "transaction_id": cloudevent["id"],
            "external_subscription_id": self.subscriptions.subscription_id(cloudevent),
            "code": cloudevent["type"],
            "timestamp": unix_seconds(cloudevent["time"]),
            "properties": {key: property_value(value) for key, value in data.items() if value is not None},
        }

    def encode(self, events: Sequence[QueuedEvent]) -> EncodedRequest:
        encoded = []
        for index, event in enumerate(events):
            try:
                encoded.append(self.lago_event(decode(event)))
            except ValueError as error:
                raise UnencodableEvent(index, str(error)) from error
        return EncodedRequest(self.url, {"Content-Type": "application/json"}, dumps({"events": encoded}))

    def auth_headers(self, secret: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {secret}"}

    def classify(self, response: httpx.Response, batch: Sequence[QueuedEvent]) -> Verdict:
        verdict = standard_verdict(response)
        if response.status_code != 422:
            return verdict
        try:
            details = json.loads(response.content).get("error_details") or {}
        except (ValueError, AttributeError):
            return verdict
        per_event: dict[int, tuple[DeliveryOutcome, str]] = {}
        for key, errors in details.items() if isinstance(details, dict) else ():
            if not (isinstance(key, str) and key.isdigit() and isinstance(errors, dict)):
                continue  # an error about the whole batch (too_many_events, no_events): bisect
            messages = [f"{field}: {', '.join(map(str, codes))}" for field, codes in errors.items()]
            only_duplicate = all(list(codes) == ["value_already_exist"] for codes in errors.values())
            if only_duplicate:
                per_event[int(key)] = (DeliveryOutcome.DELIVERED, "already stored (value_already_exist)")
            else:
                per_event[int(key)] = (DeliveryOutcome.REJECTED, f"HTTP 422: {'; '.join(messages)}")
        if not per_event:
            return verdict
        return Verdict(
            DeliveryOutcome.REJECTED, f"HTTP 422: {response_excerpt(response, 300)}", per_event=per_event
        )
