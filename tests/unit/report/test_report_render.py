"""Table, CSV, JSON and HTML carry the same numbers; the HTML is self-contained."""

from __future__ import annotations

import csv
import io
import json
import xml.etree.ElementTree as ElementTree

from kubemeter.report.compute import Dimension, build_report
from kubemeter.report.html import Page, to_html
from kubemeter.report.pricing import Pricing
from kubemeter.report.render import to_csv, to_json, to_table
from kubemeter.report.usage import UsageRow

USAGE = [
    UsageRow("team-a", "gpu-seconds", "gpu-seconds", "a", "NVIDIA-H200", "2026-11-01", 7200, 2, 0),
    UsageRow("team-a", "cpu-core-seconds", "core-seconds", "a", "", "2026-11-01", 3600, 2, 0),
    UsageRow("team-<b>", "gpu-seconds", "gpu-seconds", "b", "NVIDIA-H200", "2026-11-01", 1800, 1, 1),
]
PRICING = Pricing(unit_prices={"GPU-hours": 2.0, "core-hours": 0.5})


def test_table_has_a_row_per_customer_a_total_and_the_incomplete_note() -> None:
    text = to_table(build_report(USAGE, [Dimension.SUBJECT], PRICING))
    lines = text.splitlines()
    assert lines[0].split() == ["subject", "GPU-hours", "core-hours", "cost", "(USD)"]
    assert lines[2].split() == ["team-<b>", "0.500", "0.000", "1.00"]
    assert lines[3].split() == ["team-a", "2.000", "1.000", "4.50"]
    assert lines[5].split() == ["total", "2.500", "1.000", "5.50"]
    assert "1 event(s) are flagged complete=false" in text


def test_csv_keeps_full_precision_and_the_same_totals() -> None:
    rows = list(csv.DictReader(io.StringIO(to_csv(build_report(USAGE, [Dimension.SUBJECT], PRICING)))))
    assert [r["subject"] for r in rows] == ["team-<b>", "team-a", "total"]
    assert float(rows[-1]["cost (USD)"]) == 5.5
    assert float(rows[1]["gpu-seconds (GPU-hours)"]) == 2.0
    assert rows[-1]["incomplete_events"] == "1"


def test_json_rows_and_total() -> None:
    document = json.loads(to_json(build_report(USAGE, [Dimension.SUBJECT], PRICING), {"source": "x"}))
    assert document["source"] == "x" and document["groupBy"] == ["subject"]
    assert document["total"]["cost"] == 5.5
    team_a = next(r for r in document["rows"] if r["subject"] == "team-a")
    assert team_a["quantities"]["gpu-seconds"] == {"unit": "GPU-hours", "value": 2.0}


def page_for(usage: list[UsageRow], pricing: Pricing, bucket_s: int = 3600) -> str:
    report = build_report(usage, [Dimension.SUBJECT], pricing)
    page = Page.of(usage, bucket_s, pricing)
    return to_html(report, "chargeback", ["source: x"], page)


def svgs(page: str) -> dict[str, ElementTree.Element]:
    charts = {}
    rest = page
    while "<svg" in rest:
        svg = rest[rest.index("<svg") : rest.index("</svg>") + len("</svg>")]
        rest = rest[rest.index("</svg>") + len("</svg>") :]
        tree = ElementTree.fromstring(svg)  # well-formed XML
        charts[tree.get("id", "")] = tree
    return charts


def bars(tree: ElementTree.Element) -> list[ElementTree.Element]:
    return [e for e in tree.iter() if e.tag.endswith("rect") and e.get("class") == "bar"]


def timed(subject: str, gpu_seconds: float, bucket: str, incomplete: int = 0, reason: str = "") -> UsageRow:
    """H200 GPU-seconds in the hour starting at ``bucket`` on 2026-11-01."""
    return UsageRow(
        subject,
        "gpu-seconds",
        "gpu-seconds",
        "ns",
        "NVIDIA-H200",
        "2026-11-01",
        gpu_seconds,
        1,
        incomplete,
        bucket_start=f"2026-11-01T{bucket}:00Z",
        incomplete_reason=reason,
    )


TIMED = [
    timed("team-a", 7200, "10:00"),
    timed("team-a", 3600, "12:00"),
    timed("team-<b>", 1800, "10:00", incomplete=1, reason="pod watch down"),
    timed("platform-idle", 3600, "11:00"),
]


def test_html_is_self_contained_and_escapes_tenant_text() -> None:
    page = page_for(TIMED, PRICING)
    assert "<script" not in page and "<link" not in page and "@import" not in page and "url(http" not in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in page
    assert "team-&lt;b&gt;" in page and "team-<b>" not in page


def test_timeline_stacks_each_customer_per_bucket_with_idle_last() -> None:
    charts = svgs(page_for(TIMED, PRICING))
    timeline = charts["timeline"]
    titles = [bar.find("{http://www.w3.org/2000/svg}title").text for bar in bars(timeline)]  # type: ignore[union-attr]
    # 10:00 team-a 2 GPU-h x 2 = 4.00 and team-<b> 0.5 x 2 = 1.00; 11:00 idle 2.00; 12:00 team-a 2.00
    assert titles == [
        "11-01 10:00, team-a: 4 cost (USD)",
        "11-01 10:00, team-<b>: 1 cost (USD)",
        "11-01 11:00, idle capacity: 2 cost (USD)",
        "11-01 12:00, team-a: 2 cost (USD)",
    ]
    heights = [float(bar.get("height", "0")) for bar in bars(timeline)]
    assert heights[0] == 4 * heights[1] and heights[2] == heights[3] == 2 * heights[1]


def test_every_chart_has_a_title_a_description_and_is_labelled_by_them() -> None:
    for chart_id, tree in svgs(page_for(TIMED, PRICING)).items():
        assert tree.get("role") == "img"
        assert tree.get("aria-labelledby") == f"{chart_id}-title {chart_id}-desc"
        ns = "{http://www.w3.org/2000/svg}"
        assert (tree.find(f"{ns}title").text or "").strip()  # type: ignore[union-attr]
        assert "in all" in (tree.find(f"{ns}desc").text or "") or chart_id == "breakdown"  # type: ignore[union-attr]
        # series differ by pattern as well as colour, so they stay apart in greyscale
        patterns = [e for e in tree.iter() if e.tag.endswith("pattern")]
        overlays = {
            b"".join(ElementTree.tostring(child) for child in list(pattern)[1:]) for pattern in patterns
        }
        assert len(overlays) == len(patterns), chart_id


def test_breakdown_by_meter_and_gpu_model_and_the_idle_row() -> None:
    page = page_for(TIMED, PRICING)
    breakdown = svgs(page)["breakdown"]
    assert len(bars(breakdown)) == 3  # one resource, stacked: team-a, team-<b>, idle
    assert "<tr class=idle><td>idle capacity</td><td class=num>1.000</td>" in page
    assert "<tr class=idle><td>capacity</td><td class=num>4.500</td>" in page


def test_incomplete_windows_are_listed_with_their_reason() -> None:
    page = page_for(TIMED, PRICING)
    assert "<td>team-&lt;b&gt;</td><td>gpu-seconds</td><td>pod watch down</td><td class=num>1</td>" in page


def test_without_prices_the_chart_shows_one_meters_quantity_and_says_so() -> None:
    page = page_for(TIMED, Pricing())
    assert "No prices given: the chart shows GPU-hours" in page
    assert "breakdown" not in svgs(page)  # different units cannot share an axis: table only
