"""The report itself, pure: usage rows and prices in, grouped quantities and costs out."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from kubemeter.report.pricing import Pricing, display_unit
from kubemeter.report.usage import UsageRow

NONE_LABEL = "(none)"


class Dimension(StrEnum):
    SUBJECT = "subject"
    NAMESPACE = "namespace"
    METER = "meter"
    GPU_MODEL = "gpu_model"
    DAY = "day"

    def of(self, row: UsageRow) -> str:
        value = {
            Dimension.SUBJECT: row.subject,
            Dimension.NAMESPACE: row.namespace,
            Dimension.METER: row.event_type,
            Dimension.GPU_MODEL: row.gpu_model,
            Dimension.DAY: row.day,
        }[self]
        return value or NONE_LABEL


@dataclass(frozen=True)
class Column:
    """One meter (event type) in its display unit."""

    event_type: str
    unit: str
    label: str


@dataclass
class ReportRow:
    key: tuple[str, ...]
    quantities: dict[str, float] = field(default_factory=dict)  # event type -> display units
    costs: dict[str, float] = field(default_factory=dict)  # event type -> cost of the priced part
    events: int = 0
    incomplete_events: int = 0

    @property
    def cost(self) -> float:
        return sum(self.costs.values())

    def add(self, other: ReportRow) -> None:
        for name, quantity in other.quantities.items():
            self.quantities[name] = self.quantities.get(name, 0.0) + quantity
        for name, cost in other.costs.items():
            self.costs[name] = self.costs.get(name, 0.0) + cost
        self.events += other.events
        self.incomplete_events += other.incomplete_events


@dataclass
class Report:
    group_by: tuple[Dimension, ...]
    columns: list[Column]
    rows: list[ReportRow]
    total: ReportRow
    currency: str
    unpriced: list[str]  # "<event type> (<unit>[, <gpu model>])" with usage but no price


def _columns(units: dict[str, str]) -> list[Column]:
    """Labelled by unit alone when that is unambiguous (``GPU-hours``), else ``type (unit)``."""
    per_unit: dict[str, int] = {}
    for unit in units.values():
        per_unit[unit] = per_unit.get(unit, 0) + 1
    order = {"GPU-hours": 0, "core-hours": 1, "GiB-hours": 2}
    columns = [
        Column(event_type, unit, unit if per_unit[unit] == 1 else f"{event_type} ({unit})")
        for event_type, unit in units.items()
    ]
    return sorted(columns, key=lambda c: (order.get(c.unit, 9), c.unit, c.event_type))


def build_report(usage: Iterable[UsageRow], group_by: Sequence[Dimension], pricing: Pricing) -> Report:
    dimensions = tuple(group_by)
    rows: dict[tuple[str, ...], ReportRow] = {}
    units: dict[str, str] = {}
    unpriced: set[str] = set()
    for usage_row in usage:
        unit = display_unit(usage_row.event_type, usage_row.unit)
        quantity = usage_row.value / unit.divisor
        units.setdefault(usage_row.event_type, unit.name)
        fine = ReportRow(
            key=(),
            quantities={usage_row.event_type: quantity},
            events=usage_row.events,
            incomplete_events=usage_row.incomplete_events,
        )
        price = pricing.price(usage_row.event_type, unit.name, usage_row.gpu_model)
        if price is None:
            if quantity:
                model = f", {usage_row.gpu_model}" if usage_row.gpu_model and unit.name == "GPU-hours" else ""
                unpriced.add(f"{usage_row.event_type} ({unit.name}{model})")
        else:
            fine.costs[usage_row.event_type] = quantity * price
        key = tuple(dimension.of(usage_row) for dimension in dimensions)
        rows.setdefault(key, ReportRow(key=key)).add(fine)
    total = ReportRow(key=tuple("total" if i == 0 else "" for i in range(len(dimensions))))
    for row in rows.values():
        total.add(row)
    return Report(
        group_by=dimensions,
        columns=_columns(units),
        rows=[rows[key] for key in sorted(rows)],
        total=total,
        currency=pricing.currency,
        unpriced=sorted(unpriced),
    )
