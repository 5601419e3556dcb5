"""OpenMeter: ``POST /api/v1/events`` with ``application/cloudevents-batch+json``, Bearer token.

The stored events already are the CloudEvents OpenMeter wants, so the body is built without
decoding them. OpenMeter deduplicates on (source, id) and answers 204.
"""

from __future__ import annotations

from collections.abc import Sequence

import httpx

from kubemeter.output.delivery import EncodedRequest, Verdict, standard_verdict
from kubemeter.output.queue import QueuedEvent
from kubemeter.output.sinks._common import json_array

CONTENT_TYPE = "application/cloudevents-batch+json"


class OpenMeterSink:
    kind = "openmeter"

    def __init__(self, base_url: str, *, max_batch_events: int = 1000) -> None:
        """``base_url`` is the API root, e.g. ``https://openmeter.cloud`` (``/api/v1/events`` is added)."""
        self.url = base_url.rstrip("/") + "/api/v1/events"
        self.max_batch_events = max_batch_events

    def encode(self, events: Sequence[QueuedEvent]) -> EncodedRequest:
        return EncodedRequest(self.url, {"Content-Type": CONTENT_TYPE}, json_array(events))

    def auth_headers(self, secret: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {secret}"}

    def classify(self, response: httpx.Response, batch: Sequence[QueuedEvent]) -> Verdict:
        return standard_verdict(response)
