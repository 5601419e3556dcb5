"""Self-contained HTML: the chargeback report and the per-customer statement. One file with inline
CSS and SVG, no scripts, fonts or fetches, so it can be mailed, attached or opened offline."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape

from kubemeter.report.compute import (
    DEFAULT_IDLE_SUBJECT,
    IDLE_LABEL,
    Dimension,
    IncompleteUsage,
    Report,
    ReportRow,
    Timeline,
    bucket_label,
    build_report,
    build_timeline,
    incomplete_usage,
)
from kubemeter.report.pricing import Pricing
from kubemeter.report.render import cells, extra_rows, headers, notes
from kubemeter.report.statement import (
    ROUNDING_NOTE,
    Statement,
    money_text,
    period_text,
    price_text,
    quantity_text,
)
from kubemeter.report.svg import Series, format_amount, stacked_bars, stacked_columns
from kubemeter.report.usage import UsageRow

STYLE = """
body { font: 14px/1.45 "DejaVu Sans", Verdana, sans-serif; margin: 2rem auto; max-width: 960px;
       color: #1a1a1a; padding: 0 1rem; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: .6rem 0; }
th, td { padding: 4px 10px; border-bottom: 1px solid #ddd; text-align: left; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.total td { font-weight: 700; border-top: 2px solid #555; }
tr.idle td { font-style: italic; color: #444; }
.cards { display: flex; flex-wrap: wrap; gap: .8rem; margin: 1rem 0; }
.card { border: 1px solid #ccc; border-radius: 6px; padding: .5rem .9rem; min-width: 9rem; }
.card .value { font-size: 1.35rem; font-weight: 700; }
.card .label { color: #555; font-size: .85rem; }
.note { color: #8a1c1c; } .meta { color: #555; } .ok { color: #1d5e2a; }
details { margin: .3rem 0 1rem; } summary { cursor: pointer; color: #333; }
"""


@dataclass
class Page:
    """What the chargeback page shows besides the table."""

    timeline: Timeline | None = None
    breakdown: Report | None = None  # grouped by meter, GPU model and subject, idle not split out
    incomplete: list[IncompleteUsage] = field(default_factory=list)

    @classmethod
    def of(
        cls,
        usage: Sequence[UsageRow],
        bucket_seconds: int,
        pricing: Pricing,
        idle_subject: str | None = DEFAULT_IDLE_SUBJECT,
    ) -> Page:
        """Everything the page shows besides the table, from the same usage rows."""
        breakdown_by = [Dimension.METER, Dimension.GPU_MODEL, Dimension.SUBJECT]
        return cls(
            timeline=build_timeline(usage, bucket_seconds, pricing, idle_subject),
            breakdown=build_report(usage, breakdown_by, pricing, None),
            incomplete=incomplete_usage(usage),
        )


def _table(report: Report, css: str = "chargeback") -> str:
    keys = len(report.group_by)
    head = "".join(
        f'<th scope="col"{" class=num" if i >= keys else ""}>{escape(name)}</th>'
        for i, name in enumerate(headers(report))
    )

    def tr(row: ReportRow, row_css: str = "") -> str:
        tds = "".join(
            f"<td{' class=num' if i >= keys else ''}>{escape(value)}</td>"
            for i, value in enumerate(cells(report, row))
        )
        return f"<tr{f' class={row_css}' if row_css else ''}>{tds}</tr>"

    body = [tr(row) for row in report.rows]
    body.append(tr(report.total, "total"))
    body += [tr(row, "idle") for row in extra_rows(report)]
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _cards(report: Report) -> str:
    cards = [(f"{report.total.cost:,.2f} {report.currency}", "billed to customers")]
    cards.append((str(len(report.rows)), " / ".join(d.value for d in report.group_by) + " rows"))
    for column in report.columns:
        cards.append((format_amount(report.total.quantities.get(column.event_type, 0.0)), column.label))
    if report.idle is not None:
        cards.append((f"{report.idle.cost:,.2f} {report.currency}", "idle capacity"))
    cards.append((str(report.total.incomplete_events), "incomplete events"))
    return (
        '<div class="cards">'
        + "".join(
            f'<div class="card"><div class="value">{escape(value)}</div><div class="label">{escape(label)}'
            "</div></div>"
            for value, label in cards
        )
        + "</div>"
    )


def _timeline(timeline: Timeline) -> str:
    if not timeline.buckets or not timeline.series:
        return '<p class="meta">No usage in this period.</p>'
    labels = [bucket_label(start, timeline.bucket_seconds) for start in timeline.buckets]
    series = [
        Series(name, [timeline.amount(name, start) for start in timeline.buckets], idle=name == IDLE_LABEL)
        for name in timeline.series
    ]
    width = _bucket_name(timeline.bucket_seconds)
    totals = {one.name: sum(one.values) for one in series}
    largest = max(totals, key=lambda name: totals[name])
    description = (
        f"{timeline.measure} per {width} for {len(timeline.series)} series over {len(labels)} buckets, "
        f"{format_amount(timeline.total)} in all; largest: {largest}."
    )
    chart = stacked_columns(
        "timeline",
        f"{timeline.measure} per {width}, by customer",
        description,
        labels,
        series,
        timeline.measure,
    )
    head = "".join(f'<th scope="col" class=num>{escape(name)}</th>' for name in timeline.series)
    rows = "".join(
        f"<tr><td>{escape(label)}</td>"
        + "".join(f"<td class=num>{format_amount(one.values[i])}</td>" for one in series)
        + "</tr>"
        for i, label in enumerate(labels)
    )
    data = (
        "<details><summary>The chart as a table</summary><table class=timeline-data><thead><tr>"
        f'<th scope="col">{escape(width)} (UTC)</th>{head}</tr></thead>'
        f"<tbody>{rows}</tbody></table></details>"
    )
    hint = ""
    if not timeline.measure.startswith("cost"):
        hint = (
            f'<p class="meta">No prices given: the chart shows {escape(timeline.measure)}; pass --pricing '
            "for costs (examples/report/pricing.yaml).</p>"
        )
    return hint + chart + data


def _bucket_name(bucket_seconds: int) -> str:
    names = {86_400: "day", 3_600: "hour", 60: "minute"}
    if bucket_seconds in names:
        return names[bucket_seconds]
    if bucket_seconds % 3_600 == 0:
        return f"{bucket_seconds // 3_600} hours"
    if bucket_seconds % 60 == 0:
        return f"{bucket_seconds // 60} minutes"
    return f"{bucket_seconds} seconds"


def _breakdown(breakdown: Report, idle_subject: str) -> str:
    """Cost by (meter, GPU model), each bar stacked by customer; the table always, the chart only
    when something is priced (quantities in different units cannot share an axis)."""
    by_resource: dict[tuple[str, str], dict[str, float]] = {}
    customers: dict[str, float] = {}
    for row in breakdown.rows:
        meter, model, subject = row.key
        name = IDLE_LABEL if subject == idle_subject else subject
        by_resource.setdefault((meter, model), {})[name] = row.cost
        customers[name] = customers.get(name, 0.0) + row.cost
    chart = ""
    if breakdown.total.cost > 0 or (breakdown.idle and breakdown.idle.cost > 0):
        keys = sorted(by_resource, key=lambda k: -sum(by_resource[k].values()))
        labels = [meter if model == "(none)" else f"{meter} / {model}" for meter, model in keys]
        names = sorted((n for n in customers if n != IDLE_LABEL), key=lambda n: -customers[n])[:10]
        if IDLE_LABEL in customers:
            names.append(IDLE_LABEL)
        series = [
            Series(name, [by_resource[key].get(name, 0.0) for key in keys], idle=name == IDLE_LABEL)
            for name in names
        ]
        measure = f"cost ({breakdown.currency})"
        description = f"{measure} of each meter and GPU model, stacked by customer, {len(labels)} bars."
        chart = stacked_bars(
            "breakdown", f"{measure} by meter and GPU model", description, labels, series, measure
        )
    grouped: dict[tuple[str, ...], ReportRow] = {}
    for row in breakdown.rows:
        grouped.setdefault(row.key[:2], ReportRow(key=row.key[:2])).add(row)
    summary = Report(
        group_by=(Dimension.METER, Dimension.GPU_MODEL),
        columns=breakdown.columns,
        rows=[grouped[key] for key in sorted(grouped)],
        total=ReportRow(
            key=("total", ""), quantities=breakdown.total.quantities, costs=breakdown.total.costs
        ),
        currency=breakdown.currency,
        unpriced=[],
    )
    summary.total.events = breakdown.total.events
    return chart + _table(summary, "breakdown")


def _incomplete(incomplete: Sequence[IncompleteUsage]) -> str:
    if not incomplete:
        return '<p class="ok">Every window is complete: all usage was read in full.</p>'
    rows = "".join(
        f"<tr><td>{escape(item.subject)}</td><td>{escape(item.event_type)}</td>"
        f"<td>{escape(item.reason)}</td><td class=num>{item.events}</td>"
        f"<td class=num>{format_amount(item.quantity)} {escape(item.unit)}</td></tr>"
        for item in incomplete
    )
    return (
        '<p class="note">These windows are flagged <code>complete: false</code>: the agent could not read '
        "all of their usage and billed what it read. See each Collector's status.</p>"
        '<table class="incomplete"><thead><tr><th scope="col">customer</th><th scope="col">meter</th>'
        '<th scope="col">reason</th><th scope="col" class=num>events</th>'
        f'<th scope="col" class=num>quantity</th></tr></thead><tbody>{rows}</tbody></table>'
    )


def _document(title: str, body: str) -> str:
    return f"""<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title><style>{STYLE}</style></head>
<body>
{body}
</body>
</html>
"""


def to_html(report: Report, title: str, meta_lines: list[str], page: Page | None = None) -> str:
    page = page or Page()
    meta = "".join(f"<div>{escape(line)}</div>" for line in meta_lines)
    meta += f"<div>currency: {escape(report.currency)}; amounts rounded to the cent for display</div>"
    warnings = "".join(f'<p class="note">{escape(line)}</p>' for line in notes(report))
    sections = [f"<h1>{escape(title)}</h1>", f'<div class="meta">{meta}</div>', _cards(report)]
    if page.timeline is not None:
        sections += ["<h2>Over time</h2>", _timeline(page.timeline)]
    if page.breakdown is not None:
        sections += ["<h2>By meter and GPU model</h2>", _breakdown(page.breakdown, report.idle_subject)]
    grouping = ", ".join(d.value for d in report.group_by)
    sections += [f"<h2>Chargeback by {escape(grouping)}</h2>", _table(report), warnings]
    sections += ["<h2>Incomplete usage</h2>", _incomplete(page.incomplete)]
    return _document(title, "\n".join(sections))


def statement_html(statement: Statement, title: str, meta_lines: list[str]) -> str:
    currency = escape(statement.currency)
    rows = "".join(
        f"<tr><td>{escape(line.event_type)}</td><td>{escape(line.gpu_model or '-')}</td>"
        f"<td class=num>{quantity_text(line.quantity)}</td><td>{escape(line.unit)}</td>"
        f"<td class=num>{price_text(line.unit_price) if line.unit_price is not None else 'no price'}</td>"
        f"<td class=num>{money_text(line.amount)}</td></tr>"
        for line in statement.lines
    )
    rows += (
        f'<tr class="total"><td colspan="5">total ({currency})</td>'
        f"<td class=num>{money_text(statement.total)}</td></tr>"
    )
    notes_html = ""
    if statement.unpriced:
        names = ", ".join(f"{line.event_type} ({line.unit})" for line in statement.unpriced)
        notes_html += f'<p class="note">No price for: {escape(names)}; not included in the total.</p>'
    if statement.incomplete_events:
        notes_html += (
            f'<p class="note">{statement.incomplete_events} event(s) are flagged complete=false: usage the '
            "agent could not read in full is billed as read.</p>"
        )
    meta = "".join(f"<div>{escape(line)}</div>" for line in meta_lines)
    body = f"""<h1>{escape(title)}</h1>
<div class="meta"><div>customer: <strong>{escape(statement.customer)}</strong></div>
<div>period: {escape(period_text(statement))}</div>{meta}</div>
<div class="cards"><div class="card"><div class="value">{money_text(statement.total)} {currency}</div>
<div class="label">amount due</div></div></div>
<table class="statement"><thead><tr><th scope="col">meter</th><th scope="col">GPU model</th>
<th scope="col" class=num>quantity</th><th scope="col">unit</th>
<th scope="col" class=num>unit price ({currency})</th><th scope="col" class=num>amount ({currency})</th>
</tr></thead><tbody>{rows}</tbody></table>
{notes_html}<p class="meta">{escape(ROUNDING_NOTE)}</p>"""
    return _document(title, body)
