"""The Pipeline: binds Meters to a Collector and runs processors on their events."""

from __future__ import annotations

from typing import Self

from pydantic import ConfigDict, Field, model_validator

from kubemeter.api.common import (
    PROTECTED_DATA_KEYS,
    CelExpression,
    DataKey,
    LabelSelector,
    ObjectName,
    SpecModel,
    cel_rules,
)

# ---------------------------------------------------------------------------------------------------
# Pipeline

_PROTECTED_LIST = "[" + ", ".join(f"'{key}'" for key in PROTECTED_DATA_KEYS) + "]"


class ProcessorSpec(SpecModel):
    """One step applied to events before they reach the output. Set exactly one field.

    Keys name entries of the event's ``data``. Processors see ``event`` (the CloudEvent as a map)."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            (
                "[has(self.filter), has(self.set), has(self.drop), has(self.rename)]"
                ".filter(x, x).size() == 1",
                "spec.processors[]: set exactly one of filter, set, drop or rename in each processor",
            ),
            (
                f"!has(self.drop) || self.drop.all(k, !(k in {_PROTECTED_LIST}))",
                f"spec.processors[].drop: the keys {', '.join(PROTECTED_DATA_KEYS)} are required in every "
                "event and cannot be dropped",
            ),
            (
                f"!has(self.rename) || self.rename.all(k, !(k in {_PROTECTED_LIST}) && "
                f"!(self.rename[k] in {_PROTECTED_LIST}))",
                f"spec.processors[].rename: the keys {', '.join(PROTECTED_DATA_KEYS)} are required in every "
                "event and cannot be renamed or overwritten",
            ),
            (
                f"!has(self.set) || self.set.all(k, !(k in {_PROTECTED_LIST}))",
                f"spec.processors[].set: the keys {', '.join(PROTECTED_DATA_KEYS)} are computed by the "
                "meter and cannot be set",
            ),
        )
    )

    filter: CelExpression | None = Field(
        default=None, description="CEL bool over event; events for which it is false are not billed."
    )
    set: dict[DataKey, CelExpression] | None = Field(
        default=None,
        json_schema_extra={"maxProperties": 32},
        description="Data keys to set: key -> CEL expression over event.",
    )
    drop: list[DataKey] | None = Field(
        default=None, max_length=32, description="Data keys to remove from each event."
    )
    rename: dict[DataKey, DataKey] | None = Field(
        default=None,
        json_schema_extra={"maxProperties": 32},
        description="Data keys to rename: old key -> new key.",
    )

    @model_validator(mode="after")
    def _exactly_one_and_protected(self) -> Self:
        chosen = [name for name in ("filter", "set", "drop", "rename") if getattr(self, name) is not None]
        if len(chosen) != 1:
            raise ValueError(
                "spec.processors[]: set exactly one of filter, set, drop or rename in each processor"
                + (f" (found {', '.join(chosen)})" if chosen else "")
            )
        touched = set(self.drop or ()) | set(self.set or {}) | set(self.rename or {})
        touched |= set((self.rename or {}).values())
        protected = sorted(touched.intersection(PROTECTED_DATA_KEYS))
        if protected:
            raise ValueError(
                f"spec.processors[]: {', '.join(protected)} are required in every event and cannot be "
                "set, dropped or renamed"
            )
        return self


class PipelineSpec(SpecModel):
    """Binds Meters to a Collector and lists the processors their events pass through."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            (
                "has(self.meters) != has(self.meterSelector)",
                "spec: set exactly one of meters (a list of Meter names) or meterSelector (a label selector)",
            )
        )
    )

    collector_ref: ObjectName = Field(
        description="Name of the Collector, in this namespace, that ships the events."
    )
    meters: list[ObjectName] | None = Field(
        default=None,
        min_length=1,
        max_length=500,
        description="Names of Meters in this namespace to bind. Use this or meterSelector.",
    )
    meter_selector: LabelSelector | None = Field(
        default=None, description="Bind every Meter in this namespace whose labels match. Use this or meters."
    )
    processors: list[ProcessorSpec] = Field(
        default_factory=list, max_length=50, description="Steps applied in order to every event."
    )

    @model_validator(mode="after")
    def _meters_or_selector(self) -> Self:
        if (self.meters is None) == (self.meter_selector is None):
            raise ValueError(
                "spec: set exactly one of meters (a list of Meter names) or meterSelector (a label selector)"
            )
        return self
