"""Any CloudEvents HTTP endpoint, structured mode (one event per request) or batch mode.

Also the agent's forwarder to the gateway (batch mode to ``<gateway>/api/v1/events``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import httpx

from kubemeter.output.delivery import BILLING_CREDENTIALS_FIX, EncodedRequest, Verdict, standard_verdict
from kubemeter.output.queue import QueuedEvent
from kubemeter.output.sinks._common import json_array

STRUCTURED_CONTENT_TYPE = "application/cloudevents+json; charset=utf-8"
BATCH_CONTENT_TYPE = "application/cloudevents-batch+json; charset=utf-8"


class CloudEventsSink:
    kind = "cloudevents"

    def __init__(
        self,
        url: str,
        *,
        mode: Literal["structured", "batch"] = "batch",
        headers: Mapping[str, str] | None = None,
        max_batch_events: int = 1000,
        unauthorized_fix: str = BILLING_CREDENTIALS_FIX,
    ) -> None:
        """``url`` is the full endpoint; ``headers`` are sent with every request (e.g. a tenant id);
        ``unauthorized_fix`` says what to do about a 401/403."""
        self.url = url
        self.mode = mode
        self.headers = dict(headers or {})
        self.max_batch_events = 1 if mode == "structured" else max_batch_events
        self.unauthorized_fix = unauthorized_fix

    def encode(self, events: Sequence[QueuedEvent]) -> EncodedRequest:
        if self.mode == "structured":
            (event,) = events
            return EncodedRequest(
                self.url, {**self.headers, "Content-Type": STRUCTURED_CONTENT_TYPE}, event.payload
            )
        return EncodedRequest(
            self.url, {**self.headers, "Content-Type": BATCH_CONTENT_TYPE}, json_array(events)
        )

    def auth_headers(self, secret: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {secret}"}

    def classify(self, response: httpx.Response, batch: Sequence[QueuedEvent]) -> Verdict:
        return standard_verdict(response, unauthorized_fix=self.unauthorized_fix)
