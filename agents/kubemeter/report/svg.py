"""The report's charts as inline SVG, written here rather than by a charting library.

Why our own: the page must be one file with no scripts, fonts or fetches, readable in greyscale and
by a screen reader. pygal writes SVG but loads its tooltips from a CDN unless told otherwise and
brings lxml; matplotlib's SVG is a picture of text (paths, no <title>s), and ~40 MB for the image.
Two chart kinds are needed, a stacked column chart over time and stacked horizontal bars, which this
module draws in ~200 lines that the unit tests read back as XML.

Accessibility: every chart has a <title> and a <desc> (a sentence with the totals) and is labelled
by them; every bar has a <title> with its value; series differ by colour (the Okabe-Ito palette,
safe for colour-blind readers) *and* by fill pattern, so neighbours stay apart in greyscale.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

# Okabe-Ito, ordered so that neighbours differ in lightness too.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9", "#F0E442", "#444444")
IDLE_COLOUR = "#BBBBBB"
# Pattern drawn over each series' colour: none, diagonal, dots, cross-hatch, horizontal, vertical.
PATTERNS = (
    "",
    '<path d="M-1,1 l2,-2 M0,8 l8,-8 M7,9 l2,-2" stroke="{ink}" stroke-width="1.4"/>',
    '<circle cx="4" cy="4" r="1.5" fill="{ink}"/>',
    '<path d="M0,0 L8,8 M8,0 L0,8" stroke="{ink}" stroke-width="1"/>',
    '<path d="M0,4 H8" stroke="{ink}" stroke-width="1.6"/>',
    '<path d="M4,0 V8" stroke="{ink}" stroke-width="1.6"/>',
)
# Idle capacity: grey with back-diagonal stripes, a pattern no customer series uses.
IDLE_PATTERN = '<path d="M-1,7 l2,2 M0,0 l8,8 M7,-1 l2,2" stroke="{ink}" stroke-width="1.4"/>'
MAX_COLUMN_PX = 56.0  # a few buckets still read as columns, not as a block
FONT = 'font-family="DejaVu Sans, Verdana, sans-serif" font-size="12"'


@dataclass(frozen=True)
class Series:
    name: str
    values: Sequence[float]  # one per category (bucket or bar), >= 0
    idle: bool = False  # drawn grey and hatched: capacity nobody held


def nice_ticks(maximum: float, count: int = 5) -> list[float]:
    """Axis ticks from 0 at a 1, 2 or 5 step that reach past ``maximum`` in about ``count`` steps."""
    if maximum <= 0 or not math.isfinite(maximum):
        return [0.0, 1.0]
    raw = maximum / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    ticks = [0.0]
    while ticks[-1] < maximum:
        ticks.append(round(ticks[-1] + step, 12))
    return ticks


def format_amount(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 1:
        return f"{value:,.2f}".rstrip("0").rstrip(".")
    return f"{value:.3g}"


def _fill(chart_id: str, index: int, series: Series) -> str:
    return f"url(#{chart_id}-p{index})"


def _defs(chart_id: str, series: Sequence[Series]) -> str:
    patterns = []
    for index, one in enumerate(series):
        colour = IDLE_COLOUR if one.idle else PALETTE[index % len(PALETTE)]
        overlay = IDLE_PATTERN if one.idle else PATTERNS[index % len(PATTERNS)]
        ink = "#1a1a1a" if one.idle or index % len(PALETTE) not in (0, 4, 7) else "#ffffff"
        patterns.append(
            f'<pattern id="{chart_id}-p{index}" patternUnits="userSpaceOnUse" width="8" height="8">'
            f'<rect width="8" height="8" fill="{colour}"/>{overlay.format(ink=ink)}</pattern>'
        )
    return f"<defs>{''.join(patterns)}</defs>"


def _bar(
    chart_id: str,
    index: int,
    one: Series,
    box: tuple[float, float, float, float],
    label: str,
    value: float,
    measure: str,
) -> str:
    """One bar segment, titled with what it stands for."""
    x, y, width, height = box
    return (
        f'<rect class="bar" x="{x:.2f}" y="{y:.2f}" width="{width:.2f}" height="{height:.2f}" '
        f'fill="{_fill(chart_id, index, one)}"><title>{escape(label)}, {escape(one.name)}: '
        f"{format_amount(value)} {escape(measure)}</title></rect>"
    )


def _open(chart_id: str, width: int, height: int, title: str, description: str) -> list[str]:
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" id="{chart_id}" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-labelledby="{chart_id}-title {chart_id}-desc" {FONT}>',
        f'<title id="{chart_id}-title">{escape(title)}</title>',
        f'<desc id="{chart_id}-desc">{escape(description)}</desc>',
    ]


def _legend(
    chart_id: str, series: Sequence[Series], x: float, y: float, width: float
) -> tuple[list[str], float]:
    """Swatches with names, wrapped to ``width``; returns the elements and the height used."""
    parts, left, top = [], x, y
    for index, one in enumerate(series):
        item = 34 + 8 * len(one.name)  # swatch, gap, ~8 px a character at 12 px
        if left + item > x + width and left > x:
            left, top = x, top + 18
        parts.append(
            f'<g class="legend-item"><rect x="{left:.0f}" y="{top:.0f}" width="14" height="14" '
            f'fill="{_fill(chart_id, index, one)}" stroke="#333" stroke-width="0.5"/>'
            f'<text x="{left + 19:.0f}" y="{top + 11:.0f}">{escape(one.name)}</text></g>'
        )
        left += item
    return parts, top - y + 18


def stacked_columns(
    chart_id: str,
    title: str,
    description: str,
    categories: Sequence[str],
    series: Sequence[Series],
    measure: str,
    width: int = 880,
    plot_height: int = 260,
) -> str:
    """Columns over time (one per category), each stacked from its series, with a y axis in
    ``measure`` and every few category labels on the x axis."""
    left, right, top = 72, 16, 12
    plot_width = width - left - right
    totals = [sum(one.values[i] for one in series) for i in range(len(categories))]
    ticks = nice_ticks(max(totals, default=0.0))
    top_value = ticks[-1]
    slot = plot_width / max(len(categories), 1)
    column = min(max(slot * 0.72, 1.0), MAX_COLUMN_PX)
    bottom = top + plot_height
    legend, legend_height = _legend(chart_id, series, left, bottom + 40, plot_width)
    height = int(bottom + 40 + legend_height + 8)
    out = _open(chart_id, width, height, title, description)
    out.append(_defs(chart_id, series))
    for tick in ticks:
        y = bottom - plot_height * tick / top_value
        out.append(f'<line x1="{left}" x2="{left + plot_width}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{format_amount(tick)}</text>')
    out.append(
        f'<text transform="translate(14 {top + plot_height / 2:.0f}) rotate(-90)" '
        f'text-anchor="middle">{escape(measure)}</text>'
    )
    label_every = max(1, math.ceil(len(categories) / 8))
    for i, category in enumerate(categories):
        x = left + i * slot + (slot - column) / 2
        y = float(bottom)
        for index, one in enumerate(series):
            value = one.values[i]
            if value <= 0:
                continue
            bar = plot_height * value / top_value
            y -= bar
            out.append(_bar(chart_id, index, one, (x, y, column, bar), category, value, measure))
        if i % label_every == 0:
            out.append(
                f'<text x="{x + column / 2:.1f}" y="{bottom + 16}" text-anchor="middle">'
                f"{escape(category)}</text>"
            )
    out.append(f'<line x1="{left}" x2="{left + plot_width}" y1="{bottom}" y2="{bottom}" stroke="#333"/>')
    out += legend
    out.append("</svg>")
    return "\n".join(out)


def stacked_bars(
    chart_id: str,
    title: str,
    description: str,
    labels: Sequence[str],
    series: Sequence[Series],
    measure: str,
    width: int = 880,
) -> str:
    """Horizontal bars (one per label), each stacked from its series, the total at the bar's end."""
    label_width, bar_height, right = 330, 22, 70
    plot_width = width - label_width - right
    totals = [sum(one.values[i] for one in series) for i in range(len(labels))]
    largest = max(totals, default=0.0) or 1.0
    plot_height = bar_height * len(labels)
    legend, legend_height = _legend(chart_id, series, label_width, plot_height + 10, plot_width + right)
    height = int(plot_height + 10 + legend_height + 6)
    out = _open(chart_id, width, height, title, description)
    out.append(_defs(chart_id, series))
    for i, label in enumerate(labels):
        y = i * bar_height
        shown = label if len(label) <= 46 else label[:45] + "…"
        out.append(f'<text x="{label_width - 8}" y="{y + 15}" text-anchor="end">{escape(shown)}</text>')
        x = float(label_width)
        for index, one in enumerate(series):
            value = one.values[i]
            if value <= 0:
                continue
            bar = plot_width * value / largest
            out.append(_bar(chart_id, index, one, (x, y + 3, bar, bar_height - 6), label, value, measure))
            x += bar
        out.append(f'<text x="{x + 6:.1f}" y="{y + 15}">{format_amount(totals[i])}</text>')
    out += legend
    out.append("</svg>")
    return "\n".join(out)
