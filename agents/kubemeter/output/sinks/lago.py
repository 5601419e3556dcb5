"""Lago: ``POST /api/v1/events/batch`` (100 events by default), Bearer token.

``transaction_id`` is the event id and ``timestamp`` the event time in Unix seconds, both fixed at
the source, so a retry is the same event. Lago refuses a whole batch when one event fails; its 422
names the failing events by index, so ``value_already_exist`` (already stored: delivered) and real
validation errors (dead-lettered) are settled without bisecting.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from kubemeter.output.delivery import (
    DeliveryOutcome,
    EncodedRequest,
    Verdict,
    response_excerpt,
    standard_verdict,
)
from kubemeter.output.queue import QueuedEvent
from kubemeter.output.sinks._common import decode, dumps, parse_time, scalar_text

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


class LagoSink:
    kind = "lago"

    def __init__(
        self,
        base_url: str,
        *,
        max_batch_events: int = DEFAULT_MAX_BATCH_EVENTS,
        subscription_ids: Mapping[str, str] | None = None,
        subscription_id_template: str = "{subject}",
    ) -> None:
        """``base_url`` is the API root, e.g. ``https://api.getlago.com/api/v1``.

        Lago bills a subscription, not a customer: ``subscription_ids`` maps an event subject to its
        ``external_subscription_id``; subjects not in it use ``subscription_id_template``.
        """
        self.url = base_url.rstrip("/") + "/events/batch"
        self.max_batch_events = max_batch_events
        self.subscription_ids = dict(subscription_ids or {})
        self.subscription_id_template = subscription_id_template

    def lago_event(self, cloudevent: dict[str, Any]) -> dict[str, Any]:
        subject = cloudevent["subject"]
        data = cloudevent.get("data") or {}
        subscription = self.subscription_ids.get(subject) or self.subscription_id_template.format(
            subject=subject
        )
        return {
            "transaction_id": cloudevent["id"],
            "external_subscription_id": subscription,
            "code": cloudevent["type"],
            "timestamp": unix_seconds(cloudevent["time"]),
            "properties": {key: property_value(value) for key, value in data.items() if value is not None},
        }

    def encode(self, events: Sequence[QueuedEvent]) -> EncodedRequest:
        body = dumps({"events": [self.lago_event(decode(event)) for event in events]})
        return EncodedRequest(self.url, {"Content-Type": "application/json"}, body)

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
