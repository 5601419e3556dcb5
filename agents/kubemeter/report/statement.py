"""One customer's statement for a period (a month by default): a line per meter and GPU model with
its quantity, unit price and amount, and the total, the thing a platform team sends to a team.

Money is decimal: each line's amount is quantity x unit price rounded half up to the cent, and the
total is the sum of the rounded lines, so the lines always add up to the total a reader checks.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal

from kubemeter.report.pricing import GPU_HOURS, Pricing, display_unit
from kubemeter.report.safe import csv_cell, terminal_text
from kubemeter.report.usage import UsageRow

CENT = Decimal("0.01")
QUANTITY_PLACES = Decimal("0.0001")
ROUNDING_NOTE = (
    "Amounts are quantity times unit price, rounded half up to the cent per line; the total is the sum "
    "of the lines."
)


def month_bounds(month: str) -> tuple[datetime, datetime]:
    """``2026-11`` -> [2026-11-01T00:00Z, 2026-12-01T00:00Z)."""
    try:
        year, number = (int(part) for part in month.split("-"))
        start = datetime(year, number, 1, tzinfo=UTC)
    except ValueError:
        raise ValueError(f"{month!r} is not a month; give it as YYYY-MM, e.g. 2026-11") from None
    return start, datetime(year + number // 12, number % 12 + 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class StatementLine:
    event_type: str
    gpu_model: str  # "" for meters that have none
    quantity: Decimal  # display units, full precision
    unit: str
    unit_price: Decimal | None  # None: nothing prices it (listed, not silently free)
    amount: Decimal | None
    events: int
    incomplete_events: int


@dataclass
class Statement:
    customer: str
    start: datetime | None
    end: datetime | None
    currency: str
    lines: list[StatementLine] = field(default_factory=list)

    @property
    def total(self) -> Decimal:
        return sum((line.amount for line in self.lines if line.amount is not None), Decimal(0))

    @property
    def unpriced(self) -> list[StatementLine]:
        return [line for line in self.lines if line.unit_price is None and line.quantity]

    @property
    def incomplete_events(self) -> int:
        return sum(line.incomplete_events for line in self.lines)


def build_statement(
    usage: Iterable[UsageRow],
    customer: str,
    pricing: Pricing,
    start: datetime | None = None,
    end: datetime | None = None,
) -> Statement:
    grouped: dict[tuple[str, str], tuple[Decimal, str, int, int]] = {}
    for row in usage:
        if row.subject != customer:
            continue
        unit = display_unit(row.event_type, row.unit)
        model = row.gpu_model if unit.name == GPU_HOURS else ""
        quantity = Decimal(repr(row.value)) / Decimal(repr(unit.divisor))
        key = (row.event_type, model)
        before = grouped.get(key, (Decimal(0), unit.name, 0, 0))
        grouped[key] = (
            before[0] + quantity,
            unit.name,
            before[2] + row.events,
            before[3] + row.incomplete_events,
        )
    statement = Statement(customer, start, end, pricing.currency)
    for (event_type, model), (quantity, unit_name, events, incomplete) in sorted(grouped.items()):
        price = pricing.price(event_type, unit_name, model)
        unit_price = None if price is None else Decimal(repr(price))
        amount = None if unit_price is None else (quantity * unit_price).quantize(CENT, ROUND_HALF_UP)
        statement.lines.append(
            StatementLine(event_type, model, quantity, unit_name, unit_price, amount, events, incomplete)
        )
    return statement


def quantity_text(value: Decimal) -> str:
    return f"{value.quantize(QUANTITY_PLACES, ROUND_HALF_UP):,}"


def price_text(value: Decimal) -> str:
    """A unit price as given: at least cents, more digits where the price has them (0.005)."""
    if value == value.quantize(CENT):
        return f"{value.quantize(CENT):,}"
    return f"{value.normalize():,f}"


def money_text(value: Decimal | None) -> str:
    return "-" if value is None else f"{value.quantize(CENT, ROUND_HALF_UP):,}"


def period_text(statement: Statement) -> str:
    start = statement.start.date().isoformat() if statement.start else "the beginning"
    end = statement.end.date().isoformat() if statement.end else "now"
    return f"{start} to {end} (end exclusive, UTC)"


def statement_rows(statement: Statement) -> list[list[str]]:
    """Header and lines as text, for CSV and the terminal."""
    rows = [["meter", "gpu_model", "quantity", "unit", f"unit price ({statement.currency})", "amount"]]
    for line in statement.lines:
        rows.append(
            [
                line.event_type,
                line.gpu_model,
                quantity_text(line.quantity),
                line.unit,
                price_text(line.unit_price) if line.unit_price is not None else "no price",
                money_text(line.amount),
            ]
        )
    return rows


def statement_csv(statement: Statement) -> str:
    """CSV with full-precision quantities and exact amounts."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["customer", csv_cell(statement.customer)])
    writer.writerow(["period", period_text(statement)])
    writer.writerow(["currency", statement.currency])
    writer.writerow([])
    writer.writerow(["meter", "gpu_model", "quantity", "unit", "unit_price", "amount", "incomplete_events"])
    for line in statement.lines:
        writer.writerow(
            [
                csv_cell(line.event_type),
                csv_cell(line.gpu_model),
                str(line.quantity),
                csv_cell(line.unit),
                "" if line.unit_price is None else str(line.unit_price),
                "" if line.amount is None else str(line.amount),
                line.incomplete_events,
            ]
        )
    writer.writerow(["total", "", "", "", "", str(statement.total), statement.incomplete_events])
    return buffer.getvalue()


def statement_table(statement: Statement) -> str:
    """The statement for a terminal: aligned columns, tenant text neutralised."""
    rows = [[terminal_text(cell) for cell in row] for row in statement_rows(statement)]
    rows.append(["total", "", "", "", "", money_text(statement.total)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [f"statement for {terminal_text(statement.customer)}, {period_text(statement)}"]
    for index, row in enumerate(rows):
        if index in (1, len(rows) - 1):
            lines.append("  ".join("-" * width for width in widths))
        aligned = (
            value.ljust(width) if column in (0, 1, 3) else value.rjust(width)
            for column, (value, width) in enumerate(zip(row, widths, strict=True))
        )
        lines.append("  ".join(aligned).rstrip())
    return "\n".join(lines) + "\n"
