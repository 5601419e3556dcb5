"""The custom resources: Meter, Collector and Pipeline wrap the spec models of :mod:`kubemeter.api`
with a typed status, and say how ``kubectl`` shows them (printer columns, short names, category)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from kubemeter.api.collector import CollectorSpec
from kubemeter.api.common import API_GROUP, API_VERSION, SpecModel
from kubemeter.api.meter import MeterSpec
from kubemeter.api.pipeline import PipelineSpec
from pydantic import BaseModel, Field

CATEGORY = "kubemeter"
REASON_PATTERN = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(SpecModel):
    """A Kubernetes API-convention condition."""

    type: str = Field(max_length=316, description="Condition type: Ready or Degraded.")
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(
        max_length=1024, pattern=REASON_PATTERN, description="CamelCase reason for the last transition."
    )
    message: str = Field(default="", max_length=32_768, description="What happened and, if needed, the fix.")
    last_transition_time: datetime | None = Field(default=None, description="When status last changed.")
    observed_generation: int | None = Field(
        default=None, ge=0, description="metadata.generation the condition was computed from."
    )


def _conditions_field() -> Any:
    return Field(
        default_factory=list,
        max_length=8,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
        description="Ready and Degraded, with reasons and messages.",
    )


class ReplicaCounts(SpecModel):
    """Desired and ready pods."""

    desired: int = Field(default=0, ge=0, description="Pods that should run.")
    ready: int = Field(default=0, ge=0, description="Pods that are ready.")


class BufferStats(SpecModel):
    """Sum over the gateway replicas."""

    events: int = Field(default=0, ge=0, description="Events on the gateway volumes not yet delivered.")
    bytes: int = Field(default=0, ge=0, description="Bytes of those events.")
    oldest_event_age_seconds: float = Field(default=0, ge=0, description="Age of the oldest buffered event.")


class SourceFault(SpecModel):
    """A meter whose source is behind on one node; its windows there are flagged until it clears."""

    meter: str = Field(description="The Meter, namespace/name.")
    node: str = Field(description="The node whose agent reports it.")
    reason: str = Field(max_length=4096, description="Why, as the source says (unreachable, refused, ...).")


class CollectorStatus(SpecModel):
    """What the operator and the gateways observed: agents, gateways, buffer and delivery."""

    observed_generation: int | None = Field(
        default=None, ge=0, description="metadata.generation this status describes."
    )
    conditions: list[Condition] = _conditions_field()
    agents: ReplicaCounts = Field(default_factory=ReplicaCounts, description="Agent DaemonSet pods.")
    gateway: ReplicaCounts = Field(default_factory=ReplicaCounts, description="Gateway StatefulSet pods.")
    meters: int = Field(default=0, ge=0, description="Meters the agents run for this Collector.")
    buffer: BufferStats | None = Field(
        default=None, description="The gateway buffer, as the gateway reports."
    )
    delivered_events: int | None = Field(
        default=None, ge=0, description="Events accepted by the billing API."
    )
    dead_lettered_events: int | None = Field(
        default=None, ge=0, description="Events the billing API refused; kept in the dead-letter table."
    )
    last_delivery_error: str | None = Field(
        default=None, max_length=4096, description="The latest delivery failure reported by the gateway."
    )
    source_faults: list[SourceFault] = Field(
        default_factory=list,
        max_length=20,
        description="Meters whose source is behind on some node (the first 20), as the agents report.",
    )


class MeterStatus(SpecModel):
    """Whether the Meter is valid and which Collectors run it."""

    observed_generation: int | None = Field(
        default=None, ge=0, description="metadata.generation this status describes."
    )
    conditions: list[Condition] = _conditions_field()
    source: str | None = Field(default=None, max_length=300, description="Short form of spec.source.")
    collectors: list[str] = Field(
        default_factory=list, max_length=64, description="Collectors whose agents run this Meter."
    )


class PipelineStatus(SpecModel):
    """Whether the Pipeline's references resolve and which Meters it binds."""

    observed_generation: int | None = Field(
        default=None, ge=0, description="metadata.generation this status describes."
    )
    conditions: list[Condition] = _conditions_field()
    meters: list[str] = Field(default_factory=list, max_length=500, description="Meters this Pipeline binds.")
    meter_count: int = Field(default=0, ge=0, description="How many Meters this Pipeline binds.")


@dataclass(frozen=True)
class PrinterColumn:
    name: str
    json_path: str
    type: str = "string"
    description: str = ""
    priority: int = 0

    def to_crd(self) -> dict[str, Any]:
        column: dict[str, Any] = {"name": self.name, "type": self.type, "jsonPath": self.json_path}
        if self.description:
            column["description"] = self.description
        if self.priority:
            column["priority"] = self.priority
        return column


READY_COLUMN = PrinterColumn("Ready", '.status.conditions[?(@.type=="Ready")].status', description="Ready")
REASON_COLUMN = PrinterColumn(
    "Reason", '.status.conditions[?(@.type=="Ready")].reason', description="Why", priority=1
)
AGE_COLUMN = PrinterColumn("Age", ".metadata.creationTimestamp", type="date")


@dataclass(frozen=True)
class CustomResource:
    """One kind of ``kubemeter.io/v1alpha1``: its models and how ``kubectl`` presents it."""

    kind: str
    plural: str
    short_names: tuple[str, ...]
    spec_model: type[BaseModel]
    status_model: type[BaseModel]
    description: str
    printer_columns: tuple[PrinterColumn, ...] = field(default_factory=tuple)

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def crd_name(self) -> str:
        return f"{self.plural}.{API_GROUP}"

    @property
    def api_version(self) -> str:
        return f"{API_GROUP}/{API_VERSION}"


METER = CustomResource(
    kind="Meter",
    plural="meters",
    short_names=("mtr",),
    spec_model=MeterSpec,
    status_model=MeterStatus,
    description=(
        "A Meter says what to measure (its source), for which pods, who is billed (subject), and the "
        "event type, unit and window of the usage events. A Pipeline binds it to a Collector."
    ),
    printer_columns=(
        PrinterColumn("Type", ".spec.eventType", description="CloudEvent type"),
        PrinterColumn("Source", ".status.source", description="Where the numbers come from"),
        PrinterColumn("Unit", ".spec.unit", priority=1),
        PrinterColumn("Window", ".spec.windowSeconds", type="integer", description="Window seconds"),
        PrinterColumn("Collectors", ".status.collectors", description="Collectors running it", priority=1),
        READY_COLUMN,
        REASON_COLUMN,
        AGE_COLUMN,
    ),
)

COLLECTOR = CustomResource(
    kind="Collector",
    plural="collectors",
    short_names=("kmc",),
    spec_model=CollectorSpec,
    status_model=CollectorStatus,
    description=(
        "A Collector runs an agent on every selected node and a disk-buffered gateway that delivers the "
        "usage events of its Meters to a billing API."
    ),
    printer_columns=(
        PrinterColumn("Output", ".spec.output.type", description="Billing API"),
        PrinterColumn("Meters", ".status.meters", type="integer", description="Meters run"),
        PrinterColumn("Agents", ".status.agents.ready", type="integer", description="Agents ready"),
        PrinterColumn("Desired", ".status.agents.desired", type="integer", description="Agents desired"),
        PrinterColumn("Buffered", ".status.buffer.events", type="integer", description="Buffered events"),
        PrinterColumn("URL", ".spec.output.url", priority=1),
        READY_COLUMN,
        REASON_COLUMN,
        AGE_COLUMN,
    ),
)

PIPELINE = CustomResource(
    kind="Pipeline",
    plural="pipelines",
    short_names=("kmp",),
    spec_model=PipelineSpec,
    status_model=PipelineStatus,
    description=(
        "A Pipeline binds Meters to a Collector and lists processors (CEL filter, set, drop, rename) "
        "applied to their events before delivery."
    ),
    printer_columns=(
        PrinterColumn("Collector", ".spec.collectorRef", description="Collector shipping the events"),
        PrinterColumn("Meters", ".status.meterCount", type="integer", description="Meters bound"),
        READY_COLUMN,
        REASON_COLUMN,
        AGE_COLUMN,
    ),
)

ALL_RESOURCES = (METER, COLLECTOR, PIPELINE)
