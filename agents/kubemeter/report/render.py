"""Text renderings of a report: an aligned table, CSV and JSON."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from kubemeter.report.compute import Report, ReportRow
from kubemeter.report.safe import csv_cell, terminal_text


def _quantity(value: float) -> str:
    return f"{value:,.3f}"


def _money(value: float) -> str:
    return f"{value:,.2f}"


def headers(report: Report) -> list[str]:
    names = [dimension.value for dimension in report.group_by]
    return [*names, *(column.label for column in report.columns), f"cost ({report.currency})"]


def cells(report: Report, row: ReportRow) -> list[str]:
    quantities = [_quantity(row.quantities.get(c.event_type, 0.0)) for c in report.columns]
    return [*row.key, *quantities, _money(row.cost)]


def extra_rows(report: Report) -> list[ReportRow]:
    """Below the customers' total: the idle capacity, and customers + idle, when an idle meter ran."""
    capacity = report.capacity
    if report.idle is None or capacity is None:
        return []
    capacity.key = tuple("capacity" if i == 0 else "" for i in range(len(report.group_by)))
    return [report.idle, capacity]


def to_table(report: Report) -> str:
    header = headers(report)
    body = [[terminal_text(cell) for cell in cells(report, row)] for row in report.rows]
    footer = cells(report, report.total)
    extra = [cells(report, row) for row in extra_rows(report)]
    widths = [max(len(line[i]) for line in [header, *body, footer, *extra]) for i in range(len(header))]
    keys = len(report.group_by)

    def line(values: list[str]) -> str:
        parts = [
            v.ljust(w) if i < keys else v.rjust(w)
            for i, (v, w) in enumerate(zip(values, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    out = [line(header), rule, *(line(values) for values in body), rule, line(footer)]
    out += [line(values) for values in extra]
    out += [terminal_text(note) for note in notes(report)]
    return "\n".join(out) + "\n"


def notes(report: Report) -> list[str]:
    lines = []
    if report.total.incomplete_events:
        lines.append(
            f"! {report.total.incomplete_events} event(s) are flagged complete=false: the agent could not "
            "read all of their usage; see each Collector's status and the agents' logs"
        )
    if report.unpriced:
        lines.append(
            "! no price for: " + "; ".join(report.unpriced) + " (add them with --price UNIT=PRICE, "
            "--gpu-price MODEL=PRICE or a --pricing file)"
        )
    return lines


def to_csv(report: Report) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    names = [dimension.value for dimension in report.group_by]
    writer.writerow(
        [
            *names,
            *(f"{c.event_type} ({c.unit})" for c in report.columns),
            *(f"{c.event_type} cost ({report.currency})" for c in report.columns),
            f"cost ({report.currency})",
            "events",
            "incomplete_events",
        ]
    )
    for row in [*report.rows, report.total, *extra_rows(report)]:
        writer.writerow(
            [
                *(csv_cell(key) for key in row.key),
                *(repr(row.quantities.get(c.event_type, 0.0)) for c in report.columns),
                *(repr(row.costs.get(c.event_type, 0.0)) for c in report.columns),
                repr(row.cost),
                row.events,
                row.incomplete_events,
            ]
        )
    return buffer.getvalue()


def _row_json(report: Report, row: ReportRow) -> dict[str, Any]:
    return {
        **{dimension.value: value for dimension, value in zip(report.group_by, row.key, strict=True)},
        "quantities": {
            c.event_type: {"unit": c.unit, "value": row.quantities.get(c.event_type, 0.0)}
            for c in report.columns
        },
        "costs": {c.event_type: row.costs.get(c.event_type, 0.0) for c in report.columns},
        "cost": row.cost,
        "events": row.events,
        "incompleteEvents": row.incomplete_events,
    }


def to_json(report: Report, meta: dict[str, Any] | None = None) -> str:
    document = {
        **(meta or {}),
        "currency": report.currency,
        "groupBy": [dimension.value for dimension in report.group_by],
        "columns": [{"meter": c.event_type, "unit": c.unit, "label": c.label} for c in report.columns],
        "rows": [_row_json(report, row) for row in report.rows],
        "total": _row_json(report, report.total),
        "idle": None if report.idle is None else _row_json(report, report.idle),
        "idleSubject": report.idle_subject or None,
        "unpriced": report.unpriced,
    }
    return json.dumps(document, indent=2) + "\n"
