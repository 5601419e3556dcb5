"""The report itself, pure: usage rows and prices in, grouped quantities and costs out."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum

from kubemeter.report.pricing import Pricing, display_unit
from kubemeter.report.usage import UsageRow

NONE_LABEL = "(none)"
# The subject the idle-capacity meter bills (examples/idle-capacity.yaml): shown as its own row,
# never as a customer, and kept out of the customers' total.
DEFAULT_IDLE_SUBJECT = "platform-idle"
IDLE_LABEL = "idle capacity"
OTHERS_LABEL = "others"
MAX_SERIES = 10  # customers drawn one by one in a chart; the rest are summed as "others"


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
    total: ReportRow  # the customers' rows, idle capacity not included
    currency: str
    unpriced: list[str]  # "<event type> (<unit>[, <gpu model>])" with usage but no price
    idle: ReportRow | None = None  # what nobody held, billed to the idle subject
    idle_subject: str = DEFAULT_IDLE_SUBJECT

    @property
    def capacity(self) -> ReportRow | None:
        """Customers plus idle: everything the nodes offered over the period."""
        if self.idle is None:
            return None
        capacity = ReportRow(key=self.total.key)
        capacity.add(self.total)
        capacity.add(self.idle)
        return capacity


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


def priced(usage_row: UsageRow, pricing: Pricing, unpriced: set[str] | None = None) -> ReportRow:
    """One usage row in its display unit, with its cost where a price applies; an unpriced row with
    usage is named in ``unpriced``."""
    unit = display_unit(usage_row.event_type, usage_row.unit)
    quantity = usage_row.value / unit.divisor
    fine = ReportRow(
        key=(),
        quantities={usage_row.event_type: quantity},
        events=usage_row.events,
        incomplete_events=usage_row.incomplete_events,
    )
    price = pricing.price(usage_row.event_type, unit.name, usage_row.gpu_model)
    if price is not None:
        fine.costs[usage_row.event_type] = quantity * price
    elif quantity and unpriced is not None:
        model = f", {usage_row.gpu_model}" if usage_row.gpu_model and unit.name == "GPU-hours" else ""
        unpriced.add(f"{usage_row.event_type} ({unit.name}{model})")
    return fine


def build_report(
    usage: Iterable[UsageRow],
    group_by: Sequence[Dimension],
    pricing: Pricing,
    idle_subject: str | None = DEFAULT_IDLE_SUBJECT,
) -> Report:
    """Rows per group; usage billed to ``idle_subject`` becomes :attr:`Report.idle` instead."""
    dimensions = tuple(group_by)
    rows: dict[tuple[str, ...], ReportRow] = {}
    units: dict[str, str] = {}
    unpriced: set[str] = set()
    blank = tuple("" for _ in dimensions)
    idle: ReportRow | None = None
    for usage_row in usage:
        units.setdefault(usage_row.event_type, display_unit(usage_row.event_type, usage_row.unit).name)
        fine = priced(usage_row, pricing, unpriced)
        if idle_subject is not None and usage_row.subject == idle_subject:
            if idle is None:
                idle = ReportRow(key=(IDLE_LABEL, *blank[1:]) if dimensions else ())
            idle.add(fine)
            continue
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
        idle=idle,
        idle_subject=idle_subject or "",
    )


@dataclass
class Timeline:
    """A chart's data: per time bucket, the cost (or, with no prices, the quantity of one meter) of
    each series (customer), largest customers first, the idle capacity last."""

    bucket_seconds: int
    buckets: list[float]  # bucket starts, Unix seconds, contiguous from the first to the last
    series: list[str]
    values: dict[tuple[str, float], float]  # (series, bucket start) -> amount
    measure: str  # "cost (USD)", or the unit of the quantity shown

    def amount(self, series: str, bucket_start_s: float) -> float:
        return self.values.get((series, bucket_start_s), 0.0)

    def bucket_total(self, bucket_start_s: float) -> float:
        return sum(self.amount(name, bucket_start_s) for name in self.series)

    @property
    def total(self) -> float:
        return sum(self.values.values())


def build_timeline(
    usage: Sequence[UsageRow],
    bucket_seconds: int,
    pricing: Pricing,
    idle_subject: str | None = DEFAULT_IDLE_SUBJECT,
) -> Timeline:
    """Cost per customer per bucket when anything is priced; else the quantity of the first meter in
    report order (GPU-hours before core-hours before GiB-hours), since units cannot be stacked."""
    fine = [(row, priced(row, pricing)) for row in usage if row.bucket_start]
    by_cost = any(amounts.costs for _, amounts in fine)
    report_columns = _columns(
        {row.event_type: display_unit(row.event_type, row.unit).name for row, _ in fine}
    )
    measure_column = report_columns[0] if report_columns and not by_cost else None
    measure = f"cost ({pricing.currency})" if by_cost else (measure_column.label if measure_column else "")
    per_series: dict[str, float] = {}
    values: dict[tuple[str, float], float] = {}
    for row, amounts in fine:
        if by_cost:
            amount = amounts.cost
        elif measure_column is not None and row.event_type == measure_column.event_type:
            amount = amounts.quantities[row.event_type]
        else:
            continue
        name = IDLE_LABEL if idle_subject is not None and row.subject == idle_subject else row.subject
        name = name or NONE_LABEL
        start = row.bucket_start_s - row.bucket_start_s % bucket_seconds
        values[(name, start)] = values.get((name, start), 0.0) + amount
        per_series[name] = per_series.get(name, 0.0) + amount
    customers = sorted((n for n in per_series if n != IDLE_LABEL), key=lambda n: (-per_series[n], n))
    if len(customers) > MAX_SERIES:
        shown, folded = customers[: MAX_SERIES - 1], set(customers[MAX_SERIES - 1 :])
        for (name, start), amount in list(values.items()):
            if name in folded:
                del values[(name, start)]
                values[(OTHERS_LABEL, start)] = values.get((OTHERS_LABEL, start), 0.0) + amount
        customers = [*shown, OTHERS_LABEL]
    series = customers + ([IDLE_LABEL] if IDLE_LABEL in per_series else [])
    starts = sorted({start for _, start in values})
    buckets = []
    if starts:
        count = int((starts[-1] - starts[0]) // bucket_seconds) + 1
        buckets = [starts[0] + i * bucket_seconds for i in range(count)]
    return Timeline(bucket_seconds, buckets, series, values, measure)


@dataclass(frozen=True)
class IncompleteUsage:
    """Usage flagged ``complete: false``: the agent could not read all of it, and says why."""

    subject: str
    event_type: str
    reason: str
    events: int
    quantity: float
    unit: str


def incomplete_usage(usage: Iterable[UsageRow]) -> list[IncompleteUsage]:
    grouped: dict[tuple[str, str, str, str], tuple[int, float]] = {}
    for row in usage:
        if not row.incomplete_events:
            continue
        unit = display_unit(row.event_type, row.unit)
        key = (row.subject or NONE_LABEL, row.event_type, row.incomplete_reason or "not given", unit.name)
        events, quantity = grouped.get(key, (0, 0.0))
        grouped[key] = (events + row.incomplete_events, quantity + row.value / unit.divisor)
    return [
        IncompleteUsage(subject, event_type, reason, events, quantity, unit)
        for (subject, event_type, reason, unit), (events, quantity) in sorted(grouped.items())
    ]


def bucket_label(start_s: float, bucket_seconds: int) -> str:
    """How a bucket reads on an axis: a date for days, a time of day otherwise (UTC)."""
    moment = datetime.fromtimestamp(start_s, UTC)
    if bucket_seconds >= 86_400:
        return moment.strftime("%Y-%m-%d")
    if bucket_seconds >= 60:
        return moment.strftime("%m-%d %H:%M")
    return moment.strftime("%H:%M:%S")
