"""The usage event: a CloudEvents 1.0 envelope, the one shape that flows through the data plane.

``id`` is deterministic (see :func:`kubemeter.metering.ids.event_id`) and ``time`` is the window end,
so a re-emitted event is byte-for-byte the same event and the billing API deduplicates it on
``(source, id)``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator

CLOUDEVENTS_SPEC_VERSION = "1.0"


def format_rfc3339(moment: datetime) -> str:
    """UTC with a ``Z`` suffix: the form every billing API accepts."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


class UsageEvent(BaseModel):
    """One CloudEvent. ``data`` carries ``value``, ``unit``, ``window_start``, ``window_end``,
    ``namespace``, ``pod``, ``node``, ``complete`` and the meter's dimensions."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    specversion: Literal["1.0"] = "1.0"
    id: str = Field(min_length=1)
    source: str = Field(min_length=1, description="kubemeter/<cluster>; stable so (source, id) dedups")
    type: str = Field(min_length=1)
    subject: str = Field(min_length=1, description="the customer billed for this usage")
    time: datetime = Field(description="the window end; never the moment of sending")
    datacontenttype: Literal["application/json"] = "application/json"
    data: dict[str, Any] = Field(default_factory=dict)

    @field_validator("time")
    @classmethod
    def _time_is_aware(cls, moment: datetime) -> datetime:
        if moment.tzinfo is None:
            raise ValueError("time must carry a timezone (UTC); naive datetimes are ambiguous")
        return moment

    @field_serializer("time")
    def _serialize_time(self, moment: datetime) -> str:
        return format_rfc3339(moment)

    def to_cloudevent(self) -> dict[str, Any]:
        """The structured-mode CloudEvents JSON object."""
        return self.model_dump(mode="json")
