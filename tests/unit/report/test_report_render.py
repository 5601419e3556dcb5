"""Table, CSV, JSON and HTML carry the same numbers; the HTML is self-contained."""

from __future__ import annotations

import csv
import io
import json
import xml.etree.ElementTree as ElementTree

from kubemeter.report.compute import Dimension, build_report
from kubemeter.report.html import to_html
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


def test_html_is_self_contained_escaped_and_has_an_svg_chart() -> None:
    page = to_html(build_report(USAGE, [Dimension.SUBJECT], PRICING), "chargeback", ["source: x"])
    assert "<script" not in page and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in page
    assert "team-&lt;b&gt;" in page and "team-<b>" not in page
    svg = page[page.index("<svg") : page.index("</svg>") + len("</svg>")]
    tree = ElementTree.fromstring(svg)  # well-formed
    bars = [e for e in tree.iter() if e.tag.endswith("rect") and e.get("height") != "12"]
    assert len(bars) == 3  # team-a GPU + CPU, team-<b> GPU


def test_html_charts_quantities_when_nothing_is_priced() -> None:
    page = to_html(build_report(USAGE, [Dimension.SUBJECT], Pricing()), "t", [])
    assert "(no prices given)" in page
