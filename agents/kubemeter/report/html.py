"""A self-contained HTML report: the table and an inline SVG bar chart (no scripts, no CDN), so it
can be mailed, archived or opened offline."""

from __future__ import annotations

from html import escape

from kubemeter.report.compute import Report, ReportRow
from kubemeter.report.render import cells, headers, notes

PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#9c755f")
BAR_HEIGHT_PX = 22
LABEL_WIDTH_PX = 220
PLOT_WIDTH_PX = 560
MAX_BARS = 40

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2rem; color: #222; }
table { border-collapse: collapse; margin: 1rem 0; }
th, td { padding: 4px 10px; border-bottom: 1px solid #ddd; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.total td { font-weight: 600; border-top: 2px solid #999; }
.note { color: #a33; }
.meta { color: #666; }
"""


def _chart(report: Report) -> str:
    """Cost per row, stacked by meter; quantities of the first meter when nothing is priced."""
    by_cost = report.total.cost > 0
    rows = sorted(report.rows, key=lambda r: r.cost if by_cost else 0.0, reverse=True)[:MAX_BARS]
    columns = report.columns if by_cost else report.columns[:1]
    if not rows or not columns:
        return ""

    def parts(row: ReportRow) -> list[float]:
        source = row.costs if by_cost else row.quantities
        return [max(source.get(c.event_type, 0.0), 0.0) for c in columns]

    largest = max((sum(parts(row)) for row in rows), default=0.0) or 1.0
    legend_y = len(rows) * BAR_HEIGHT_PX + 16
    height = legend_y + 24
    width = LABEL_WIDTH_PX + PLOT_WIDTH_PX + 120
    title = f"cost ({report.currency}) by {', '.join(d.value for d in report.group_by)}"
    if not by_cost:
        title = f"{columns[0].label} by {', '.join(d.value for d in report.group_by)} (no prices given)"
    svg = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        f'aria-label="{escape(title)}" font-family="system-ui, sans-serif" font-size="12">',
        f"<title>{escape(title)}</title>",
    ]
    for index, row in enumerate(rows):
        y = index * BAR_HEIGHT_PX
        label = " / ".join(row.key)
        svg.append(
            f'<text x="{LABEL_WIDTH_PX - 8}" y="{y + 15}" text-anchor="end">{escape(label[:40])}</text>'
        )
        x = float(LABEL_WIDTH_PX)
        for colour_index, value in enumerate(parts(row)):
            bar = PLOT_WIDTH_PX * value / largest
            if bar > 0:
                colour = PALETTE[colour_index % len(PALETTE)]
                name = columns[colour_index].label
                svg.append(
                    f'<rect x="{x:.1f}" y="{y + 3}" width="{bar:.1f}" height="{BAR_HEIGHT_PX - 6}" '
                    f'fill="{colour}"><title>{escape(label)}: {escape(name)} {value:,.2f}</title></rect>'
                )
            x += bar
        total = sum(parts(row))
        svg.append(f'<text x="{x + 6:.1f}" y="{y + 15}">{total:,.2f}</text>')
    x = float(LABEL_WIDTH_PX)
    for colour_index, column in enumerate(columns):
        colour = PALETTE[colour_index % len(PALETTE)]
        svg.append(f'<rect x="{x:.0f}" y="{legend_y}" width="12" height="12" fill="{colour}"/>')
        svg.append(f'<text x="{x + 16:.0f}" y="{legend_y + 11}">{escape(column.label)}</text>')
        x += 24 + 7 * len(column.label)
    svg.append("</svg>")
    return "\n".join(svg)


def to_html(report: Report, title: str, meta_lines: list[str]) -> str:
    keys = len(report.group_by)
    head = "".join(
        f"<th{' class=num' if i >= keys else ''}>{escape(name)}</th>"
        for i, name in enumerate(headers(report))
    )

    def tr(row: ReportRow, css: str = "") -> str:
        tds = "".join(
            f"<td{' class=num' if i >= keys else ''}>{escape(value)}</td>"
            for i, value in enumerate(cells(report, row))
        )
        return f"<tr{f' class={css}' if css else ''}>{tds}</tr>"

    body = "\n".join(tr(row) for row in report.rows)
    meta = "".join(f"<div>{escape(line)}</div>" for line in meta_lines)
    warnings = "".join(f'<p class="note">{escape(line)}</p>' for line in notes(report))
    return f"""<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>{escape(title)}</title><style>{STYLE}</style></head>
<body>
<h1>{escape(title)}</h1>
<div class="meta">{meta}</div>
{_chart(report)}
<table>
<thead><tr>{head}</tr></thead>
<tbody>
{body}
{tr(report.total, "total")}
</tbody>
</table>
{warnings}
</body>
</html>
"""
