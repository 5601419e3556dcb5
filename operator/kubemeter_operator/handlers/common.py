"""What every kind's handlers share: index entries and scheduling a namespace reconciliation."""

from __future__ import annotations

from typing import Any

from kubemeter_operator import runtime
from kubemeter_operator.resolve import ObjectView


def index_entry(namespace: str | None, body: Any) -> dict[str, ObjectView]:
    return {str(namespace): ObjectView.from_body(body)}


async def request_reconcile(namespace: str | None, **kwargs: Any) -> None:
    state = runtime.current()
    state.remember_indexes(kwargs)
    if namespace:
        state.queue.request(namespace)
