"""Meter handlers: a Meter change re-renders the Collectors whose Pipelines bind it."""

from __future__ import annotations

from typing import Any

from kubemeter_operator.handlers.common import index_entry, request_reconcile
from kubemeter_operator.resolve import ObjectView


def meter_index(namespace: str | None, body: Any, **_: Any) -> dict[str, ObjectView]:
    return index_entry(namespace, body)


async def meter_event(namespace: str | None, **kwargs: Any) -> None:
    await request_reconcile(namespace, **kwargs)
