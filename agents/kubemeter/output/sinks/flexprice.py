"""Flexprice: ``POST /v1/events/bulk`` (at most 1000 events), ``x-api-key``.

Flexprice collapses duplicates only when ``event_id`` AND ``timestamp`` (and the customer) are equal,
so both come from the stored event and never from the moment of sending. Property values are sent
as strings, as the OpenAPI spec declares them (Flexprice converts them back to numbers to aggregate).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx

from kubemeter.output.delivery import EncodedRequest, Verdict, standard_verdict
from kubemeter.output.queue import QueuedEvent
from kubemeter.output.sinks._common import decode, dumps, scalar_text

MAX_BULK_EVENTS = 1000


def flexprice_event(cloudevent: dict[str, Any]) -> dict[str, Any]:
    data = cloudevent.get("data") or {}
    return {
        "event_id": cloudevent["id"],
        "event_name": cloudevent["type"],
        "external_customer_id": cloudevent["subject"],
        "timestamp": cloudevent["time"],
        "source": cloudevent["source"],
        "properties": {key: scalar_text(value) for key, value in data.items() if value is not None},
    }


class FlexpriceSink:
    kind = "flexprice"

    def __init__(self, base_url: str, *, max_batch_events: int = MAX_BULK_EVENTS) -> None:
        """``base_url`` is the API root with its version, e.g. ``https://us.api.flexprice.io/v1``."""
        if max_batch_events > MAX_BULK_EVENTS:
            raise ValueError(
                f"Flexprice takes at most {MAX_BULK_EVENTS} events per bulk request; lower batch.maxEvents"
            )
        self.url = base_url.rstrip("/") + "/events/bulk"
        self.max_batch_events = max_batch_events

    def encode(self, events: Sequence[QueuedEvent]) -> EncodedRequest:
        body = dumps({"events": [flexprice_event(decode(event)) for event in events]})
        return EncodedRequest(self.url, {"Content-Type": "application/json"}, body)

    def auth_headers(self, secret: str) -> dict[str, str]:
        return {"x-api-key": secret}

    def classify(self, response: httpx.Response, batch: Sequence[QueuedEvent]) -> Verdict:
        return standard_verdict(response)
