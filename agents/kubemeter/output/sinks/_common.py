"""Helpers the encoders share: reading a stored CloudEvent, shaping property values."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from kubemeter.output.queue import QueuedEvent


def json_array(events: Sequence[QueuedEvent]) -> bytes:
    """The stored CloudEvents as a JSON array, without decoding them again."""
    return b"[" + b",".join(event.payload for event in events) + b"]"


def decode(event: QueuedEvent) -> dict[str, Any]:
    decoded: dict[str, Any] = json.loads(event.payload)
    return decoded


def dumps(document: Any) -> bytes:
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def parse_time(text: str) -> datetime:
    """An RFC 3339 time as the gateway stored it (always with a zone)."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def scalar_text(value: Any) -> str:
    """A property value as text, for APIs whose properties are strings (numbers keep full precision)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value, separators=(",", ":"), sort_keys=True)
